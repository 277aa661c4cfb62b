"""Strategies against sequential references, identities, and robust aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_dx as fdx
from fedjax_dx import agg
from tests import reference
from tests.test_algorithms import assert_trees_close, init_params, make_data

RNG = jax.random.PRNGKey(21)


@pytest.mark.parametrize("budget", [dict(local_epochs=2), dict(local_steps=4)],
                         ids=["epochs", "steps"])
def test_fedprox_equals_sequential_reference(budget):
  model = fdx.mlp(hidden=(6,), num_classes=2)
  xs, ys, data = make_data()
  params = init_params(model)
  algo = fdx.fedprox(model, optax.sgd(0.1), mu=0.5, batch_size=4, **budget)
  state, _ = algo.run(algo.init(params, data, RNG), data, num_rounds=3)
  expected = reference.fedopt_rounds(
      model, optax.sgd(0.1), optax.sgd(1.0), params, xs, ys, rng=RNG, num_rounds=3,
      budget=fdx.LocalBudget.create(budget.get("local_steps"), budget.get("local_epochs")),
      batch_size=4, prox_mu=0.5)
  assert_trees_close(state.params, expected)
  plain = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, **budget)
  plain_state, _ = plain.run(plain.init(params, data, RNG), data, num_rounds=3)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(plain_state.params)))
  assert moved > 1e-4  # the proximal term matters at mu = 0.5


def test_fedprox_with_mu_zero_is_fedavg():
  model = fdx.logistic_regression()
  _, _, data = make_data()
  params = init_params(model)
  prox = fdx.fedprox(model, optax.sgd(0.1), mu=0.0, batch_size=4, local_epochs=1)
  avg = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, local_epochs=1)
  a, _ = prox.run(prox.init(params, data, RNG), data, num_rounds=3)
  b, _ = avg.run(avg.init(params, data, RNG), data, num_rounds=3)
  assert_trees_close(a.params, b.params, atol=0)


_ALGORITHM2 = lambda server, v0: reference.Algorithm2Server(server, 0.05, 0.9, 0.999, 1e-3,
                                                            v0)


@pytest.mark.parametrize("name,form,server", [
    ("fedadam", "paper", _ALGORITHM2("adam", 1e-6)),
    ("fedyogi", "paper", _ALGORITHM2("yogi", 1e-6)),
    ("fedadagrad", "paper", _ALGORITHM2("adagrad", 1e-6)),
    ("fedadam", "flamby", _ALGORITHM2("adam", 0.0)),
    ("fedyogi", "flamby", _ALGORITHM2("yogi", 0.0)),
    ("fedadagrad", "flamby", _ALGORITHM2("adagrad", 0.0)),
    ("fedadam", "bias_corrected", optax.adam(0.05, b1=0.9, b2=0.999, eps=1e-3)),
    ("fedyogi", "bias_corrected", optax.yogi(0.05, b1=0.9, b2=0.999, eps=1e-3)),
    ("fedadagrad", "bias_corrected",
     optax.adagrad(0.05, initial_accumulator_value=0.0, eps=1e-3)),
    ("fedavgm", None, optax.sgd(0.7, momentum=0.9)),
])
def test_server_optimizers_equal_sequential_reference(name, form, server):
  """FedOpt in each form against local training one client at a time and the server
  step in NumPy (Algorithm 2 of Reddi et al. 2021, tau = 1e-3 so that the paper's
  v_{-1} = tau^2 differs from FLamby's 0) or optax's bias-corrected optimizers."""
  model = fdx.logistic_regression()
  xs, ys, data = make_data()
  params = init_params(model)
  if name == "fedavgm":
    algo = fdx.fedavgm(model, optax.sgd(0.1), server_learning_rate=0.7,
                       server_momentum=0.9, batch_size=4, local_steps=3)
  else:
    algo = fdx.fedopt(model, optax.sgd(0.1), server=name[3:], server_learning_rate=0.05,
                      tau=1e-3, form=form, batch_size=4, local_steps=3)
  assert algo.name == name
  state, _ = algo.run(algo.init(params, data, RNG), data, num_rounds=3)
  expected = reference.fedopt_rounds(model, optax.sgd(0.1), server, params, xs, ys,
                                     rng=RNG, num_rounds=3, budget=fdx.LocalBudget(steps=3),
                                     batch_size=4)
  assert_trees_close(state.params, expected)


@pytest.mark.parametrize("server", ["adam", "yogi", "adagrad"])
def test_fedopt_server_is_algorithm_2_step_by_step(server):
  """Eight server steps on random pseudo-gradients (scales 0.01 to 1) against the
  NumPy transcription, from v_{-1} = tau^2, 0 and 0.5; and no bias correction: the
  first adam step is (1 - b1) / sqrt(1 - b2) = 3.16 times optax's corrected one."""
  params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros((3,))}
  for v0 in (None, 0.0, 0.5):
    ours = fdx.fedopt_server(server, 0.02, b1=0.8, b2=0.99, tau=1e-4, initial_v=v0)
    numpy = reference.Algorithm2Server(server, 0.02, 0.8, 0.99, 1e-4,
                                       1e-8 if v0 is None else v0)
    state, ref_state = ours.init(params), numpy.init(params)
    update = jax.jit(ours.update)
    for step in range(8):
      key = jax.random.fold_in(jax.random.PRNGKey(3), step)
      g = jax.tree.map(lambda p: jax.random.normal(key, p.shape) * 10.0 ** (step % 3 - 2),
                       params)
      ours_step, state = update(g, state)
      ref_step, ref_state = numpy.update(g, ref_state)
      assert_trees_close(ours_step, ref_step, atol=1e-6)
  g, zeros = {"w": jnp.full((2,), -0.01)}, {"w": jnp.zeros((2,))}
  published = fdx.fedopt_server("adam", 1.0, tau=1e-12)
  first, _ = published.update(g, published.init(zeros))
  corrected, _ = optax.adam(1.0, eps=1e-12).update(g, optax.adam(1.0).init(zeros))
  np.testing.assert_allclose(first["w"], 0.1 / np.sqrt(0.001), rtol=1e-4)
  np.testing.assert_allclose(corrected["w"], 1.0, rtol=1e-4)


