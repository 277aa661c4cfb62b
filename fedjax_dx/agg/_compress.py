"""Compressed uploads: stochastic quantization or top-k, with error feedback."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fedjax_dx.agg import _codecs
from fedjax_dx.agg._stage import Stage

COMPRESS_TAG = 0xD0000002  # fold_in tag of the rounding keys


@dataclasses.dataclass(frozen=True)
class Compress(Stage):
  """What the server receives of each flat update; see `quantize` and `top_k`."""

  kind: str  # "quantize" or "topk"
  bits: int = 8  # quantization bits
  fraction: float = 0.01  # share of entries top-k keeps
  error_feedback: bool = True  # each client keeps what compression dropped

  name: ClassVar[str] = "compress"
  flat: ClassVar[bool] = True
  is_compression: ClassVar[bool] = True

  def __post_init__(self):
    if self.kind not in ("quantize", "topk"):
      raise ValueError(f"compression must be one of {_codecs.COMPRESSIONS}, got "
                       f"{self.kind!r}")
    _codecs.compressor(self.kind, bits=self.bits, topk_fraction=self.fraction)

  def init(self, params, num_clients):
    if not self.error_feedback:
      return None, None
    size = sum(x.size for x in jax.tree.leaves(params))
    return None, jnp.zeros((num_clients, size), jnp.float32)

  def encode(self, state, row, message, client, ctx):
    if self.error_feedback:
      message = message + row
    compress = _codecs.compressor(self.kind, bits=self.bits,
                                  topk_fraction=self.fraction)
    key = jax.random.fold_in(jax.random.fold_in(ctx["noise_key"], COMPRESS_TAG),
                             client["id"])
    sent = compress(key, message)
    if self.error_feedback:  # what compression dropped waits for the next round
      row = jnp.where(client["sending"], message - sent, row)
    return sent, row, {}

  def upload_bytes(self, num_params, current):
    return _codecs.upload_bytes(self.kind, num_params, bits=self.bits,
                                topk_fraction=self.fraction)


def quantize(bits: int = 8, *, error_feedback: bool = True) -> Compress:
  """Unbiased `bits`-bit stochastic quantization of each upload (1, 2, 4, 8 or 16)."""
  return Compress("quantize", bits=bits, error_feedback=error_feedback)


def top_k(fraction: float = 0.01, *, error_feedback: bool = True) -> Compress:
  """Each upload keeps its `fraction` largest-magnitude entries (value + index)."""
  return Compress("topk", fraction=fraction, error_feedback=error_feedback)
