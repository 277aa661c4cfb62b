"""The FedProx paper's synthetic experiment (Li et al., MLSys 2020, Figure 1).

  python -m benchmarks.run --config=configs/fedprox_synthetic.py \\
      --workdir=results/fedprox_synthetic

Synthetic(0,0), Synthetic(0.5,0.5), Synthetic(1,1): multinomial logistic regression
(60 -> 10), 30 devices, 10 sampled per round with probability proportional to their
data, lr 0.01, batch 10, E = 20 local epochs, 200 rounds; FedAvg against FedProx with
mu = 1, with 0%, 50% and 90% stragglers (a straggler runs 1 .. E-1 epochs; FedAvg drops
it, FedProx keeps its partial work). Device sizes follow the paper's lognormal recipe,
capped at `dataset.max_examples`.
"""

import ml_collections

from fedjax_dx.configs import heart_disease


def get_config() -> ml_collections.ConfigDict:
  config = heart_disease.get_config()
  config.name = "fedprox_synthetic"
  config.methods = "fedavg,fedprox"
  config.dataset.name = "fedprox"
  config.dataset.num_clients = 30
  config.dataset.max_examples = 2000
  config.model.name = "logistic_regression"  # 10 classes: multinomial
  config.optimizer = "sgd"
  config.learning_rate = 0.01
  config.batch_size = 10
  config.local_steps = 0
  config.local_epochs = 20
  config.rounds = 200
  config.eval_every = 20
  config.clients_per_round = 10
  config.sampling = "size"
  config.mu = 1.0
  config.straggler_policy = "paper"  # fedavg drops stragglers, fedprox keeps them
  config.sweep = ("dataset.fedprox_alpha+dataset.fedprox_beta=0/0,0.5/0.5,1/1;"
                  "stragglers=0,0.5,0.9")
  config.num_seeds = 1
  config.seed = 0
  config.fast_compile = False
  # 30 clients of up to 2,000 examples, 10 classes: metrics at level 0 ran slower
  # (this sweep 346 -> 407 s) than they compile at full optimisation
  config.fast_compile_metrics = False
  config.target_metric = "accuracy"
  config.target_value = 0.6
  return config