def test_fedopt_with_sgd_server_lr_one_is_fedavg():
  model = fdx.logistic_regression()
  _, _, data = make_data()
  params = init_params(model)
  opt = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, local_steps=3,
                   server_optimizer=optax.sgd(1.0), name="fedopt_sgd")
  avg = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, local_steps=3)
  a, _ = opt.run(opt.init(params, data, RNG), data, num_rounds=2)
  b, _ = avg.run(avg.init(params, data, RNG), data, num_rounds=2)
  assert_trees_close(a.params, b.params, atol=0)


@pytest.mark.parametrize("budget", [dict(local_epochs=1), dict(local_steps=3)],
                         ids=["epochs", "steps"])
def test_scaffold_equals_sequential_reference_and_keeps_absent_clients_state(budget):
  model = fdx.logistic_regression()
  xs, ys, data = make_data()
  params = init_params(model)
  participation = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 1]], np.float32)
  algo = fdx.scaffold(model, 0.1, batch_size=4, server_learning_rate=1.0, **budget)
  state, _ = algo.run(algo.init(params, data, RNG), data, participation=participation)
  expected, controls = reference.scaffold_rounds(
      model, 0.1, params, xs, ys, rng=RNG, num_rounds=3,
      budget=fdx.LocalBudget.create(budget.get("local_steps"), budget.get("local_epochs")),
      batch_size=4, participation=participation)
  assert_trees_close(state.params, expected)
  for k in range(4):
    assert_trees_close(jax.tree.map(lambda c: c[k], state.client_controls), controls[k])
  # Client 0 sat out round 2: its control variate is the one it left in round 1.
  after_two, _ = algo.run(algo.init(params, data, RNG), data,
                          participation=participation[:2])
  assert_trees_close(jax.tree.map(lambda c: c[0], state.client_controls),
                     jax.tree.map(lambda c: c[0], after_two.client_controls), atol=0)
  assert float(jnp.abs(jax.tree.leaves(state.client_controls)[0][0]).max()) > 0


