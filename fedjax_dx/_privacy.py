"""Differential privacy: clipping and noising client updates, and the privacy budget.

The budget comes from Google's `dp-accounting` (RDP or PLD accountant): `epsilon` of a
run from its noise multiplier, sampling rate and number of noised releases, and
`noise_for_epsilon` for the noise multiplier that reaches a target epsilon.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ACCOUNTANTS = ("rdp", "pld")
DP_MODES = ("central", "local", "example")
MAX_NOISE_MULTIPLIER = 1000.0


def check_budget_args(*, delta: float, sampling_rate: float, steps: int,
                      accountant: str) -> None:
  """Range checks shared by `epsilon` and `noise_for_epsilon` (clear ValueErrors)."""
  if not 0 < delta < 1:
    raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
  if not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate must lie in (0, 1], got {sampling_rate!r}")
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps (noised releases) must be an integer >= 1, got {steps!r}")
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


class _SkipNonConvergedOrders(logging.Filter):
  """dp-accounting's RDP accountant warns for every Renyi order whose series does not
  converge at small noise, and then leaves that order out (its result stays a valid
  bound); one line per order and call would flood a study's log."""

  def filter(self, record):
    return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkipNonConvergedOrders())


def _event(noise_multiplier: float, sampling_rate: float, steps: int):
  import dp_accounting
  release = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1:
    release = dp_accounting.PoissonSampledDpEvent(sampling_rate, release)
  return dp_accounting.SelfComposedDpEvent(release, steps)


def _accountant(name: str):
  import dp_accounting
  if name == "rdp":
    return dp_accounting.rdp.RdpAccountant()
  return dp_accounting.pld.PLDAccountant()


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
  """The epsilon at `delta` of `steps` Gaussian releases with Poisson sampling.

  Args:
    noise_multiplier: noise standard deviation / sensitivity (clip norm); 0 = no noise.
    sampling_rate: probability that a unit (a client for client-level DP) takes part
      in a release; 1 for full participation.
    steps: noised releases (rounds for DP-FedAvg).
    delta: the delta of the (epsilon, delta) guarantee.
    accountant: "rdp" (Renyi DP) or "pld" (privacy loss distributions; tighter).

  Returns:
    epsilon (inf without noise).
  """
  check_budget_args(delta=delta, sampling_rate=sampling_rate, steps=steps,
                    accountant=accountant)
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
  if noise_multiplier == 0:
    return math.inf
  ledger = _accountant(accountant)
  ledger.compose(_event(noise_multiplier, sampling_rate, steps))
  return float(ledger.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, delta: float, sampling_rate: float,
                      steps: int, accountant: str = "rdp") -> float:
  """The smallest noise multiplier whose run reaches `target_epsilon` at `delta`.

  Raises:
    ValueError: epsilon <= 0, or no multiplier up to `MAX_NOISE_MULTIPLIER` reaches it.
  """
  check_budget_args(delta=delta, sampling_rate=sampling_rate, steps=steps,
                    accountant=accountant)
  if not target_epsilon > 0:
    raise ValueError(f"target epsilon must be > 0, got {target_epsilon!r}")
  best = epsilon(MAX_NOISE_MULTIPLIER, sampling_rate, steps, delta, accountant)
  if best > target_epsilon:
    raise ValueError(
        f"target epsilon {target_epsilon} is not reached by any noise multiplier up to "
        f"{MAX_NOISE_MULTIPLIER:g} (that gives epsilon {best:.4g} for {steps} releases at "
        f"sampling rate {sampling_rate:g}, delta {delta:g}); allow a larger epsilon, "
        "fewer rounds or a lower sampling rate")
  import dp_accounting

  def calibrate(name, low, high):
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(name), lambda z: _event(z, sampling_rate, steps),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(low, high),
        tol=1e-4))

  rdp_noise = calibrate("rdp", 1e-3, MAX_NOISE_MULTIPLIER)
  if accountant == "rdp":
    return rdp_noise
  # PLD is tighter, so it needs no more noise than RDP; tiny multipliers would make
  # its distributions huge, so the search starts near the RDP answer.
  return calibrate("pld", rdp_noise / 4, rdp_noise)


