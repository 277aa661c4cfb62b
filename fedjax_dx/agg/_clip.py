"""Clipping each client's update to an L2 norm, fixed or adaptive (DP-FedAvg)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fedjax_dx.agg._stage import Stage
from fedjax_dx.core import _local
from fedjax_dx.privacy import _mechanisms

COUNT_TAG = 0xD0000005  # fold_in tag of the adaptive count's noise


@dataclasses.dataclass(frozen=True)
class Clip(Stage):
  """Scales each update to norm <= the clipping norm; see `clip`."""

  norm: float  # the clipping norm (adaptive: its initial value)
  quantile: float | None = None  # adaptive clipping's target quantile, None: fixed
  learning_rate: float = 0.2  # adaptive clipping's geometric step
  count_noise: float | None = None  # std of the noise on the unclipped count

  name: ClassVar[str] = "clip"
  is_clip: ClassVar[bool] = True
  needs_unit_weights: ClassVar[bool] = True

  def __post_init__(self):
    if not _traced(self.norm) and not self.norm > 0:
      raise ValueError(f"dp_clip (clipping norm) must be > 0, got {self.norm!r}")
    if self.quantile is not None:
      if not 0 < self.quantile < 1:
        raise ValueError(f"dp_adaptive_quantile must lie in (0, 1), got "
                         f"{self.quantile!r}")
      if not self.learning_rate > 0:
        raise ValueError(f"dp_clip_learning_rate must be > 0, got "
                         f"{self.learning_rate!r}")
      if self.count_noise is not None and not self.count_noise > 0:
        raise ValueError(f"dp_count_noise must be > 0, got {self.count_noise!r}")

  @property
  def adaptive(self) -> bool:
    return self.quantile is not None

  def init(self, params, num_clients):
    return (jnp.asarray(self.norm, jnp.float32) if self.adaptive else None), None

  def statics(self, ctx):
    if not self.adaptive:
      return {"clip_norm": self.norm, "adaptive_count_noise": None}
    count_noise = (self.count_noise if self.count_noise is not None
                   else (ctx["expected_clients"] or ctx["num_clients"]) / 20)
    return {"adaptive_count_noise": count_noise}

  def begin(self, state, ctx):
    return ({"clip_norm": state} if self.adaptive else {}), {}

  def encode(self, state, row, message, client, ctx):
    norm = _mechanisms.global_norm(message)
    clip_norm = ctx["clip_norm"]
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda d: d * scale, message), row, {"clipped": norm > clip_norm}

  def decode(self, state, total, ctx, clients):
    if not self.adaptive:
      return total, state, {}
    # The noised share of unclipped updates moves the norm towards the quantile.
    clip_norm, weight_total = ctx["clip_norm"], ctx["total"]
    count = (clients["sending"] & ~clients["clipped"]).sum().astype(jnp.float32)
    if _local.is_active(ctx.get("noise_multiplier", 0.0)):
      count = count + ctx["adaptive_count_noise"] * jax.random.normal(
          jax.random.fold_in(ctx["noise_key"], COUNT_TAG))
    share = count / jnp.where(weight_total > 0, ctx["denominator"], 1.0)
    new_norm = jnp.where(
        weight_total > 0,
        clip_norm * jnp.exp(-self.learning_rate * (share - self.quantile)), clip_norm)
    return total, new_norm, {"clip_norm": clip_norm}


def _traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def clip(norm: float, *, adaptive_quantile: float | None = None,
         learning_rate: float = 0.2, count_noise: float | None = None) -> Clip:
  """Clips each client's update to L2 norm `norm` (client-level DP's sensitivity).

  Args:
    norm: the clipping norm; with `adaptive_quantile`, its initial value.
    adaptive_quantile: adaptive clipping (Andrew et al., 2021): the norm follows this
      quantile of the clients' update norms, `C <- C exp(-learning_rate (b - q))`,
      `b` the (noised, when the chain adds noise) share of unclipped updates.
    learning_rate: the geometric step of adaptive clipping.
    count_noise: std of the noise on the unclipped count (default: expected
      participants / 20); the chain's Gaussian noise on the updates is raised so that
      the pair stays a Gaussian mechanism of its multiplier.

  Returns:
    A stage (per-client metric `clipped`; round metric `clip_norm` when adaptive).
  """
  return Clip(norm, adaptive_quantile, learning_rate, count_noise)