@pytest.mark.parametrize("server_learning_rate", [1.0, 0.7])
def test_scaffold_flamby_form_equals_a_transcription_of_flambys_round(
    server_learning_rate):
  """form="flamby" against a NumPy transcription of FLamby's Scaffold (which keeps each
  client's correction and previous model, and no server c): the same models over
  four rounds. The paper's form (c moved by 1/N) differs on unequal clients."""
  model = fdx.mlp(hidden=(5,), num_classes=2)
  xs, ys, data = make_data()
  params = init_params(model)
  runs = {}
  for form in ("flamby", "paper"):
    algo = fdx.scaffold(model, 0.1, batch_size=4, local_steps=3, form=form,
                        server_learning_rate=server_learning_rate)
    runs[form], _ = algo.run(algo.init(params, data, RNG), data, num_rounds=4)
  want = reference.flamby_scaffold_rounds(
      model, 0.1, params, xs, ys, rng=RNG, num_rounds=4, steps=3, batch_size=4,
      server_learning_rate=server_learning_rate)
  assert_trees_close(runs["flamby"].params, want)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(runs["flamby"].params), jax.tree.leaves(runs["paper"].params)))
  assert moved > 1e-5
  with pytest.raises(ValueError, match=r"SCAFFOLD form must be one of"):
    fdx.scaffold(model, 0.1, batch_size=4, local_steps=3, form="flamb")


def test_scaffold_first_round_with_zero_controls_is_fedavg():
  model = fdx.logistic_regression()
  _, _, data = make_data()
  params = init_params(model)
  sca = fdx.scaffold(model, 0.1, batch_size=4, local_steps=3)
  avg = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, local_steps=3)
  a, _ = sca.run(sca.init(params, data, RNG), data, num_rounds=1)
  b, _ = avg.run(avg.init(params, data, RNG), data, num_rounds=1)
  assert_trees_close(a.params, b.params, atol=1e-7)


def _random_deltas(seed, num_clients=9):
  rng = np.random.default_rng(seed)
  tree = {"w": rng.normal(size=(num_clients, 4, 3)).astype(np.float32),
          "b": rng.normal(size=(num_clients, 3)).astype(np.float32)}
  participating = rng.random(num_clients) > 0.3
  participating[:3] = True
  weights = participating * rng.uniform(1, 5, num_clients)
  return tree, jnp.asarray(weights / weights.sum(), jnp.float32), participating


@pytest.mark.parametrize("seed", range(3))
def test_median_and_trimmed_mean_equal_numpy(seed):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  tree, weights, part = _random_deltas(seed)
  median = fdx.coordinate_median(jax.tree.map(jnp.asarray, tree), weights)
  for name in tree:
    np.testing.assert_allclose(median[name], np.median(tree[name][part], axis=0),
                               rtol=1e-6)
  for fraction in (0.0, 0.2, 0.34):
    trimmed = fdx.trimmed_mean(fraction)(jax.tree.map(jnp.asarray, tree), weights)
    for name in tree:
      np.testing.assert_allclose(trimmed[name],
                                 stats.trim_mean(tree[name][part], fraction, axis=0),
                                 rtol=1e-5, atol=1e-6)


def _toy_updates():
  """Real client updates of one FedAvg round of a toy model on 10 clients."""
  data = fdx.synthetic_binary(3, 10, 60, heterogeneity=0.2)
  model = fdx.logistic_regression()
  params = model.init(jax.random.PRNGKey(0), data.train.features[0, :1])
  trainer = fdx.local_trainer(model, optax.sgd(0.2), batch_size=8,
                              budget=fdx.LocalBudget(epochs=1))
  keys = jnp.stack([jax.random.PRNGKey(k) for k in range(10)])
  out = fdx.train_clients(trainer, params, optax.sgd(0.2).init(params), data.train, keys,
                          jnp.zeros(10, jnp.int32), epochs_window=1, stacked=False)
  return jax.tree.map(lambda c, p: c - p, out.params, params)


