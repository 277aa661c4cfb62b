"""Client-level DP: clipping, noise of the right size, and the dp-accounting budget."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_dx as fdx
from fedjax_dx import agg
from tests.test_algorithms import assert_trees_close, init_params, make_data

RNG = jax.random.PRNGKey(5)


def test_epsilon_matches_the_values_dp_accounting_publishes():
  # dp-accounting's own test: noise 4.530877117, one full-batch release = (1, 1e-6)-DP.
  assert fdx.privacy_epsilon(4.530877117, 1.0, 1, 1e-6) == pytest.approx(1.0, abs=1e-3)
  assert fdx.noise_for_epsilon(1.0, 1e-6, 1.0, 1) == pytest.approx(4.530877117, rel=1e-3)
  # PLD is tighter than RDP; more noise, fewer rounds or less sampling give less epsilon.
  rdp = fdx.privacy_epsilon(1.1, 0.01, 1000, 1e-5)
  assert fdx.privacy_epsilon(1.1, 0.01, 1000, 1e-5, "pld") < rdp
  assert fdx.privacy_epsilon(2.0, 0.01, 1000, 1e-5) < rdp
  assert fdx.privacy_epsilon(1.1, 0.01, 100, 1e-5) < rdp
  assert fdx.privacy_epsilon(1.1, 0.001, 1000, 1e-5) < rdp
  z = fdx.noise_for_epsilon(2.0, 1e-5, 0.1, 50, "pld")
  assert fdx.privacy_epsilon(z, 0.1, 50, 1e-5, "pld") == pytest.approx(2.0, rel=1e-2)
  assert fdx.privacy_epsilon(0.0, 1.0, 1, 1e-5) == float("inf")



def test_a_calibration_asked_again_is_answered_from_memory(monkeypatch):
  """A study asks for the same calibration in its checks and again at each method's
  start: the second answer is the first, without dp-accounting's search."""
  import dp_accounting  # pylint: disable=g-import-not-at-top
  from fedjax_dx.privacy import _accounting  # pylint: disable=g-import-not-at-top
  _accounting._calibrated.cache_clear()
  _accounting._epsilon.cache_clear()
  searches = []
  search = dp_accounting.calibrate_dp_mechanism
  monkeypatch.setattr(dp_accounting, "calibrate_dp_mechanism",
                      lambda *a, **k: searches.append(a) or search(*a, **k))
  first = fdx.noise_for_epsilon(3.0, 1e-5, 1.0, 40)
  assert len(searches) == 1
  assert fdx.noise_for_epsilon(3.0, 1e-5, 1.0, 40) == first and len(searches) == 1
  # Other arguments, or the same value of another type, are computed afresh.
  other = fdx.noise_for_epsilon(3.0, 1e-5, 1.0, 41)
  assert len(searches) == 2 and other != first
  assert fdx.noise_for_epsilon(np.float64(3.0), 1e-5, 1.0, 40) == first
  assert len(searches) == 3
  # Remembered answers are the accountant's: the calibrated noise spends the target.
  assert fdx.privacy_epsilon(first, 1.0, 40, 1e-5) == pytest.approx(3.0, rel=1e-3)
  # Errors are not remembered: asked again, the same error.
  for _ in range(2):
    with pytest.raises(ValueError, match="is not reached"):
      fdx.noise_for_epsilon(1e-4, 1e-5, 1.0, 10**6)

