"""Cyclic weight transfer: one model visits the participating clients in a random order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_dx.core import _engine
from fedjax_dx.core import _local
from fedjax_dx.core import _models
from fedjax_dx.core._data import ClientData
from fedjax_dx.core._engine import Algorithm
from fedjax_dx.core._engine import ServerState


def cyclic(model: _models.Model, client_optimizer: optax.GradientTransformation, *,
           batch_size: int, local_steps: int | None = None,
           local_epochs: int | None = None, name: str = "cyclic") -> Algorithm:
  """Cyclic weight transfer (Chang et al., 2018), as in FLamby.

  One model travels from hospital to hospital: each round one client trains it for the
  local budget and passes it on. The clients are visited in a random order, drawn
  afresh for every cycle of `C` rounds (see `cyclic_order`). Each client's data stream
  continues where its previous visit stopped. In round `r` only client
  `cyclic_order(...)[r % C]` works, so there is nothing to vmap over clients; a round
  whose client has no data or does not take part (`participation`) leaves the model
  unchanged.

  Returns:
    An `Algorithm` with a `ServerState`; the client optimizer restarts at each visit.
  """
  budget = _local.LocalBudget.create(local_steps, local_epochs)
  trainer = _local.local_trainer(model, client_optimizer, batch_size=batch_size,
                                 budget=budget)
  sgd = optax.sgd(1.0)

  def init(params, data: ClientData, rng) -> ServerState:
    _engine.check_init_inputs(model, data, batch_size)
    return ServerState(
        params=params, server_opt_state=sgd.init(params),
        positions=jnp.zeros((data.num_clients,), jnp.int32),
        rng=jnp.asarray(rng), round=jnp.zeros((), jnp.int32),
        epochs_window=_local.epochs_window(budget, batch_size, data.num_examples))

  def apply(state: ServerState, data: ClientData, participation=None):
    num_clients = data.num_clients
    participation = _engine.participation_vector(participation, num_clients)
    order = cyclic_order(_engine.side_key(state, _engine.CYCLE_KEY),
                         state.round // num_clients,
                         num_clients)
    k = order[state.round % num_clients]
    client = _local.Client(data.features[k], data.labels[k], data.num_examples[k])
    key = _engine.round_keys(state, num_clients, budget)[k]
    out = _local.train_client(trainer, state.params, client_optimizer.init(state.params),
                              client, key, state.positions[k],
                              epochs_window=state.epochs_window)
    works = (participation[k] > 0) & (data.num_examples[k] > 0)
    new_state = state.replace(
        params=jax.tree.map(lambda new, old: jnp.where(works, new, old), out.params,
                            state.params),
        positions=state.positions.at[k].set(
            jnp.where(works, out.position, state.positions[k])),
        round=state.round + 1)
    metrics = {"train_loss": jnp.where(works, out.train_loss, jnp.nan),
               "client_train_loss": jnp.full((num_clients,), jnp.nan).at[k].set(
                   jnp.where(works, out.train_loss, jnp.nan)),
               "num_participants": works.astype(jnp.int32),
               "num_uploads": works.astype(jnp.int32),
               "client": k}
    return new_state, metrics

  # A round whose client sits out is allowed: the model just waits.
  return Algorithm(init=init, apply=apply,
                   run=_engine.make_run(
                       apply, _engine.check_clients_and_participation,
                       lambda data: _engine.check_init_inputs(model, data, batch_size)),
                   name=name)


def cyclic_order(key: jax.Array, cycle: jax.Array, num_clients: int) -> jax.Array:
  """The order in which `cyclic` visits the clients in `cycle` (a permutation)."""
  return jax.random.permutation(jax.random.fold_in(key, cycle), num_clients)
