"""Diagnostic metrics in JAX, masked, for binary and multi-class tasks.

Every function takes padded arrays and a mask, so it can be vmapped over clients.
Ratios whose denominator is zero (e.g. sensitivity on a client with no positive case,
AUC on a client with one class only) are NaN, never an error; so is every metric of a
model whose outputs or losses are not finite (a diverged model).
"""

from __future__ import annotations

import functools

from typing import Any

import jax
import numpy as np
import jax.numpy as jnp

from fedjax_dx.core import _models
from fedjax_dx.core import _survival
from fedjax_dx.core._data import ClientData

METRIC_NAMES = ("loss", "accuracy", "balanced_accuracy", "auc", "sensitivity",
                "specificity", "f1", "pr_auc", "brier", "ece", "c_index", "num_examples")


def _ratio(num, den):
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.nan)


def _nanmean(x):
  defined = ~jnp.isnan(x)
  count = defined.sum()
  return jnp.where(count > 0, jnp.where(defined, x, 0).sum() / jnp.maximum(count, 1),
                   jnp.nan)


def binary_auc(scores: jax.Array, positive: jax.Array, mask: jax.Array) -> jax.Array:
  """Exact ROC AUC (Mann-Whitney U, ties count one half); NaN without both classes.

  Args:
    scores: `[N]` finite scores, higher meaning more likely positive.
    positive: `[N]` bool, the true class.
    mask: `[N]` bool, which entries are real.

  Returns:
    A scalar: P(score of a random positive > score of a random negative) + half the
    probability of a tie.
  """
  pos = mask & positive
  neg = mask & ~positive
  negative_scores = jnp.sort(jnp.where(neg, scores, jnp.inf))
  # Counts are exact integers whatever the search; a vectorised binary search is 3x
  # faster on CPU than `method="sort"` (which sorts queries and table together), and
  # dominated the bootstrap's 100 resamples per site.
  below = jnp.searchsorted(negative_scores, scores, side="left", method="scan")
  below_or_tied = jnp.searchsorted(negative_scores, scores, side="right", method="scan")
  # An infinite score would also count the masked +inf entries as ties.
  below_or_tied = jnp.minimum(below_or_tied, neg.sum())
  auc = _mann_whitney_auc(below, below_or_tied, pos, pos.sum(), neg.sum())
  # A NaN score has no rank: the count above would be a number, even above 1.
  return jnp.where(jnp.any(mask & jnp.isnan(scores)), jnp.nan, auc)


def _mann_whitney_auc(below, below_or_tied, positive_weight, num_pos, num_neg):
  """AUC from rank counts (last axis: examples): each example's negatives below it
  and below or tied, summed over the positives (`positive_weight`: 0/1, or how often
  a resample drew it) as wins plus half the ties, over `num_pos * num_neg` pairs. The
  sums are of half-integers in float32: exact in any order below 2^23."""
  wins = (below + 0.5 * (below_or_tied - below)).astype(jnp.float32)
  pairs = num_pos.astype(jnp.float32) * num_neg.astype(jnp.float32)
  return _ratio((positive_weight * wins).sum(-1), pairs)


def average_precision(scores: jax.Array, positive: jax.Array, mask: jax.Array
                      ) -> jax.Array:
  """The area under the precision-recall curve as scikit-learn's
  `average_precision_score` computes it: `sum_n (R_n - R_{n-1}) P_n` over the distinct
  score thresholds, from the highest; NaN without a positive.

  Args:
    scores: `[N]` finite scores, higher meaning more likely positive.
    positive: `[N]` bool, the true class.
    mask: `[N]` bool, which entries are real.
  """
  order = jnp.argsort(jnp.where(mask, -scores, jnp.inf), stable=True)
  s, y, m = scores[order], (positive & mask)[order], mask[order]
  tp = jnp.cumsum(y).astype(jnp.float32)
  fp = jnp.cumsum(~y & m).astype(jnp.float32)
  # A threshold ends each group of equal scores (and the last real entry).
  next_differs = jnp.concatenate([s[1:] != s[:-1], jnp.ones((1,), bool)])
  next_real = jnp.concatenate([m[1:], jnp.zeros((1,), bool)])
  is_last = m & (next_differs | ~next_real)
  ends = jax.lax.cummax(jnp.where(is_last, tp, 0.0))
  before = jnp.concatenate([jnp.zeros((1,)), ends[:-1]])  # tp at the previous threshold
  precision = tp / jnp.maximum(tp + fp, 1.0)
  num_pos = y.sum().astype(jnp.float32)
  ap = _ratio(jnp.where(is_last, (tp - before) * precision, 0.0).sum(), num_pos)
  return jnp.where(jnp.any(mask & jnp.isnan(scores)), jnp.nan, ap)


