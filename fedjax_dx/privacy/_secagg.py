"""Secure aggregation, simulated faithfully (Bonawitz et al., CCS 2017).

Each participant turns its (weighted) update into integers modulo `2^bits` (fixed
point, stochastic rounding) and adds

* a self mask `PRG(b_i)`, and
* for every other participant `j` a pairwise mask `+PRG(s_ij)` if `i < j`, `-PRG(s_ij)`
  if `i > j`, from a seed both derive by key agreement,

so the server sees only uniformly random vectors, and in the sum of all of them the
pairwise masks cancel. Clients that drop out after masking leave their pairwise masks
uncancelled: the surviving clients' shares let the server rebuild the dropped clients'
pair seeds (and each survivor's self mask), so it removes exactly those masks and gets
the exact sum of the survivors' integers. Here the key agreement and secret sharing are
simulated (seeds are `fold_in`s of one round key); the masking arithmetic, the
cancellation and the recovery are the real ones, and `round_bytes` counts what the
protocol's four rounds send.

All functions work on flat update vectors `[P]` and run inside the jitted round.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_SELF_MASK = 0xFFFFFFF0  # fold_in tag of self-mask seeds (pair seeds use client ids)


def modulus_mask(bits: int) -> jax.Array:
  """`2^bits - 1` as uint32 (all arithmetic is uint32, wrapping mod 2^32)."""
  return jnp.uint32((1 << bits) - 1) if bits < 32 else jnp.uint32(0xFFFFFFFF)


# The sum's signed range must hold this many rounding units per participant: each
# encoding rounds by under one unit, so the sum's rounding error stays within a tenth of
# its range (a round's error as large as the update, as 8 bits gave 100 clients, is not).
UNITS_PER_PARTICIPANT = 10


def max_participants(bits: int) -> int:
  """The most participants a round may have at `bits` bits: the signed range
  `2^(bits-1) - 1` must hold the participants' rounding units (one each) plus
  `UNITS_PER_PARTICIPANT` units of headroom per participant (the fixed-point scale)."""
  return ((1 << (bits - 1)) - 1) // (UNITS_PER_PARTICIPANT + 1)


def bits_for(participants: int) -> int | None:
  """The fewest bits in [8, 32] that fit `participants` (None: none does)."""
  return next((b for b in range(8, 33) if max_participants(b) >= participants), None)


def check_bits(bits: int, participants: int, field: str = "secagg_bits") -> None:
  """A ValueError naming `field` when `participants` per round do not fit `bits`."""
  if participants <= max_participants(bits):
    return
  fits = bits_for(participants)
  raise ValueError(
      f"{field} = {bits} fits at most {max_participants(bits)} participants per round "
      f"(the sum's signed range 2^{bits - 1} - 1 must hold one rounding unit per "
      f"participant plus {UNITS_PER_PARTICIPANT} units of headroom each, or the round's "
      f"rounding error approaches the update itself), got {participants}; "
      + (f"use {field} >= {fits}" if fits else "no bits up to 32 fit that many"))


def fixed_point_scale(bound, total_weight, num_participants, bits: int):
  """Integers per unit: the largest scale at which the sum of `num_participants`
  encoded updates (each entry of weight `w_k` times a value in `[-bound, bound]`,
  `sum w_k = total_weight`, each rounded by at most 1) cannot overflow the signed
  range of `bits` bits."""
  headroom = 2.0**(bits - 1) - 1 - num_participants
  return headroom / (bound * jnp.maximum(total_weight, 1e-30))


def encode(key: jax.Array, vector: jax.Array, weight, scale, bound, bits: int):
  """`round(weight * clip(vector, -bound, bound) * scale)` (stochastic rounding, so
  unbiased) as integers mod 2^bits (two's complement), uint32 `[P]`."""
  value = weight * jnp.clip(vector, -bound, bound) * scale
  low = jnp.floor(value)
  integer = (low + (jax.random.uniform(key, value.shape) < value - low)).astype(jnp.int32)
  return jax.lax.bitcast_convert_type(integer, jnp.uint32) & modulus_mask(bits)


def decode(total: jax.Array, scale, bits: int) -> jax.Array:
  """The signed integers of `total` (uint32 mod 2^bits) divided by `scale`."""
  total = total & modulus_mask(bits)
  if bits == 32:
    signed = jax.lax.bitcast_convert_type(total, jnp.int32)
  else:
    as_int = total.astype(jnp.int32)
    signed = jnp.where(as_int >= (1 << (bits - 1)), as_int - (1 << bits), as_int)
  return signed.astype(jnp.float32) / scale


def _prg(key, size):
  return jax.random.bits(key, (size,), jnp.uint32)


def self_mask(round_key: jax.Array, client: jax.Array, size: int) -> jax.Array:
  """`PRG(b_i)`: client `client`'s own mask, `[size]` uint32."""
  return _prg(jax.random.fold_in(jax.random.fold_in(round_key, _SELF_MASK), client), size)


def pairwise_mask(round_key: jax.Array, client: jax.Array, others: jax.Array,
                  include: jax.Array, size: int) -> jax.Array:
  """`sum_j include_j sign(client, j) PRG(s_{client j})` over `others` (client ids),
  `sign = +1` if `client < j`, `-1` if `client > j`, nothing for `j == client`.

  Args:
    round_key: this round's key (the simulated key agreement derives `s_ij` from it).
    client: this client's id.
    others: `[M]` ids of the round's participants.
    include: `[M]` bool, which of them to mask with.
    size: `P`.

  Returns:
    `[size]` uint32, mod 2^32.
  """
  def add(total, other_and_flag):
    other, flag = other_and_flag
    low, high = jnp.minimum(client, other), jnp.maximum(client, other)
    prg = _prg(jax.random.fold_in(jax.random.fold_in(round_key, low), high), size)
    signed = jnp.where(client < other, prg, jnp.uint32(0) - prg)
    return jnp.where(flag & (other != client), total + signed, total), None

  total, _ = jax.lax.scan(add, jnp.zeros((size,), jnp.uint32), (others, include))
  return total


def mask(round_key, encoded, client, others, participating, bits: int):
  """What client `client` sends: `encoded + PRG(b_i) + pairwise masks` mod 2^bits."""
  size = encoded.shape[0]
  return (encoded + self_mask(round_key, client, size)
          + pairwise_mask(round_key, client, others, participating, size)
          ) & modulus_mask(bits)


def unmask(round_key, masked_sum, others, survived, dropped, bits: int):
  """The sum of the survivors' encoded updates from the sum of their masked ones.

  The server rebuilds every survivor's self mask and, for each survivor and each client
  that dropped out after masking, their pair mask, and subtracts them.

  Args:
    round_key: the round's key.
    masked_sum: `[P]` uint32, the sum of the masked vectors that arrived.
    others: `[M]` ids of the round's participants (the mask graph).
    survived: `[M]` bool, whose masked vector arrived.
    dropped: `[M]` bool, who was in the mask graph but sent nothing.
    bits: the modulus.
  """
  size = masked_sum.shape[0]

  def survivor_masks(client, alive):
    total = (self_mask(round_key, client, size)
             + pairwise_mask(round_key, client, others, dropped, size))
    return jnp.where(alive, total, jnp.uint32(0))

  masks = jax.vmap(survivor_masks)(others, survived).sum(0, dtype=jnp.uint32)
  return (masked_sum - masks) & modulus_mask(bits)


def round_bytes(num_params: int, bits: int, participants: int, dropped: int
                ) -> tuple[int, int]:
  """Bytes up and down, summed over clients, of one secure-aggregation round.

  The four rounds of Bonawitz et al. with X25519 keys (32 B), 32-byte Shamir shares and
  AES-GCM (16 B tag, 12 B nonce) between clients through the server:

  * AdvertiseKeys: each client uploads 2 public keys (64 B); the server sends every
    client the list of all `m` clients' keys (`m * 64` B).
  * ShareKeys: each client uploads `m - 1` encrypted messages, each holding one share of
    its pair key and one of its self-mask seed plus both ids (2 * 32 + 2 * 4 + 28 B);
    the server forwards each client the `m - 1` messages addressed to it.
  * MaskedInput: each client uploads `ceil(P * bits / 8)` bytes (its masked vector).
  * Unmasking: the server sends every survivor the list of survivors (`4 * s` B); each
    survivor uploads one 32-byte share per other client (the pair-key share of each
    dropped client, the self-mask share of each survivor).

  Args:
    num_params: `P`.
    bits: the modulus bits.
    participants: `m`, clients that started the round.
    dropped: how many of them dropped out after masking.
  """
  m, s = participants, participants - dropped
  share_message = 2 * 32 + 2 * 4 + 28
  up = (m * 64 + m * (m - 1) * share_message + s * math.ceil(num_params * bits / 8)
        + s * (m - 1) * 32)
  down = m * m * 64 + m * (m - 1) * share_message + s * s * 4
  return up, down


def max_dropouts(participants, tolerance: float):
  """Dropouts the protocol survives: `floor(tolerance * m)` (its Shamir threshold is
  `m - floor(tolerance * m)` shares)."""
  return jnp.floor(tolerance * participants + 1e-6).astype(jnp.int32)
