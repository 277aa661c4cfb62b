"""Client sampling: which clients take part in each round (a participation mask)."""

from __future__ import annotations

import numpy as np

SAMPLINGS = ("uniform", "size", "poisson")


def sample_participation(seed: int, num_rounds: int, num_examples, clients_per_round: int,
                         *, by: str = "uniform") -> np.ndarray:
  """Draws the clients of each round.

  Args:
    seed: seed of the draw (host-side NumPy; the mask then goes into the compiled run).
    num_rounds: rounds R.
    num_examples: `[C]` client sizes; clients with none are never drawn.
    clients_per_round: clients per round (at most the clients with data); with
      "poisson", the expected number.
    by: "uniform" (a fixed-size cohort drawn without replacement), "size" (probability
      proportional to n_k, without replacement), or "poisson" (each client with data
      independently with probability clients_per_round / clients with data: a
      cohort of variable size, the sampling DP accountants' Poisson events assume).

  Returns:
    `[R, C]` float32 masks: exactly `clients_per_round` ones per row, or with
    "poisson" each row's own count.
  """
  sizes = np.asarray(num_examples)
  eligible = np.flatnonzero(sizes > 0)
  if by not in SAMPLINGS:
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {by!r}")
  if not 1 <= clients_per_round <= len(eligible):
    raise ValueError(
        f"clients_per_round={clients_per_round}: cannot sample more clients than exist "
        f"({len(eligible)} with data) or fewer than 1")
  rng = np.random.default_rng(seed)
  mask = np.zeros((num_rounds, len(sizes)), np.float32)
  if by == "poisson":
    rate = clients_per_round / len(eligible)
    mask[:, eligible] = rng.random((num_rounds, len(eligible))) < rate
    return mask
  p = sizes[eligible] / sizes[eligible].sum() if by == "size" else None
  for r in range(num_rounds):
    mask[r, rng.choice(eligible, clients_per_round, replace=False, p=p)] = 1.0
  return mask
