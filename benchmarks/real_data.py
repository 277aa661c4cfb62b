r"""Federated training on the real data sets: Fed-Heart-Disease and PneumoniaMNIST.

Shows that the core trains on real hospitals' data: test accuracy per client and pooled
against the majority-class rate of each test set (what a constant guess would score).

  python -m benchmarks.real_data                      # heart disease (offline copy)
  python -m benchmarks.real_data --dataset=pneumoniamnist --raw_dir=DIR_WITH_NPZ
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax

import fedjax_dx as fdx
import fedjax_dx.datasets as ds

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "heart_disease", ["heart_disease", *ds.MEDMNIST_SUBSETS],
                  "Data set.")
flags.DEFINE_string("raw_dir", None, "Directory holding the raw files (else: offline copy "
                    "for heart disease, download for MedMNIST).")
flags.DEFINE_string("data_dir", None, "Where prepared TFDS data sets live.")
flags.DEFINE_integer("clients", 10, "MedMNIST: hospitals to split the data into.",
                     lower_bound=1)
flags.DEFINE_float("alpha", 0.5, "MedMNIST: Dirichlet label-skew alpha.", lower_bound=0)
flags.DEFINE_integer("rounds", 30, "Federated rounds.", lower_bound=1)
flags.DEFINE_integer("local_steps", 20, "Local steps per round.", lower_bound=1)
flags.DEFINE_integer("batch_size", 4, "Local batch size (MedMNIST default: 32).",
                     lower_bound=1)
flags.DEFINE_float("learning_rate", 0.05, "Client SGD learning rate.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed.")


def majority_rate(labels, num_examples, num_classes):
  values = np.asarray(labels)[np.arange(labels.shape[1])[None, :] <
                              np.asarray(num_examples)[:, None]]
  return np.bincount(values, minlength=num_classes).max() / len(values)


def main(argv):
  del argv
  start = time.perf_counter()
  if FLAGS.dataset == "heart_disease":
    data = ds.heart_disease(raw_dir=FLAGS.raw_dir, data_dir=FLAGS.data_dir)
    model = fdx.logistic_regression()
    batch = FLAGS.batch_size
    names = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
  else:
    data = ds.medmnist(FLAGS.dataset, FLAGS.clients, partition="dirichlet",
                       alpha=FLAGS.alpha, seed=FLAGS.seed, raw_dir=FLAGS.raw_dir,
                       data_dir=FLAGS.data_dir)
    model = fdx.cnn(num_classes=data.num_classes, channels=(8, 16), dense=32)
    batch = FLAGS.batch_size if FLAGS["batch_size"].present else 32
    names = [f"client {k}" for k in range(data.num_clients)]
  key = jax.random.PRNGKey(FLAGS.seed)
  params = model.init(key, data.train.features[0, :1])
  algo = fdx.fedavg(model, optax.sgd(FLAGS.learning_rate), batch_size=batch,
                    local_steps=FLAGS.local_steps)
  state = algo.init(params, data.train, key)
  state, metrics = algo.run(state, data.train, num_rounds=FLAGS.rounds)
  result = fdx.evaluate(model, state.params, data.test)
  train_s = time.perf_counter() - start
  print(f"\n{FLAGS.dataset}: {data.num_clients} clients, train sizes "
        f"{np.asarray(data.train.num_examples).tolist()}; FedAvg {FLAGS.rounds} rounds x "
        f"{FLAGS.local_steps} steps, batch {batch}, SGD lr {FLAGS.learning_rate}; "
        f"final train loss {float(metrics['train_loss'][-1]):.3f}; {train_s:.1f} s")
  print(f"{'test set':<16}{'n':>6}{'accuracy':>10}{'majority':>10}{'AUC':>8}")
  for k, name in enumerate(names):
    n = int(data.test.num_examples[k])
    majority = majority_rate(data.test.labels[k:k + 1], data.test.num_examples[k:k + 1],
                             data.num_classes)
    print(f"{name:<16}{n:>6}{float(result['clients']['accuracy'][k]):>10.3f}"
          f"{majority:>10.3f}{float(result['clients']['auc'][k]):>8.3f}")
  pooled_majority = majority_rate(data.test.labels, data.test.num_examples,
                                  data.num_classes)
  print(f"{'pooled':<16}{int(np.sum(data.test.num_examples)):>6}"
        f"{float(result['pooled']['accuracy']):>10.3f}{pooled_majority:>10.3f}"
        f"{float(result['pooled']['auc']):>8.3f}")


if __name__ == "__main__":
  app.run(main)
