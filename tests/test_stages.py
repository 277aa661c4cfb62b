"""The aggregator chain (`fedjax_dx.agg`): its rules, the study's config fields as chains,
epsilon and upload bytes from the chain, the executors' refusals, and the guard against
faulty hospitals."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_dx as fdx
from fedjax_dx import agg
from tests import reference
from tests.test_algorithms import assert_trees_close, assert_trees_equal, init_params, make_data

RNG = jax.random.PRNGKey(5)


def _poisoned(data: fdx.ClientData, clients, *, nan=False, scale=1.0) -> fdx.ClientData:
  """The same clients with the features of `clients` made NaN or scaled (a hospital
  whose data broke after it enrolled: `init` checked the clean data)."""
  bad = np.zeros(data.num_clients, bool)
  bad[list(clients)] = True
  shape = (-1,) + (1,) * (data.features.ndim - 1)
  features = jnp.where(bad.reshape(shape), data.features * scale, data.features)
  if nan:
    features = jnp.where(bad.reshape(shape), jnp.nan, features)
  return data.replace(features=features)


def _fedavg_without(model, params, xs, ys, client, num_rounds, steps=3):
  """The sequential FedAvg loop (sgd 0.2, batch 4) with `client` sitting out."""
  participation = np.ones((num_rounds, len(ys)))
  participation[:, client] = 0
  return reference.fedavg_rounds(model, optax.sgd(0.2), params, xs, ys, rng=RNG,
                                 num_rounds=num_rounds, budget=fdx.LocalBudget(steps=steps),
                                 batch_size=4, participation=participation)


@pytest.mark.parametrize("stages,message", [
    ((agg.secure_sum(), agg.mean()), r"secure aggregation must be the last stage"),
    ((agg.mean("uniform"), agg.gaussian(1.0)), r"put a clip stage before it"),
    ((agg.clip(1.0), agg.mean()), r"needs every client to count alike"),
    ((agg.mean("uniform"), agg.clip(1.0)), r"clip before weighting"),
    ((agg.clip(1.0), agg.guard(), agg.mean("uniform")), r"guard.*must see the raw updates"
     .replace("guard", "Guard")),
    ((agg.median(), agg.secure_sum()), r"needs aggregator='mean'"),
    ((agg.quantize(8), agg.secure_sum()), r"already quantizes"),
    ((agg.median(), agg.krum()), r"at most one robust reducer"),
])
def test_chain_ordering_rules_are_checked(stages, message):
  with pytest.raises(ValueError, match=message):
    agg.chain(*stages)


def test_study_config_builds_the_chain_written_by_hand():
  """The study's config fields become the chain a user would write (equal chains are
  equal pipelines and share one compiled program)."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _build  # pylint: disable=g-import-not-at-top

  def config(**changes):
    c = test_config.get_config()
    c.drop_nonfinite = False  # on by default: its own cases below
    for field, value in changes.items():
      c[field] = value
    return c

  cases = [
      (config(), "fedavg", agg.chain(agg.mean())),
      (config(aggregator="trimmed_mean", trim_fraction=0.2), "fedavg",
       agg.chain(agg.mean(), agg.trimmed_mean(0.2))),
      (config(dp="central", dp_clip=0.05, dp_noise=1.0, dp_adaptive_quantile=0.5,
              dp_count_noise=1.0), "fedprox",
       agg.chain(agg.clip(0.05, adaptive_quantile=0.5, count_noise=1.0),
                 agg.mean("uniform"), agg.gaussian(1.0))),
      (config(dp="local", dp_clip=0.5, dp_noise=0.3, secure_aggregation=True,
              secagg_dropout=0.25), "fedavg",
       agg.chain(agg.clip(0.5), agg.mean("uniform"), agg.gaussian(0.3, "local"),
                 agg.secure_sum(bound=0.5, dropout=0.25))),
      (config(compression="topk", topk_fraction=0.3, guard=5.0), "fedadam",
       agg.chain(agg.guard(5.0), agg.mean(), agg.top_k(0.3))),
      (config(compression="quantize", compression_bits=4, error_feedback=False), "fedavg",
       agg.chain(agg.mean(), agg.quantize(4, error_feedback=False))),
      (config(dp="central", dp_clip=0.5, dp_noise=1.0, guard=5.0), "centralized",
       agg.chain(agg.mean())),  # the baselines are not private
      (test_config.get_config(), "fedavg", agg.chain(agg.guard(None), agg.mean())),
      (config(drop_nonfinite=True, dp="central", dp_clip=0.5, dp_noise=1.0), "fedavg",
       agg.chain(agg.guard(None), agg.clip(0.5), agg.mean("uniform"),
                 agg.gaussian(1.0))),
      (config(drop_nonfinite=True, guard=5.0), "fedavg",
       agg.chain(agg.guard(5.0), agg.mean())),  # the screen checks finiteness too
  ]
  for c, method, want in cases:
    assert _build.aggregator_chain(c, method) == want, (method, want)
  assert hash(agg.chain(agg.clip(1.0), agg.mean("uniform"))) == hash(
      agg.chain(agg.clip(1.0), agg.mean("uniform")))


