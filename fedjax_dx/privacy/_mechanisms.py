"""Clipping and Gaussian noise on update trees (used by the `agg` stages)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def clip_updates(deltas: Any, clip_norm) -> tuple[Any, jax.Array]:
  """Scales each client's update (leading clients axis) to L2 norm <= `clip_norm`.

  Returns:
    `(clipped, was_clipped [C] bool)`.
  """
  norms = jax.vmap(global_norm)(deltas)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))

  def scaled(d):
    return d * scale.reshape((-1,) + (1,) * (d.ndim - 1))

  return jax.tree.map(scaled, deltas), norms > clip_norm


def gaussian_like(key: jax.Array, tree: Any, stddev) -> Any:
  """Independent N(0, stddev^2) noise shaped like `tree`."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      stddev * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