@pytest.mark.parametrize("attack", ["sign_flip", "scale_100"])
def test_robust_aggregation_resists_20_percent_bad_updates(attack):
  deltas = _toy_updates()
  weights = jnp.full(10, 0.1)
  clean = fdx.weighted_mean(deltas, weights)
  factor = -10.0 if attack == "sign_flip" else 100.0  # a boosted sign flip, or x100
  bad = jax.tree.map(lambda d: d.at[:2].multiply(factor), deltas)

  def distance(update):
    return float(np.sqrt(sum(((np.asarray(a) - np.asarray(b)) ** 2).sum()
                             for a, b in zip(jax.tree.leaves(update),
                                             jax.tree.leaves(clean)))))

  scale = distance(jax.tree.map(jnp.zeros_like, clean))  # size of the clean update
  mean_error = distance(fdx.weighted_mean(bad, weights))
  assert mean_error > scale  # FedAvg is pulled away
  for aggregate in (fdx.coordinate_median, fdx.trimmed_mean(0.2),
                    fdx.krum(num_byzantine=2, num_selected=4)):
    assert distance(aggregate(bad, weights)) < 0.5 * scale, aggregate
    assert distance(aggregate(bad, weights)) < 0.2 * mean_error
  # Krum returns one update: an honest client's, never an attacker's.
  chosen = fdx.krum(num_byzantine=2)(bad, weights)
  matches = [k for k in range(10) if all(
      np.allclose(np.asarray(c), np.asarray(d[k])) for c, d in
      zip(jax.tree.leaves(chosen), jax.tree.leaves(bad)))]
  assert len(matches) == 1 and matches[0] >= 2


def test_robust_aggregator_in_a_federated_run_and_bad_arguments():
  model = fdx.logistic_regression()
  _, _, data = make_data()
  params = init_params(model)
  for name in ("median", "trimmed_mean", "krum"):
    algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, local_steps=2, aggregator=name)
    if name == "krum":
      with pytest.raises(ValueError, match=r"krum needs at least 5 participating clients"):
        algo.run(algo.init(params, data, RNG), data, num_rounds=1)
      continue
    state, _ = algo.run(algo.init(params, data, RNG), data, num_rounds=2)
    assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(state.params))
  with pytest.raises(ValueError, match=r"FedProx mu must be >= 0, got -1"):
    fdx.fedprox(model, optax.sgd(0.1), mu=-1, batch_size=2, local_steps=1)
  with pytest.raises(ValueError, match=r"trim_fraction must lie in \[0, 0.5\), got 0.5"):
    fdx.trimmed_mean(0.5)
  with pytest.raises(ValueError, match=r"aggregator must be one of .* got 'mode'"):
    fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_steps=1, aggregator="mode")
  with pytest.raises(ValueError, match=r"FedOpt server must be"):
    fdx.fedopt(model, optax.sgd(0.1), server="lamb", server_learning_rate=0.1,
               batch_size=2, local_steps=1)
  with pytest.raises(ValueError, match=r"FedOpt form must be one of .* got 'adamw'"):
    fdx.fedopt(model, optax.sgd(0.1), server="adam", server_learning_rate=0.1,
               form="adamw", batch_size=2, local_steps=1)
  with pytest.raises(ValueError, match=r"fedopt_server tau = 0.0: expected a finite "
                     r"number > 0"):
    fdx.fedopt_server("adam", 0.1, tau=0.0)
  with pytest.raises(ValueError, match=r"fedopt_server learning_rate = inf"):
    fdx.fedopt_server("yogi", float("inf"))
  with pytest.raises(ValueError, match=r"fedopt_server initial_v = -1.0"):
    fdx.fedopt_server("adagrad", 0.1, initial_v=-1.0)


# ------------------------------------------------------- stragglers, cyclic, fine-tuning


@pytest.mark.parametrize("policy", ["drop", "keep"])
@pytest.mark.parametrize("budget", [dict(local_epochs=3), dict(local_steps=5)],
                         ids=["epochs", "steps"])
def test_stragglers_equal_sequential_reference(policy, budget):
  model = fdx.mlp(hidden=(6,), num_classes=2)
  xs, ys, data = make_data()
  params = init_params(model)
  mu = 0.3 if policy == "keep" else 0.0
  algo = fdx.fedavg(model, optax.chain(fdx.client.proximal(mu), optax.sgd(0.1)),
                    batch_size=3, systems=fdx.Systems(0.5, policy), **budget)
  state, metrics = algo.run(algo.init(params, data, RNG), data, num_rounds=4)
  expected = reference.straggler_rounds(
      model, optax.sgd(0.1), params, xs, ys, rng=RNG, num_rounds=4,
      budget=fdx.LocalBudget.create(budget.get("local_steps"), budget.get("local_epochs")),
      batch_size=3, fraction=0.5, policy=policy, prox_mu=mu)
  assert_trees_close(state.params, expected)
  np.testing.assert_array_equal(metrics["num_stragglers"], 2)  # round(0.5 * 4)
  uploads = 2 if policy == "drop" else 4
  np.testing.assert_array_equal(metrics["num_uploads"], uploads)


