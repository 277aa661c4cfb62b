"""The round cut at the wire (`Algorithm.halves`): the server's begin, each client's half
called one client at a time in a Python loop, and the server's end give the round the
vmapped engine gives."""

import jax
import numpy as np
import optax
import pytest

import fedjax_dx as fdx
from fedjax_dx import agg
from tests.test_algorithms import assert_trees_close, init_params, make_data

RNG = jax.random.PRNGKey(11)
COMMON = dict(batch_size=4, local_steps=3)
PARTICIPATION = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1]], np.float32)


def _algorithms(model):
  sgd = optax.sgd(0.1)
  return {
      "adaptive_dp": fdx.fedavg(model, sgd, **COMMON, aggregator=agg.chain(
          agg.clip(0.05, adaptive_quantile=0.5, count_noise=1.0), agg.mean("uniform"),
          agg.gaussian(1.0))),
      "topk_error_feedback": fdx.fedavg(model, sgd, **COMMON, aggregator=agg.chain(
          agg.mean(), agg.top_k(0.3))),
      "secure_sum_dropouts": fdx.fedavg(model, sgd, **COMMON, aggregator=agg.chain(
          agg.mean(), agg.secure_sum(dropout=0.25))),
      "scaffold_stragglers": fdx.scaffold(model, 0.1, **COMMON, systems=fdx.Systems(0.5)),
      "fedprox_adam_server": fdx.fedprox(
          model, sgd, mu=0.1, **COMMON, server_optimizer=optax.adam(0.05),
          systems=fdx.Systems(0.5, "keep")),
  }


def _round_by_halves(algo, state, data, participation):
  halves = algo.halves
  ctx = halves.begin(state, data.num_examples, participation)
  uploads = {}
  for k in np.flatnonzero(participation > 0):  # one hospital at a time
    one_client = jax.tree.map(lambda x, k=k: x[k:k + 1], data)
    uploads[int(k)] = halves.client(state, ctx, one_client, int(k))
  return halves.end(state, ctx, data.num_examples, uploads)


@pytest.mark.parametrize("name", ["adaptive_dp", "topk_error_feedback",
                                  "secure_sum_dropouts", "scaffold_stragglers",
                                  "fedprox_adam_server"])
def test_client_and_server_halves_equal_the_vmapped_round(name):
  _, _, data = make_data()
  model = fdx.logistic_regression()
  algo = _algorithms(model)[name]
  engine = halved = algo.init(init_params(model), data, RNG)
  apply = jax.jit(algo.apply)
  for participation in PARTICIPATION:
    engine, engine_metrics = apply(engine, data, participation)
    halved, halved_metrics = _round_by_halves(algo, halved, data, participation)
    # Bit for bit: the server sums in the engine's own order (a deployment's parity).
    jax.tree.map(np.testing.assert_array_equal, halved.params, engine.params)
    np.testing.assert_array_equal(halved.positions, engine.positions)
    assert_trees_close(halved.client_rows, engine.client_rows, atol=1e-6)
    assert_trees_close(halved.aggregator, engine.aggregator, atol=1e-6)
    assert_trees_close((halved.control, halved.client_controls),
                       (engine.control, engine.client_controls), atol=1e-6)
    for key in ("num_participants", "num_uploads", "num_stragglers"):
      np.testing.assert_array_equal(halved_metrics[key], engine_metrics[key], key)
    np.testing.assert_allclose(halved_metrics["train_loss"], engine_metrics["train_loss"],
                               rtol=1e-5)
  assert int(halved.round) == len(PARTICIPATION)


def test_halves_refuse_a_chain_that_needs_every_update():
  _, _, data = make_data()
  model = fdx.logistic_regression()
  algo = fdx.fedavg(model, optax.sgd(0.1), **COMMON, aggregator=agg.chain(agg.median()))
  state = algo.init(init_params(model), data, RNG)
  with pytest.raises(ValueError, match="'median' is not linear"):
    algo.halves.begin(state, data.num_examples)
  with pytest.raises(ValueError, match="at least one client"):
    plain = fdx.fedavg(model, optax.sgd(0.1), **COMMON)
    plain_state = plain.init(init_params(model), data, RNG)
    plain.halves.end(plain_state, plain.halves.begin(plain_state, data.num_examples),
                     data.num_examples, {})