@pytest.mark.parametrize("call,message", [
    (lambda: fdx.privacy_epsilon(1.0, 1.0, 10, 0.0), r"delta must lie in \(0, 1\), got 0.0"),
    (lambda: fdx.privacy_epsilon(1.0, 1.0, 10, 1.5), r"delta must lie in \(0, 1\), got 1.5"),
    (lambda: fdx.privacy_epsilon(1.0, 1.2, 10, 1e-5), r"sampling_rate must lie in"),
    (lambda: fdx.noise_for_epsilon(-1.0, 1e-5, 1.0, 10), r"target epsilon must be > 0"),
    (lambda: fdx.noise_for_epsilon(1e-4, 1e-5, 1.0, 10**6),
     r"target epsilon 0.0001 is not reached by any noise multiplier up to 1000"),
    (lambda: agg.clip(0.0), r"dp_clip .* must be > 0, got 0.0"),
    (lambda: agg.chain(agg.mean("uniform"), agg.gaussian(1.0)),
     r"Gaussian is scaled to the clipping norm: put a clip stage before it"),
    (lambda: fdx.client.dp_sgd(optax.sgd(0.1), clip_norm=0.0, noise_multiplier=1.0),
     r"DP-SGD clip_norm must be > 0"),
])
def test_bad_privacy_arguments_are_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_clip_updates_caps_each_clients_norm():
  deltas = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]]), "b": jnp.array([[0.0], [0.0]])}
  clipped, was_clipped = fdx.clip_updates(deltas, 1.0)
  np.testing.assert_allclose(clipped["w"], [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)
  np.testing.assert_array_equal(was_clipped, [True, False])


def test_dp_fedavg_without_noise_is_the_uniform_mean_of_clipped_updates():
  model = fdx.logistic_regression()
  xs, ys, data = make_data()
  params = init_params(model)
  plain = fdx.fedavg(model, optax.sgd(0.5), batch_size=3, local_steps=4,
                     weighting="uniform")
  state, _ = plain.run(plain.init(params, data, RNG), data, num_rounds=1)
  big = fdx.fedavg(model, optax.sgd(0.5), batch_size=3, local_steps=4,
                   aggregator=agg.chain(agg.clip(1e6), agg.mean("uniform")))
  big_state, metrics = big.run(big.init(params, data, RNG), data, num_rounds=1)
  assert_trees_close(big_state.params, state.params, atol=1e-6)
  assert float(metrics["clip_fraction"][0]) == 0.0
  # A small clip: each client's update scaled to norm 0.05, then averaged (NumPy).
  local = fdx.local_only(model, optax.sgd(0.5), batch_size=3, local_steps=4)
  local_state, _ = local.run(local.init(params, data, RNG), data, num_rounds=1)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  updates = [flat(jax.tree.map(lambda p, g: p[k] - g, local_state.params, params))
             for k in range(4)]
  clipped = [u * min(1.0, 0.05 / np.linalg.norm(u)) for u in updates]
  expected = flat(params) + np.mean(clipped, axis=0)
  small = fdx.fedavg(model, optax.sgd(0.5), batch_size=3, local_steps=4,
                     aggregator=agg.chain(agg.clip(0.05), agg.mean("uniform")))
  small_state, metrics = small.run(small.init(params, data, RNG), data, num_rounds=1)
  np.testing.assert_allclose(flat(small_state.params), expected, atol=1e-6)
  assert float(metrics["clip_fraction"][0]) == 1.0


@pytest.mark.parametrize("mode", ["central", "local"])
def test_noise_has_the_stated_size(mode):
  model = fdx.mlp(hidden=(128,), num_classes=2)  # ~1,000 parameters to measure a std
  _, _, data = make_data()
  params = init_params(model)
  # Learning rate 0: every update is 0, so the new model minus the old one is the noise.
  algo = fdx.fedavg(model, optax.sgd(0.0), batch_size=3, local_steps=1,
                    aggregator=agg.chain(agg.clip(0.5), agg.mean("uniform"),
                                         agg.gaussian(2.0, mode)))
  state, _ = algo.run(algo.init(params, data, RNG), data, num_rounds=1)
  noise = np.concatenate([np.ravel(a - b) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(params))])
  # Central: N(0, (z C)^2) on the sum of 4 updates, divided by 4. Local: each of the
  # 4 clients adds N(0, (z C)^2), the mean has std z C / 2.
  expected = 2.0 * 0.5 / 4 if mode == "central" else 2.0 * 0.5 / 2
  assert noise.size > 800
  assert np.std(noise) == pytest.approx(expected, rel=0.1)
  assert abs(np.mean(noise)) < 4 * expected / np.sqrt(noise.size)


