"""Client-level DP: clipping, noise of the right size, and the dp-accounting budget."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_dx as fdx
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


@pytest.mark.parametrize("call,message", [
    (lambda: fdx.privacy_epsilon(1.0, 1.0, 10, 0.0), r"delta must lie in \(0, 1\), got 0.0"),
    (lambda: fdx.privacy_epsilon(1.0, 1.0, 10, 1.5), r"delta must lie in \(0, 1\), got 1.5"),
    (lambda: fdx.privacy_epsilon(1.0, 1.2, 10, 1e-5), r"sampling_rate must lie in"),
    (lambda: fdx.noise_for_epsilon(-1.0, 1e-5, 1.0, 10), r"target epsilon must be > 0"),
    (lambda: fdx.noise_for_epsilon(1e-4, 1e-5, 1.0, 10**6),
     r"target epsilon 0.0001 is not reached by any noise multiplier up to 1000"),
    (lambda: fdx.fedavg(fdx.logistic_regression(), optax.sgd(0.1), batch_size=2,
                        local_steps=1, dp_clip=0.0), r"dp_clip .* must be > 0, got 0.0"),
    (lambda: fdx.fedavg(fdx.logistic_regression(), optax.sgd(0.1), batch_size=2,
                        local_steps=1, dp_noise=1.0), r"dp_noise=1.0 needs dp_clip"),
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
  big = fdx.fedavg(model, optax.sgd(0.5), batch_size=3, local_steps=4, dp_clip=1e6)
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
  small = fdx.fedavg(model, optax.sgd(0.5), batch_size=3, local_steps=4, dp_clip=0.05)
  small_state, metrics = small.run(small.init(params, data, RNG), data, num_rounds=1)
  np.testing.assert_allclose(flat(small_state.params), expected, atol=1e-6)
  assert float(metrics["clip_fraction"][0]) == 1.0


@pytest.mark.parametrize("mode", ["central", "local"])
def test_noise_has_the_stated_size(mode):
  model = fdx.mlp(hidden=(128,), num_classes=2)  # ~1,000 parameters to measure a std
  _, _, data = make_data()
  params = init_params(model)
  # Learning rate 0: every update is 0, so the new model minus the old one is the noise.
  algo = fdx.fedavg(model, optax.sgd(0.0), batch_size=3, local_steps=1, dp_clip=0.5,
                    dp_noise=2.0, dp_mode=mode)
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
  assert float(fdx.membership_inference(model, fitted, train, test)["auc"]) > 0.9
