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
import jax.numpy as jnp

from fedjax_dx.core import _models
from fedjax_dx.core import _survival
from fedjax_dx.core._data import ClientData

METRIC_NAMES = ("loss", "accuracy", "balanced_accuracy", "auc", "sensitivity", "c_index",
                "specificity", "f1", "num_examples")


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
  below = jnp.searchsorted(negative_scores, scores, side="left", method="sort")
  below_or_tied = jnp.searchsorted(negative_scores, scores, side="right", method="sort")
  # An infinite score would also count the masked +inf entries as ties.
  below_or_tied = jnp.minimum(below_or_tied, neg.sum())
  wins = (below + 0.5 * (below_or_tied - below)).astype(jnp.float32)
  num_pos, num_neg = pos.sum(), neg.sum()
  pairs = num_pos.astype(jnp.float32) * num_neg.astype(jnp.float32)
  auc = _ratio(jnp.where(pos, wins, 0.0).sum(), pairs)
  # A NaN score has no rank: the count above would be a number, even above 1.
  return jnp.where(jnp.any(mask & jnp.isnan(scores)), jnp.nan, auc)


def classification_metrics(probs: jax.Array, labels: jax.Array, mask: jax.Array,
                           losses: jax.Array) -> dict[str, jax.Array]:
  """Loss, accuracy, balanced accuracy, AUC, sensitivity, specificity and F1.

  Binary tasks (2 classes) report class 1 as the positive (diseased) class. With more
  classes, sensitivity, specificity, F1 and AUC (one-vs-rest) are macro averages over
  the classes where each is defined; balanced accuracy is the mean recall over the
  classes present, as in scikit-learn.

  Args:
    probs: `[N, K]` class probabilities.
    labels: `[N]` integer labels.
    mask: `[N]` bool, real examples.
    losses: `[N]` per-example loss.

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
        auc=binary_auc(probs[:, 1], labels == 1, mask), sensitivity=recall[1],
        specificity=specificity[1], f1=f1[1])
  else:
    aucs = jax.vmap(lambda c: binary_auc(probs[:, c], labels == c, mask))(
        jnp.arange(num_classes))
    metrics.update(auc=_nanmean(aucs), sensitivity=_nanmean(recall),
                   specificity=_nanmean(specificity), f1=_nanmean(f1))
  # A model whose outputs are not finite (diverged) has no accuracy, not the majority
  # class's: every metric NaN.
  finite = jnp.all(jnp.isfinite(probs) | ~mask[:, None]) & jnp.all(
      jnp.isfinite(losses) | ~mask)
  metrics["c_index"] = jnp.float32(jnp.nan)  # survival tasks only
  return {name: value if name == "num_examples" else jnp.where(finite, value, jnp.nan)
          for name, value in metrics.items()}


def survival_metrics(scores: jax.Array, labels: jax.Array, mask: jax.Array
                     ) -> dict[str, jax.Array]:
  """A survival model's metrics on one set: `loss` (the negative Cox partial
  log-likelihood over the whole set, Breslow's ties, per example) and `c_index`
  (`_survival.concordance_index`); the classification metrics are NaN.

  Args:
    scores: `[N]` risk scores.
    labels: `[N, 2]` (event, time).
    mask: `[N]` True on real examples.
  """
  events, times = labels[:, 0], labels[:, 1]
  count = mask.sum().astype(jnp.float32)
  terms = _survival.cox_loss_terms(scores, events, times, mask.astype(jnp.float32))
  nan = jnp.float32(jnp.nan)
  finite = jnp.all(jnp.isfinite(scores) | ~mask)
  metrics = {
      "loss": _ratio(terms.sum(), count),
      "c_index": _survival.concordance_index(scores, events, times, mask),
      "accuracy": nan, "balanced_accuracy": nan, "auc": nan, "sensitivity": nan,
      "specificity": nan, "f1": nan,
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
    `{"clients": {metric: [C]}, "pooled": {metric: []}}`.
  """
  logits = jax.vmap(model.apply, in_axes=(None, 0))(params, data.features)
  return _evaluate_logits(model, logits, data)


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


def _evaluate_logits(model, logits, data: ClientData) -> dict[str, Any]:
  c, n = data.labels.shape[:2]
  if model.output == "cox":
    scores = logits[..., 0]
    per_client = jax.vmap(survival_metrics)(scores, data.labels, data.mask)
    pooled = survival_metrics(scores.reshape(-1), data.labels.reshape(c * n, 2),
                              data.mask.reshape(-1))
    return {"clients": per_client, "pooled": pooled}
  probs = _models.probabilities(model, logits)
  losses = _models.per_example_loss(
      model, logits.reshape((c * n, -1)), data.labels.reshape(-1)).reshape(c, n)
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