def test_stragglers_change_the_result_and_zero_stragglers_change_nothing():
  model = fdx.logistic_regression()
  _, _, data = make_data()
  params = init_params(model)
  runs = {}
  for name, kwargs in [("plain", {}), ("zero", dict(systems=fdx.Systems(0.0))),
                       ("half", dict(systems=fdx.Systems(0.5)))]:
    algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=3, local_epochs=3, **kwargs)
    runs[name] = algo.run(algo.init(params, data, RNG), data, num_rounds=3)[0].params
  assert_trees_close(runs["plain"], runs["zero"], atol=0)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(runs["plain"]), jax.tree.leaves(runs["half"])))
  assert moved > 1e-4


def test_straggler_work_picks_the_share_among_participants_only():
  participation = jnp.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1], jnp.float32)  # 10 in
  for r in range(20):
    is_straggler, work = fdx.straggler_work(jax.random.PRNGKey(r), participation, 0.9, 5)
    is_straggler, work = np.asarray(is_straggler), np.asarray(work)
    assert is_straggler.sum() == 9
    assert not is_straggler[np.asarray(participation) == 0].any()
    assert np.all((work[is_straggler] >= 1) & (work[is_straggler] < 5))
    assert np.all(work[~is_straggler] == 5)


def test_padding_clients_change_no_straggler_or_dropout_draw():
  """6 real clients padded to 16 (buckets, device counts, hosts): every real client's
  straggler choice, work and secure-aggregation dropout are bitwise those of the
  unpadded draw, and the padding (no data) is never chosen. (Padding used to take
  straggler slots: 2.65 real stragglers on average instead of 3.)"""
  real = jnp.ones((6,), jnp.float32)
  padded = jnp.ones((16,), jnp.float32)  # padding "participates" but holds no data
  has_data = jnp.arange(16) < 6
  for r in range(20):
    key = jax.random.PRNGKey(r)
    want = fdx.straggler_work(key, real, 0.5, 5, jnp.ones((6,), bool))
    got = fdx.straggler_work(key, padded, 0.5, 5, has_data)
    np.testing.assert_array_equal(np.asarray(got[0])[:6], np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1])[:6], np.asarray(want[1]))
    assert not np.asarray(got[0])[6:].any() and int(np.asarray(want[0]).sum()) == 3
    dropped = fdx.choose_share(key, has_data, 0.3, round_down=True)
    np.testing.assert_array_equal(np.asarray(dropped)[:6], np.asarray(
        fdx.choose_share(key, jnp.ones((6,), bool), 0.3, round_down=True)))
  # The round: FedAvg with stragglers on the padded clients equals the unpadded one.
  model = fdx.logistic_regression()
  _, _, data = make_data()
  params = init_params(model)
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=3, local_epochs=3,
                    systems=fdx.Systems(0.5))
  results = [algo.run(algo.init(params, d, RNG), d, num_rounds=3)
             for d in (data, fdx.pad_clients(data, 16))]
  assert_trees_close(results[0][0].params, results[1][0].params, atol=1e-6)
  np.testing.assert_array_equal(results[0][1]["num_stragglers"],
                                results[1][1]["num_stragglers"])


def test_all_participants_dropped_leaves_the_model_unchanged():
  model = fdx.logistic_regression()
  _, _, data = make_data()
  params = init_params(model)
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=3, local_epochs=2,
                    systems=fdx.Systems(1.0))
  state, metrics = algo.run(algo.init(params, data, RNG), data, num_rounds=2)
  assert_trees_close(state.params, params, atol=0)
  assert np.all(np.isnan(np.asarray(metrics["train_loss"])))


@pytest.mark.parametrize("budget", [dict(local_epochs=2), dict(local_steps=3)],
                         ids=["epochs", "steps"])
