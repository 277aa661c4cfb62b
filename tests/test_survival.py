"""Survival analysis: the Cox loss (Breslow's ties) against NumPy and FLamby's loop, the
C-index against lifelines (test-only oracle), and FedAvg on survival data against the
sequential reference."""

import jax
import jax.numpy as jnp
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
  from lifelines import utils as lifelines_utils  # pylint: disable=g-import-not-at-top
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
  from lifelines import utils as lifelines_utils  # pylint: disable=g-import-not-at-top
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


@pytest.mark.parametrize("kind", ["global", "stacked"])
def test_study_evaluator_counts_c_index_apart_and_gives_the_same_numbers(kind):
  """At `fast_compile` (backend level 0) a study evaluates a Cox model in two programs:
  everything but the C-index at level 0, the C-index from the risk scores at level 1
  (`_SurvivalEvaluator`). Its results equal those of the one level-0 program of
  `evaluate` bit for bit: clients of different sizes, tied and censored times, a
  model with a NaN score (its C-index and loss NaN), seeds and stacked models; and
  the global and stacked evaluators of a data set share one C-index program."""
  from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
  options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
  rng = np.random.default_rng(11)
  sizes = (17, 40, 9, 33)
  xs = [rng.normal(size=(n, 5)).astype(np.float32) for n in sizes]
  events = [(rng.random(n) < 0.5).astype(np.float32) for n in sizes]
  times = [rng.integers(1, 12, size=n).astype(np.float32) for n in sizes]  # ties
  train = fdx.stack_survival(xs, events, times)
  test = fdx.stack_survival([x[: n // 2 + 1] for x, n in zip(xs, sizes)],
                            [e[: n // 2 + 1] for e, n in zip(events, sizes)],
                            [t[: n // 2 + 1] for t, n in zip(times, sizes)])
  data = fdx.FederatedData(train=train, test=test, num_classes=2)
  model = fdx.cox()
  seeds, clients = 3, len(sizes)
  models = jax.vmap(model.init, in_axes=(0, None))(
      jax.random.split(jax.random.PRNGKey(2), seeds), jnp.zeros((1, 5)))
  if kind == "stacked":  # a model per client, each seed's different
    models = jax.tree.map(lambda x: x[:, None] * jnp.linspace(0.5, 2.0, clients)[
        None, :, *([None] * (x.ndim - 1))], models)
  kernel = np.asarray(models["Dense_0"]["kernel"]).copy()
  kernel.reshape(-1)[3] = np.nan  # one seed's (and model's) scores NaN
  models = {"Dense_0": {**models["Dense_0"], "kernel": jnp.asarray(kernel)}}
  cache = _programs.ProgramCache(options)
  found = cache.evaluator(model, kind, None, models, data)
  assert isinstance(found, _programs._SurvivalEvaluator)
  found = jax.device_get(found(models, data.train, data.test))

  apply_all = jax.vmap(model.apply, in_axes=(None, 0))
  if kind == "global":
    one_program = lambda params, tr, te: [
        *(fdx.evaluate(model, params, d) for d in (tr, te)),
        _programs._test_outputs(model, params, te.features)]
  else:
    one_program = lambda params, tr, te: [
        *(fdx.evaluate_stacked(model, params, d) for d in (tr, te)),
        jax.vmap(apply_all, in_axes=(0, None))(params, te.features)]
  args = (models, data.train, data.test)
  expected = jax.device_get(jax.jit(jax.vmap(one_program, in_axes=(0, None, None))).lower(
      *args).compile(options)(*args))
  assert jax.tree.structure(found) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(found), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)
  c_index = np.asarray(found[1]["pooled"]["c_index"])
  assert np.isnan(c_index).sum() == 1 and np.nanmin(c_index) > 0  # seed 0's (model 0)
  other = "stacked" if kind == "global" else "global"
  other_models = (jax.tree.map(lambda x: x[:, 0], models) if kind == "stacked" else
                  jax.tree.map(lambda x: jnp.stack([x] * clients, 1), models))
  cache.evaluator(model, other, None, other_models, data)
  assert len(cache.c_indexes) == 1
  assert len(next(iter(cache.c_indexes.values()))[1].programs) == 1
