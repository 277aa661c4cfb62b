"""Every metric against scikit-learn on random inputs, ties and one-class clients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_dx as fdx


def numpy_ece(probs, labels, bins=10):
  """ECE by a loop over equal-width bins of the top-class confidence."""
  confidence, correct = probs.max(1), probs.argmax(1) == labels
  index = np.minimum((confidence * bins).astype(int), bins - 1)
  total = 0.0
  for b in range(bins):
    inside = index == b
    if inside.any():
      total += inside.sum() / len(labels) * abs(correct[inside].mean()
                                                  - confidence[inside].mean())
  return total


def sklearn_binary(probs, labels):
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  pred = (probs[:, 1] > probs[:, 0]).astype(int)
  both = len(np.unique(labels)) == 2
  return {
      "pr_auc": skm.average_precision_score(labels, probs[:, 1]) if labels.any() else np.nan,
      "brier": skm.brier_score_loss(labels, probs[:, 1]),
      "ece": numpy_ece(probs, labels),
      "accuracy": skm.accuracy_score(labels, pred),
      "auc": skm.roc_auc_score(labels, probs[:, 1]) if both else np.nan,
      "sensitivity": skm.recall_score(labels, pred, pos_label=1, zero_division=np.nan),
      "specificity": skm.recall_score(labels, pred, pos_label=0, zero_division=np.nan),
      "f1": skm.f1_score(labels, pred, pos_label=1, zero_division=np.nan),
      "balanced_accuracy": skm.balanced_accuracy_score(labels, pred),
      "loss": skm.log_loss(labels, probs, labels=[0, 1]),
  }


def sklearn_multiclass(probs, labels, num_classes):
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  pred = probs.argmax(1)
  classes = list(range(num_classes))
  recall = skm.recall_score(labels, pred, labels=classes, average=None, zero_division=np.nan)
  cm = skm.multilabel_confusion_matrix(labels, pred, labels=classes)
  tn, fp = cm[:, 0, 0], cm[:, 0, 1]
  spec = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), np.nan)
  aucs = [skm.roc_auc_score(labels == c, probs[:, c]) if 0 < (labels == c).sum() < len(labels)
          else np.nan for c in classes]
  aps = [skm.average_precision_score(labels == c, probs[:, c]) if (labels == c).any()
         else np.nan for c in classes]
  return {
      "pr_auc": np.nanmean(aps),
      "brier": ((probs - np.eye(num_classes)[labels]) ** 2).sum(1).mean(),
      "ece": numpy_ece(probs, labels),
      "accuracy": skm.accuracy_score(labels, pred),
      "auc": np.nanmean(aucs) if not np.all(np.isnan(aucs)) else np.nan,
      "sensitivity": np.nanmean(recall),
      "specificity": np.nanmean(spec),
      "f1": skm.f1_score(labels, pred, labels=classes, average="macro", zero_division=np.nan),
      "balanced_accuracy": skm.balanced_accuracy_score(labels, pred),
      "loss": skm.log_loss(labels, probs, labels=classes),
  }


PAD_TO = 96  # every case padded to one size: one compiled program per class count
_classification_metrics = jax.jit(fdx.classification_metrics)


def ours(probs, labels, pad_to=PAD_TO):
  n = len(labels)
  assert n < pad_to, "each case keeps padding slots"
  probs_p = np.full((pad_to, probs.shape[1]), 1.0 / probs.shape[1], np.float32)
  probs_p[:n] = probs
  labels_p = np.zeros(pad_to, np.int32)
  labels_p[:n] = labels
  mask = np.arange(pad_to) < n
  losses = -np.log(np.clip(probs_p[np.arange(pad_to), labels_p], 1e-15, 1))
  out = _classification_metrics(jnp.asarray(probs_p), jnp.asarray(labels_p),
                                jnp.asarray(mask), jnp.asarray(losses, jnp.float32))
  return {k: float(v) for k, v in out.items()}


def compare(got, want):
  for name, value in want.items():
    if np.isnan(value):
      assert np.isnan(got[name]), (name, got[name])
    else:
      assert got[name] == pytest.approx(value, abs=1e-5), name


@pytest.mark.parametrize("seed", range(6))
def test_binary_metrics_match_sklearn_with_ties_and_padding(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 60))
  labels = rng.integers(0, 2, n)
  p1 = np.round(rng.uniform(size=n), 1).astype(np.float32)  # many ties
  p1 = np.clip(p1, 0.05, 0.95)
  probs = np.stack([1 - p1, p1], 1)
  compare(ours(probs, labels), sklearn_binary(probs, labels))


@pytest.mark.parametrize("present", [0, 1])
def test_one_class_client_gives_nan_auc_not_a_crash(present):
  rng = np.random.default_rng(present)
  labels = np.full(12, present)
  p1 = rng.uniform(0.05, 0.95, 12).astype(np.float32)
  probs = np.stack([1 - p1, p1], 1)
  got = ours(probs, labels)
  assert np.isnan(got["auc"])
  compare(got, sklearn_binary(probs, labels))


@pytest.mark.parametrize("seed", range(4))
def test_multiclass_macro_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  k, n = 5, int(rng.integers(20, 80))
  labels = rng.integers(0, k, n)
  if seed == 3:
    labels[labels == 4] = 0  # a class absent from this client
  logits = np.round(rng.normal(size=(n, k)), 1)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1), np.float64)
  probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
  compare(ours(probs, labels), sklearn_multiclass(probs, labels, k))


def test_auc_is_exact_on_a_hand_computed_case():
  scores = jnp.array([0.1, 0.4, 0.4, 0.8, 0.4, 0.9])
  positive = jnp.array([False, False, True, True, True, False])
  # pairs (pos, neg): 0.4 vs {0.1 win, 0.4 tie, 0.9 loss} twice; 0.8 vs {win, win, loss}
  expected = (2 * (1 + 0.5) + 2) / 9
  assert float(fdx.binary_auc(scores, positive, jnp.ones(6, bool))) == pytest.approx(expected)


def _random_clients(seed, sizes, num_features=3):
  """Random binary data of clients with `sizes` examples: (xs, ys, stacked)."""
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, num_features)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 2, n) for n in sizes]
  return xs, ys, fdx.stack_clients(xs, ys, num_classes=2)


def test_evaluate_pooled_equals_metrics_on_concatenated_clients():
  rng = np.random.default_rng(0)
  sizes = [9, 4, 13]
  xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 2, n) for n in sizes]
  data = fdx.stack_clients(xs, ys, num_classes=2)
  model = fdx.logistic_regression()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  result = fdx.evaluate(model, params, data)
  for k, (x, y) in enumerate(zip(xs, ys)):
    p1 = np.asarray(jax.nn.sigmoid(model.apply(params, jnp.asarray(x))[:, 0]))
    want = sklearn_binary(np.stack([1 - p1, p1], 1), y)
    compare({m: float(v[k]) for m, v in result["clients"].items()}, want)
  x_all, y_all = np.concatenate(xs), np.concatenate(ys)
  p1 = np.asarray(jax.nn.sigmoid(model.apply(params, jnp.asarray(x_all))[:, 0]))
  compare({m: float(v) for m, v in result["pooled"].items()},
          sklearn_binary(np.stack([1 - p1, p1], 1), y_all))
  assert float(result["pooled"]["num_examples"]) == sum(sizes)


def test_evaluate_stacked_evaluates_each_model_on_every_client():
  _, _, data = _random_clients(1, (5, 8))
  model = fdx.logistic_regression()
  params = [model.init(jax.random.PRNGKey(s), jnp.zeros((1, 3))) for s in (0, 1, 2)]
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *params)
  result = fdx.evaluate_stacked(model, stacked, data)
  assert result["clients"]["auc"].shape == (3, 2)
  for m, p in enumerate(params):
    single = fdx.evaluate(model, p, data)
    np.testing.assert_allclose(result["clients"]["loss"][m], single["clients"]["loss"],
                               rtol=1e-6)


def test_evaluate_personalized_uses_each_clients_own_model():
  rng = np.random.default_rng(2)
  sizes = (6, 9, 4)
  xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 2, n) for n in sizes]
  data = fdx.stack_clients(xs, ys, num_classes=2)
  model = fdx.logistic_regression()
  params = [model.init(jax.random.PRNGKey(s), jnp.zeros((1, 3))) for s in range(3)]
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *params)
  result = fdx.evaluate_personalized(model, stacked, data)
  probs = []
  for k, p in enumerate(params):
    p1 = np.asarray(jax.nn.sigmoid(model.apply(p, jnp.asarray(xs[k]))[:, 0]))
    probs.append(p1)
    compare({m: float(v[k]) for m, v in result["clients"].items()},
            sklearn_binary(np.stack([1 - p1, p1], 1), ys[k]))
  p_all = np.concatenate(probs)
  compare({m: float(v) for m, v in result["pooled"].items()},
          sklearn_binary(np.stack([1 - p_all, p_all], 1), np.concatenate(ys)))


def test_a_diverged_model_has_nan_metrics_not_the_majority_rate():
  """NaN parameters (a diverged model): every metric NaN, on every client and pooled,
  for one model and for stacked models where only one diverged; never an AUC above 1."""
  rng = np.random.default_rng(3)
  xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (7, 5)]
  ys = [np.array([1] * (n - 2) + [0, 0]) for n in (7, 5)]  # a clear majority class
  data = fdx.stack_clients(xs, ys, num_classes=2)
  model = fdx.logistic_regression()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  broken = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
  result = fdx.evaluate(model, broken, data)
  for part in (result["pooled"], {m: v[1] for m, v in result["clients"].items()}):
    for name, value in part.items():
      if name == "num_examples":
        assert float(value) > 0
      else:
        assert np.isnan(float(value)), name
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, broken)
  both = fdx.evaluate_stacked(model, stacked, data)
  assert np.isfinite(np.asarray(both["pooled"]["accuracy"][0]))
  assert np.isnan(np.asarray(both["pooled"]["accuracy"][1]))
  scores = jnp.array([0.2, jnp.nan, 0.7, 0.1])
  auc = fdx.binary_auc(scores, jnp.array([True, False, True, False]), jnp.ones(4, bool))
  assert np.isnan(float(auc))
  masked = fdx.binary_auc(scores, jnp.array([True, False, True, False]),
                          jnp.array([True, False, True, True]))
  assert float(masked) == 1.0  # the NaN score is padding: not counted


def test_a_nan_learning_rate_gives_a_nan_train_loss_not_zero():
  _, _, data = _random_clients(4, (6, 8))
  model = fdx.logistic_regression()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  for algo in (fdx.fedavg(model, optax.sgd(float("nan")), batch_size=2, local_steps=2),
               fdx.local_only(model, optax.sgd(float("nan")), batch_size=2,
                              local_steps=2)):
    _, metrics = algo.run(algo.init(params, data, jax.random.PRNGKey(1)), data,
                          num_rounds=2)
    assert np.isnan(np.asarray(metrics["train_loss"])[-1]), algo.name


def test_bootstrap_draws_same_at_every_level_and_in_or_out_of_the_metrics_program():
  """The bootstrap draws its resamples in a program of its own, compiled at XLA level
  1 (`draw_options`): integer arithmetic, so the draws equal those at full
  optimisation and at level 0 bit for bit, and the metrics of resamples drawn there
  equal those of `bootstrap_sites` drawing them itself."""
  from fedjax_dx.core import _metrics  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  c, n, r = 3, 37, 50
  mask = jnp.asarray(np.arange(n)[None] < np.array([[37], [20], [1]]))
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(0xB0075), s))(
      jnp.arange(4))
  draw = jax.jit(jax.vmap(lambda k: _metrics.bootstrap_site_draws(k, mask, r)))
  lowered = draw.lower(keys)
  found = [lowered.compile(options)(keys) for options in (
      None, _programs.draw_options(), {"xla_backend_optimization_level": 0})]
  for other in found[1:]:
    for a, b in zip(found[0], other):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sites, pooled = map(np.asarray, found[0])
  assert sites.shape == (4, c, r, n) and pooled.shape == (4, r, c * n)
  counts = np.asarray(mask.sum(1))
  assert (sites >= 0).all() and (sites < counts[None, :, None, None]).all()
  assert (pooled < counts.sum()).all() and len(np.unique(pooled)) == counts.sum()
  # The metrics with the draws handed in are those with the draws made inside.
  p1 = rng.random((c, n)).astype(np.float32)
  outputs = jnp.asarray(np.stack([1 - p1, p1], -1))
  labels = jnp.asarray(rng.random((c, n)) < 0.4, jnp.int32)
  inside = jax.jit(lambda k: _metrics.bootstrap_sites(
      k, outputs, labels, mask, survival=False, num_resamples=r))(keys[0])
  handed = jax.jit(lambda d: _metrics.bootstrap_sites(
      None, outputs, labels, mask, survival=False, num_resamples=r, draws=d))(
          (found[1][0][0], found[1][1][0]))
  assert set(inside) == set(handed) == set(_metrics.BOOTSTRAP_METRICS)
  for metric in inside:
    np.testing.assert_array_equal(np.asarray(inside[metric]),
                                  np.asarray(handed[metric]), err_msg=metric)


@pytest.mark.parametrize("scores", ["distinct", "ties", "infinite", "nan"])
def test_resampled_aucs_from_draw_counts_equal_binary_auc_of_each_resample(scores):
  """The bootstrap's sort-free AUC (one sort of the original scores, draw counts per
  resample) gives exactly `binary_auc` of every resample, padding slots included."""
  from fedjax_dx.core import _metrics  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(len(scores))
  n, count = 40, 33  # 7 padding slots
  values = {"distinct": rng.random(n), "ties": rng.integers(0, 4, n) / 4,
            "infinite": np.where(rng.random(n) < 0.15, np.inf, rng.random(n)),
            "nan": np.where(rng.random(n) < 0.03, np.nan, rng.random(n))}[scores]
  s = jnp.asarray(values, jnp.float32)
  positive = jnp.asarray(rng.random(n) < 0.4)
  mask = jnp.arange(n) < count
  draws = jax.random.randint(jax.random.key(0), (64, n), 0, count)
  auc = jax.jit(_metrics.binary_auc)  # one program for every resample
  expected = np.array([auc(s[d], positive[d], mask) for d in draws])
  got = np.asarray(jax.jit(_metrics._resampled_binary_aucs)(s, positive, mask, draws))
  np.testing.assert_array_equal(got, expected)
  if scores == "nan":  # some resamples drew the NaN, some did not
    assert np.isnan(got).any() and not np.isnan(got).all()


@pytest.mark.parametrize("scores", ["distinct", "ties", "infinite", "signed zeros",
                                    "nan"])
def test_resampled_average_precisions_from_draw_counts_equal_each_resamples(scores):
  """The bootstrap's sort-free average precision (one sort of the original scores,
  draw counts per resample) gives exactly `average_precision` of every resample:
  ties within and across the draws, infinite scores of both signs, +0 and -0, a NaN
  drawn or not, padding slots, and a resample without a positive."""
  from fedjax_dx.core import _metrics  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7 + len(scores))
  n, count = 40, 33  # 7 padding slots
  values = {"distinct": rng.random(n), "ties": rng.integers(0, 4, n) / 4,
            "infinite": np.select([rng.random(n) < 0.15, rng.random(n) < 0.1],
                                  [np.inf, -np.inf], rng.random(n)),
            "signed zeros": np.where(rng.random(n) < 0.5, 0.0, -0.0),
            "nan": np.where(rng.random(n) < 0.03, np.nan, rng.random(n))}[scores]
  s = jnp.asarray(values, jnp.float32)
  positive = jnp.asarray(rng.random(n) < 0.3)
  mask = jnp.arange(n) < count
  draws = jax.random.randint(jax.random.key(1), (64, n), 0, count)
  no_positive = jnp.flatnonzero(~positive[:count], size=1)[0]
  draws = draws.at[0].set(no_positive)  # resample 0: one negative, drawn every time
  ap = jax.jit(_metrics.average_precision)  # one program for every resample
  expected = np.array([ap(s[d], positive[d], mask) for d in draws])
  got = np.asarray(jax.jit(_metrics._resampled_average_precisions)(s, positive, mask,
                                                                    draws))
  np.testing.assert_array_equal(got, expected)
  assert np.isnan(got[0])  # no positive drawn
  if scores == "nan":  # some resamples drew the NaN, some did not
    assert np.isnan(got[1:]).any() and not np.isnan(got[1:]).all()
  else:
    assert not np.isnan(got[1:]).any()