def test_cyclic_equals_sequential_reference(budget):
  model = fdx.mlp(hidden=(6,), num_classes=2)
  xs, ys, data = make_data()
  params = init_params(model)
  algo = fdx.cyclic(model, optax.sgd(0.1), batch_size=3, **budget)
  state, metrics = algo.run(algo.init(params, data, RNG), data, num_rounds=10)
  expected, visits = reference.cyclic_rounds(
      model, optax.sgd(0.1), params, xs, ys, rng=RNG, num_rounds=10,
      budget=fdx.LocalBudget.create(budget.get("local_steps"), budget.get("local_epochs")),
      batch_size=3)
  assert_trees_close(state.params, expected)
  np.testing.assert_array_equal(metrics["client"], visits)
  for cycle in range(2):  # every client once per cycle, in a fresh order
    assert sorted(visits[4 * cycle:4 * cycle + 4]) == [0, 1, 2, 3]
  assert visits[:4] != visits[4:8]


def test_personalization_equals_sequential_reference():
  model = fdx.logistic_regression()
  xs, ys, data = make_data()
  params = init_params(model)
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=3, local_steps=4,
                    fine_tune_steps=5)
  state, _ = algo.run(algo.init(params, data, RNG), data, num_rounds=3)
  personal = jax.jit(algo.personalize)(state, data)
  expected = reference.fine_tuned(model, optax.sgd(0.1), state.params, xs, ys, rng=RNG,
                                  round_index=3, steps=5, batch_size=3)
  for k in range(4):
    assert_trees_close(jax.tree.map(lambda x: x[k], personal), expected[k])
  moved = max(float(jnp.abs(p[0] - g).max()) for p, g in zip(
      jax.tree.leaves(personal), jax.tree.leaves(state.params)))
  assert moved > 1e-4
  plain = fdx.fedavg(model, optax.sgd(0.1), batch_size=3, local_steps=4)
  assert plain.personalize is None
  plain_state, _ = plain.run(plain.init(params, data, RNG), data, num_rounds=3)
  assert_trees_close(plain_state.params, state.params, atol=0)  # FT does not touch FedAvg


def test_batched_runner_over_seeds_and_learning_rates_equals_separate_runs():
  model = fdx.logistic_regression()
  _, _, data = make_data()
  make = lambda learning_rate, mu: fdx.fedprox(
      model, optax.sgd(learning_rate), mu=mu, batch_size=3, local_steps=4)
  grid = [(0, 0.05, 0.0), (1, 0.05, 0.1), (2, 0.2, 0.5)]
  states, expected = [], []
  for seed, lr, mu in grid:
    key = jax.random.PRNGKey(seed)
    algo = make(lr, mu)
    state = algo.init(init_params(model, seed), data, key)
    states.append(state)
    expected.append(algo.run(state, data, num_rounds=3)[0].params)
  runner = fdx.batched_runner(make, ("learning_rate", "mu"))
  out, metrics = runner(fdx.stack_states(states), data, np.ones((3, 3, 4)),
                        learning_rate=[g[1] for g in grid], mu=[g[2] for g in grid])
  assert metrics["train_loss"].shape == (3, 3)
  for g in range(3):
    assert_trees_close(jax.tree.map(lambda x: x[g], out.params), expected[g])
  with pytest.raises(ValueError, match=r"exactly \['learning_rate', 'mu'\]"):
    runner(fdx.stack_states(states), data, np.ones((3, 3, 4)), learning_rate=[1, 2, 3])
  with pytest.raises(ValueError, match=r"mu must have shape \[3\]"):
    runner(fdx.stack_states(states), data, np.ones((3, 3, 4)), learning_rate=[1, 2, 3],
           mu=[1, 2])


def test_straggler_and_fine_tuning_arguments_are_checked():
  model = fdx.logistic_regression()
  with pytest.raises(ValueError, match=r"stragglers .* \[0, 1\], got 1.5"):
    fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_epochs=3,
               systems=fdx.Systems(1.5))
  with pytest.raises(ValueError, match=r"at least 2 local epochs .* got 1"):
    fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_epochs=1,
               systems=fdx.Systems(0.5))
  with pytest.raises(ValueError, match=r"straggler_policy .* got 'wait'"):
    fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_epochs=3,
               systems=fdx.Systems(0.5, "wait"))
  with pytest.raises(ValueError, match=r"fine_tune_steps .* got -1"):
    fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_epochs=3, fine_tune_steps=-1)


