"""The clients axis sharded over 4 simulated CPU devices equals the unsharded run."""

import jax
import numpy as np
import optax
import pytest

import fedjax_dx as fdx


@pytest.fixture(scope="module")
def mesh():
  if len(jax.devices()) < 4:
    pytest.fail("conftest must give 4 CPU devices (jax_num_cpu_devices=4)")
  return fdx.client_mesh(jax.devices()[:4])


@pytest.mark.parametrize("budget", [dict(local_epochs=1), dict(local_steps=3)],
                         ids=["epochs", "steps"])
def test_sharded_round_equals_unsharded(mesh, budget):
  data = fdx.synthetic_binary(seed=1, num_clients=6, examples_per_client=[20, 9, 31, 14,
                                                                          8, 25])
  model = fdx.mlp(hidden=(8,), num_classes=2)
  params = model.init(jax.random.PRNGKey(0), data.train.features[0, :1])
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=4, **budget)
  rng = jax.random.PRNGKey(3)

  plain, plain_metrics = algo.run(algo.init(params, data.train, rng), data.train,
                                  num_rounds=3)

  sharded_data = fdx.shard_clients(data, mesh)
  assert sharded_data.num_clients == 8  # 6 clients padded to a multiple of 4 devices
  assert len(sharded_data.train.features.sharding.device_set) == 4
  state = algo.init(fdx.replicate(params, mesh), sharded_data.train, rng)
  sharded, sharded_metrics = algo.run(state, sharded_data.train, num_rounds=3)
  # Clients train where they live: only the weighted mean crosses devices.
  compiled = algo.run.compiled.lower(
      state, sharded_data.train, np.ones((3, 8), np.float32)).compile().as_text()
  assert "all-reduce" in compiled and "all-gather" not in compiled
  assert sharded.positions.sharding.spec == jax.sharding.PartitionSpec("clients")

  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(plain_metrics["train_loss"], sharded_metrics["train_loss"],
                             rtol=1e-5)

  plain_eval = fdx.evaluate(model, plain.params, data.test)
  sharded_eval = jax.jit(fdx.evaluate, static_argnums=0)(model, sharded.params,
                                                         sharded_data.test)
  np.testing.assert_allclose(plain_eval["clients"]["auc"],
                             sharded_eval["clients"]["auc"][:6], atol=1e-5)
  assert np.all(sharded_eval["clients"]["num_examples"][6:] == 0)
  np.testing.assert_allclose(float(plain_eval["pooled"]["accuracy"]),
                             float(sharded_eval["pooled"]["accuracy"]), atol=1e-6)


def test_local_only_sharded_equals_unsharded(mesh):
  data = fdx.synthetic_binary(seed=2, num_clients=4, examples_per_client=[12, 30, 7, 18])
  model = fdx.logistic_regression()
  params = model.init(jax.random.PRNGKey(0), data.train.features[0, :1])
  algo = fdx.local_only(model, optax.adam(0.05), batch_size=4, local_epochs=1)
  rng = jax.random.PRNGKey(0)
  plain, _ = algo.run(algo.init(params, data.train, rng), data.train, num_rounds=2)
  train = fdx.shard_clients(data.train, mesh)
  sharded, _ = algo.run(algo.init(params, train, rng), train, num_rounds=2)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
