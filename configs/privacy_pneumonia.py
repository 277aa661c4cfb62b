"""Privacy versus utility on PneumoniaMNIST split into 10 hospitals: example-level DP-SGD.

  python -m benchmarks.run --config=configs/privacy_pneumonia.py \
      --workdir=results/privacy_pneumonia --config.dataset.raw_dir=DIR_WITH_NPZ

Each hospital protects its own patients: every local step clips each chest X-ray's
gradient to `dp_clip` and adds Gaussian noise (DP-SGD inside the vmapped round), and
dp-accounting's RDP accountant turns the steps each hospital takes (sampling rate
batch / n_k) into epsilon; the noise is chosen so that the worst hospital spends exactly
`dp_target_epsilon` at delta 1e-5. With only 10 hospitals, client-level DP would need
noise far larger than the averaged update, so example level is the setting that can
work here. The sweep's first point is FedAvg without DP; centralized training is the
other reference line of `privacy_utility.png`; the membership-inference audit (plain
and calibrated) runs on every final model.
"""

import ml_collections

from fedjax_dx.configs import heart_disease


def get_config():
  config = heart_disease.get_config()
  config.name = "privacy_pneumonia"
  config.methods = "fedavg,centralized"
  config.dataset.name = "medmnist"
  config.dataset.subset = "pneumoniamnist"
  config.dataset.num_clients = 10
  config.dataset.partition = "dirichlet"
  config.dataset.alpha = 1.0
  config.model.name = "cnn"
  config.model.channels = "8,16"
  config.model.dense = 32
  config.fast_compile_metrics = False  # thousands of images: metrics at full speed
  # DP-SGD wants plain SGD (Adam rescales the noise per coordinate: at lr 0.001 it kept
  # every private run at the majority class); centralized training is not private and
  # trains with Adam (SGD with momentum diverged on the pooled data).
  config.optimizer = "sgd"
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.per_method = ml_collections.ConfigDict(
      {"centralized": {"optimizer": "adam", "learning_rate": 0.001, "momentum": 0.0}})
  config.batch_size = 32
  config.local_steps = 0
  config.local_epochs = 1
  config.rounds = 10
  config.eval_every = 5
  config.num_seeds = 3
  config.dp_clip = 1.0
  config.dp_delta = 1e-5
  config.dp_accountant = "rdp"
  config.sweep = "dp+dp_target_epsilon=none/0,example/1,example/4,example/16"
  config.target_value = 0.8
  return config
