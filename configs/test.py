"""A tiny study that runs in seconds on CPU (tests, smoke checks)."""

from fedjax_dx.configs import heart_disease


def get_config():
  config = heart_disease.get_config()
  config.name = "test"
  config.dataset.name = "synthetic"
  config.dataset.num_clients = 3
  config.dataset.examples_per_client = 40
  config.rounds = 4
  config.eval_every = 2
  config.local_steps = 3
  config.num_seeds = 2
  config.target_metric = "accuracy"
  config.target_value = 0.5
  config.bootstrap_resamples = 0  # its own test turns it on
  return config
