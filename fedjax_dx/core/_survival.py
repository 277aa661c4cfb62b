"""Survival analysis: the Cox model's partial likelihood and the concordance index.

Survival targets ride in `ClientData.labels` as `[..., 2]` float32 `(event, time)`:
event 1 is a death (or the event) observed at `time`, 0 a patient censored at `time`.
Both functions take a mask (or weights) for padding, so they run on padded client
arrays, under `vmap` and inside `jit`; both cost O(n^2) in the examples they see (a
batch in training, a client's test set in evaluation).
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

  Args:
    scores: `[N]` risk scores (higher = earlier death).
    events: `[N]` 1 observed, 0 censored.
    times: `[N]` event or censoring times.
    mask: `[N]` True on real examples.

  Returns:
    `[]` float32, NaN when no pair is admissible.
  """
  survival = -scores  # lifelines compares predicted survival: higher = later death
  event = events > 0
  t_a, t_b = times[:, None], times[None, :]
  e_a, e_b = event[:, None], event[None, :]
  p_a, p_b = survival[:, None], survival[None, :]
  n = scores.shape[0]
  pairs = (jnp.arange(n)[:, None] < jnp.arange(n)[None, :]) & mask[:, None] & mask[None, :]
  admissible = pairs & jnp.where(t_a == t_b, e_a != e_b,
                                 (e_a & (t_a < t_b)) | (e_b & (t_b < t_a)))
  tied = p_a == p_b
  correct = jnp.where(p_a < p_b, (t_a < t_b) | ((t_a == t_b) & e_a & ~e_b),
                      (t_a > t_b) | ((t_a == t_b) & ~e_a & e_b))
  count = admissible.sum()
  score = ((admissible & ~tied & correct).sum() + 0.5 * (admissible & tied).sum())
  return jnp.where(count > 0, score / jnp.maximum(count, 1), jnp.nan).astype(jnp.float32)
