"""Client sampling: which clients take part in each round (a participation mask)."""

from __future__ import annotations

import numpy as np

SAMPLINGS = ("uniform", "size")


def sample_participation(seed: int, num_rounds: int, num_examples, clients_per_round: int,
                         *, by: str = "uniform") -> np.ndarray:
  """Draws `clients_per_round` distinct clients per round.

  Args:
    seed: seed of the draw (host-side NumPy; the mask then goes into the compiled run).
    num_rounds: rounds R.
    num_examples: `[C]` client sizes; clients with none are never drawn.
    clients_per_round: clients per round (at most the clients with data).
    by: "uniform", or "size" (probability proportional to n_k, without replacement).

  Returns:
    `[R, C]` float32 with exactly `clients_per_round` ones per row.
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
  p = sizes[eligible] / sizes[eligible].sum() if by == "size" else None
  mask = np.zeros((num_rounds, len(sizes)), np.float32)
  for r in range(num_rounds):
    mask[r, rng.choice(eligible, clients_per_round, replace=False, p=p)] = 1.0
  return mask