def test_executors_refuse_a_chain_that_is_not_linear():
  model = fdx.logistic_regression()
  with pytest.raises(ValueError, match=r"client_chunk=2 needs aggregator='mean': 'guard' "
                                       r"is not linear"):
    fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_steps=1, client_chunk=2,
               aggregator=agg.chain(agg.guard(), agg.mean()))
  _, _, data = make_data()
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_steps=1, aggregator="median")
  state = algo.init(init_params(model), data, RNG)
  with pytest.raises(ValueError, match=r"stream needs aggregator='mean': 'median'"):
    algo.stream(state, jax.tree.map(np.asarray, data), chunk=2)
  assert agg.chain(agg.clip(1.0), agg.mean("uniform"), agg.gaussian(1.0)).linear
  assert not agg.chain(agg.guard(), agg.mean()).linear


def test_upload_bytes_come_from_the_chain():
  assert agg.chain(agg.mean()).upload_bytes(1000) == 4000
  assert agg.chain(agg.mean(), agg.quantize(4)).upload_bytes(1000) == 500 + 4
  assert agg.chain(agg.mean(), agg.top_k(0.01)).upload_bytes(1000) == 10 * 8
  assert agg.chain(agg.mean(), agg.secure_sum(16)).upload_bytes(1001) == 2002
  assert agg.chain(agg.mean(), agg.quantize(4)).upload_bytes(1000) == (
      fdx.upload_bytes("quantize", 1000, bits=4))


def test_epsilon_comes_from_the_chain_noise_stage():
  """The chain's epsilon is the accountant's epsilon of its Gaussian stage's event:
  central noise amplified by sampling, local noise not; no noise stage, no epsilon."""
  central = agg.chain(agg.clip(1.0), agg.mean("uniform"), agg.gaussian(1.1))
  local = agg.chain(agg.clip(1.0), agg.mean("uniform"), agg.gaussian(1.1, "local"))
  assert central.epsilon(rounds=50, sampling_rate=0.1, delta=1e-5) == (
      fdx.privacy_epsilon(1.1, 0.1, 50, 1e-5))
  assert local.epsilon(rounds=50, sampling_rate=0.1, delta=1e-5) == (
      fdx.privacy_epsilon(1.1, 1.0, 50, 1e-5))
  assert central.epsilon(rounds=50, sampling_rate=0.1, delta=1e-5, accountant="pld") < (
      central.epsilon(rounds=50, sampling_rate=0.1, delta=1e-5))
  with pytest.raises(ValueError, match="no stage spends privacy"):
    agg.chain(agg.clip(1.0), agg.mean("uniform")).epsilon(
        rounds=5, sampling_rate=1.0, delta=1e-5)
  # Composition: two Gaussian releases at z are one release at z / sqrt(2) (RDP adds).
  from fedjax_dx.privacy import _accounting  # pylint: disable=g-import-not-at-top
  twice = _accounting.epsilon_of([_accounting.GaussianRelease(2.0, 1.0, 10)] * 2, 1e-5)
  once = _accounting.epsilon(2.0 / np.sqrt(2.0), 1.0, 10, 1e-5)
  np.testing.assert_allclose(twice, once, rtol=1e-6)