def test_membership_inference_attack_matches_sklearn_and_sees_overfitting():
  from sklearn.metrics import roc_auc_score
  rng = np.random.default_rng(0)
  sizes = [6, 9]
  xs = [rng.normal(size=(n, 5)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 2, n) for n in sizes]
  txs = [rng.normal(size=(n, 5)).astype(np.float32) for n in (7, 4)]
  tys = [rng.integers(0, 2, n) for n in (7, 4)]
  train = fdx.stack_clients(xs, ys, num_classes=2)
  test = fdx.stack_clients(txs, tys, num_classes=2)
  model = fdx.mlp(hidden=(32,), num_classes=2)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
  # Overfit on the 15 training examples (random labels: only memorising helps).
  local = fdx.centralized(model, optax.adam(0.05), batch_size=15, local_steps=300)
  pooled = fdx.pool_clients(train)
  state, _ = local.run(local.init(params, pooled, RNG), pooled, num_rounds=1)
  fitted = fdx.global_params(state)
  for p in (params, fitted):
    result = fdx.membership_inference(model, p, train, test)
    loss = lambda x, y: np.asarray(fdx.per_example_loss(
        model, model.apply(p, jnp.asarray(x)), jnp.asarray(y)))
    member = -np.concatenate([loss(x, y) for x, y in zip(xs, ys)])
    other = -np.concatenate([loss(x, y) for x, y in zip(txs, tys)])
    want = roc_auc_score(np.r_[np.ones(15), np.zeros(11)], np.r_[member, other])
    assert float(result["auc"]) == pytest.approx(want, abs=1e-6)
    threshold = np.quantile(other, 0.99)
    assert float(result["tpr_at_1pct_fpr"]) == pytest.approx(np.mean(member > threshold))
    labels, other_labels = np.concatenate(ys), np.concatenate(tys)
    per_class = [roc_auc_score(np.r_[np.ones((labels == c).sum()),
                                     np.zeros((other_labels == c).sum())],
                               np.r_[member[labels == c], other[other_labels == c]])
                 for c in (0, 1)]
    assert float(result["class_balanced_auc"]) == pytest.approx(np.mean(per_class),
                                                                abs=1e-6)
  assert float(fdx.membership_inference(model, fitted, train, test)["auc"]) > 0.9
  # A diverged model (NaN parameters) gives no attack result, not an AUC above 1.
  broken = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), fitted)
  result = fdx.membership_inference(model, broken, train, test, reference_params=params)
  assert all(np.isnan(float(v)) for v in result.values()), result