def expected_calibration_error(probs: jax.Array, labels: jax.Array, mask: jax.Array,
                               bins: int = 10) -> jax.Array:
  """ECE over `bins` equal-width bins of the top-class confidence in [0, 1]:
  `sum_b (n_b / n) |accuracy_b - mean confidence_b|` (empty bins count nothing).

  Args:
    probs: `[N, K]` class probabilities.
    labels: `[N]` integer labels.
    mask: `[N]` bool, real examples.
    bins: number of bins (static).
  """
  confidence = probs.max(-1)
  correct = (jnp.argmax(probs, -1) == labels).astype(jnp.float32)
  index = jnp.clip(jnp.floor(confidence * bins).astype(jnp.int32), 0, bins - 1)
  weight = mask.astype(jnp.float32)
  gap = jax.ops.segment_sum(weight * (correct - confidence), index, bins)
  return _ratio(jnp.abs(gap).sum(), weight.sum())


def brier_score(probs: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Brier score: binary, the mean of `(p_1 - y)^2` (scikit-learn's
  `brier_score_loss`); with K > 2 classes, the mean of `sum_k (p_k - [y = k])^2`
  (Brier 1950)."""
  weight = mask.astype(jnp.float32)
  if probs.shape[-1] == 2:
    errors = (probs[:, 1] - (labels == 1)) ** 2
  else:
    errors = ((probs - jax.nn.one_hot(labels, probs.shape[-1])) ** 2).sum(-1)
  return _ratio((errors * weight).sum(), weight.sum())


ECE_BINS = 10  # the bins of the reported `ece`


def classification_metrics(probs: jax.Array, labels: jax.Array, mask: jax.Array,
                           losses: jax.Array, auc: jax.Array | None = None,
                           pr_auc: jax.Array | None = None) -> dict[str, jax.Array]:
  """Loss, accuracy, balanced accuracy, AUC, sensitivity, specificity, F1, PR-AUC
  (average precision), Brier score and ECE (`ECE_BINS` equal-width bins).

  Binary tasks (2 classes) report class 1 as the positive (diseased) class. With more
  classes, sensitivity, specificity, F1 and AUC (one-vs-rest) are macro averages over
  the classes where each is defined; balanced accuracy is the mean recall over the
  classes present, as in scikit-learn.

  Args:
    probs: `[N, K]` class probabilities.
    labels: `[N]` integer labels.
    mask: `[N]` bool, real examples.
    losses: `[N]` per-example loss.
    auc: a binary task's AUC when the caller has it (the bootstrap's exact shortcut,
      `_resampled_binary_aucs`); None computes it.
    pr_auc: the same of its average precision (`_resampled_average_precisions`).

  Returns:
    A dict of scalars, keys `METRIC_NAMES`.
  """
  num_classes = probs.shape[-1]
  maskf = mask.astype(jnp.float32)
  count = maskf.sum()
  predicted = jnp.argmax(probs, axis=-1)
  onehot_true = jax.nn.one_hot(labels, num_classes, dtype=bool) & mask[:, None]
  onehot_pred = jax.nn.one_hot(predicted, num_classes, dtype=bool) & mask[:, None]
  tp = (onehot_true & onehot_pred).sum(0).astype(jnp.float32)
  fp = (~onehot_true & onehot_pred & mask[:, None]).sum(0).astype(jnp.float32)
  fn = (onehot_true & ~onehot_pred).sum(0).astype(jnp.float32)
  tn = count - tp - fp - fn
  recall = _ratio(tp, tp + fn)
  specificity = _ratio(tn, tn + fp)
  f1 = _ratio(2 * tp, 2 * tp + fp + fn)
  metrics = {
      "loss": _ratio((losses * maskf).sum(), count),
      "accuracy": _ratio(((predicted == labels) & mask).sum().astype(jnp.float32), count),
      "balanced_accuracy": _nanmean(recall),
      "num_examples": count,
  }
  if num_classes == 2:
    metrics.update(
        auc=binary_auc(probs[:, 1], labels == 1, mask) if auc is None else auc,
        sensitivity=recall[1],
        specificity=specificity[1], f1=f1[1],
        pr_auc=(average_precision(probs[:, 1], labels == 1, mask) if pr_auc is None
                else pr_auc))
  else:
    aucs = jax.vmap(lambda c: binary_auc(probs[:, c], labels == c, mask))(
        jnp.arange(num_classes))
    pr_aucs = jax.vmap(lambda c: average_precision(probs[:, c], labels == c, mask))(
        jnp.arange(num_classes))
    metrics.update(auc=_nanmean(aucs), sensitivity=_nanmean(recall),
                   specificity=_nanmean(specificity), f1=_nanmean(f1),
                   pr_auc=_nanmean(pr_aucs))
  metrics.update(brier=brier_score(probs, labels, mask),
                 ece=expected_calibration_error(probs, labels, mask, ECE_BINS))
  # A model whose outputs are not finite (diverged) has no accuracy, not the majority
  # class's: every metric NaN.
  finite = jnp.all(jnp.isfinite(probs) | ~mask[:, None]) & jnp.all(
      jnp.isfinite(losses) | ~mask)
  metrics["c_index"] = jnp.float32(jnp.nan)  # survival tasks only
  return {name: value if name == "num_examples" else jnp.where(finite, value, jnp.nan)
          for name, value in metrics.items()}


# Every metric of a row (classification and survival).
BOOTSTRAP_METRICS = ("loss", "accuracy", "balanced_accuracy", "auc", "sensitivity",
                     "specificity", "f1", "pr_auc", "brier", "ece", "c_index")


def bootstrap_draws(key: jax.Array, mask: jax.Array, num_resamples: int) -> jax.Array:
  """Which real example each slot of each resample of one test set holds:
  `[num_resamples, N]` indices drawn uniformly, with replacement, among the
  `mask.sum()` real examples (they occupy the first slots).

  Args:
    key: the resampling key.
    mask: `[N]` True on real examples.
    num_resamples: resamples (static).
  """
  count = mask.sum()
  return jax.random.randint(key, (num_resamples, mask.shape[0]), 0,
                            jnp.maximum(count, 1))


def bootstrap_metrics(key: jax.Array | None, outputs: jax.Array, labels: jax.Array,
                      mask: jax.Array, *, survival: bool, num_resamples: int,
                      draws: jax.Array | None = None) -> dict[str, jax.Array]:
  """Every metric (`BOOTSTRAP_METRICS`) of one test set resampled with
  replacement from its real examples, `num_resamples` times (vectorised; the
  percentile interval of the result is the patient-level uncertainty).

  Args:
    key: the resampling key (unused when `draws` is given).
    outputs: `[N, K]` what the model said of each example (`outputs`).
    labels: `[N]` labels, or `[N, 2]` (event, time).
    mask: `[N]` True on real examples (they occupy the first slots).
    survival: whether `outputs` are Cox risk scores.
    num_resamples: resamples (static).
    draws: `bootstrap_draws(key, mask, num_resamples)`, when the caller has them.

  Returns:
    `{metric: [num_resamples]}`.
  """
  n_max = mask.shape[0]
  if draws is None:
    draws = bootstrap_draws(key, mask, num_resamples)

  def one(indices, auc=None, pr_auc=None):
    x, y = outputs[indices], labels[indices]
    if survival:
      found = survival_metrics(x[:, 0], y, mask)
    else:
      losses = -jnp.log(jnp.clip(jnp.take_along_axis(x, y[:, None], 1)[:, 0], 1e-12))
      found = classification_metrics(x, y, mask, losses, auc=auc, pr_auc=pr_auc)
    return {m: found[m] for m in BOOTSTRAP_METRICS}

  if not survival and outputs.shape[-1] == 2 and n_max * n_max // 2 < 2**24:
    aucs = _resampled_binary_aucs(outputs[:, 1], labels == 1, mask, draws)
    pr_aucs = _resampled_average_precisions(outputs[:, 1], labels == 1, mask, draws)
    return jax.vmap(one)(draws, aucs, pr_aucs)
  return jax.vmap(one)(draws)


def _resampled_binary_aucs(scores: jax.Array, positive: jax.Array, mask: jax.Array,
                           draws: jax.Array) -> jax.Array:
  """`binary_auc` of each resample `scores[draws[r]]` (real slots: `mask`), the same
  numbers without sorting each resample: a resample holds the original scores, so one
  sort of them and each resample's draw counts give every rank count.

  Exact, as `binary_auc` is (`_mann_whitney_auc` for both), while the win counts stay
  below 2^23 (callers ensure N^2 / 2 < 2^24).

  Args:
    scores: `[N]` the original scores.
    positive: `[N]` bool, the original classes.
    mask: `[N]` bool, real slots of the original and of every resample.
    draws: `[R, N]` int, the original example each resample slot holds.

  Returns:
    `[R]` AUCs (NaN without both classes or with a NaN score drawn).
  """
  counts = _draw_counts(mask, draws)  # [R, N]: times each example was drawn
  negative_counts = jnp.where(mask & ~positive, counts, 0)
  positive_counts = jnp.where(mask & positive, counts, 0)
  key = jnp.where(jnp.isnan(scores), jnp.inf, scores)  # an undrawn NaN weighs nothing
  order = jnp.argsort(key)
  sorted_key = key[order]
  start = jnp.searchsorted(sorted_key, key, side="left", method="scan")  # tie groups
  end = jnp.searchsorted(sorted_key, key, side="right", method="scan")
  below_counts = jnp.concatenate([jnp.zeros_like(negative_counts[:, :1]),
                                  jnp.cumsum(negative_counts[:, order], axis=1)], axis=1)
  auc = _mann_whitney_auc(below_counts[:, start], below_counts[:, end], positive_counts,
                          positive_counts.sum(1), negative_counts.sum(1))
  drawn_nan = jnp.any((counts > 0) & jnp.isnan(scores)[None, :], axis=1)
  return jnp.where(drawn_nan, jnp.nan, auc)


def _draw_counts(mask: jax.Array, draws: jax.Array) -> jax.Array:
  """`[R, N]`: how often each example was drawn into each resample's real slots."""
  n = mask.shape[0]
  return jax.vmap(lambda d: jnp.zeros((n,), jnp.int32).at[d].add(
      mask.astype(jnp.int32)))(draws)