@pytest.mark.parametrize("method", ["fedavg", "scaffold", "fedprox_stragglers"])
def test_training_only_the_cohort_equals_masking_everyone(method):
  model = fdx.logistic_regression()
  _, _, data = make_data(sizes=[7, 12, 3, 9, 5, 11])
  params = init_params(model)
  participation = fdx.sample_participation(3, 5, np.asarray(data.num_examples), 2)

  def build(**kwargs):
    if method == "scaffold":
      return fdx.scaffold(model, 0.1, batch_size=3, local_steps=4, **kwargs)
    if method == "fedprox_stragglers":
      return fdx.fedprox(model, optax.sgd(0.1), mu=0.2, batch_size=3, local_epochs=3,
                         systems=fdx.Systems(0.5, "keep"), **kwargs)
    return fdx.fedavg(model, optax.sgd(0.1), batch_size=3, local_steps=4, **kwargs)

  results = {}
  for name, kwargs in [("all", {}), ("cohort", dict(cohort_size=2))]:
    algo = build(**kwargs)
    results[name] = algo.run(algo.init(params, data, RNG), data, participation=participation)
  (full, full_metrics), (cohort, cohort_metrics) = results["all"], results["cohort"]
  assert_trees_close(cohort.params, full.params, atol=1e-6)
  np.testing.assert_array_equal(cohort.positions, full.positions)
  if method == "scaffold":
    assert_trees_close(cohort.client_controls, full.client_controls, atol=1e-6)
    assert_trees_close(cohort.control, full.control, atol=1e-6)
  for key in ("num_participants", "num_uploads", "num_stragglers"):
    np.testing.assert_array_equal(cohort_metrics[key], full_metrics[key])
  np.testing.assert_allclose(cohort_metrics["client_train_loss"],
                             full_metrics["client_train_loss"], rtol=1e-5)
  too_small = build(cohort_size=1)
  with pytest.raises(ValueError, match=r"cohort_size=1 but round\(s\) \[0, 1, 2, 3, 4\] "
                                       r"have \[2, 2, 2, 2, 2\] participants"):
    too_small.run(too_small.init(params, data, RNG), data, participation=participation)


