"""Privacy versus utility on Fed-Heart-Disease: client-level DP-FedAvg at several epsilons.

  python -m benchmarks.run --config=configs/privacy_heart.py --workdir=results/privacy_heart

FedAvg with central client-level DP (each hospital's update clipped to `dp_clip`, Gaussian
noise on the sum, every hospital counts alike), the noise chosen by dp-accounting's RDP
accountant so that the whole run spends exactly `dp_target_epsilon` at delta 1e-5; the
sweep gives accuracy and membership-inference AUC versus epsilon (`privacy_utility.png`),
with non-private FedAvg (the sweep's first point) and centralized training as the
references. With 4 hospitals, all taking part
every round, client-level DP needs a lot of noise: this is the honest picture for
cross-silo studies with few sites.
"""

from fedjax_dx.configs import heart_disease


def get_config():
  config = heart_disease.get_config()
  config.name = "privacy_heart"
  config.methods = "fedavg,centralized"
  config.dp = "central"
  config.dp_clip = 0.5
  config.dp_delta = 1e-5
  config.dp_accountant = "rdp"
  # The first point is FedAvg without DP (the reference line); then central DP at
  # increasing epsilon.
  config.sweep = "dp+dp_target_epsilon=none/0,central/1,central/4,central/16,central/64,central/256"
  config.num_seeds = 5
  return config
