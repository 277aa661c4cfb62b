r"""The privacy audit: an empirical epsilon beside the accountant's, across noise levels.

  fedjax-dx run --config=privacy_audit --workdir=results/privacy_audit
  fedjax-dx run --config=privacy_audit:pneumonia --workdir=results/privacy_audit_xray \
      --config.dataset.raw_dir=path/with/pneumoniamnist.npz

DP-FedAvg (central client-level DP, clipping 1.0) at noise multipliers 0 .. 8, each run
with 100 canary clients inserted, each in with probability 1/2 (Steinke, Nasr &
Jagielski 2023, one run): a canary uploads the clipping norm along a direction of its
own, and the adversary scores it by the final model's move along that direction.
jax-privacy's CanaryScoreAuditor turns the scores into `epsilon_lower` (95%
confidence); the accountant's `epsilon` is the upper bound. Noise 0 shows that the
audit detects leakage (its epsilon is infinite); large noise leaves it near 0.
Needs jax-privacy (pip install 'fedjax_dx[audit]', Python >= 3.11).

Default: Fed-Heart-Disease (4 hospitals) with an MLP (13 -> 64 -> 1: more parameters
than canaries, so their directions are orthogonal). `:heart_example`: example-level
DP-SGD (Poisson batches of 8) with 100 canary *examples* in the hospitals' rows, whose
gradients DP-SGD crafts. `:pneumonia`: PneumoniaMNIST in 10 Dirichlet hospitals with the
CNN.
"""

from fedjax_dx.configs import heart_disease


def get_config(variant: str = "heart"):
  config = heart_disease.get_config()
  config.name = f"privacy_audit_{variant}"
  config.methods = "fedavg"
  config.dp = "central"
  config.dp_clip = 1.0
  config.privacy_audit = True
  config.audit_canaries = 100
  config.model.name = "mlp"
  config.model.hidden = "64"
  config.rounds = 30
  config.eval_every = 30
  config.num_seeds = 3
  config.membership_audit = False
  config.bootstrap_resamples = 0
  config.sweep = "dp_noise=0,0.5,1,2,4,8"
  if variant == "pneumonia":
    config.dataset.name = "medmnist"
    config.dataset.subset = "pneumoniamnist"
    config.dataset.num_clients = 10
    config.model.name = "cnn"
    config.fast_compile_metrics = False  # thousands of images: metrics at full speed
    config.batch_size = 16
    config.local_steps = 10
    config.rounds = 20
    config.eval_every = 20
  elif variant == "heart_example":  # example-level DP-SGD: canary examples
    config.dp = "example"
    config.batch_size = 8
    config.sweep = "dp_noise=0,0.5,1,2,4"
  elif variant != "heart":
    raise ValueError(f"privacy_audit variants: heart (default), heart_example or "
                     f"pneumonia, got {variant!r}")
  return config
