"""Bad input raises a clear ValueError naming the argument, before anything compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_dx as fdx


def good():
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(n, 3)).astype(np.float32) for n in (6, 4)]
  ys = [rng.integers(0, 2, n) for n in (6, 4)]
  return xs, ys


def test_mismatched_lengths_and_shapes():
  xs, ys = good()
  with pytest.raises(ValueError, match=r"client 1 has 4 feature rows but 3 labels"):
    fdx.stack_clients(xs, [ys[0], ys[1][:3]], num_classes=2)
  with pytest.raises(ValueError, match=r"features for 2 clients but labels for 1"):
    fdx.stack_clients(xs, ys[:1], num_classes=2)
  with pytest.raises(ValueError, match=r"client 1 has feature shape \(2,\)"):
    fdx.stack_clients([xs[0], xs[1][:, :2]], ys, num_classes=2)


def test_empty_client():
  xs, ys = good()
  with pytest.raises(ValueError, match=r"train: client 1 has no examples"):
    fdx.stack_clients([xs[0], xs[1][:0]], [ys[0], ys[1][:0]], num_classes=2, name="train")


def test_nan_features():
  xs, ys = good()
  xs[0][2, 1] = np.nan
  with pytest.raises(ValueError, match=r"client 0 features hold NaN or infinite values in "
                                       r"rows \[2\]"):
    fdx.stack_clients(xs, ys, num_classes=2)


def test_labels_out_of_range():
  xs, ys = good()
  ys[1] = np.array([0, 2, 1, 3])
  with pytest.raises(ValueError, match=r"client 1 has labels \[2, 3\] outside the "
                                       r"expected range \[0, 1\]"):
    fdx.stack_clients(xs, ys, num_classes=2)


def test_hand_built_data_is_checked_at_init():
  xs, ys = good()
  data = fdx.stack_clients(xs, ys, num_classes=2)
  bad = data.replace(features=data.features.at[1, 0, 0].set(jnp.inf))
  model = fdx.logistic_regression()
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_epochs=1)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match=r"train_data.features hold NaN"):
    algo.init(params, bad, jax.random.PRNGKey(0))
  bad = data.replace(labels=data.labels.at[0, 0].set(5))
  with pytest.raises(ValueError, match=r"train_data.labels must lie in \[0, 1\]"):
    algo.init(params, bad, jax.random.PRNGKey(0))


def test_batch_larger_than_every_client():
  xs, ys = good()
  data = fdx.stack_clients(xs, ys, num_classes=2)
  model = fdx.logistic_regression()
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=7, local_epochs=1)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match=r"batch_size=7 is larger than every client's "
                                       r"training set \(the largest has 6 examples\)"):
    algo.init(params, data, jax.random.PRNGKey(0))
  assert algo.run.compiled._cache_size() == 0


def test_zero_participating_clients_refused_before_compile():
  xs, ys = good()
  data = fdx.stack_clients(xs, ys, num_classes=2)
  model = fdx.logistic_regression()
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_epochs=1)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  state = algo.init(params, data, jax.random.PRNGKey(0))
  participation = np.array([[1, 1], [0, 0]], np.float32)
  with pytest.raises(ValueError, match=r"participation: round\(s\) \[1\] have zero "
                                       r"participating clients"):
    algo.run(state, data, participation=participation)
  # A padding client taking part does not count: it has no data.
  padded = fdx.pad_clients(data, 3)
  state = algo.init(params, padded, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"zero participating clients with data"):
    algo.run(state, padded, participation=np.array([[0, 0, 1]], np.float32))
  with pytest.raises(ValueError, match=r"participation must have shape \[rounds, 3\]"):
    algo.run(state, padded, participation=np.ones((2, 2), np.float32))
  assert algo.run.compiled._cache_size() == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(local_epochs=1, local_steps=2), "exactly one of local_steps and local_epochs"),
    (dict(), "exactly one of local_steps and local_epochs"),
    (dict(local_epochs=0), "local_epochs must be a positive integer, got 0"),
    (dict(local_steps=2.5), "local_steps must be a positive integer, got 2.5"),
    (dict(local_epochs=1, batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(local_epochs=1, weighting="size"), "weighting must be one of"),
])
def test_bad_algorithm_arguments(kwargs, message):
  kwargs = {"batch_size": 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    fdx.fedavg(fdx.logistic_regression(), optax.sgd(0.1), **kwargs)


def test_state_and_data_client_counts_must_match():
  xs, ys = good()
  data = fdx.stack_clients(xs, ys, num_classes=2)
  model = fdx.logistic_regression()
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_epochs=1)
  state = algo.init(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3))), data,
                    jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"data has 4 clients but the state was initialised "
                                       r"for 2"):
    algo.run(state, fdx.pad_clients(data, 4), num_rounds=1)


def test_centralized_needs_pooled_data():
  xs, ys = good()
  data = fdx.stack_clients(xs, ys, num_classes=2)
  model = fdx.logistic_regression()
  algo = fdx.centralized(model, optax.sgd(0.1), batch_size=2, local_epochs=1)
  with pytest.raises(ValueError, match=r"pass pool_clients\(train_data\)"):
    algo.init(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3))), data,
              jax.random.PRNGKey(0))
