"""Compressing client updates before upload: stochastic quantization and top-k.

Every function works on one client's update as a flat vector `[P]` (vmap it over the
clients axis); `upload_bytes` gives the exact size of what a client sends.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

COMPRESSIONS = ("none", "quantize", "topk")
QUANTIZE_BITS = (1, 2, 4, 8, 16)


def stochastic_quantize(key: jax.Array, vector: jax.Array, bits: int) -> jax.Array:
  """Unbiased `bits`-bit quantization of one update (QSGD-style stochastic rounding).

  The `2^bits` levels split `[-s, s]` evenly, `s = max |vector|` (sent as one float32);
  each entry rounds up or down to a neighbouring level with the probabilities that make
  its expectation the entry itself.

  Args:
    key: this client's rounding key.
    vector: `[P]` float update.
    bits: bits per entry, one of `QUANTIZE_BITS`.

  Returns:
    The dequantized vector `[P]` (what the server reconstructs); `E[result] = vector`.
  """
  if bits not in QUANTIZE_BITS:
    raise ValueError(f"quantization bits must be one of {QUANTIZE_BITS}, got {bits!r}")
  levels = 2**bits - 1
  scale = jnp.max(jnp.abs(vector))
  step = 2 * scale / levels
  position = (vector + scale) / jnp.where(step > 0, step, 1.0)
  low = jnp.floor(position)
  up = jax.random.uniform(key, vector.shape) < (position - low)
  level = jnp.clip(low + up, 0, levels)
  return jnp.where(step > 0, level * step - scale, vector)


def top_k(vector: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Keeps the `k` largest-magnitude entries of `vector` (`[P]`), zeroes the rest.

  Returns:
    `(sparse [P], kept [P] bool)` with exactly `k` entries kept.
  """
  _, index = jax.lax.top_k(jnp.abs(vector), k)
  kept = jnp.zeros(vector.shape, bool).at[index].set(True)
  return jnp.where(kept, vector, 0.0), kept


def topk_count(num_params: int, fraction: float) -> int:
  """Entries top-k keeps of `num_params`: `ceil(fraction * P)`, at least 1."""
  if not 0 < fraction <= 1:
    raise ValueError(f"topk_fraction must lie in (0, 1], got {fraction!r}")
  return max(1, min(num_params, math.ceil(fraction * num_params)))


def compressor(kind: str, *, bits: int = 8, topk_fraction: float = 0.01):
  """`(key, vector [P]) -> sent [P]`: what the server receives of one client's update.

  Args:
    kind: "none", "quantize" (`bits`-bit stochastic quantization) or "topk"
      (`topk_fraction` of the entries, largest magnitude).
  """
  if kind not in COMPRESSIONS:
    raise ValueError(f"compression must be one of {COMPRESSIONS}, got {kind!r}")
  if kind == "quantize":
    if bits not in QUANTIZE_BITS:
      raise ValueError(f"compression_bits must be one of {QUANTIZE_BITS}, got {bits!r}")
    return lambda key, vector: stochastic_quantize(key, vector, bits)
  if kind == "topk":
    topk_count(1, topk_fraction)  # range check

    def sparsify(key, vector):
      del key
      return top_k(vector, topk_count(vector.shape[0], topk_fraction))[0]

    return sparsify
  return lambda key, vector: vector


def upload_bytes(kind: str, num_params: int, *, bits: int = 8,
                 topk_fraction: float = 0.01, value_bytes: int = 4) -> int:
  """Bytes one client uploads for one update of `num_params` float32 parameters.

  "none": `P * 4`; "quantize": `ceil(P * bits / 8)` packed levels plus the float32
  scale; "topk": `k` (float32 value, int32 index) pairs.
  """
  if kind == "quantize":
    return math.ceil(num_params * bits / 8) + 4
  if kind == "topk":
    return topk_count(num_params, topk_fraction) * (value_bytes + 4)
  return num_params * value_bytes