def _example_level_groups(batch_size: int, num_examples, steps):
  """The distinct (sampling rate, steps) pairs of the clients with data and steps."""
  sizes = np.asarray(num_examples)
  steps = np.broadcast_to(np.asarray(steps), sizes.shape)
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  pairs = {(min(1.0, batch_size / int(n)), int(k)) for n, k in zip(sizes, steps)
           if n > 0 and k > 0}
  if not pairs:
    raise ValueError("no client has both examples and local steps")
  return sorted(pairs)


def example_level_epsilon(noise_multiplier: float, batch_size: int, num_examples,
                          steps, delta: float, accountant: str = "rdp") -> float:
  """epsilon of example-level DP-SGD in federated training: the worst hospital's.

  Each hospital runs DP-SGD on its own patients: its `steps[k]` noised steps sample
  batches of `batch_size` of its `num_examples[k]` examples, accounted as Poisson
  sampling at rate `batch_size / n_k` (the usual approximation of shuffled batches).
  A patient belongs to one hospital, so the guarantee is the largest epsilon over
  hospitals (the smallest ones, with the highest sampling rate, spend most).

  Args:
    noise_multiplier: DP-SGD's noise std / per-example clipping norm.
    batch_size: examples per local step.
    num_examples: `[C]` training examples per hospital.
    steps: `[C]` (or one number) noised local steps each hospital has taken.
    delta: the delta of the guarantee.
    accountant: "rdp" or "pld".
  """
  return max(epsilon(noise_multiplier, rate, k, delta, accountant)
             for rate, k in _example_level_groups(batch_size, num_examples, steps))


def example_level_noise(target_epsilon: float, batch_size: int, num_examples, steps,
                        delta: float, accountant: str = "rdp") -> float:
  """The noise multiplier at which every hospital's DP-SGD spends at most
  `target_epsilon` (the largest of the per-hospital calibrations)."""
  return max(noise_for_epsilon(target_epsilon, delta, rate, k, accountant)
             for rate, k in _example_level_groups(batch_size, num_examples, steps))


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


def _attack_scores(scores, member_mask, other_scores, other_mask):
  from fedjax_dx import _metrics
  all_scores = jnp.concatenate([scores, other_scores])
  is_member = jnp.concatenate([jnp.ones_like(member_mask), jnp.zeros_like(other_mask)])
  auc = _metrics.binary_auc(all_scores, is_member, jnp.concatenate([member_mask,
                                                                    other_mask]))
  # The threshold passed by 1% of non-members: the 99th percentile of their scores.
  threshold = jnp.nanquantile(jnp.where(other_mask, other_scores, jnp.nan), 0.99)
  passed = (scores > threshold) & member_mask
  return auc, passed.sum() / jnp.maximum(member_mask.sum(), 1)


def _class_balanced_auc(scores, labels, member_mask, other_scores, other_labels,
                        other_mask, num_classes):
  """The attack's AUC within each class, averaged over the classes that both sets
  hold (NaN when none does)."""
  from fedjax_dx import _metrics
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
  from fedjax_dx import _models

  def losses(p, data):
    features = data.features.reshape((-1,) + data.features.shape[2:])
    return _models.per_example_loss(model, model.apply(p, features),
                                    data.labels.reshape(-1))

  member_mask, other_mask = members.mask.reshape(-1), non_members.mask.reshape(-1)
  member_loss, other_loss = losses(params, members), losses(params, non_members)
  auc, tpr = _attack_scores(-member_loss, member_mask, -other_loss, other_mask)
  result = {"auc": auc, "tpr_at_1pct_fpr": tpr, "class_balanced_auc":
            _class_balanced_auc(-member_loss, members.labels.reshape(-1), member_mask,
                                -other_loss, non_members.labels.reshape(-1),
                                other_mask, model.num_classes)}
  if reference_params is not None:
    auc, tpr = _attack_scores(losses(reference_params, members) - member_loss,
                              member_mask,
                              losses(reference_params, non_members) - other_loss,
                              other_mask)
    result.update(calibrated_auc=auc, calibrated_tpr_at_1pct_fpr=tpr)
  return result
