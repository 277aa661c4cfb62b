"""Gaussian noise scaled to the clipping norm: central (on the sum) or local."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fedjax_dx.agg._stage import Stage
from fedjax_dx.core import _local
from fedjax_dx.privacy import _accounting
from fedjax_dx.privacy import _mechanisms

NOISE_MODES = ("central", "local")


def adaptive_update_noise(noise_multiplier, count_noise):
  """The update noise of adaptive clipping (Andrew et al., 2021, Theorem 1): with the
  unclipped count noised at std `count_noise` (sensitivity 1/2), updates noised at the
  returned multiplier make the pair a Gaussian mechanism of `noise_multiplier`."""
  if not isinstance(noise_multiplier, jax.core.Tracer) and not (
      2 * count_noise > noise_multiplier):
    raise ValueError(
        f"adaptive clipping with noise multiplier {noise_multiplier} needs "
        f"dp_count_noise > {noise_multiplier / 2:g} (the count's noise must be more than "
        f"half the update noise), got {count_noise:g}; raise dp_count_noise or use "
        "fixed clipping")
  return (noise_multiplier**-2 - (2 * count_noise)**-2)**-0.5


@dataclasses.dataclass(frozen=True)
class Gaussian(Stage):
  """N(0, (z C)^2) noise, C the clipping norm; see `gaussian`."""

  noise_multiplier: float  # z
  mode: str = "central"  # "central": the server noises the sum; "local": each client

  name: ClassVar[str] = "gaussian"
  needs_clip: ClassVar[bool] = True
  needs_unit_weights: ClassVar[bool] = True

  def __post_init__(self):
    if not isinstance(self.noise_multiplier, jax.core.Tracer) and not (
        self.noise_multiplier >= 0):
      raise ValueError(f"dp_noise (noise multiplier) must be >= 0, got "
                       f"{self.noise_multiplier!r}")
    if self.mode not in NOISE_MODES:
      raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {self.mode!r}")

  @property
  def active(self) -> bool:
    return _local.is_active(self.noise_multiplier)

  def statics(self, ctx):
    return {"noise_multiplier": self.noise_multiplier}

  def privacy_event(self, rounds, sampling_rate, sampling="poisson", population=0):
    """Central noise is amplified by sampling; local noise claims no amplification."""
    if self.mode != "central":
      return _accounting.GaussianRelease(self.noise_multiplier, 1.0, rounds)
    return _accounting.GaussianRelease(self.noise_multiplier, sampling_rate, rounds,
                                       sampling, population)

  def encode(self, state, row, message, client, ctx):
    if self.mode != "local" or not self.active:
      return message, row, {}
    key = jax.random.fold_in(ctx["noise_key"], client["id"])
    noise = _mechanisms.gaussian_like(key, message, self.noise_multiplier * ctx["clip_norm"])
    return jax.tree.map(jnp.add, message, noise), row, {}

  def decode(self, state, total, ctx, clients):
    if self.mode != "central" or not self.active:
      return total, state, {}
    noise = self.noise_multiplier
    if ctx["adaptive_count_noise"] is not None:
      noise = adaptive_update_noise(noise, ctx["adaptive_count_noise"])
    return jax.tree.map(jnp.add, total, _mechanisms.gaussian_like(
        ctx["noise_key"], total, noise * ctx["clip_norm"] * ctx["scale_weights"])
    ), state, {}


def gaussian(noise_multiplier: float, mode: str = "central") -> Gaussian:
  """Gaussian noise of std `noise_multiplier * C` (C: the chain's clipping norm).

  Args:
    noise_multiplier: z; `fedjax_dx.privacy_epsilon` turns it into epsilon.
    mode: "central" (the server noises the sum of clipped updates) or "local" (each
      client noises its own update before it leaves).
  """
  return Gaussian(noise_multiplier, mode)
