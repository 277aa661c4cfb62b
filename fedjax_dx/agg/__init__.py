"""Aggregation stages of the federated round, composed with `chain` (optax style).

Each stage lives in its own module and is split across the wire: `encode` runs on each
client (vmapped), `decode` on the server on the sum. `chain` composes them and checks
the ordering rules.

Example:
  >>> from fedjax_dx import agg
  >>> private = agg.chain(agg.clip(1.0), agg.mean(weighting="uniform"),
  ...                     agg.gaussian(1.1))
  >>> robust = agg.chain(agg.guard(10.0), agg.median())
"""

from fedjax_dx.agg._canary import Canaries, canaries, canary_directions
from fedjax_dx.agg._clip import Clip, clip
from fedjax_dx.agg._compress import Compress, quantize, top_k
from fedjax_dx.agg._gaussian import Gaussian, adaptive_update_noise, gaussian
from fedjax_dx.agg._guard import FiniteGuard, Guard, guard
from fedjax_dx.agg._mean import WEIGHTINGS, Mean, mean
from fedjax_dx.agg._robust import Krum, Median, TrimmedMean, krum, median, trimmed_mean
from fedjax_dx.agg._secure_sum import SecureSum, choose_share, secure_sum
from fedjax_dx.agg._stage import Chain, Reducer, Screen, Stage, chain

__all__ = [
    "Canaries", "Chain", "Clip", "Compress", "FiniteGuard", "Gaussian", "Guard", "Krum",
    "Mean", "Median", "Reducer", "Screen", "SecureSum", "Stage", "TrimmedMean", "WEIGHTINGS",
    "adaptive_update_noise", "canaries", "canary_directions", "chain", "choose_share", "clip", "gaussian", "guard", "krum",
    "mean", "median", "quantize", "secure_sum", "top_k", "trimmed_mean",
]