def test_class_balanced_attack_does_not_count_a_class_shift_as_membership():
  # A model whose loss depends on the class alone (it predicts class 1 for everyone)
  # and members with more of class 1 than non-members: the plain attack "wins",
  # though nothing about any individual was learned.
  rng = np.random.default_rng(1)
  model = fdx.logistic_regression()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  params = jax.tree.map(jnp.zeros_like, params)
  params["Dense_0"]["bias"] = jnp.full_like(params["Dense_0"]["bias"], 2.0)
  make = lambda labels: fdx.stack_clients(
      [rng.normal(size=(len(labels), 3)).astype(np.float32)], [np.asarray(labels)],
      num_classes=2)
  members, non_members = make([1] * 30 + [0] * 10), make([1] * 10 + [0] * 30)
  result = fdx.membership_inference(model, params, members, non_members)
  assert float(result["auc"]) > 0.7
  assert float(result["class_balanced_auc"]) == pytest.approx(0.5, abs=1e-6)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_dp_sgd_clips_each_example_and_matches_a_per_example_loop():
  model = fdx.mlp(hidden=(8,), num_classes=2)
  xs, ys, data = make_data()
  params = init_params(model)
  # A huge clip and no noise: DP-SGD is plain SGD (local steps: every batch is full).
  plain = fdx.fedavg(model, optax.sgd(0.5), batch_size=3, local_steps=3)
  want, _ = plain.run(plain.init(params, data, RNG), data, num_rounds=2)
  free = fdx.fedavg(model, fdx.client.dp_sgd(optax.sgd(0.5), clip_norm=1e6,
                                             noise_multiplier=0.0),
                    batch_size=3, local_steps=3)
  got, _ = free.run(free.init(params, data, RNG), data, num_rounds=2)
  assert_trees_close(got.params, want.params, atol=1e-6)
  # A small clip: one step of one client against a loop over its examples.
  clip, batch = 0.05, 3
  trainer = fdx.local_trainer(
      model, fdx.client.dp_sgd(optax.sgd(1.0), clip_norm=clip, noise_multiplier=0.0),
      batch_size=batch, budget=fdx.LocalBudget(steps=1))
  x, y = jnp.asarray(xs[1][:batch]), jnp.asarray(ys[1][:batch])
  state = trainer.client_init(params, optax.sgd(1.0).init(params),
                              noise_key=jax.random.PRNGKey(0))
  stepped = jax.jit(trainer.client_step)(state, fdx.Batch(x=x, y=y, weight=jnp.ones(batch)))
  total = np.zeros_like(_flat(params))
  for i in range(batch):
    g = _flat(jax.grad(lambda p: fdx.per_example_loss(
        model, model.apply(p, x[i:i + 1]), y[i:i + 1])[0])(params))
    total += g * min(1.0, clip / np.linalg.norm(g))
  np.testing.assert_allclose(_flat(stepped.params), _flat(params) - total / batch,
                             atol=1e-6)


def test_dp_sgd_noise_has_the_stated_size():
  model = fdx.mlp(hidden=(128,), num_classes=2)
  _, _, data = make_data()
  params = init_params(model)
  # One step at learning rate 1: the update is -(clipped sum + N(0, (zC)^2)) / B; the
  # clipped part has norm <= C spread over ~1,000 parameters, negligible next to it.
  trainer = fdx.local_trainer(
      model, fdx.client.dp_sgd(optax.sgd(1.0), clip_norm=0.01, noise_multiplier=3.0),
      batch_size=3, budget=fdx.LocalBudget(steps=1))
  state = trainer.client_init(params, optax.sgd(1.0).init(params),
                              noise_key=jax.random.PRNGKey(1))
  x = data.features[0, :3]
  stepped = jax.jit(trainer.client_step)(state, fdx.Batch(x=x, y=data.labels[0, :3],
                                                 weight=jnp.ones(3)))
  noise = _flat(stepped.params) - _flat(params)
  assert np.std(noise) == pytest.approx(3.0 * 0.01 / 3, rel=0.1)
  # Each step draws new noise: the noise key moves on.
  assert not np.array_equal(np.asarray(stepped.noise_key), np.asarray(state.noise_key))


def test_example_level_epsilon_is_the_worst_hospitals():
  sizes, steps = [100, 400, 0], [50, 200, 0]
  each = [fdx.privacy_epsilon(1.2, 10 / 100, 50, 1e-5),
          fdx.privacy_epsilon(1.2, 10 / 400, 200, 1e-5)]
  assert fdx.example_level_epsilon(1.2, 10, sizes, steps, 1e-5) == pytest.approx(max(each))
  z = fdx.example_level_noise(3.0, 10, sizes, steps, 1e-5)
  assert fdx.example_level_epsilon(z, 10, sizes, steps, 1e-5) == pytest.approx(3.0,
                                                                                rel=1e-2)
  with pytest.raises(ValueError, match="no client has both examples and local steps"):
    fdx.example_level_epsilon(1.0, 10, [0, 5], [3, 0], 1e-5)