def test_guard_equals_fedavg_over_the_clean_clients():
  """A hospital sending NaN is dropped and the mean renormalised over the others:
  exactly FedAvg without it (sequential reference)."""
  xs, ys, data = make_data()
  model = fdx.mlp(hidden=(6,), num_classes=2)
  params = init_params(model)
  algo = fdx.fedavg(model, optax.sgd(0.2), batch_size=4, local_steps=3,
                    aggregator=agg.chain(agg.guard(), agg.mean()))
  state = algo.init(params, data, RNG)
  broken = _poisoned(data, [1], nan=True)
  state, metrics = algo.run.compiled(state, broken, jnp.ones((3, data.num_clients)))
  assert_trees_close(state.params, _fedavg_without(model, params, xs, ys, 1, 3))
  np.testing.assert_array_equal(metrics["guard_dropped"], 1)


@pytest.mark.parametrize("client_chunk", [None, 2], ids=["at_once", "chunked"])
def test_finite_guard_is_linear_and_equals_fedavg_over_the_clean_clients(client_chunk):
  """`agg.guard(None)` (NaN/Inf only, the studies' default) decides per client, so it
  is linear: chunked rounds take it. A NaN hospital is dropped and the mean is
  rescaled to the others: FedAvg without it (sequential reference), and the same
  train loss as the screen."""
  xs, ys, data = make_data()
  model = fdx.mlp(hidden=(6,), num_classes=2)
  params = init_params(model)
  assert agg.chain(agg.guard(None), agg.mean()).linear
  algo = fdx.fedavg(model, optax.sgd(0.2), batch_size=4, local_steps=3,
                    client_chunk=client_chunk,
                    aggregator=agg.chain(agg.guard(None), agg.mean()))
  state = algo.init(params, data, RNG)
  broken = _poisoned(data, [1], nan=True)
  state, metrics = algo.run.compiled(state, broken, jnp.ones((3, data.num_clients)))
  assert_trees_close(state.params, _fedavg_without(model, params, xs, ys, 1, 3))
  np.testing.assert_array_equal(metrics["guard_dropped"], 1)
  screened = fdx.fedavg(model, optax.sgd(0.2), batch_size=4, local_steps=3,
                        aggregator=agg.chain(agg.guard(10.0), agg.mean()))
  _, screen_metrics = screened.run.compiled(screened.init(params, data, RNG), broken,
                                            jnp.ones((3, data.num_clients)))
  np.testing.assert_allclose(metrics["train_loss"], screen_metrics["train_loss"],
                             rtol=1e-5)
  assert np.isfinite(np.asarray(metrics["train_loss"])).all()


@pytest.mark.parametrize("ratio", [None, 10.0], ids=["finite", "screen"])
def test_a_round_whose_every_update_is_dropped_keeps_the_model_and_reports_no_loss(
    ratio):
  """Every hospital NaN: the model stays where it was, `guard_kept` is 0 and the
  round's train loss is NaN (it was 0.0: a sum over no kept client)."""
  _, _, data = make_data()
  model = fdx.logistic_regression()
  params = init_params(model)
  algo = fdx.fedavg(model, optax.sgd(0.2), batch_size=4, local_steps=3,
                    aggregator=agg.chain(agg.guard(ratio), agg.mean()))
  broken = _poisoned(data, range(data.num_clients), nan=True)
  state, metrics = algo.run.compiled(algo.init(params, data, RNG), broken,
                                     jnp.ones((2, data.num_clients)))
  assert_trees_equal(state.params, params)
  np.testing.assert_array_equal(metrics["guard_kept"], 0)
  np.testing.assert_array_equal(metrics["guard_dropped"], data.num_clients)
  assert np.isnan(np.asarray(metrics["train_loss"])).all()


def test_finite_guard_changes_nothing_when_every_update_is_finite():
  """On by default in studies, so it must leave clean rounds bit for bit alone."""
  _, _, data = make_data()
  model = fdx.mlp(hidden=(6,), num_classes=2)
  params = init_params(model)
  results = []
  for aggregator in ("mean", agg.chain(agg.guard(None), agg.mean())):
    algo = fdx.fedavg(model, optax.sgd(0.2), batch_size=4, local_steps=3,
                      aggregator=aggregator)
    results.append(algo.run.compiled(algo.init(params, data, RNG), data,
                                     jnp.ones((3, data.num_clients))))
  assert_trees_equal(results[0][0].params, results[1][0].params)
  np.testing.assert_array_equal(results[0][1]["train_loss"], results[1][1]["train_loss"])
  np.testing.assert_array_equal(results[1][1]["guard_dropped"], 0)


