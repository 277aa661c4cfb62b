"""An empirical epsilon: the one-run canary audit of client-level DP.

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