def test_adaptive_clipping_follows_the_quantile_of_update_norms():
  model = fdx.logistic_regression()
  _, _, data = make_data()
  params = init_params(model)
  clip, eta, quantile = 0.05, 0.3, 0.5
  algo = fdx.fedavg(model, optax.sgd(0.5), batch_size=3, local_steps=4,
                    aggregator=agg.chain(agg.clip(clip, adaptive_quantile=quantile,
                                                  learning_rate=eta),
                                         agg.mean("uniform")))
  state = algo.init(params, data, RNG)
  local = fdx.local_only(model, optax.sgd(0.5), batch_size=3, local_steps=4)
  lstate, _ = local.run(local.init(params, data, RNG), data, num_rounds=1)
  norms = [np.linalg.norm(_flat(jax.tree.map(lambda p, g: p[k] - g, lstate.params,
                                             params))) for k in range(4)]
  state, metrics = algo.apply(state, data)
  share = np.mean(np.asarray(norms) <= clip)
  assert float(metrics["clip_norm"]) == pytest.approx(clip)
  assert float(state.clip_norm) == pytest.approx(clip * np.exp(-eta * (share - quantile)),
                                                 rel=1e-6)
  # Over rounds, without noise, the norm settles between the updates' norms so that
  # about half are clipped.
  state, metrics = algo.run(state, data, num_rounds=60)
  metrics = jax.tree.map(lambda m: m[-1], metrics)
  assert 0.25 <= float(metrics["clip_fraction"]) <= 0.75


def test_adaptive_clipping_keeps_the_budget_of_its_noise_multiplier():
  # The update and count noises compose to the stated multiplier (Andrew et al.).
  z, sigma_b = 1.0, 2.0
  z_update = fdx.adaptive_update_noise(z, sigma_b)
  assert (z_update**-2 + (2 * sigma_b)**-2)**-0.5 == pytest.approx(z)
  assert z_update > z
  with pytest.raises(ValueError, match=r"needs dp_count_noise > 0.5"):
    fdx.adaptive_update_noise(1.0, 0.4)
  with pytest.raises(ValueError, match=r"adaptive clipping .* needs central noise"):
    agg.chain(agg.clip(1.0, adaptive_quantile=0.5), agg.mean("uniform"),
              agg.gaussian(1.0, "local"))
  with pytest.raises(ValueError, match=r"dp_adaptive_quantile must lie in \(0, 1\)"):
    agg.clip(1.0, adaptive_quantile=1.5)


def test_calibrated_attack_scores_the_loss_drop():
  from sklearn.metrics import roc_auc_score
  rng = np.random.default_rng(3)
  xs = [rng.normal(size=(n, 5)).astype(np.float32) for n in (8, 6)]
  ys = [rng.integers(0, 2, len(x)) for x in xs]
  txs = [rng.normal(size=(n, 5)).astype(np.float32) for n in (5, 9)]
  tys = [rng.integers(0, 2, len(x)) for x in txs]
  train = fdx.stack_clients(xs, ys, num_classes=2)
  test = fdx.stack_clients(txs, tys, num_classes=2)
  model = fdx.mlp(hidden=(16,), num_classes=2)
  start = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
  pooled = fdx.pool_clients(train)
  algo = fdx.centralized(model, optax.adam(0.05), batch_size=14, local_steps=100)
  state, _ = algo.run(algo.init(start, pooled, RNG), pooled, num_rounds=1)
  fitted = fdx.global_params(state)
  result = fdx.membership_inference(model, fitted, train, test, reference_params=start)
  loss = lambda p, x, y: np.asarray(fdx.per_example_loss(
      model, model.apply(p, jnp.asarray(x)), jnp.asarray(y)))
  drop = lambda xs, ys: np.concatenate([loss(start, x, y) - loss(fitted, x, y)
                                        for x, y in zip(xs, ys)])
  member, other = drop(xs, ys), drop(txs, tys)
  want = roc_auc_score(np.r_[np.ones(14), np.zeros(14)], np.r_[member, other])
  assert float(result["calibrated_auc"]) == pytest.approx(want, abs=1e-6)
  threshold = np.quantile(other, 0.99)
  assert float(result["calibrated_tpr_at_1pct_fpr"]) == pytest.approx(
      np.mean(member > threshold))
  assert float(result["calibrated_auc"]) > 0.8


