"""Survival analysis: the Cox loss (Breslow's ties) against NumPy and FLamby's loop, the
C-index against lifelines (test-only oracle), and FedAvg on survival data against the
sequential reference."""

import jax
import jax.numpy as jnp
from lifelines import utils as lifelines_utils  # test-only oracle (test extras)
import numpy as np
import optax
import pytest

import fedjax_dx as fdx
from fedjax_dx.core import _survival
from tests import reference
from tests.test_algorithms import assert_trees_close


def _breslow_numpy(scores, events, times):
  """The negative partial log-likelihood, Breslow's ties, mean over the examples."""
  total = 0.0
  for i in range(len(scores)):
    if events[i]:
      at_risk = times >= times[i]
      total += np.log(np.exp(scores[at_risk]).sum()) - scores[i]
  return total / len(scores)


def _flamby_loss(scores, events, times):
  """FLamby's BaselineLoss (fed_tcga_brca/loss.py), transcribed: sort by time
  descending, term i = log sum_{j <= i} exp(s_j - s_i), times the event, mean."""
  order = sorted(range(len(scores)), key=lambda i: -times[i])
  s, e = scores[order], events[order]
  terms = np.zeros(len(s))
  for i in range(1, len(s)):
    aux = s[:i + 1] - s[i]
    terms[i] = aux.max() + np.log(np.exp(aux - aux.max()).sum())
  return (terms * e).mean()


def _survival_sample(rng, n, tied_times=False):
  scores = rng.normal(size=n)
  events = (rng.random(n) < 0.6).astype(np.float64)
  times = (rng.integers(1, 6, size=n) if tied_times else rng.permutation(n) + 1.0)
  return scores, events, times.astype(np.float64)


def test_cox_loss_is_breslow_and_flambys_when_times_are_distinct():
  rng = np.random.default_rng(0)
  for n, tied in [(8, False), (8, True), (30, True)]:
    scores, events, times = _survival_sample(rng, n, tied)
    terms = fdx.cox_loss_terms(jnp.asarray(scores, jnp.float32), jnp.asarray(events),
                               jnp.asarray(times), jnp.ones(n))
    np.testing.assert_allclose(float(terms.sum()) / n,
                               _breslow_numpy(scores, events, times), rtol=1e-5)
    if not tied:
      np.testing.assert_allclose(float(terms.sum()) / n,
                                 _flamby_loss(scores, events, times), rtol=1e-5)
  # Padding (weight 0) neither counts nor sits in a risk set.
  scores, events, times = _survival_sample(rng, 6)
  padded = fdx.cox_loss_terms(
      jnp.asarray(np.r_[scores, 9.0, -9.0], jnp.float32), jnp.asarray(np.r_[events, 1, 1]),
      jnp.asarray(np.r_[times, 0.5, 99.0]), jnp.asarray([1.0] * 6 + [0.0, 0.0]))
  np.testing.assert_allclose(float(padded.sum()) / 6,
                             _breslow_numpy(scores, events, times), rtol=1e-5)


@pytest.mark.parametrize("tied_times", [False, True])
def test_concordance_index_matches_lifelines_with_censoring_ties_and_padding(tied_times):
  rng = np.random.default_rng(1 + tied_times)
  concordance_index = jax.jit(fdx.concordance_index)  # one shape: one program
  for n in (5, 40, 120):
    scores, events, times = _survival_sample(rng, n, tied_times)
    scores = np.round(scores, 1)  # some tied scores too
    want = lifelines_utils.concordance_index(times, -scores, events)
    pad = 127 - n  # padding slots in every case
    got = concordance_index(
        jnp.asarray(np.r_[scores, np.zeros(pad)], jnp.float32),
        jnp.asarray(np.r_[events, np.ones(pad)]), jnp.asarray(np.r_[times, np.ones(pad)]),
        jnp.asarray(np.r_[np.ones(n, bool), np.zeros(pad, bool)]))
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # vmappable over clients; no admissible pair is NaN, not a number that looks valid.
  batch = jax.vmap(fdx.concordance_index)(
      jnp.ones((2, 3)), jnp.asarray([[1.0, 1, 1], [0, 0, 0]]),
      jnp.asarray([[1.0, 2, 3], [1, 2, 3]]), jnp.ones((2, 3), bool))
  assert float(batch[0]) == 0.5 and np.isnan(float(batch[1]))


def _pairwise_counts(scores, events, times, mask):
  """Harrell's pairs by their definition, every pair in a Python loop: (admissible,
  concordant, tied)."""
  real = np.flatnonzero(mask)
  count = concordant = tied = 0
  for a in real:
    for b in real:
      if events[a] and (times[a] < times[b] or (times[a] == times[b] and not events[b])):
        count += 1  # a, an observed event, came first
        concordant += int(scores[a] > scores[b])
        tied += int(scores[a] == scores[b])
  return count, concordant, tied


