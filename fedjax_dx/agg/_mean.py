"""The weighting of the round: how much each client's update counts in the mean."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from fedjax_dx.agg._stage import Stage

WEIGHTINGS = ("num_examples", "uniform")


@dataclasses.dataclass(frozen=True)
class Mean(Stage):
  """Weighted mean of the updates (FedAvg); see `mean`."""

  weighting: str = "num_examples"  # "num_examples" (n_k) or "uniform"
  expected_clients: int | None = None  # fixed denominator (DP), None: the actual total

  name: ClassVar[str] = "mean"
  is_weighting: ClassVar[bool] = True

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
    if self.expected_clients is not None and self.expected_clients < 1:
      raise ValueError(f"dp_expected_clients must be >= 1, got "
                       f"{self.expected_clients!r}")

  def weights(self, sizes, participation, dropped):
    """`(raw_weights [C], total, denominator)`: `p_k n_k` (or `p_k`), 0 for dropped."""
    sizes = sizes.astype(jnp.float32)
    base = (sizes if self.weighting == "num_examples"
            else (sizes > 0).astype(jnp.float32))
    raw_weights = jnp.where(dropped, 0.0, participation * base)
    total = raw_weights.sum()
    denominator = total if self.expected_clients is None else float(
        self.expected_clients)
    return raw_weights, total, denominator


def mean(weighting: str = "num_examples", expected_clients: int | None = None) -> Mean:
  """The weighted mean of the clients' updates.

  Args:
    weighting: "num_examples" (client k counts `n_k`, FedAvg) or "uniform" (every
      participant alike; what client-level differential privacy needs).
    expected_clients: divide the weighted sum by this fixed number (the expected
      participants of a DP round) instead of the actual total weight.

  Returns:
    A stage; where a chain has none, `mean()` applies.
  """
  if isinstance(expected_clients, np.integer):
    expected_clients = int(expected_clients)
  return Mean(weighting, expected_clients)