def _resampled_average_precisions(scores: jax.Array, positive: jax.Array,
                                  mask: jax.Array, draws: jax.Array) -> jax.Array:
  """`average_precision` of each resample `scores[draws[r]]` (real slots: `mask`), the
  same numbers without sorting each resample (as `_resampled_binary_aucs`): one sort
  of the original scores, and each resample's draw counts give its true and false
  positives at every threshold.

  Each threshold's term `(R_n - R_{n-1}) P_n` is computed from the same integer
  counts as `average_precision` computes them on the resample, and put in the slot
  where that function has it (the resample's last example of the threshold, in its
  sorted order), so the sum over the slots is the same sum.

  Args:
    scores: `[N]` the original scores.
    positive: `[N]` bool, the original classes.
    mask: `[N]` bool, real slots of the original and of every resample.
    draws: `[R, N]` int, the original example each resample slot holds.

  Returns:
    `[R]` average precisions (NaN without a positive drawn, or with a NaN score
    drawn).
  """
  n = scores.shape[0]
  order = jnp.argsort(jnp.where(mask, -scores, jnp.inf), stable=True)
  s, y = scores[order], (positive & mask)[order]
  counts = _draw_counts(mask, draws)[:, order]  # [R, N] in the sorted order (padding: 0)
  index = jnp.arange(n)
  # Ties: a threshold is a group of equal scores (padding is never drawn).
  starts = jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]])
  first = jax.lax.cummax(jnp.where(starts, index, 0))
  last = jnp.concatenate([jax.lax.cummin(jnp.where(starts, index, n), reverse=True)[1:],
                          jnp.full((1,), n)]) - 1
  drawn = jnp.cumsum(counts, axis=1)  # [R, N]: examples drawn up to here
  tp = jnp.cumsum(jnp.where(y, counts, 0), axis=1)
  tp_before = jnp.where(first > 0, tp[:, jnp.maximum(first - 1, 0)], 0)
  # An example ends its threshold in the resample when it is the group's last drawn.
  is_last = (counts > 0) & (drawn == drawn[:, last])
  tp_f, fp_f = tp.astype(jnp.float32), (drawn - tp).astype(jnp.float32)
  precision = tp_f / jnp.maximum(tp_f + fp_f, 1.0)
  terms = (tp_f - tp_before.astype(jnp.float32)) * precision
  slot = jnp.where(is_last, drawn - 1, n)  # the resample's sorted slot (n: none)
  per_slot = jax.vmap(lambda t, i: jnp.zeros((n,), jnp.float32).at[i].set(
      t, mode="drop"))(terms, slot)
  num_pos = tp[:, -1].astype(jnp.float32)
  ap = _ratio(per_slot.sum(-1), num_pos)
  drawn_nan = jnp.any((counts > 0) & jnp.isnan(s)[None, :], axis=1)
  return jnp.where(drawn_nan, jnp.nan, ap)


