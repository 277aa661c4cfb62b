"""The vmapped engine against plain sequential references and algebraic identities."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_dx as fdx
from tests import reference

SIZES = [7, 12, 3, 9]  # unequal client sizes
NUM_FEATURES = 5


def make_data(sizes=SIZES, seed=0, num_classes=2):
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, NUM_FEATURES)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, num_classes, size=n) for n in sizes]
  return xs, ys, fdx.stack_clients(xs, ys, num_classes=num_classes)


def init_params(model, seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, NUM_FEATURES)))


def assert_trees_close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


BUDGETS = [dict(local_epochs=2), dict(local_steps=5)]
MODELS = [("logreg", lambda: fdx.logistic_regression()),
          ("mlp", lambda: fdx.mlp(hidden=(8,), num_classes=3))]


@pytest.mark.parametrize("budget", BUDGETS, ids=["epochs", "steps"])
@pytest.mark.parametrize("model_name,make_model", MODELS, ids=[m[0] for m in MODELS])
def test_fedavg_round_equals_sequential_loop(budget, model_name, make_model):
  model = make_model()
  xs, ys, data = make_data(num_classes=model.num_classes)
  optimizer = optax.sgd(0.1, momentum=0.9)  # state must reset each round
  params = init_params(model)
  rng = jax.random.PRNGKey(7)
  algo = fdx.fedavg(model, optimizer, batch_size=4, **budget)
  state = algo.init(params, data, rng)
  state, metrics = algo.run(state, data, num_rounds=3)
  expected = reference.fedavg_rounds(
      model, optimizer, params, xs, ys, rng=rng, num_rounds=3,
      budget=fdx.LocalBudget.create(budget.get("local_steps"), budget.get("local_epochs")),
      batch_size=4)
  assert_trees_close(state.params, expected)
  assert metrics["train_loss"].shape == (3,)
  assert np.all(np.isfinite(metrics["train_loss"]))


def test_fedavg_uniform_weighting_and_partial_participation_match_loop():
  model = fdx.logistic_regression()
  xs, ys, data = make_data()
  params = init_params(model)
  rng = jax.random.PRNGKey(3)
  participation = np.array([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]], np.float32)
  algo = fdx.fedavg(model, optax.sgd(0.2), batch_size=3, local_steps=4,
                    weighting="uniform")
  state = algo.init(params, data, rng)
  state, metrics = algo.run(state, data, participation=participation)
  expected = reference.fedavg_rounds(
      model, optax.sgd(0.2), params, xs, ys, rng=rng, num_rounds=3,
      budget=fdx.LocalBudget(steps=4), batch_size=3, participation=participation,
      weighting="uniform")
  assert_trees_close(state.params, expected)
  np.testing.assert_array_equal(metrics["num_participants"], [3, 2, 3])
  # A client that sat out a round keeps its stream position (its iterator did not move).
  np.testing.assert_array_equal(state.positions, [4 * 3 * 2, 4 * 3 * 2, 4 * 3 * 2,
                                                  4 * 3 * 2])


@pytest.mark.parametrize("budget", BUDGETS, ids=["epochs", "steps"])
def test_local_only_equals_sequential_loop(budget):
  model = fdx.logistic_regression()
  xs, ys, data = make_data()
  optimizer = optax.adam(0.05)  # state persists across rounds for local training
  params = init_params(model)
  rng = jax.random.PRNGKey(11)
  algo = fdx.local_only(model, optimizer, batch_size=4, **budget)
  state = algo.init(params, data, rng)
  state, _ = algo.run(state, data, num_rounds=3)
  expected = reference.local_rounds(
      model, optimizer, params, xs, ys, rng=rng, num_rounds=3,
      budget=fdx.LocalBudget.create(budget.get("local_steps"), budget.get("local_epochs")),
      batch_size=4)
  for k in range(len(SIZES)):
    assert_trees_close(jax.tree.map(lambda x: x[k], state.params), expected[k])


@pytest.mark.parametrize("budget", BUDGETS, ids=["epochs", "steps"])
def test_fedavg_with_one_client_equals_centralized(budget):
  model = fdx.mlp(hidden=(6,), num_classes=2)
  _, _, data = make_data()
  pooled = fdx.pool_clients(data)
  params = init_params(model)
  rng = jax.random.PRNGKey(5)
  fed = fdx.fedavg(model, optax.sgd(0.05), batch_size=4, **budget)
  central = fdx.centralized(model, optax.sgd(0.05), batch_size=4, **budget)
  fed_state, _ = fed.run(fed.init(params, pooled, rng), pooled, num_rounds=4)
  central_state, _ = central.run(central.init(params, pooled, rng), pooled, num_rounds=4)
  assert_trees_close(fed_state.params, fdx.global_params(central_state), atol=1e-6)
  # And training actually moved the model.
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), params,
                                       fed_state.params))
  assert max(float(m) for m in moved) > 1e-3


def test_one_full_batch_step_with_size_weights_is_one_centralized_gradient_step():
  model = fdx.logistic_regression()
  xs, ys, data = make_data()
  params = init_params(model, seed=1)
  lr = 0.3
  algo = fdx.fedavg(model, optax.sgd(lr), batch_size=max(SIZES), local_epochs=1)
  state, _ = algo.run(algo.init(params, data, jax.random.PRNGKey(0)), data, num_rounds=1)

  pooled_x, pooled_y = jnp.asarray(np.concatenate(xs)), jnp.asarray(np.concatenate(ys))
  grads = jax.grad(
      lambda p: jnp.mean(fdx.per_example_loss(model, model.apply(p, pooled_x), pooled_y))
  )(params)
  expected = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  assert_trees_close(state.params, expected, atol=1e-6)


def _run_fedavg(data, participation=None, num_rounds=3, budget=None):
  model = fdx.mlp(hidden=(8,), num_classes=2)
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, **(budget or dict(local_epochs=1)))
  state = algo.init(init_params(model), data, jax.random.PRNGKey(2))
  if participation is None:
    return algo.run(state, data, num_rounds=num_rounds)
  return algo.run(state, data, participation=participation)


@pytest.mark.parametrize("budget", BUDGETS, ids=["epochs", "steps"])
def test_zero_weight_client_padding_and_non_participant_change_nothing(budget):
  _, _, data = make_data()
  base, base_metrics = _run_fedavg(data, budget=budget)

  padded_clients, _ = _run_fedavg(fdx.pad_clients(data, 7), budget=budget)
  assert_trees_close(padded_clients.params, base.params, atol=1e-6)

  wider, _ = _run_fedavg(fdx.pad_examples(data, 40), budget=budget)
  assert_trees_close(wider.params, base.params, atol=1e-6)

  xs, ys, _ = make_data()
  rng = np.random.default_rng(9)
  extra_x = rng.normal(size=(15, NUM_FEATURES)).astype(np.float32) * 100.0
  with_extra = fdx.stack_clients(xs + [extra_x], ys + [np.ones(15, int)], num_classes=2)
  participation = np.ones((3, 5), np.float32)
  participation[:, 4] = 0.0
  sat_out, metrics = _run_fedavg(with_extra, participation=participation, budget=budget)
  assert_trees_close(sat_out.params, base.params, atol=1e-6)
  np.testing.assert_allclose(metrics["train_loss"], base_metrics["train_loss"], rtol=1e-6)


def test_epochs_budget_gives_each_client_exactly_its_examples():
  _, _, data = make_data()
  model = fdx.logistic_regression()
  for epochs, batch in [(1, 4), (3, 5)]:
    algo = fdx.local_only(model, optax.sgd(0.0), batch_size=batch, local_epochs=epochs)
    trainer = fdx.local_trainer(model, optax.sgd(0.0), batch_size=batch,
                                budget=fdx.LocalBudget(epochs=epochs))
    state = algo.init(init_params(model), data, jax.random.PRNGKey(0))
    out = fdx.train_clients(
        trainer, state.params, state.opt_state, data,
        jnp.stack([jax.random.PRNGKey(k) for k in range(4)]), state.positions,
        epochs_window=state.epochs_window, stacked=True)
    np.testing.assert_array_equal(out.examples_seen, np.array(SIZES) * epochs)


def test_every_example_is_visited_once_per_epoch():
  n, max_examples = 11, 16
  key = jax.random.PRNGKey(4)
  for epoch in range(3):
    order = np.asarray(fdx.epoch_order(key, epoch, n, max_examples))
    assert sorted(order[:n].tolist()) == list(range(n))
  orders = {tuple(np.asarray(fdx.epoch_order(key, e, n, max_examples))[:n]) for e in range(5)}
  assert len(orders) > 1  # reshuffled each epoch


def test_same_seed_gives_bitwise_identical_results_and_other_seed_does_not():
  _, _, data = make_data()
  first, m1 = _run_fedavg(data)
  second, m2 = _run_fedavg(data)  # a fresh algorithm: a new trace and compile
  assert_trees_equal(first.params, second.params)
  np.testing.assert_array_equal(m1["train_loss"], m2["train_loss"])
  model = fdx.mlp(hidden=(8,), num_classes=2)
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, local_epochs=1)
  other, _ = algo.run(algo.init(init_params(model), data, jax.random.PRNGKey(99)), data,
                      num_rounds=3)
  assert not np.array_equal(np.asarray(jax.tree.leaves(other.params)[0]),
                            np.asarray(jax.tree.leaves(first.params)[0]))


def test_server_optimizer_plugs_in_without_changing_the_round():
  _, _, data = make_data()
  model = fdx.logistic_regression()
  params = init_params(model)
  plain = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, local_epochs=1)
  half = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, local_epochs=1,
                    server_optimizer=optax.sgd(0.5))
  rng = jax.random.PRNGKey(0)
  full_state, _ = plain.run(plain.init(params, data, rng), data, num_rounds=1)
  half_state, _ = half.run(half.init(params, data, rng), data, num_rounds=1)
  expected = jax.tree.map(lambda p, f: p + 0.5 * (f - p), params, full_state.params)
  assert_trees_close(half_state.params, expected, atol=1e-6)


def test_epoch_order_is_a_permutation_that_ignores_padding_width():
  key = jax.random.PRNGKey(8)
  for n in (1, 2, 5, 64, 100):
    narrow = np.asarray(fdx.epoch_order(key, 3, n, n))
    wide = np.asarray(fdx.epoch_order(key, 3, n, n + 37))
    assert sorted(narrow.tolist()) == list(range(n))
    np.testing.assert_array_equal(wide[:n], narrow)
  # Orders of different clients (keys) and epochs differ.
  a = np.asarray(fdx.epoch_order(jax.random.PRNGKey(1), 0, 50, 50))
  b = np.asarray(fdx.epoch_order(jax.random.PRNGKey(2), 0, 50, 50))
  c = np.asarray(fdx.epoch_order(jax.random.PRNGKey(1), 1, 50, 50))
  assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_epoch_order_positions_are_close_to_uniform():
  # Over many epochs, each example lands in each position about equally often.
  n, epochs = 6, 3000
  orders = jax.vmap(lambda e: fdx.epoch_order(jax.random.PRNGKey(0), e, n, n))(
      jnp.arange(epochs))
  counts = np.zeros((n, n))
  for position in range(n):
    counts[position] = np.bincount(np.asarray(orders[:, position]), minlength=n)
  expected = epochs / n
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 60, chi2  # 25 degrees of freedom; p < 1e-4 beyond about 60