def test_poisson_dp_sgd_batches_include_each_example_at_batch_over_n():
  """DP-SGD's Poisson batches: every example of a client in each step with probability
  batch / n (frequencies over many steps), never a padded or out-of-range example, a
  new draw each round; one step equals a loop over the chosen examples with the
  clipped sum divided by the expected batch, not by the padded slots."""
  model = fdx.mlp(hidden=(8,), num_classes=2)
  xs, ys, data = make_data()
  params = init_params(model)
  clip, batch = 0.05, 3
  opt = fdx.client.dp_sgd(optax.sgd(1.0), clip_norm=clip, noise_multiplier=0.0,
                          batch_sampling="poisson")
  trainer = fdx.local_trainer(model, opt, batch_size=batch,
                              budget=fdx.LocalBudget(steps=2000))
  client = jax.tree.map(lambda a: a[1], data)
  n = int(client.num_examples)
  layout, end = jax.jit(trainer.client_batches, static_argnums=3)(
      client, jax.random.PRNGKey(4), jnp.int32(0), 1)
  slots, weight = np.asarray(layout.slots), np.asarray(layout.weight)
  assert int(end) == 2000 and slots.shape[1] == fdx.poisson_bound(batch, client.labels.shape[0])
  chosen = np.zeros((2000, client.labels.shape[0]))
  for s in range(2000):
    chosen[s, slots[s][weight[s] > 0]] = 1
  assert chosen[:, n:].sum() == 0  # padding never
  np.testing.assert_allclose(chosen[:, :n].mean(0), batch / n, atol=0.05)
  again, _ = trainer.client_batches(client, jax.random.PRNGKey(4), jnp.int32(2000), 1)
  assert not np.array_equal(np.asarray(again.slots), slots)  # the next round draws anew
  # One step against the loop over its chosen examples.
  one = fdx.local_trainer(model, opt, batch_size=batch, budget=fdx.LocalBudget(steps=1))
  layout, _ = one.client_batches(client, jax.random.PRNGKey(7), jnp.int32(0), 1)
  picked = np.asarray(layout.slots[0])[np.asarray(layout.weight[0]) > 0]
  state = one.client_init(params, optax.sgd(1.0).init(params),
                          noise_key=jax.random.PRNGKey(0))
  stepped = one.client_step(state, fdx.gather_batch(client, layout.slots[0],
                                                    layout.weight[0]))
  total = np.zeros_like(_flat(params))
  for i in picked:
    g = _flat(jax.grad(lambda p: fdx.per_example_loss(
        model, model.apply(p, client.features[i][None]), client.labels[i][None])[0])(
            params))
    total += g * min(1.0, clip / np.linalg.norm(g))
  np.testing.assert_allclose(_flat(stepped.params), _flat(params) - total / batch,
                             atol=1e-6)


def test_fedprox_keeps_dp_sgd_batch_sampling_and_canaries(monkeypatch):
  """FedProx re-wraps DP-SGD around its proximal term: the batch sampling and the
  audit's canaries stay what the caller asked for (they fell back to defaults)."""
  from fedjax_dx.strategies import _fedavg  # pylint: disable=g-import-not-at-top
  seen = {}
  monkeypatch.setattr(_fedavg, "fedavg",
                      lambda model, client_optimizer, **kwargs: seen.setdefault(
                          "optimizer", client_optimizer))
  opt = fdx.client.dp_sgd(optax.sgd(0.1), clip_norm=1.0, noise_multiplier=1.0,
                          batch_sampling="poisson", canaries=7)
  _fedavg.fedprox(fdx.logistic_regression(), opt, mu=0.1, batch_size=4, local_steps=2)
  wrapped = seen["optimizer"]
  assert isinstance(wrapped, fdx.client.DpSgd) and wrapped.inner is not opt.inner
  assert (wrapped.batch_sampling, wrapped.canaries) == ("poisson", 7)