def bootstrap_site_draws(key: jax.Array, mask: jax.Array, num_resamples: int
                         ) -> tuple[jax.Array, jax.Array]:
  """`bootstrap_draws` of every site (`[C, R, N]`, site k with `fold_in(key, k)`)
  and of the pooled test set (`[R, C * N]`, with `fold_in(key, C)`), as
  `bootstrap_sites` resamples them.

  Integer arithmetic only (the PRNG), so its own program may compile with any
  optimisation and give the same draws.
  """
  c, _ = mask.shape
  per_site = jax.vmap(lambda k, m: bootstrap_draws(jax.random.fold_in(key, k), m,
                                                   num_resamples))(jnp.arange(c), mask)
  pooled = bootstrap_draws(jax.random.fold_in(key, c), mask.reshape(-1), num_resamples)
  return per_site, pooled


def bootstrap_sites(key: jax.Array | None, outputs: jax.Array, labels: jax.Array,
                    mask: jax.Array, *, survival: bool, num_resamples: int,
                    draws: tuple[jax.Array, jax.Array] | None = None
                    ) -> dict[str, jax.Array]:
  """`bootstrap_metrics` of every site and of the pooled test set: `{metric: [R, C +
  1]}`, column C the pooled set; site k resamples with `fold_in(key, k)`
  (`bootstrap_site_draws`, or its result `draws` when the caller has it)."""
  c, n = mask.shape
  if draws is None:
    draws = bootstrap_site_draws(key, mask, num_resamples)
  site_draws, pooled_draws = draws
  per_site = jax.vmap(lambda d, o, y, m: bootstrap_metrics(
      None, o, y, m, survival=survival, num_resamples=num_resamples, draws=d))(
          site_draws, outputs, labels, mask)
  order = jnp.argsort(~mask.reshape(-1), stable=True)  # real examples first
  flat = lambda x: x.reshape((c * n,) + x.shape[2:])[order]
  pooled = bootstrap_metrics(None, flat(outputs), flat(labels), flat(mask),
                             survival=survival, num_resamples=num_resamples,
                             draws=pooled_draws)
  return {m: jnp.concatenate([per_site[m].T, pooled[m][:, None]], axis=1)
          for m in BOOTSTRAP_METRICS}


