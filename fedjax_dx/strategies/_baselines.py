"""The two baselines (local-only and centralized training) and running a batch of
algorithms (seeds, hyperparameter grids) as one vmapped program.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedjax_dx.core import _engine
from fedjax_dx.core import _local
from fedjax_dx.core import _models
from fedjax_dx.core._data import ClientData
from fedjax_dx.core._engine import Algorithm
from fedjax_dx.core._engine import ServerState

Params = Any


@flax.struct.dataclass
class LocalState:
  """State of local-only training: one independent model per client."""

  params: Params  # [C, ...] one model per client
  opt_state: optax.OptState  # [C, ...] each client's optimizer state (kept across rounds)
  positions: jax.Array  # [C] int32: each client's data-stream position
  rng: jax.Array  # [2] uint32: the run's base key
  round: jax.Array  # [] int32: rounds done
  epochs_window: int = flax.struct.field(pytree_node=False)


def local_only(model: _models.Model, optimizer: optax.GradientTransformation, *,
               batch_size: int, local_steps: int | None = None,
               local_epochs: int | None = None, name: str = "local") -> Algorithm:
  """Each client trains its own model on its own data, with no communication.

  Same local-training code, budget and data streams as `fedavg`; the optimizer state
  persists across rounds (a hospital training alone never resets it). Also used for
  centralized training, which is local training of the single client
  `pool_clients(train_data)` (see `centralized`).

  Returns:
    An `Algorithm` whose state holds one model per client (`LocalState`).
  """
  budget = _local.LocalBudget.create(local_steps, local_epochs)
  trainer = _local.local_trainer(model, optimizer, batch_size=batch_size, budget=budget)

  def init(params, data: ClientData, rng) -> LocalState:
    _engine.check_init_inputs(model, data, batch_size)
    num_clients = data.num_clients
    stack = lambda x: jnp.broadcast_to(x, (num_clients,) + jnp.shape(x))
    return LocalState(
        params=jax.tree.map(stack, params),
        opt_state=jax.tree.map(stack, optimizer.init(params)),
        positions=jnp.zeros((num_clients,), jnp.int32),
        rng=jnp.asarray(rng), round=jnp.zeros((), jnp.int32),
        epochs_window=_local.epochs_window(budget, batch_size, data.num_examples))

  def apply(state: LocalState, data: ClientData, participation=None):
    num_clients = data.num_clients
    took_part = _engine.participation_vector(participation, num_clients) > 0
    out = _local.train_clients(
        trainer, state.params, state.opt_state, data,
        _engine.round_keys(state, num_clients, budget),
        state.positions, epochs_window=state.epochs_window, stacked=True)

    def keep(new, old):
      shaped = took_part.reshape((num_clients,) + (1,) * (new.ndim - 1))
      return jnp.where(shaped, new, old)

    new_state = state.replace(
        params=jax.tree.map(keep, out.params, state.params),
        opt_state=jax.tree.map(keep, out.opt_state, state.opt_state),
        positions=jnp.where(took_part, out.position, state.positions),
        round=state.round + 1)
    train_loss = jnp.where(took_part, out.train_loss, jnp.nan)
    trained = took_part & (data.num_examples > 0)  # a diverged model's NaN shows
    mean_loss = jnp.where(trained, train_loss, 0.0).sum() / jnp.maximum(trained.sum(), 1)
    metrics = {"train_loss": jnp.where(trained.any(), mean_loss, jnp.nan),
               "client_train_loss": train_loss,
               "num_participants": (took_part & (data.num_examples > 0)).sum()}
    return new_state, metrics

  return Algorithm(init=init, apply=apply,
                   run=_engine.make_run(
                       apply, _engine.check_run_inputs,
                       lambda data: _engine.check_init_inputs(model, data, batch_size)),
                   name=name)


def centralized(model: _models.Model, optimizer: optax.GradientTransformation, *,
                batch_size: int, local_steps: int | None = None,
                local_epochs: int | None = None, name: str = "centralized") -> Algorithm:
  """Centralized (pooled) training: `local_only` on `pool_clients(train_data)`.

  Pass the pooled data (one client) to `init` and `run`; with the same budget per
  round, R rounds give the same gradient budget as R federated rounds would give if
  all data sat in one hospital. `global_params(state)` is the trained model.
  """
  algorithm = local_only(model, optimizer, batch_size=batch_size,
                         local_steps=local_steps, local_epochs=local_epochs, name=name)

  def init(params, pooled_data: ClientData, rng):
    if pooled_data.num_clients != 1:
      raise ValueError(
          f"centralized training takes pooled data with one client, got "
          f"{pooled_data.num_clients}; pass pool_clients(train_data)")
    return algorithm.init(params, pooled_data, rng)

  return algorithm._replace(init=init)


def global_params(state) -> Params:
  """The model to evaluate: the global model, or the pooled model of `centralized`."""
  if isinstance(state, ServerState):
    return state.params
  if state.positions.shape[0] != 1:
    raise ValueError("local-only state holds one model per client; evaluate them with "
                     "evaluate_stacked(model, state.params, data)")
  return jax.tree.map(lambda x: x[0], state.params)


def batched_runner(make_algorithm: Callable[..., Algorithm],
                   hyperparameters: tuple[str, ...] = ()) -> Callable:
  """Runs a grid of runs (seeds x hyperparameters) as one vmapped, compiled program.

  Every grid point is an independent run with its own state (its own seed) and, for
  each name in `hyperparameters`, its own value of that argument of `make_algorithm`
  (client learning rate, FedProx mu, server learning rate, ...). The algorithm is built
  inside the vmapped function, so those values are traced and the whole grid compiles
  once, instead of one Python loop iteration (and one compile) per point.

  Args:
    make_algorithm: `(**hyperparameters) -> Algorithm`, e.g.
      `lambda learning_rate: fedavg(model, optax.sgd(learning_rate), ...)`. Range
      checks of traced values are skipped: check the grid before running it.
    hyperparameters: the argument names that vary over the grid.

  Returns:
    `run(states, data, participation, **values) -> (states, metrics)`: `states` stacked
    on a leading grid axis `[G, ...]` (e.g. `jax.tree.map(lambda *x: jnp.stack(x),
    *per_seed_states)`), `participation` `[G, R, C]`, each value `[G]`; metrics carry
    `[G, R, ...]`. `run.compiled` is the jitted function (for AOT compile timing).

  Example:
    >>> runner = batched_runner(
    ...     lambda learning_rate: fedavg(model, optax.sgd(learning_rate), batch_size=4,
    ...                                  local_steps=10), ("learning_rate",))
    >>> states, _ = runner(states, data, np.ones((G, 15, C)), learning_rate=lrs)
  """
  names = tuple(hyperparameters)

  @jax.jit
  def compiled(states, data, participation, values):
    def one(state, rounds_participation, point_values):
      algorithm = make_algorithm(**dict(zip(names, point_values)))
      return jax.lax.scan(lambda s, p: algorithm.apply(s, data, p), state,
                          rounds_participation)

    return jax.vmap(one)(states, participation, values)

  def run(states, data: ClientData, participation, **values):
    if set(values) != set(names):
      raise ValueError(f"batched run takes values for exactly {list(names)}, got "
                       f"{sorted(values)}")
    participation = jnp.asarray(participation, jnp.float32)
    grid = participation.shape[0]
    if participation.ndim != 3 or participation.shape[2] != data.num_clients:
      raise ValueError(f"participation must have shape [grid, rounds, "
                       f"{data.num_clients}], got {participation.shape}")
    arrays = tuple(jnp.asarray(values[n], jnp.float32) for n in names)
    for n, a in zip(names, arrays):
      if a.shape != (grid,):
        raise ValueError(f"{n} must have shape [{grid}] (one value per grid point), "
                         f"got {a.shape}")
    return compiled(states, data, participation, arrays)

  run.compiled = compiled
  return run


def stack_states(states: list) -> Any:
  """Stacks per-run states (same structure) on a leading grid axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)