def test_concordance_index_counts_every_pair_exactly():
  """The O(n log n) pair counts equal the pairwise definition's: tied times and scores,
  infinite scores and times, NaN times, padding anywhere, under vmap over models."""
  rng = np.random.default_rng(7)
  counts = jax.jit(jax.vmap(_survival._concordance_counts, in_axes=(0, None, None, None)))
  c_index = jax.jit(jax.vmap(fdx.concordance_index, in_axes=(0, None, None, None)))
  for trial in range(60):
    n = 48  # one shape, one compile; the real count varies with the mask
    scores = np.round(rng.normal(size=(3, n)), int(rng.integers(0, 3))).astype(np.float32)
    if trial % 4 == 0:
      scores[:, rng.integers(0, n)] = rng.choice([np.inf, -np.inf])
    events = (rng.random(n) < rng.random()).astype(np.float32)
    times = rng.integers(0, int(rng.integers(1, 12)), n).astype(np.float32)
    if trial % 5 == 0:
      times[rng.integers(0, n)] = np.inf
    if trial % 7 == 0:
      times[rng.integers(0, n)] = np.nan  # never in an admissible pair
    mask = rng.random(n) < (1.0 if trial % 2 else rng.random())
    args = [jnp.asarray(x) for x in (scores, events, times, mask)]
    got = np.stack([np.asarray(x) for x in counts(*args)], 1)
    want = np.array([_pairwise_counts(s, events, times, mask) for s in scores])
    np.testing.assert_array_equal(got, want, f"trial {trial}")
    ratio = np.where(want[:, 0] > 0, (want[:, 1] + 0.5 * want[:, 2]) / np.maximum(want[:, 0], 1),
                     np.nan)
    np.testing.assert_allclose(np.asarray(c_index(*args)), ratio, rtol=1e-6)
  # A NaN score of a real patient makes the index NaN; a padded one does not count.
  scores, events = jnp.asarray([0.3, jnp.nan, 0.1]), jnp.asarray([1.0, 0.0, 1.0])
  times = jnp.asarray([1.0, 2.0, 3.0])
  assert np.isnan(float(fdx.concordance_index(scores, events, times, jnp.ones(3, bool))))
  assert float(fdx.concordance_index(scores, events, times,
                                     jnp.asarray([True, False, True]))) == 1.0


def test_count_below_in_prefix_equals_a_loop():
  rng = np.random.default_rng(3)
  for n, bits in ((1, 1), (9, 4), (64, 7)):
    values = rng.integers(0, 2**bits, n).astype(np.int32)
    prefix = rng.integers(0, n + 1, 40).astype(np.int32)
    bound = rng.integers(0, 2**bits, 40).astype(np.int32)
    got = _survival._count_below_in_prefix(jnp.asarray(values), jnp.asarray(prefix),
                                           jnp.asarray(bound), bits)
    want = [int((values[:p] < v).sum()) for p, v in zip(prefix, bound)]
    np.testing.assert_array_equal(np.asarray(got), want)


def _survival_clients(seed=0, sizes=(9, 14, 6)):
  rng = np.random.default_rng(seed)
  xs, events, times = [], [], []
  for n in sizes:
    x = rng.normal(size=(n, 4)).astype(np.float32)
    hazard = np.exp(x @ np.array([0.8, -0.5, 0.0, 0.3]))
    t = np.ceil(rng.exponential(1.0 / hazard) * 100)
    xs.append(x)
    events.append((rng.random(n) < 0.7).astype(np.float32))
    times.append(t.astype(np.float32))
  return xs, events, times


def test_fedavg_on_survival_clients_equals_the_sequential_loop_and_learns():
  """FedAvg of a Cox model (batch Cox loss in local SGD) equals the sequential
  reference, and its C-index on the training clients rises above one half."""
  xs, events, times = _survival_clients()
  data = fdx.stack_survival(xs, events, times)
  assert data.labels.shape == (3, 14, 2)
  model = fdx.cox()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  rng = jax.random.PRNGKey(3)
  algo = fdx.fedavg(model, optax.sgd(0.05), batch_size=4, local_steps=3)
  state, metrics = algo.run(algo.init(params, data, rng), data, num_rounds=4)
  ys = [np.stack([e, t], 1) for e, t in zip(events, times)]
  want = reference.fedavg_rounds(model, optax.sgd(0.05), params, xs, ys, rng=rng,
                                 num_rounds=4, budget=fdx.LocalBudget(steps=3),
                                 batch_size=4, participation=np.ones((4, 3)))
  assert_trees_close(state.params, want)
  assert np.isfinite(np.asarray(metrics["train_loss"])).all()
  state, _ = algo.run(state, data, num_rounds=60)
  trained = fdx.evaluate(model, state.params, data)
  assert float(trained["pooled"]["c_index"]) > 0.6
  assert np.isnan(float(trained["pooled"]["accuracy"]))
  pooled = np.concatenate([e for e in events]), np.concatenate(times)
  scores = np.concatenate([np.asarray(model.apply(state.params, x))[:, 0] for x in xs])
  np.testing.assert_allclose(
      float(trained["pooled"]["c_index"]),
      lifelines_utils.concordance_index(pooled[1], -scores, pooled[0]), rtol=1e-6)


def test_survival_data_is_checked():
  xs, events, times = _survival_clients()
  with pytest.raises(ValueError, match=r"client 1 events must be 0 \(censored\) or 1"):
    fdx.stack_survival(xs, [events[0], events[1] * 2, events[2]], times)
  with pytest.raises(ValueError, match=r"client 0 times must be finite and >= 0"):
    fdx.stack_survival(xs, events, [times[0] * -1, times[1], times[2]])
  with pytest.raises(ValueError, match=r"not per example"):
    fdx.per_example_loss(fdx.cox(), jnp.zeros((2, 1)), jnp.zeros((2, 2)))