def outputs(model: _models.Model, logits: jax.Array) -> jax.Array:
  """What a model says of each example, `[..., K]`: class probabilities, or `[..., 1]`
  a Cox model's risk score."""
  if model.output == "cox":
    return logits
  return _models.probabilities(model, logits)


def survival_metrics(scores: jax.Array, labels: jax.Array, mask: jax.Array,
                     c_index: bool = True) -> dict[str, jax.Array]:
  """A survival model's metrics on one set: `loss` (the negative Cox partial
  log-likelihood over the whole set, Breslow's ties, per example) and `c_index`
  (`_survival.concordance_index`); the classification metrics are NaN.

  Args:
    scores: `[N]` risk scores.
    labels: `[N, 2]` (event, time).
    mask: `[N]` True on real examples.
    c_index: False: `c_index` NaN (`evaluate_before_c_index`).
  """
  events, times = labels[:, 0], labels[:, 1]
  count = mask.sum().astype(jnp.float32)
  terms = _survival.cox_loss_terms(scores, events, times, mask.astype(jnp.float32))
  nan = jnp.float32(jnp.nan)
  finite = jnp.all(jnp.isfinite(scores) | ~mask)
  metrics = {
      "loss": _ratio(terms.sum(), count),
      "c_index": (_survival.concordance_index(scores, events, times, mask) if c_index
                  else nan),
      "accuracy": nan, "balanced_accuracy": nan, "auc": nan, "sensitivity": nan,
      "specificity": nan, "f1": nan, "pr_auc": nan, "brier": nan, "ece": nan,
  }
  metrics = {k: jnp.where(finite, v, jnp.nan) for k, v in metrics.items()}
  return {**metrics, "num_examples": mask.sum()}