def test_secure_sum_after_the_finite_guard_drops_the_nan_hospital():
  """The guard zeroes the weight the secure sum encodes with; the two rescalings
  (survivors, kept clients) compose to FedAvg over the clean clients."""
  xs, ys, data = make_data()
  model = fdx.mlp(hidden=(6,), num_classes=2)
  params = init_params(model)
  algo = fdx.fedavg(model, optax.sgd(0.2), batch_size=4, local_steps=3,
                    aggregator=agg.chain(agg.guard(None), agg.mean(),
                                         agg.secure_sum(bound=10.0)))
  state, metrics = algo.run.compiled(algo.init(params, data, RNG),
                                     _poisoned(data, [1], nan=True),
                                     jnp.ones((2, data.num_clients)))
  assert_trees_close(state.params, _fedavg_without(model, params, xs, ys, 1, 2),
                    atol=1e-4)
  np.testing.assert_array_equal(metrics["guard_dropped"], 1)


def test_scaffold_guard_drops_the_nan_hospital_and_its_control_variate_change():
  """SCAFFOLD with the guard: the NaN hospital neither moves the model nor `c`, and
  its own `c_k` stays 0; the others train as SCAFFOLD without it (sequential
  reference, which keeps N = all clients in `c`'s 1/N)."""
  xs, ys, data = make_data()
  model = fdx.logistic_regression()
  params = init_params(model)
  algo = fdx.scaffold(model, 0.1, batch_size=4, local_steps=3, guard=agg.guard(None))
  state, metrics = algo.run.compiled(algo.init(params, data, RNG),
                                     _poisoned(data, [1], nan=True),
                                     jnp.ones((3, data.num_clients)))
  participation = np.ones((3, data.num_clients))
  participation[:, 1] = 0
  want, want_controls = reference.scaffold_rounds(
      model, 0.1, params, xs, ys, rng=RNG, num_rounds=3,
      budget=fdx.LocalBudget(steps=3), batch_size=4, participation=participation)
  assert_trees_close(state.params, want)
  for k, control in enumerate(want_controls):
    assert_trees_close(jax.tree.map(lambda c: c[k], state.client_controls), control)
  np.testing.assert_array_equal(metrics["guard_dropped"], 1)
  with pytest.raises(ValueError, match=r"SCAFFOLD's guard must be agg.guard"):
    fdx.scaffold(model, 0.1, batch_size=4, local_steps=3, guard=agg.mean())


def test_run_checks_the_data_it_is_given_as_init_does():
  """Data given to `run` after `init` is checked again on the host (NaN features,
  labels out of range), for the FedAvg family, the baselines and cyclic."""
  _, _, data = make_data()
  model = fdx.logistic_regression()
  params = init_params(model)
  broken = _poisoned(data, [1], nan=True)
  bad_labels = data.replace(labels=data.labels.at[0, 0].set(7))
  for algo in (fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_steps=1),
               fdx.local_only(model, optax.sgd(0.1), batch_size=2, local_steps=1),
               fdx.cyclic(model, optax.sgd(0.1), batch_size=2, local_steps=1)):
    state = algo.init(params, data, RNG)
    with pytest.raises(ValueError, match=r"train_data.features hold NaN"):
      algo.run(state, broken, 1)
    with pytest.raises(ValueError, match=r"train_data.labels must lie in \[0, 1\]"):
      algo.run(state, bad_labels, 1)


def test_guard_screen_matches_numpy():
  """Which updates the guard drops: a NumPy transcription of its rule."""
  rng = np.random.default_rng(3)
  updates = rng.normal(size=(9, 5)).astype(np.float32)
  updates[2] *= 50.0  # blown up
  updates[4, 1] = np.inf
  updates[6, 0] = np.nan
  sending = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
  weights = np.where(sending, rng.uniform(1, 3, 9), 0.0).astype(np.float32)
  weights /= weights.sum()
  ctx = {"expected_clients": None}
  messages, clients, metrics = agg.guard(4.0).screen(
      None, jnp.asarray(updates), {"weight": jnp.asarray(weights),
                                   "sending": jnp.asarray(sending)}, ctx)
  norms = np.linalg.norm(updates.astype(np.float64), axis=1)
  finite = np.isfinite(norms)
  median = np.median(norms[finite & sending])
  keep = finite & (norms <= 4.0 * median)
  np.testing.assert_array_equal(np.asarray(clients["guarded"]), sending & ~keep)
  assert int(metrics["guard_dropped"]) == 3  # the NaN, the Inf and the blown-up one
  kept = np.where(keep, weights, 0.0)
  np.testing.assert_allclose(np.asarray(clients["weight"]), kept / kept.sum(), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(messages), np.where(keep[:, None], updates, 0))
  with pytest.raises(ValueError, match=r"max_norm_ratio must be >= 1"):
    agg.guard(0.5)


