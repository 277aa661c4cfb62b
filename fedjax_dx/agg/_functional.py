"""Aggregators: how the server combines client updates `delta_k = w_k - w`.

Each takes `deltas` (a pytree with a leading clients axis `[C, ...]`) and `weights` `[C]`
(normalised to sum 1 over the participants, 0 for clients that did not take part) and
returns one update. The robust ones ignore the magnitudes of the weights and treat every
participant alike, as their papers do.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Aggregator = Callable[[Any, jax.Array], Any]
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")


def weighted_mean(deltas, weights):
  """FedAvg: `sum_k weights_k delta_k`."""
  return jax.tree.map(lambda d: jnp.tensordot(weights, d, axes=1), deltas)


def coordinate_median(deltas, weights):
  """Coordinate-wise median over participants (Yin et al., 2018)."""
  taking_part = weights > 0

  def median(d):
    mask = taking_part.reshape((-1,) + (1,) * (d.ndim - 1))
    return jnp.nanmedian(jnp.where(mask, d, jnp.nan), axis=0)

  return jax.tree.map(median, deltas)


def trimmed_mean(trim_fraction: float) -> Aggregator:
  """Coordinate-wise mean after dropping `floor(trim_fraction * m)` values at each end
  (m participants), like `scipy.stats.trim_mean`."""
  if not 0 <= trim_fraction < 0.5:
    raise ValueError(f"trim_fraction must lie in [0, 0.5), got {trim_fraction!r}")

  def aggregate(deltas, weights):
    taking_part = weights > 0
    m = taking_part.sum()
    t = jnp.floor(trim_fraction * m).astype(jnp.int32)

    def trimmed(d):
      mask = taking_part.reshape((-1,) + (1,) * (d.ndim - 1))
      ordered = jnp.sort(jnp.where(mask, d, jnp.inf), axis=0)
      rank = jnp.arange(d.shape[0]).reshape(mask.shape)
      keep = (rank >= t) & (rank < m - t)
      return jnp.where(keep, ordered, 0.0).sum(0) / jnp.maximum(m - 2 * t, 1)

    return jax.tree.map(trimmed, deltas)

  return aggregate


def krum(num_byzantine: int, num_selected: int = 1) -> Aggregator:
  """(Multi-)Krum (Blanchard et al., 2017): average the `num_selected` updates whose
  `m - f - 2` nearest participants are closest (f = `num_byzantine`).

  Needs at least `2 f + 3` participants each round (checked by `run`).
  """
  if num_byzantine < 0 or num_selected < 1:
    raise ValueError(f"krum needs num_byzantine >= 0 and num_selected >= 1, got "
                     f"{num_byzantine}, {num_selected}")

  def aggregate(deltas, weights):
    taking_part = weights > 0
    flat = jnp.concatenate(
        [d.reshape(d.shape[0], -1) for d in jax.tree.leaves(deltas)], axis=1)
    sq = (flat ** 2).sum(1)
    distances = sq[:, None] + sq[None, :] - 2 * flat @ flat.T
    c = flat.shape[0]
    valid = taking_part[:, None] & taking_part[None, :] & ~jnp.eye(c, dtype=bool)
    distances = jnp.where(valid, jnp.maximum(distances, 0.0), jnp.inf)
    m = taking_part.sum()
    closest = m - num_byzantine - 2
    nearest = jnp.sort(distances, axis=1)
    scores = jnp.where(jnp.arange(c)[None, :] < closest, nearest, 0.0).sum(1)
    scores = jnp.where(taking_part, scores, jnp.inf)
    chosen = jnp.argsort(scores)[:num_selected]
    pick = jnp.zeros(c).at[chosen].set(1.0 / num_selected)
    return weighted_mean(deltas, pick)

  aggregate.min_participants = 2 * num_byzantine + 3
  return aggregate


def make_aggregator(name: str = "mean", *, trim_fraction: float = 0.1,
                    num_byzantine: int = 1, num_selected: int = 1) -> Aggregator:
  """An aggregator by name: "mean", "median", "trimmed_mean" or "krum"."""
  if name == "mean":
    return weighted_mean
  if name == "median":
    return coordinate_median
  if name == "trimmed_mean":
    return trimmed_mean(trim_fraction)
  if name == "krum":
    return krum(num_byzantine, num_selected)
  raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {name!r}")
