r"""The main job until the harness lands: federated versus centralized versus local-only.

Eight synthetic hospitals of unequal size and shifted case mix (no download needed)
train a logistic-regression diagnosis model three ways, in the same engine and with the
same budget per round: FedAvg, centralized (all records pooled) and each hospital alone.
Prints a table of test metrics per hospital and on the pooled test set.

  python -m benchmarks.quickstart [--rounds=40] [--clients=8] [--seed=0]
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import numpy as np
import optax

import fedjax_dx as fdx

FLAGS = flags.FLAGS
flags.DEFINE_integer("clients", 8, "Number of simulated hospitals.", lower_bound=1)
flags.DEFINE_integer("rounds", 40, "Communication rounds.", lower_bound=1)
flags.DEFINE_integer("eval_every", 10, "Rounds per compiled call between evaluations.",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of data, initialisation and data order.")
flags.DEFINE_float("heterogeneity", 0.8, "Scale of the per-hospital shifts.", lower_bound=0)
flags.DEFINE_float("learning_rate", 0.1, "Client learning rate (SGD).", lower_bound=0)
flags.DEFINE_integer("batch_size", 16, "Local batch size.", lower_bound=1)


def run_method(algorithm, params, train, rng, rounds, eval_every):
  state = algorithm.init(params, train, rng)
  done, history = 0, []
  while done < rounds:
    chunk = min(eval_every, rounds - done)
    state, metrics = algorithm.run(state, train, num_rounds=chunk)
    done += chunk
    history.append((done, float(metrics["train_loss"][-1])))
  jax.block_until_ready(state)
  return state, history


def main(argv):
  del argv
  start = time.perf_counter()
  rng = np.random.default_rng(FLAGS.seed)
  sizes = rng.integers(40, 400, FLAGS.clients)
  data = fdx.synthetic_binary(FLAGS.seed, FLAGS.clients, sizes,
                              heterogeneity=FLAGS.heterogeneity)
  model = fdx.logistic_regression()
  key = jax.random.PRNGKey(FLAGS.seed)
  params = model.init(key, data.train.features[0, :1])
  opt = optax.sgd(FLAGS.learning_rate)
  budget = dict(batch_size=FLAGS.batch_size, local_epochs=1)
  pooled_train = fdx.pool_clients(data.train)

  rows = {}
  fed = fdx.fedavg(model, opt, **budget)
  state, fed_history = run_method(fed, params, data.train, key, FLAGS.rounds,
                                  FLAGS.eval_every)
  rows["fedavg"] = fdx.evaluate(model, state.params, data.test)
  central = fdx.centralized(model, opt, **budget)
  state, _ = run_method(central, params, pooled_train, key, FLAGS.rounds, FLAGS.eval_every)
  rows["centralized"] = fdx.evaluate(model, fdx.global_params(state), data.test)
  local = fdx.local_only(model, opt, **budget)
  state, _ = run_method(local, params, data.train, key, FLAGS.rounds, FLAGS.eval_every)
  local_eval = fdx.evaluate_stacked(model, state.params, data.test)

  print(f"\n{FLAGS.clients} synthetic hospitals, {int(np.sum(data.train.num_examples))} "
        f"training and {int(np.sum(data.test.num_examples))} test patients; "
        f"{FLAGS.rounds} rounds of 1 local epoch, batch {FLAGS.batch_size}, "
        f"SGD lr {FLAGS.learning_rate}; device {jax.devices()[0].platform}")
  print("FedAvg training loss by round: " +
        ", ".join(f"{r}: {loss:.3f}" for r, loss in fed_history))
  header = f"{'test set':<12}{'n':>5}  " + "  ".join(
      f"{m:>22}" for m in ("accuracy fed/cen/loc", "AUC fed/cen/loc"))
  print("\n" + header)
  test_sizes = np.asarray(data.test.num_examples)
  for k in range(FLAGS.clients):
    cells = []
    for metric in ("accuracy", "auc"):
      fed_v = float(rows["fedavg"]["clients"][metric][k])
      cen_v = float(rows["centralized"]["clients"][metric][k])
      loc_v = float(local_eval["clients"][metric][k, k])  # hospital k's own model
      cells.append(f"{fed_v:>6.3f} {cen_v:>6.3f} {loc_v:>7.3f}")
    print(f"{'hospital ' + str(k):<12}{test_sizes[k]:>5}  " + "  ".join(
        f"{c:>22}" for c in cells))
  cells = []
  for metric in ("accuracy", "auc"):
    fed_v = float(rows["fedavg"]["pooled"][metric])
    cen_v = float(rows["centralized"]["pooled"][metric])
    loc_v = float(np.nanmean(local_eval["pooled"][metric]))  # mean over local models
    cells.append(f"{fed_v:>6.3f} {cen_v:>6.3f} {loc_v:>7.3f}")
  print(f"{'pooled':<12}{int(test_sizes.sum()):>5}  " + "  ".join(f"{c:>22}" for c in cells))
  print("\nloc = each hospital's own model on its own test set; on the pooled row, the mean "
        "over the hospitals' models.")
  print(f"done in {time.perf_counter() - start:.1f} s (compile included)")


if __name__ == "__main__":
  app.run(main)
