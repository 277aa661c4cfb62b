"""Differential privacy: clipping and noising client updates, and the privacy budget.

The budget comes from Google's `dp-accounting` (RDP or PLD accountant): `epsilon` of a
run from its noise multiplier, sampling rate and number of noised releases, and
`noise_for_epsilon` for the noise multiplier that reaches a target epsilon.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

ACCOUNTANTS = ("rdp", "pld")
DP_MODES = ("central", "local")
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


def membership_inference(model, params, members, non_members) -> dict[str, jax.Array]:
  """The loss-threshold membership-inference attack (Yeom et al., 2018) on one model.

  The attacker guesses "member" when an example's loss is low. Its success over all
  thresholds is the ROC AUC of the score `-loss` with training examples (`members`) as
  positives and held-out examples (`non_members`) as negatives; 0.5 means the model
  leaks nothing this attack can see. Also the true-positive rate at a 1% false-positive
  rate (the threshold that 1% of non-members pass), the figure that matters for the
  few patients most exposed.

  Args:
    model: the model.
    params: one model's parameters.
    members: `ClientData` it was trained on (all clients pooled by the attack).
    non_members: `ClientData` it never saw (e.g. the test split).

  Returns:
    `{"auc": [], "tpr_at_1pct_fpr": []}`.
  """
  from fedjax_dx import _metrics
  from fedjax_dx import _models

  def scores(data):
    features = data.features.reshape((-1,) + data.features.shape[2:])
    logits = model.apply(params, features)
    losses = _models.per_example_loss(model, logits, data.labels.reshape(-1))
    return -losses, data.mask.reshape(-1)

  member_scores, member_mask = scores(members)
  other_scores, other_mask = scores(non_members)
  all_scores = jnp.concatenate([member_scores, other_scores])
  is_member = jnp.concatenate([jnp.ones_like(member_mask), jnp.zeros_like(other_mask)])
  mask = jnp.concatenate([member_mask, other_mask])
  auc = _metrics.binary_auc(all_scores, is_member, mask)
  # The threshold passed by 1% of non-members: the 99th percentile of their scores.
  threshold = jnp.nanquantile(jnp.where(other_mask, other_scores, jnp.nan), 0.99)
  passed = (member_scores > threshold) & member_mask
  tpr = passed.sum() / jnp.maximum(member_mask.sum(), 1)
  return {"auc": auc, "tpr_at_1pct_fpr": tpr}