@functools.partial(jax.jit, static_argnums=0)  # one program, not op by op
def evaluate(model: _models.Model, params: Any, data: ClientData) -> dict[str, Any]:
  """Evaluates one model on every client's data and on the pooled data.

  Args:
    model: the model.
    params: its parameters (one model, not stacked).
    data: `ClientData` with C clients (usually their test parts).

  Returns:
    `{"clients": {metric: [C]}, "pooled": {metric: []}}` (arrays; `metrics_table`
    makes a DataFrame of it).
  """
  logits = jax.vmap(model.apply, in_axes=(None, 0))(params, data.features)
  return _evaluate_logits(model, logits, data)


@functools.partial(jax.jit, static_argnums=0)  # as `evaluate`: one program
def evaluate_before_c_index(model: _models.Model, params: Any, data: ClientData
                            ) -> tuple[dict[str, Any], jax.Array]:
  """`evaluate` of a Cox model with `c_index` left NaN, and the risk scores `[C, N]`
  that `c_index_of` takes to fill it in.

  The concordance index is counting (comparisons and integers, then one division),
  so a program of its own gives the same numbers at any XLA optimisation, while
  the rest of the evaluation keeps its own (the study's evaluators of a Cox model
  at `fast_compile`: the counts are half of an evaluation's time at backend level 0
  and a seventh of it at level 1).
  """
  logits = jax.vmap(model.apply, in_axes=(None, 0))(params, data.features)
  return _evaluate_logits(model, logits, data, c_index=False), logits[..., 0]


@functools.partial(jax.jit, static_argnums=0)  # as `evaluate_stacked`
def evaluate_stacked_before_c_index(model: _models.Model, stacked_params: Any,
                                    data: ClientData
                                    ) -> tuple[dict[str, Any], jax.Array]:
  """`evaluate_before_c_index` of M stacked models: scores `[M, C, N]`."""
  return jax.vmap(lambda params: evaluate_before_c_index(model, params, data))(
      stacked_params)


def c_index_of(scores: jax.Array, data: ClientData) -> dict[str, jax.Array]:
  """`evaluate`'s `c_index` of a Cox model, `{"clients": [C], "pooled": []}`, from the
  risk scores `[C, N]` of `evaluate_before_c_index`: the same numbers (NaN where a
  real example's score is not finite, or no pair is admissible)."""
  events, times = data.labels[..., 0], data.labels[..., 1]

  def one(s, e, t, m):
    finite = jnp.all(jnp.isfinite(s) | ~m)
    return jnp.where(finite, _survival.concordance_index(s, e, t, m), jnp.nan)

  return {"clients": jax.vmap(one)(scores, events, times, data.mask),
          "pooled": one(scores.reshape(-1), events.reshape(-1), times.reshape(-1),
                        data.mask.reshape(-1))}


