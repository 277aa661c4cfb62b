"""Canary clients for a privacy audit: crafted updates of known directions.

Steinke, Nasr & Jagielski, "Privacy Auditing in One (1) Training Run" (NeurIPS 2023):
canaries are inserted into the run that is audited, each with probability 1/2; an
adversary that sees what the DP mode releases (here the final model) guesses which
were in; how well it guesses bounds epsilon from below. A canary client sends
`clip_norm` times a unit direction of its own instead of what it trained, so clipping
leaves it whole and it is the worst case the mechanism must hide.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_dx.agg._stage import Stage


def canary_directions(seed: int, count: int, num_params: int) -> jax.Array:
  """`[count, num_params]` unit directions: orthonormal where `count <= num_params`
  (canaries then never leak into each other's score), else independent random ones."""
  gaussian = jax.random.normal(jax.random.PRNGKey(seed), (num_params, count))
  if count <= num_params:
    q, r = jnp.linalg.qr(gaussian)
    return (q * jnp.sign(jnp.diagonal(r))).T  # a unique orthonormal basis
  return (gaussian / jnp.linalg.norm(gaussian, axis=0, keepdims=True)).T


@dataclasses.dataclass(frozen=True)
class Canaries(Stage):
  """Clients `first_id .. first_id + count - 1` upload `clip_norm * direction_i`."""

  first_id: int  # the first canary client (the real clients come before it)
  count: int  # how many canary clients
  clip_norm: float  # the norm of each crafted update (the DP clipping norm)
  seed: int = 0  # of the directions (the audit scores with the same ones)

  name: ClassVar[str] = "canaries"

  def __post_init__(self):
    if self.count < 1 or self.first_id < 0 or not self.clip_norm > 0:
      raise ValueError(f"canaries need count >= 1, first_id >= 0 and clip_norm > 0, got "
                       f"{self.count}, {self.first_id}, {self.clip_norm}")

  def init(self, params, num_clients: int):
    if num_clients < self.first_id + self.count:
      raise ValueError(f"canaries: {self.count} canary clients from client "
                       f"{self.first_id} need {self.first_id + self.count} clients, the "
                       f"data has {num_clients}")
    size = ravel_pytree(params)[0].size
    return {"directions": canary_directions(self.seed, self.count, size)}, None

  def encode(self, state, row, message, client, ctx):
    flat, unravel = ravel_pytree(message)
    index = client["id"] - self.first_id
    is_canary = (index >= 0) & (index < self.count)
    crafted = self.clip_norm * state["directions"][jnp.clip(index, 0, self.count - 1)]
    return unravel(jnp.where(is_canary, crafted.astype(flat.dtype), flat)), row, {}


def canaries(first_id: int, count: int, clip_norm: float, seed: int = 0) -> Canaries:
  """The canary stage: put it first in the chain (before the guard and clipping).

  Example:
    >>> chain = agg.chain(agg.canaries(4, 100, 1.0), agg.clip(1.0),
    ...                   agg.mean("uniform"), agg.gaussian(1.0))
  """
  return Canaries(first_id, count, float(clip_norm), seed)
