"""Secure aggregation: the server sees only the modular sum of masked integer updates."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dx.agg._stage import Stage
from fedjax_dx.core import _local
from fedjax_dx.privacy import _secagg

SECAGG_TAG, DROPOUT_TAG = 0xD0000003, 0xD0000004  # fold_in tags of the round's keys


def per_client_uniform(key: jax.Array, num_clients: int) -> jax.Array:
  """`[C]` uniforms, client `k`'s from `fold_in(key, k)` (independent of `C`)."""
  return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(key, k)))(
      jnp.arange(num_clients))


def choose_share(key: jax.Array, eligible: jax.Array, fraction, *,
                 round_down: bool = False) -> jax.Array:
  """`round(fraction * m)` (`floor` with `round_down`) of the `m` eligible clients
  (`[C]` bool), uniformly. Client `k`'s score comes from `fold_in(key, k)`, so clients
  appended as padding (never eligible) change no real client's draw."""
  scores = jnp.where(eligible, per_client_uniform(key, eligible.shape[0]), 2.0)
  rank = jnp.argsort(jnp.argsort(scores))
  share = fraction * eligible.sum()
  count = jnp.floor(share + 1e-6) if round_down else jnp.round(share)
  return eligible & (rank < count.astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class SecureSum(Stage):
  """Bonawitz et al. (2017) masking mod 2^bits, with dropouts; see `secure_sum`."""

  bits: int = 32  # bits of the modulus (8 .. 32)
  bound: float = 1.0  # each coordinate is clipped to [-bound, bound] before encoding
  dropout: float = 0.0  # share of senders that drop out after masking (simulated)
  tolerance: float = 0.3  # largest share of dropouts the protocol survives

  name: ClassVar[str] = "secure_sum"
  flat: ClassVar[bool] = True
  modular: ClassVar[bool] = True

  def __post_init__(self):
    if not isinstance(self.bits, (int, np.integer)) or not 8 <= self.bits <= 32:
      raise ValueError(f"secagg_bits must be an integer in [8, 32], got {self.bits!r}")
    if not 0 <= self.tolerance < 1:
      raise ValueError(f"secagg_tolerance must lie in [0, 1), got {self.tolerance!r}")
    if not 0 <= self.dropout <= 1:
      raise ValueError(f"secagg_dropout must lie in [0, 1], got {self.dropout!r}")
    if not self.bound > 0:
      raise ValueError(f"secagg_bound must be > 0, got {self.bound!r}")

  def begin(self, state, ctx):
    sending, noise_key = ctx["clients"]["sending"], ctx["noise_key"]
    dropped = jnp.zeros(sending.shape, bool)
    if self.dropout > 0:
      # floor, as the tolerance counts (`max_dropouts`): a dropout share within the
      # tolerance never fails a round (round(0.3 * 3) = 1 > floor(0.3 * 3) = 0 did).
      dropped = choose_share(jax.random.fold_in(noise_key, DROPOUT_TAG), sending,
                             self.dropout, round_down=True)
    failed = dropped.sum() > _secagg.max_dropouts(sending.sum(), self.tolerance)
    scale = _secagg.fixed_point_scale(
        self.bound, (ctx["clients"]["raw_weight"] * ctx["scale_weights"]).sum(),
        sending.sum(), self.bits)
    return ({"secagg_failed": failed, "secagg_scale": scale,
             "secagg_dropped": dropped, "secagg_arrived": sending & ~dropped},
            {"arrived": sending & ~dropped})

  def encode(self, state, row, message, client, ctx):
    key = jax.random.fold_in(ctx["noise_key"], SECAGG_TAG)
    encoded = _secagg.encode(jax.random.fold_in(key, client["id"]), message,
                             client["weight"], ctx["secagg_scale"], self.bound, self.bits)
    cohort = ctx["cohort"]
    masked = _secagg.mask(key, encoded, client["id"], cohort,
                          ctx["clients"]["sending"][cohort], self.bits)
    return jnp.where(client["arrived"], masked, jnp.uint32(0)), row, {}

  def decode(self, state, total, ctx, clients):
    """Removes the masks the server can rebuild, decodes, and rescales to the
    survivors' weighted mean (unless the mean has a fixed denominator)."""
    cohort, arrived = ctx["cohort"], ctx["secagg_arrived"]
    sending = ctx["clients"]["sending"]
    survivors_sum = _secagg.unmask(
        jax.random.fold_in(ctx["noise_key"], SECAGG_TAG), total, cohort,
        arrived[cohort], sending[cohort] & ctx["secagg_dropped"][cohort], self.bits)
    update = _secagg.decode(survivors_sum, ctx["secagg_scale"], self.bits)
    if ctx["expected_clients"] is None:
      arrived_weight = jnp.where(arrived, ctx["clients"]["raw_weight"], 0.0).sum()
      update = update * ctx["total"] / jnp.maximum(arrived_weight, 1e-30)
    update = jnp.where(ctx["secagg_failed"], 0.0, update)
    return update, state, {"secagg_dropped": ctx["secagg_dropped"].sum(),
                           "secagg_failed": ctx["secagg_failed"]}

  def upload_bytes(self, num_params, current):
    return -(-num_params * self.bits // 8)

  def protocol_bytes(self, num_params: int, senders: int, dropped: int
                     ) -> tuple[int, int]:
    """`(up, down)` bytes of one round's protocol messages (keys, shares, the masked
    vectors, the unmasking round) with `senders` masked uploads of which `dropped`
    dropped out (`fedjax_dx.secagg.round_bytes`)."""
    return _secagg.round_bytes(num_params, self.bits, senders, dropped)


def secure_sum(bits: int = 32, *, bound: float = 1.0, dropout: float = 0.0,
               tolerance: float = 0.3) -> SecureSum:
  """Secure aggregation (simulated faithfully; see `fedjax_dx.secagg`).

  Each client's weighted update is encoded in fixed point modulo `2^bits` (coordinates
  clipped to `[-bound, bound]`), masked pairwise; the server recovers only the sum,
  also when up to `floor(tolerance * m)` of the `m` senders drop out after masking
  (`dropout` simulates that share: `floor(dropout * m)` senders drop); a round with
  more dropouts keeps the model (`secagg_failed`). Must be the last stage.
  """
  _local.check_hyperparameter(bound, "secagg_bound", above=0.0)
  return SecureSum(int(bits) if isinstance(bits, np.integer) else bits, bound, dropout,
                   tolerance)
