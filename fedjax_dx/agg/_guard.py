"""A guard against faulty hospitals: drops non-finite or blown-up updates.

Two stages share the name "guard": `Guard` compares each update's norm with the round's
median, so it needs every update at once (a screen, not linear); `FiniteGuard` only drops
updates that are not finite, which each client's own message decides, so it is linear
and runs in chunked and streamed rounds too.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fedjax_dx.agg._stage import Screen
from fedjax_dx.agg._stage import Stage
from fedjax_dx.privacy import _mechanisms


@dataclasses.dataclass(frozen=True)
class Guard(Screen):
  """Zero weight for updates that are not finite or far above the round's median norm."""

  max_norm_ratio: float | None = 10.0  # drop norms > ratio x the round's median; None: off

  name: ClassVar[str] = "guard"

  def __post_init__(self):
    if self.max_norm_ratio is not None and not self.max_norm_ratio >= 1:
      raise ValueError(f"guard max_norm_ratio must be >= 1 (a multiple of the round's "
                       f"median update norm) or None, got {self.max_norm_ratio!r}")

  def screen(self, state, messages, clients, ctx):
    """Keeps the finite updates whose norm is at most `max_norm_ratio` times the
    median norm of the round's finite updates; the others get weight 0 and a zero
    message, and the kept weights are rescaled to the same total (unless the mean has
    a fixed denominator, as under DP)."""
    weights, sending = clients["weight"], clients["sending"]
    norms = jax.vmap(_mechanisms.global_norm)(messages)
    finite = jnp.isfinite(norms)
    keep = finite
    if self.max_norm_ratio is not None:
      candidates = sending & finite
      median = jnp.nanmedian(jnp.where(candidates, norms, jnp.nan))
      keep = keep & ((norms <= self.max_norm_ratio * median) | ~jnp.isfinite(median))
    dropped = sending & ~keep
    kept = jnp.where(keep, weights, 0.0)
    if ctx["expected_clients"] is None:
      kept = kept * (weights.sum() / jnp.where(kept.sum() > 0, kept.sum(), 1.0))
    messages = jax.tree.map(
        lambda m: jnp.where(keep.reshape((-1,) + (1,) * (m.ndim - 1)), m, 0.0), messages)
    return messages, {**clients, "weight": kept, "guarded": dropped}, {
        "guard_dropped": dropped.sum(), "guard_kept": (sending & keep).sum()}


@dataclasses.dataclass(frozen=True)
class FiniteGuard(Stage):
  """Zero weight for updates that are not finite (NaN or Inf); linear, see `guard`."""

  name: ClassVar[str] = "guard"

  def encode(self, state, row, message, client, ctx):
    finite = jnp.isfinite(_mechanisms.global_norm(message))
    dropped = client["sending"] & ~finite
    message = jax.tree.map(lambda m: jnp.where(finite, m, 0.0), message)
    # Later stages (the secure sum) and the round's sum read the zeroed weight.
    return message, row, {"weight": jnp.where(dropped, 0.0, client["weight"]),
                          "guarded": dropped}

  def decode(self, state, total, ctx, clients):
    """Rescales the sum to the kept clients' weighted mean, as `Guard` does by
    rescaling their weights (not under a fixed DP denominator); exact when none was
    dropped."""
    sending = clients["sending"] & clients.get("arrived", True)
    before = jnp.where(sending, clients["raw_weight"] * ctx["scale_weights"], 0.0).sum()
    dropped = clients["guarded"] & sending
    removed = jnp.where(dropped, clients["raw_weight"] * ctx["scale_weights"], 0.0).sum()
    if ctx["expected_clients"] is None:
      kept = before - removed
      # Exactly 1.0 when none was dropped (x * 1.0 == x in IEEE arithmetic).
      factor = jnp.where(dropped.any() & (kept > 0),
                         before / jnp.where(kept > 0, kept, 1.0), 1.0)
      total = jax.tree.map(lambda t: t * factor, total)
    return total, state, {"guard_dropped": dropped.sum(),
                          "guard_kept": (sending & ~clients["guarded"]).sum()}


def guard(max_norm_ratio: float | None = 10.0) -> Guard | FiniteGuard:
  """Drops (zero weight, counted as `guard_dropped`) each update that is not finite,
  or whose L2 norm exceeds `max_norm_ratio` times the median norm of the round's
  finite updates, so a hospital sending NaN/Inf or a blown-up update cannot poison
  the global model. It needs every update of the round (not linear): put it first.

  Args:
    max_norm_ratio: the multiple of the round's median norm above which an update is
      dropped (>= 1); None checks finiteness only, which needs no other client's
      update: then the stage is linear (`FiniteGuard`) and chunked and streamed
      rounds accept it.

  Example:
    >>> robust = agg.chain(agg.guard(10.0), agg.median())
    >>> chunkable = agg.chain(agg.guard(None), agg.mean())  # NaN/Inf only
  """
  if max_norm_ratio is None:
    return FiniteGuard()
  return Guard(max_norm_ratio)
