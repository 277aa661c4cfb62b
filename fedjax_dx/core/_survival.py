"""Survival analysis: the Cox model's partial likelihood and the concordance index.

Survival targets ride in `ClientData.labels` as `[..., 2]` float32 `(event, time)`:
event 1 is a death (or the event) observed at `time`, 0 a patient censored at `time`.
Both functions take a mask (or weights) for padding, so they run on padded client
arrays, under `vmap` and inside `jit`. The partial likelihood costs O(n^2) in the
examples it sees (a batch in training, a client's set in evaluation), the C-index
O(n log n).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cox_loss_terms(scores: jax.Array, events: jax.Array, times: jax.Array,
                   weight: jax.Array) -> jax.Array:
  """Each example's term of the negative Cox partial log-likelihood, Breslow's ties.

  `event_i * (log sum_{j: t_j >= t_i} exp(s_j) - s_i)` over the real examples
  (`weight > 0`); the batch loss is their sum over the real examples' count, as
  FLamby's `BaselineLoss` takes the mean over the batch. Every subject whose time
  equals `t_i` is in `i`'s risk set (Breslow); FLamby's loss breaks ties by sort
  order instead, which agrees when the times are distinct.

  Args:
    scores: `[B]` risk scores (log hazard ratios: higher = earlier death).
    events: `[B]` 1 for an observed event, 0 for a censored time.
    times: `[B]` event or censoring times.
    weight: `[B]` > 0 for a real example, 0 for padding.

  Returns:
    `[B]` terms (0 for censored and padding examples).
  """
  real = weight > 0
  at_risk = (times[None, :] >= times[:, None]) & real[None, :]
  log_risk = jax.nn.logsumexp(jnp.where(at_risk, scores[None, :], -jnp.inf), axis=1)
  observed = (events > 0) & real
  return jnp.where(observed, log_risk - scores, 0.0)


def concordance_index(scores: jax.Array, events: jax.Array, times: jax.Array,
                      mask: jax.Array) -> jax.Array:
  """Harrell's C-index of risk `scores`, as `lifelines.utils.concordance_index(times,
  -scores, events)` counts it (FLamby's metric): over the admissible pairs (the
  earlier time is an observed event; equal times count when exactly one is an event),
  the share whose higher risk died first, ties in score counting one half.

  The pairs are counted exactly in O(n log n) (`_count_below_in_prefix`), not by
  comparing every pair: the same counts as the pairwise definition, in integers.

  Args:
    scores: `[N]` risk scores (higher = earlier death).
    events: `[N]` 1 observed, 0 censored.
    times: `[N]` event or censoring times.
    mask: `[N]` True on real examples.

  Returns:
    `[]` float32, NaN when no pair is admissible or a real example's score is NaN.

  Example:
    >>> fdx.concordance_index(model.apply(params, x)[:, 0], events, times, mask)
  """
  count, concordant, tied = _concordance_counts(scores, events, times, mask)
  score = concordant + 0.5 * tied
  defined = (count > 0) & ~jnp.any(jnp.isnan(scores) & mask)
  return jnp.where(defined, score / jnp.maximum(count, 1), jnp.nan).astype(jnp.float32)


def _concordance_counts(scores, events, times, mask):
  """`(admissible, concordant, tied)` pair counts of `concordance_index`, int32."""
  n = scores.shape[0]
  event = events > 0
  mask = mask & ~jnp.isnan(times)  # no pair with an unknown time is admissible
  # A patient's place in time: its time's rank, a censored patient just after the
  # events at its time. Pair (i, j) is admissible when i is an observed event and j
  # comes later; concordant when s_i > s_j, tied when s_i == s_j.
  place = jnp.where(mask, 2 * _rank(times, mask) + (~event).astype(jnp.int32), -1)
  score_rank = _rank(scores, mask)
  # Real patients from the latest place: those after patient i are the first later[i].
  by_place = jnp.argsort(-place, stable=True)
  later = mask.sum() - jnp.searchsorted(
      jnp.sort(jnp.where(mask, place, jnp.iinfo(jnp.int32).max)), place, side="right",
      method="scan").astype(jnp.int32)
  counts = _count_below_in_prefix(score_rank[by_place], jnp.concatenate([later, later]),
                                  jnp.concatenate([score_rank, score_rank + 1]),
                                  bits=int(n + 1).bit_length())
  below, at_or_below = counts[:n], counts[n:]  # later patients of lower (or equal) risk
  rows = event & mask
  return (jnp.where(rows, later, 0).sum(), jnp.where(rows, below, 0).sum(),
          jnp.where(rows, at_or_below - below, 0).sum())


def _rank(values: jax.Array, mask: jax.Array) -> jax.Array:
  """`[N]` int32: how many real values are below each value (equal values, equal
  ranks; infinities in order)."""
  key = jnp.where(mask, values, jnp.inf)
  return jnp.searchsorted(jnp.sort(key), key, side="left", method="scan").astype(jnp.int32)


def _count_below_in_prefix(values: jax.Array, prefix: jax.Array, bound: jax.Array,
                           bits: int) -> jax.Array:
  """For each query q, `#{p < prefix[q] : values[p] < bound[q]}` in O((N + Q) bits):
  a wavelet matrix, one level per bit of `values` from the highest (each level
  stably moves the values whose bit is 0 to the front and follows every query's range).

  Args:
    values: `[N]` int32 in `[0, 2**bits)`.
    prefix: `[Q]` int32 in `[0, N]`.
    bound: `[Q]` int32 in `[0, 2**bits)`.
    bits: static.

  Returns:
    `[Q]` int32 counts.
  """
  n = values.shape[0]
  index = jnp.arange(n, dtype=jnp.int32)

  def level(step, carry):  # one bit, from the highest; a loop: one body to compile
    values, count, lo, hi = carry
    b = bits - 1 - step
    bit = (values >> b) & 1
    zeros_before = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(1 - bit)])
    zeros = zeros_before[n]
    z_lo, z_hi = zeros_before[lo], zeros_before[hi]
    one = ((bound >> b) & 1) == 1  # values with a 0 here (and the same bits above) are below
    count = count + jnp.where(one, z_hi - z_lo, 0)
    lo = jnp.where(one, zeros + lo - z_lo, z_lo)
    hi = jnp.where(one, zeros + hi - z_hi, z_hi)
    moved = jnp.where(bit == 0, zeros_before[:n], zeros + index - zeros_before[:n])
    values = jnp.zeros_like(values).at[moved].set(values, unique_indices=True)
    return values, count, lo, hi

  start = (values, jnp.zeros(bound.shape, jnp.int32), jnp.zeros_like(prefix), prefix)
  return jax.lax.fori_loop(0, bits, level, start)[1]
