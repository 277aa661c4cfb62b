"""An empirical epsilon: the one-run canary audit of client-level and example-level DP.

Example level (DP-SGD): `with_canary_examples` adds the canary examples that are in to
the hospitals' training data, each marked in its features; DP-SGD
(`client.dp_sgd(..., canaries=count)`) gives a marked example the clipping norm along
its canary's direction in place of its gradient. The rest is as below.

`with_canaries` appends canary clients to the training data and `canary_participation`
includes each with probability 1/2 (a seeded draw); the aggregator chain's first stage
(`agg.canaries`) makes each one upload a crafted update along a direction of its own.
After training, `canary_scores` projects what the adversary sees (the final model minus
the initial one) on each direction, and `audit` turns the scores of the canaries that
were in and of those that were out into epsilon lower bounds with jax-privacy's
`CanaryScoreAuditor` (Steinke, Nasr & Jagielski 2023, `epsilon_one_run`; and the
Clopper-Pearson bound, `epsilon_clopper_pearson`). jax-privacy needs Python >= 3.11:
`pip install fedjax_dx[audit]`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np

from fedjax_dx.core import _data

AUDIT_KEY = 0xA0D17  # seed of the canaries' inclusion draws (folded with the run's seed)


class AuditResult(NamedTuple):
  """Lower bounds on epsilon from one run's canaries."""
  epsilon_one_run: float  # Steinke et al. (2023), at `confidence`
  epsilon_clopper_pearson: float  # Clopper-Pearson bound on TPR / FPR, at `confidence`
  auroc: float  # of the canary scores (0.5: no signal)
  confidence: float  # 1 - significance
  num_canaries: int


def auditor_class():
  """jax-privacy's `CanaryScoreAuditor`, or an ImportError saying how to get it."""
  try:
    from jax_privacy import auditing  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "the privacy audit uses jax-privacy's CanaryScoreAuditor: pip install "
        "'fedjax_dx[audit]' (jax-privacy needs Python >= 3.11)") from e
  return auditing.CanaryScoreAuditor


def with_canaries(train: _data.ClientData, count: int) -> _data.ClientData:
  """`train` with `count` canary clients appended, one all-zero example each (their
  training is replaced by the canary stage's crafted update)."""
  c = train.num_clients
  pad = lambda x: jnp.concatenate([x, jnp.zeros((count,) + x.shape[1:], x.dtype)])
  mask = pad(train.mask).at[c:, 0].set(True)
  num_examples = pad(train.num_examples).at[c:].set(1)
  return train.replace(features=pad(train.features), labels=pad(train.labels),
                       mask=mask, num_examples=num_examples)


CANARY_MARK = -7.7e7  # the first feature of a canary example (no real data holds it)


def with_canary_examples(train: _data.ClientData, count: int, seed: int):
  """`train` with the canary examples that are in (`canary_inclusion(seed, count)`)
  appended to the hospitals' rows, canary i in hospital i mod C, and the inclusion.
  A canary example's features are zeros but for the mark and its index; its label 0
  (its gradient is crafted, `craft_example_gradients`)."""
  inside = canary_inclusion(seed, count)
  c = train.num_clients
  features, labels = _data.unstack_clients(train)
  for i in np.flatnonzero(inside):
    k = i % c
    x = np.zeros((1,) + tuple(train.feature_shape), np.float32)
    flat = x.reshape(-1)
    flat[0], flat[1] = CANARY_MARK, float(i)
    features[k] = np.concatenate([features[k], x])
    labels[k] = np.concatenate([labels[k], np.zeros((1,) + labels[k].shape[1:],
                                                    labels[k].dtype)])
  num_classes = int(np.max(np.concatenate([np.ravel(y) for y in labels]))) + 1
  stacked = _data.stack_clients(features, labels, num_classes=max(num_classes, 2),
                                name="train with canaries")
  return stacked, inside


def craft_example_gradients(per_example, features, params, count: int,
                            clip_norm: float):
  """Per-example gradients `[B, ...]` with each marked canary example's replaced by
  `clip_norm` against its canary's direction (so training moves the model along it);
  also the canary flags `[B]`."""
  from fedjax_dx.agg._canary import canary_directions  # pylint: disable=g-import-not-at-top
  flat_x = features.reshape(features.shape[0], -1)
  is_canary = flat_x[:, 0] == CANARY_MARK
  index = jnp.clip(flat_x[:, 1].astype(jnp.int32), 0, count - 1)
  _, unravel = ravel_pytree(params)
  size = ravel_pytree(params)[0].size
  # Computed once when tracing (a constant of the program), not in every step.
  with jax.ensure_compile_time_eval():
    directions = canary_directions(0, count, size)
  # Minus the direction: a descent step then moves the model along it (the score).
  crafted = jax.vmap(unravel)(-clip_norm * directions[index])
  mixed = jax.tree.map(
      lambda g, c: jnp.where(is_canary.reshape((-1,) + (1,) * (g.ndim - 1)), c, g),
      per_example, crafted)
  return mixed, is_canary


def canary_inclusion(seed: int, count: int) -> np.ndarray:
  """Which canaries are in (`[count]` bool, each with probability 1/2, seeded)."""
  return np.random.default_rng([AUDIT_KEY, seed]).random(count) < 0.5


def canary_participation(seed: int, participation: np.ndarray, count: int,
                         rate: float = 1.0) -> np.ndarray:
  """`participation [R, C]` with `count` canary columns appended: a canary that is in
  takes part in a round as a real client does (with probability `rate` under Poisson
  sampling, else every round); one that is out never does."""
  rounds = participation.shape[0]
  rng = np.random.default_rng([AUDIT_KEY, seed, 1])
  inside = canary_inclusion(seed, count)
  drawn = rng.random((rounds, count)) < rate if rate < 1 else np.ones((rounds, count), bool)
  return np.concatenate([participation, (drawn & inside).astype(participation.dtype)],
                        axis=1)


def canary_scores(initial_params, final_params, directions) -> np.ndarray:
  """Each canary's score: the final model's move along its direction (`[count]`)."""
  moved = ravel_pytree(final_params)[0] - ravel_pytree(initial_params)[0]
  return np.asarray(jax.device_get(jnp.asarray(directions) @ moved))


def audit(scores: np.ndarray, included: np.ndarray, *, delta: float,
          significance: float = 0.05) -> AuditResult:
  """Epsilon lower bounds from the canaries' scores (higher = more likely in).

  Args:
    scores: `[count]` canary scores.
    included: `[count]` bool, which canaries were in.
    delta: the delta of the guarantee audited.
    significance: the chance the bounds are wrong (confidence = 1 - significance).
  """
  scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
  if included.all() or not included.any():
    raise ValueError("the audit needs canaries both in and out")
  auditor = auditor_class()(scores[included], scores[~included])
  return AuditResult(
      float(auditor.epsilon_one_run(significance, delta)),
      float(auditor.epsilon_clopper_pearson(significance, delta)),
      float(auditor.attack_auroc()), round(1 - significance, 9), len(scores))
