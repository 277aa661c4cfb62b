"""Federated averaging and the two baselines (centralized, local-only), one engine.

Each algorithm is a small factory returning pure `init` / `apply` functions (optax
style) plus `run`, which executes many rounds inside one compiled `lax.scan`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_dx import _aggregation
from fedjax_dx import _local
from fedjax_dx import _models
from fedjax_dx._data import ClientData, check_client_data

Params = Any
_WEIGHTINGS = ("num_examples", "uniform")


@flax.struct.dataclass
class ServerState:
  """State of a federated run."""

  params: Params  # the global model
  server_opt_state: optax.OptState  # server optimizer state (FedOpt; stateless for FedAvg)
  positions: jax.Array  # [C] int32: each client's data-stream position (local-steps budget)
  rng: jax.Array  # [2] uint32: the run's base key
  round: jax.Array  # [] int32: rounds done
  epochs_window: int = flax.struct.field(pytree_node=False)  # epochs one round can reach
  control: Params = None  # SCAFFOLD: server control variate c (same tree as params)
  client_controls: Params = None  # SCAFFOLD: [C, ...] each client's control variate c_k


@flax.struct.dataclass
class LocalState:
  """State of local-only training: one independent model per client."""

  params: Params  # [C, ...] one model per client
  opt_state: optax.OptState  # [C, ...] each client's optimizer state (kept across rounds)
  positions: jax.Array  # [C] int32: each client's data-stream position
  rng: jax.Array  # [2] uint32: the run's base key
  round: jax.Array  # [] int32: rounds done
  epochs_window: int = flax.struct.field(pytree_node=False)


class Algorithm(NamedTuple):
  """A training method as pure functions.

  Attributes:
    init: `(params, train_data, rng) -> state`; checks the data (host side).
    apply: `(state, train_data, participation [C] or None) -> (state, round_metrics)`;
      one round, pure and jittable.
    run: `(state, train_data, num_rounds=None, participation=None) -> (state, metrics)`;
      many rounds in one compiled `lax.scan` (`participation`: `[R, C]`); checks its
      inputs before compiling. Metrics carry a leading rounds axis.
    name: a short method name (e.g. "fedavg").
  """

  init: Callable[..., Any]
  apply: Callable[..., Any]
  run: Callable[..., Any]
  name: str


def _keys(state, num_clients: int, budget: _local.LocalBudget):
  stream_key, round_base = jax.random.split(state.rng)
  if budget.steps is not None:
    return _local.client_keys(stream_key, num_clients)
  return _local.client_keys(jax.random.fold_in(round_base, state.round), num_clients)


def _participation_vector(participation, num_clients):
  if participation is None:
    return jnp.ones((num_clients,), jnp.float32)
  return jnp.asarray(participation, jnp.float32)


def _make_run(apply: Callable, check: Callable) -> Callable:
  """Wraps `apply` into a jitted multi-round `lax.scan` with host-side checks."""

  @jax.jit
  def scan_rounds(state, data, participation):
    return jax.lax.scan(lambda s, p: apply(s, data, p), state, participation)

  def run(state, data: ClientData, num_rounds: int | None = None, participation=None):
    if participation is None:
      if not isinstance(num_rounds, (int, np.integer)) or num_rounds < 1:
        raise ValueError(f"num_rounds must be a positive integer, got {num_rounds!r}")
      participation = np.ones((num_rounds, data.num_clients), np.float32)
    participation = np.asarray(participation, np.float32)
    if participation.ndim != 2 or participation.shape[1] != data.num_clients:
      raise ValueError(
          f"participation must have shape [rounds, {data.num_clients}] (one row per "
          f"round, one column per client), got {participation.shape}")
    if num_rounds is not None and participation.shape[0] != num_rounds:
      raise ValueError(
          f"participation has {participation.shape[0]} rounds but num_rounds="
          f"{num_rounds}")
    check(state, data, participation)
    return scan_rounds(state, data, jnp.asarray(participation))

  run.compiled = scan_rounds
  return run


def _check_run_inputs(state, data: ClientData, participation: np.ndarray) -> None:
  if state.positions.shape[0] != data.num_clients:
    raise ValueError(
        f"data has {data.num_clients} clients but the state was initialised for "
        f"{state.positions.shape[0]}")
  if np.any((participation < 0) | ~np.isfinite(participation)):
    raise ValueError("participation must hold finite values >= 0 (1 = takes part)")
  with_data = np.asarray(data.num_examples) > 0
  active = (participation > 0) & with_data[None, :]
  empty_rounds = np.flatnonzero(~active.any(axis=1))
  if empty_rounds.size:
    raise ValueError(
        f"participation: round(s) {empty_rounds[:5].tolist()} have zero participating "
        "clients with data; every round needs at least one")


def _check_init_inputs(model, data: ClientData, batch_size: int) -> None:
  check_client_data(data, model.num_classes, name="train_data")
  _local.check_batch_size(batch_size, data)


def fedavg(model: _models.Model, client_optimizer: optax.GradientTransformation, *,
           batch_size: int, local_steps: int | None = None,
           local_epochs: int | None = None,
           server_optimizer: optax.GradientTransformation | None = None,
           weighting: str = "num_examples", aggregator: str | Callable = "mean",
           prox_mu: float = 0.0, name: str = "fedavg") -> Algorithm:
  """Federated averaging, with a pluggable server optimizer (FedOpt) and aggregator.

  Each round every client starts from the global model, trains locally (vmapped over
  clients), and the server combines the updates `delta_k = w_k - w` with weights
  `p_k * n_k` (or `p_k` for `weighting="uniform"`), `p_k` the participation mask. The
  server then treats `-combined` as a gradient: with the default `optax.sgd(1.0)` the
  new global model is exactly the weighted mean of the client models.

  Args:
    model: the model.
    client_optimizer: optax optimizer of local training (state reset each round).
    batch_size: examples per local step.
    local_steps: local steps per round (client streams continue across rounds).
    local_epochs: local epochs per round (give this or `local_steps`).
    server_optimizer: optax optimizer on the pseudo-gradient; default `sgd(1.0)`.
    weighting: "num_examples" (n_k) or "uniform".
    aggregator: "mean", "median", "trimmed_mean", "krum" or a function from
      `_aggregation` (robust aggregation for any strategy).
    prox_mu: FedProx's proximal weight (0: plain FedAvg).
    name: method name in results.

  Returns:
    An `Algorithm`.

  Example:
    >>> algo = fedavg(logistic_regression(), optax.sgd(0.1), batch_size=16,
    ...               local_epochs=1)
    >>> state = algo.init(params, data.train, jax.random.PRNGKey(0))
    >>> state, metrics = algo.run(state, data.train, num_rounds=10)
  """
  return _federated(model, client_optimizer, batch_size=batch_size,
                    local_steps=local_steps, local_epochs=local_epochs,
                    server_optimizer=server_optimizer, weighting=weighting,
                    aggregator=aggregator, prox_mu=prox_mu, name=name)


def fedprox(model, client_optimizer, *, mu: float, name: str = "fedprox", **kwargs):
  """FedProx (Li et al., 2020): FedAvg whose client loss adds `(mu/2)||w - w_global||^2`."""
  if not mu >= 0:
    raise ValueError(f"FedProx mu must be >= 0, got {mu!r}")
  return fedavg(model, client_optimizer, prox_mu=mu, name=name, **kwargs)


def fedavgm(model, client_optimizer, *, server_learning_rate: float = 1.0,
            server_momentum: float = 0.9, name: str = "fedavgm", **kwargs):
  """FedAvgM (Hsu et al., 2019): server SGD with momentum on the averaged update."""
  return fedavg(model, client_optimizer, name=name,
                server_optimizer=optax.sgd(server_learning_rate, momentum=server_momentum),
                **kwargs)


def fedopt(model, client_optimizer, *, server: str, server_learning_rate: float,
           b1: float = 0.9, b2: float = 0.999, tau: float = 1e-8, name: str | None = None,
           **kwargs):
  """FedOpt (Reddi et al., 2021): FedAdam, FedYogi or FedAdagrad on the pseudo-gradient.

  Args:
    server: "adam", "yogi" or "adagrad".
    server_learning_rate: the server step size.
    b1, b2: moment decays (adam, yogi); tau: the adaptivity `eps`.
  """
  if server == "adam":
    opt = optax.adam(server_learning_rate, b1=b1, b2=b2, eps=tau)
  elif server == "yogi":
    opt = optax.yogi(server_learning_rate, b1=b1, b2=b2, eps=tau)
  elif server == "adagrad":
    opt = optax.adagrad(server_learning_rate, initial_accumulator_value=0.0, eps=tau)
  else:
    raise ValueError(f"FedOpt server must be 'adam', 'yogi' or 'adagrad', got {server!r}")
  return fedavg(model, client_optimizer, server_optimizer=opt, name=name or f"fed{server}",
                **kwargs)


def scaffold(model, learning_rate: float, *, batch_size: int,
             local_steps: int | None = None, local_epochs: int | None = None,
             server_learning_rate: float = 1.0, weighting: str = "num_examples",
             name: str = "scaffold") -> Algorithm:
  """SCAFFOLD (Karimireddy et al., 2020), option II, with client SGD at `learning_rate`.

  Each client's gradient is corrected by `c - c_k`; after `K_k` local steps it updates
  `c_k <- c_k - c + (w - y_k) / (K_k * learning_rate)`. The server moves
  `w <- w + server_learning_rate * sum_k weight_k (y_k - w)` and
  `c <- c + (1/N) sum_{k in S} (c_k_new - c_k)`, N the clients with data. The `c_k`
  live in the state on the clients axis and persist while a client sits out.
  """
  if not learning_rate > 0:
    raise ValueError(f"SCAFFOLD learning_rate must be > 0, got {learning_rate!r}")
  return _federated(model, optax.sgd(learning_rate), batch_size=batch_size,
                    local_steps=local_steps, local_epochs=local_epochs,
                    server_optimizer=optax.sgd(server_learning_rate), weighting=weighting,
                    aggregator="mean", prox_mu=0.0, name=name,
                    scaffold_learning_rate=learning_rate)


def _federated(model, client_optimizer, *, batch_size, local_steps, local_epochs,
               server_optimizer, weighting, aggregator, prox_mu, name,
               scaffold_learning_rate=None) -> Algorithm:
  if weighting not in _WEIGHTINGS:
    raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
  if not prox_mu >= 0:
    raise ValueError(f"prox_mu (FedProx's mu) must be >= 0, got {prox_mu!r}")
  combine = (_aggregation.make_aggregator(aggregator) if isinstance(aggregator, str)
             else aggregator)
  min_participants = getattr(combine, "min_participants", 1)
  budget = _local.LocalBudget.create(local_steps, local_epochs)
  trainer = _local.local_trainer(model, client_optimizer, batch_size=batch_size,
                                 budget=budget, prox_mu=prox_mu)
  server_optimizer = server_optimizer or optax.sgd(1.0)
  uses_controls = scaffold_learning_rate is not None

  def init(params, data: ClientData, rng) -> ServerState:
    _check_init_inputs(model, data, batch_size)
    zeros = jax.tree.map(jnp.zeros_like, params)
    stacked_zeros = jax.tree.map(
        lambda x: jnp.zeros((data.num_clients,) + x.shape, x.dtype), params)
    return ServerState(
        params=params, server_opt_state=server_optimizer.init(params),
        positions=jnp.zeros((data.num_clients,), jnp.int32),
        rng=jnp.asarray(rng), round=jnp.zeros((), jnp.int32),
        epochs_window=_local.epochs_window(budget, batch_size, data.num_examples),
        control=zeros if uses_controls else None,
        client_controls=stacked_zeros if uses_controls else None)

  def apply(state: ServerState, data: ClientData, participation=None):
    num_clients = data.num_clients
    participation = _participation_vector(participation, num_clients)
    correction = None
    if uses_controls:
      correction = jax.tree.map(lambda c, ck: c[None] - ck, state.control,
                                state.client_controls)
    out = _local.train_clients(
        trainer, state.params, client_optimizer.init(state.params), data,
        _keys(state, num_clients, budget), state.positions,
        epochs_window=state.epochs_window, stacked=False,
        anchor=state.params if prox_mu else None, correction=correction)
    sizes = data.num_examples.astype(jnp.float32)
    base = sizes if weighting == "num_examples" else (sizes > 0).astype(jnp.float32)
    weights = participation * base
    weights = weights / weights.sum()
    deltas = jax.tree.map(lambda client, glob: client - glob, out.params, state.params)
    update = combine(deltas, weights)
    pseudo_gradient = jax.tree.map(jnp.negative, update)
    updates, server_opt_state = server_optimizer.update(
        pseudo_gradient, state.server_opt_state, state.params)
    took_part = participation > 0
    new_state = state.replace(
        params=optax.apply_updates(state.params, updates),
        server_opt_state=server_opt_state,
        positions=jnp.where(took_part, out.position, state.positions),
        round=state.round + 1)
    if uses_controls:
      trained = took_part & (out.steps_taken > 0)
      scale = 1.0 / (jnp.maximum(out.steps_taken, 1) * scaffold_learning_rate)

      def new_client_control(ck, c, delta):
        shape = (-1,) + (1,) * (delta.ndim - 1)
        candidate = ck - c[None] - delta * scale.reshape(shape)
        return jnp.where(trained.reshape(shape), candidate, ck)

      client_controls = jax.tree.map(new_client_control, state.client_controls,
                                     state.control, deltas)
      num_with_data = jnp.maximum((data.num_examples > 0).sum(), 1)
      control = jax.tree.map(
          lambda c, new, old: c + (new - old).sum(0) / num_with_data,
          state.control, client_controls, state.client_controls)
      new_state = new_state.replace(control=control, client_controls=client_controls)
    metrics = {
        "train_loss": jnp.nansum(weights * out.train_loss),
        "client_train_loss": jnp.where(took_part, out.train_loss, jnp.nan),
        "num_participants": (took_part & (data.num_examples > 0)).sum(),
    }
    return new_state, metrics

  def check(state, data, participation):
    _check_run_inputs(state, data, participation)
    if min_participants > 1:
      with_data = np.asarray(data.num_examples) > 0
      counts = ((participation > 0) & with_data[None, :]).sum(axis=1)
      short = np.flatnonzero(counts < min_participants)
      if short.size:
        raise ValueError(
            f"aggregator krum needs at least {min_participants} participating clients "
            f"(2 f + 3) each round; round(s) {short[:5].tolist()} have "
            f"{counts[short[:5]].tolist()}")

  return Algorithm(init=init, apply=apply, run=_make_run(apply, check), name=name)


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
    _check_init_inputs(model, data, batch_size)
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
    took_part = _participation_vector(participation, num_clients) > 0
    out = _local.train_clients(
        trainer, state.params, state.opt_state, data, _keys(state, num_clients, budget),
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
    metrics = {"train_loss": jnp.nanmean(train_loss), "client_train_loss": train_loss,
               "num_participants": (took_part & (data.num_examples > 0)).sum()}
    return new_state, metrics

  return Algorithm(init=init, apply=apply, run=_make_run(apply, _check_run_inputs),
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
