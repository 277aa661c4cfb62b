"""The membership-inference audit of trained models (loss-threshold attacks)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _attack_scores(scores, member_mask, other_scores, other_mask):
  from fedjax_dx.core import _metrics
  all_scores = jnp.concatenate([scores, other_scores])
  is_member = jnp.concatenate([jnp.ones_like(member_mask), jnp.zeros_like(other_mask)])
  auc = _metrics.binary_auc(all_scores, is_member, jnp.concatenate([member_mask,
                                                                    other_mask]))
  # The threshold passed by 1% of non-members: the 99th percentile of their scores.
  threshold = jnp.nanquantile(jnp.where(other_mask, other_scores, jnp.nan), 0.99)
  passed = (scores > threshold) & member_mask
  tpr = passed.sum() / jnp.maximum(member_mask.sum(), 1)
  # NaN losses (a diverged model): no attack result, not a rate of 0.
  undefined = jnp.any(member_mask & jnp.isnan(scores)) | jnp.any(
      other_mask & jnp.isnan(other_scores))
  return auc, jnp.where(undefined, jnp.nan, tpr)


def _class_balanced_auc(scores, labels, member_mask, other_scores, other_labels,
                        other_mask, num_classes):
  """The attack's AUC within each class, averaged over the classes that both sets
  hold (NaN when none does)."""
  from fedjax_dx.core import _metrics
  all_scores = jnp.concatenate([scores, other_scores])
  is_member = jnp.concatenate([jnp.ones_like(member_mask), jnp.zeros_like(other_mask)])
  all_labels = jnp.concatenate([labels, other_labels])
  all_mask = jnp.concatenate([member_mask, other_mask])
  aucs = jnp.stack([_metrics.binary_auc(all_scores, is_member,
                                        all_mask & (all_labels == c))
                    for c in range(max(num_classes, 2))])
  present = ~jnp.isnan(aucs)
  return jnp.where(present.any(), jnp.where(present, aucs, 0.0).sum()
                   / jnp.maximum(present.sum(), 1), jnp.nan)


@functools.partial(jax.jit, static_argnums=0)  # one program, not op by op
def membership_inference(model, params, members, non_members,
                         reference_params=None) -> dict[str, jax.Array]:
  """The loss-threshold membership-inference attack (Yeom et al., 2018) on one model.

  The attacker guesses "member" when an example's loss is low. Its success over all
  thresholds is the ROC AUC of the score `-loss` with training examples (`members`) as
  positives and held-out examples (`non_members`) as negatives; 0.5 means the model
  leaks nothing this attack can see. Also the true-positive rate at a 1% false-positive
  rate (the threshold that 1% of non-members pass), the figure that matters for the
  few patients most exposed.

  The calibrated variant (difficulty calibration, Watson et al., ICLR 2022, without
  shadow models) scores `loss_reference(x) - loss(x)`: how much training lowered the
  example's loss, so examples that are easy for any model stop looking like members.
  The reference is a model that saw none of the examples, such as the initial model.

  The class-balanced AUC compares members and non-members of the same class only (the
  plain attack's AUC within each class, averaged over the classes present in both
  sets): when the two sets hold the classes in different proportions (PneumoniaMNIST's
  train split has 74% pneumonia, its test split 62.5%), a model whose loss depends on
  the class already separates them without memorising anyone; this AUC does not count
  that.

  Args:
    model: the model.
    params: one model's parameters.
    members: `ClientData` it was trained on (all clients pooled by the attack).
    non_members: `ClientData` it never saw (e.g. the test split).
    reference_params: parameters of a model that saw neither set (the starting model
      of training), for the calibrated attack; None: the plain attack only.

  Returns:
    `{"auc": [], "tpr_at_1pct_fpr": [], "class_balanced_auc": []}`, plus
    `calibrated_auc` and `calibrated_tpr_at_1pct_fpr` with `reference_params`.
  """
  return attack_from_losses(
      attack_losses(model, params, members, non_members, reference_params),
      members, non_members, model.num_classes)


def attack_losses(model, params, members, non_members, reference_params=None):
  """`membership_inference`'s per-example losses (the model's arithmetic):
  `(member losses [M], non-member losses [O])` of `params` and, with
  `reference_params`, the same of the reference model (else None); members' and
  non-members' clients pooled."""
  from fedjax_dx.core import _models

  def losses(p, data):
    features = data.features.reshape((-1,) + data.features.shape[2:])
    return _models.per_example_loss(model, model.apply(p, features),
                                    data.labels.reshape(-1))

  found = (losses(params, members), losses(params, non_members))
  reference = None
  if reference_params is not None:
    reference = (losses(reference_params, members), losses(reference_params,
                                                           non_members))
  return found, reference


def attack_from_losses(losses, members, non_members, num_classes: int
                       ) -> dict[str, jax.Array]:
  """`membership_inference`'s result from `attack_losses` (labels and masks from
  `members` and `non_members`)."""
  (member_loss, other_loss), reference = losses
  member_mask, other_mask = members.mask.reshape(-1), non_members.mask.reshape(-1)
  auc, tpr = _attack_scores(-member_loss, member_mask, -other_loss, other_mask)
  result = {"auc": auc, "tpr_at_1pct_fpr": tpr, "class_balanced_auc":
            _class_balanced_auc(-member_loss, members.labels.reshape(-1), member_mask,
                                -other_loss, non_members.labels.reshape(-1),
                                other_mask, num_classes)}
  if reference is not None:
    auc, tpr = _attack_scores(reference[0] - member_loss, member_mask,
                              reference[1] - other_loss, other_mask)
    result.update(calibrated_auc=auc, calibrated_tpr_at_1pct_fpr=tpr)
  return result