@pytest.mark.parametrize("method", ["fedavg", "scaffold", "fedprox_stragglers_cohort"])
def test_memory_bounded_rounds_equal_the_unchunked_round(method):
  model = fdx.mlp(hidden=(5,), num_classes=2)
  _, _, data = make_data(sizes=[7, 12, 3, 9, 5, 11, 4])
  params = init_params(model)
  participation = np.ones((4, 7), np.float32)
  participation[1, [2, 5]] = 0

  def build(**kwargs):
    if method == "scaffold":
      return fdx.scaffold(model, 0.1, batch_size=3, local_steps=4, **kwargs)
    if method == "fedprox_stragglers_cohort":
      return fdx.fedprox(model, optax.sgd(0.1), mu=0.2, batch_size=3, local_epochs=3,
                         systems=fdx.Systems(0.5, "keep"), cohort_size=7, **kwargs)
    return fdx.fedavg(model, optax.sgd(0.1), batch_size=3, local_steps=4,
                      server_optimizer=optax.adam(0.05), **kwargs)

  results = {}
  for chunk in (None, 3, 1):  # 7 clients: groups of 3 (one padded) and of 1
    algo = build(client_chunk=chunk)
    results[chunk] = algo.run(algo.init(params, data, RNG), data,
                              participation=participation)
  full, full_metrics = results[None]
  for chunk in (3, 1):
    state, metrics = results[chunk]
    assert_trees_close(state.params, full.params, atol=1e-6)
    np.testing.assert_array_equal(state.positions, full.positions)
    if method == "scaffold":
      assert_trees_close(state.client_controls, full.client_controls, atol=1e-6)
      assert_trees_close(state.control, full.control, atol=1e-6)
    np.testing.assert_allclose(metrics["client_train_loss"],
                               full_metrics["client_train_loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["train_loss"], full_metrics["train_loss"],
                               rtol=1e-5)


def test_memory_bounded_rounds_refuse_robust_aggregators():
  with pytest.raises(ValueError, match=r"client_chunk=4 needs aggregator='mean'"):
    fdx.fedavg(fdx.logistic_regression(), optax.sgd(0.1), batch_size=2, local_steps=2,
               aggregator="median", client_chunk=4)


def test_client_chunk_is_chosen_from_memory_and_a_chunk_that_does_not_fit_is_refused():
  model = fdx.mlp(hidden=(16,), num_classes=2)
  _, _, data = make_data(sizes=[20] * 12)
  params = init_params(model)
  make = lambda client_chunk: fdx.fedavg(model, optax.sgd(0.1), batch_size=4,
                                         local_steps=5, client_chunk=client_chunk)
  one = fdx.round_memory(make, params, data, RNG, 1)
  four = fdx.round_memory(make, params, data, RNG, 4)
  per_client = (four["temporaries"] - one["temporaries"]) / 3
  assert per_client > 0
  fixed = one["arguments"] + one["outputs"] + one["temporaries"] - per_client
  budget = fixed + 5.5 * per_client  # room for 5 clients at a time, not 6
  chunk = fdx.choose_client_chunk(make, params, data, RNG, memory_bytes=budget,
                                  headroom=1.0)
  assert chunk == 5
  assert fdx.round_memory(make, params, data, RNG, chunk)["temporaries"] <= (
      budget - one["arguments"] - one["outputs"])
  assert fdx.choose_client_chunk(make, params, data, RNG, memory_bytes=10**12) is None
  with pytest.raises(ValueError, match=r"client_chunk=8 needs about .* at most 5 clients "
                                       r"per chunk fit"):
    fdx.choose_client_chunk(make, params, data, RNG, memory_bytes=budget, headroom=1.0,
                            requested=8)
  with pytest.raises(ValueError, match=r"even one client per chunk needs"):
    fdx.choose_client_chunk(make, params, data, RNG, memory_bytes=fixed, headroom=1.0)
  assert [fdx.client_bucket(n) for n in (1, 2, 3, 5, 8, 9, 1000)] == [1, 2, 4, 8, 8, 16,
                                                                      1024]


@pytest.mark.parametrize("kind", ["fedavg_adam", "scaffold", "topk", "secagg_dp"])
def test_host_streamed_round_equals_the_in_memory_round(kind):
  model = fdx.mlp(hidden=(8,), num_classes=2)
  xs, ys, data = make_data(sizes=[7, 12, 3, 9, 5])
  params = init_params(model)
  common = dict(batch_size=3, local_steps=4)
  make = {
      "fedavg_adam": lambda **kw: fdx.fedavg(model, optax.sgd(0.2),
                                             server_optimizer=optax.adam(0.1),
                                             systems=fdx.Systems(0.4), **common, **kw),
      "scaffold": lambda **kw: fdx.scaffold(model, 0.2, **common, **kw),
      "topk": lambda **kw: fdx.fedavg(
          model, optax.sgd(0.2), aggregator=agg.chain(agg.mean(), agg.top_k(0.3)),
          **common, **kw),
      "secagg_dp": lambda **kw: fdx.fedavg(
          model, optax.sgd(0.2), aggregator=agg.chain(
              agg.clip(0.5), agg.mean("uniform"), agg.gaussian(0.3),
              agg.secure_sum(bound=0.5, dropout=0.2)), **common, **kw),
  }[kind]
  in_memory = make(client_chunk=2)
  streamed = make()
  host = jax.tree.map(np.asarray, data)
  participation = np.array([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], np.float32)
  want, want_metrics = in_memory.run(in_memory.init(params, data, RNG), data,
                                     participation=participation)
  state = streamed.init(params, data, RNG)
  for r in range(2):
    state, metrics = streamed.stream(state, host, participation[r], chunk=2)
    np.testing.assert_allclose(metrics["train_loss"], want_metrics["train_loss"][r],
                               rtol=1e-5)
  assert_trees_close(state.params, want.params, atol=1e-6)
  assert_trees_close(state.positions, want.positions, atol=0)
  if kind == "scaffold":
    assert_trees_close(state.client_controls, want.client_controls, atol=1e-6)
  if kind == "topk":
    assert_trees_close(state.client_residuals, want.client_residuals, atol=1e-6)