def _accuracy(model, params, test):
  return float(fdx.evaluate(model, params, test)["pooled"]["accuracy"])


@pytest.mark.parametrize("fault", ["nan_features", "blown_up"])
def test_guard_keeps_the_model_finite_and_accurate_with_30_percent_faulty_clients(fault):
  """30% of hospitals send NaN (NaN features) or blown-up updates (features x 1e6: each
  local step 1e6 times too large, as with a 1e6 x learning rate): the guarded global
  model stays finite and within 2 accuracy points of the clean run; unguarded, it
  does not."""
  data = fdx.synthetic_binary(seed=4, num_clients=10, examples_per_client=120)
  model = fdx.logistic_regression()
  params = model.init(jax.random.PRNGKey(0), data.train.features[0, :1])
  faulty = [1, 4, 8]
  broken = _poisoned(data.train, faulty, nan=fault == "nan_features",
                     scale=1e6 if fault == "blown_up" else 1.0)
  rounds = jnp.ones((15, data.train.num_clients))

  def train(train_data, **options):
    algo = fdx.fedavg(model, optax.sgd(0.5), batch_size=8, local_epochs=1, **options)
    state = algo.init(params, data.train, RNG)
    return algo.run.compiled(state, train_data, rounds)

  clean, _ = train(data.train)
  guarded, metrics = train(broken, aggregator=agg.chain(agg.guard(10.0), agg.mean()))
  unguarded, _ = train(broken)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(guarded.params))
  np.testing.assert_array_equal(metrics["guard_dropped"], len(faulty))
  clean_accuracy = _accuracy(model, clean.params, data.test)
  labels = np.asarray(data.test.labels)[np.asarray(data.test.mask) > 0]
  majority = max(labels.mean(), 1 - labels.mean())
  assert clean_accuracy > majority + 0.1  # the clean run learned: the comparison means something
  assert abs(_accuracy(model, guarded.params, data.test) - clean_accuracy) <= 0.02
  poisoned_is_broken = (
      not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(unguarded.params))
      or _accuracy(model, unguarded.params, data.test) < clean_accuracy - 0.02)
  assert poisoned_is_broken


def test_study_guard_field_counts_drops_and_is_checked(tmp_path):
  import re  # pylint: disable=g-import-not-at-top
  from fedjax_dx import study  # pylint: disable=g-import-not-at-top
  from tests.test_study import _study_frame  # pylint: disable=g-import-not-at-top
  metrics = _study_frame(tmp_path, "guarded", methods="fedavg,scaffold,centralized",
                         guard=10.0, num_seeds=1)
  for method in ("fedavg", "scaffold"):
    rows = metrics[metrics["method"] == method]
    assert (rows["guard_dropped"] == 0).all()  # clean synthetic hospitals: none dropped
    assert rows["round"].max() == 4
  assert metrics[metrics["method"] == "centralized"]["guard_dropped"].isna().all()
  # The default guard (NaN/Inf only) is linear: a chunked round takes it.
  chunked = _study_frame(tmp_path, "default_chunked", methods="fedavg", client_chunk=2,
                         num_seeds=1)
  assert (chunked["guard_dropped"] == 0).all()
  with pytest.raises(study.StudyError, match=re.escape(
      "config.guard = 0.5: expected 0 (off) or a multiple >= 1")):
    _study_frame(tmp_path, "bad", guard=0.5)
  assert not (tmp_path / "bad").exists()
  with pytest.raises(study.StudyError, match=re.escape(
      "config.client_chunk = 2: expected 0 with guard")):
    _study_frame(tmp_path, "chunked", guard=10.0, client_chunk=2, methods="fedavg")