def metrics_table(results: dict[str, Any], client_names=None):
  """`evaluate`'s (or `evaluate_personalized`'s) result as a pandas DataFrame: one row
  per client and one for the pooled data, one float column per metric.

  Args:
    results: `{"clients": {metric: [C]}, "pooled": {metric: []}}`.
    client_names: a name per client (default: "client 0", "client 1", ...).

  Example:
    >>> fdx.metrics_table(fdx.evaluate(model, params, data.test), ["Cleveland", ...])
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  clients = {k: np.asarray(v) for k, v in jax.device_get(results["clients"]).items()}
  pooled = {k: np.asarray(v) for k, v in jax.device_get(results["pooled"]).items()}
  count = len(next(iter(clients.values())))
  names = list(client_names) if client_names is not None else [
      f"client {k}" for k in range(count)]
  if len(names) != count:
    raise ValueError(f"client_names: got {len(names)} names for {count} clients")
  rows = [{"client": name, **{m: float(v[k]) for m, v in clients.items()}}
          for k, name in enumerate(names)]
  rows.append({"client": "pooled", **{m: float(v) for m, v in pooled.items()}})
  frame = pd.DataFrame(rows).set_index("client")
  if "num_examples" in frame:
    frame["num_examples"] = frame["num_examples"].astype(int)
  return frame


@functools.partial(jax.jit, static_argnums=0)  # one program, not op by op
def evaluate_personalized(model: _models.Model, stacked_params: Any,
                          data: ClientData) -> dict[str, Any]:
  """Evaluates personalized models: client k's own model on client k's data.

  Args:
    model: the model.
    stacked_params: `[C, ...]`, one model per client (e.g. `Algorithm.personalize`).
    data: `ClientData` with the same C clients.

  Returns:
    `{"clients": {metric: [C]}, "pooled": {metric: []}}`; pooled metrics are over
    every client's predictions by its own model.
  """
  logits = jax.vmap(model.apply)(stacked_params, data.features)
  return _evaluate_logits(model, logits, data)


def _evaluate_logits(model, logits, data: ClientData, c_index: bool = True
                     ) -> dict[str, Any]:
  c, n = data.labels.shape[:2]
  if model.output == "cox":
    scores = logits[..., 0]
    per_client = jax.vmap(functools.partial(survival_metrics, c_index=c_index))(
        scores, data.labels, data.mask)
    pooled = survival_metrics(scores.reshape(-1), data.labels.reshape(c * n, 2),
                              data.mask.reshape(-1), c_index=c_index)
    return {"clients": per_client, "pooled": pooled}
  return metrics_of_outputs(*classification_outputs(model, logits, data.labels), data)


def evaluate_pooled(model: _models.Model, params: Any, data: ClientData
                    ) -> dict[str, Any]:
  """`evaluate`'s pooled part alone, `{"pooled": {metric: []}}`, of a classification
  model: the same arithmetic on every client's examples as one set (the study's
  FLamby pooled sets, one client each, report nothing per client)."""
  c, n = data.labels.shape[:2]
  logits = jax.vmap(model.apply, in_axes=(None, 0))(params, data.features)
  probs, losses = classification_outputs(model, logits, data.labels)
  return {"pooled": classification_metrics(
      probs.reshape((c * n, -1)), data.labels.reshape(-1), data.mask.reshape(-1),
      losses.reshape(-1))}


def classification_outputs(model: _models.Model, logits: jax.Array, labels: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """A classification model's class probabilities `[C, N, K]` and per-example losses
  `[C, N]` from its logits `[C, N, out]` on every client's examples: the model's
  arithmetic of an evaluation (`metrics_of_outputs` counts the metrics from them)."""
  c, n = labels.shape[:2]
  probs = _models.probabilities(model, logits)
  losses = _models.per_example_loss(
      model, logits.reshape((c * n, -1)), labels.reshape(-1)).reshape(c, n)
  return probs, losses


def metrics_of_outputs(probs: jax.Array, losses: jax.Array, data: ClientData
                       ) -> dict[str, Any]:
  """`evaluate`'s result from `classification_outputs`: `classification_metrics` of
  every client and of the pooled data, `{"clients": {metric: [C]}, "pooled": {metric:
  []}}` (labels and mask from `data`)."""
  c, n = data.labels.shape[:2]
  per_client = jax.vmap(classification_metrics)(probs, data.labels, data.mask, losses)
  pooled = classification_metrics(
      probs.reshape((c * n, -1)), data.labels.reshape(-1), data.mask.reshape(-1),
      losses.reshape(-1))
  return {"clients": per_client, "pooled": pooled}


@functools.partial(jax.jit, static_argnums=0)  # one program, not op by op
def evaluate_stacked(model: _models.Model, stacked_params: Any,
                     data: ClientData) -> dict[str, Any]:
  """Evaluates M stacked models (e.g. local-only training) on every client.

  Returns:
    `{"clients": {metric: [M, C]}, "pooled": {metric: [M]}}`.
  """
  return jax.vmap(lambda params: evaluate(model, params, data))(stacked_params)
