"""Local training of every client at once: client_init / client_step / client_final.

A client reads its real examples as an endless stream: epoch `e` is a fresh random
permutation of its `n_k` examples, and step `s` takes the next `batch_size` positions of
the stream, so a batch may run from the end of one epoch into the next. Two budgets:

* local steps (FLamby's style): `K` steps per round; the stream position persists
  across rounds, so a client's data iterator continues where it stopped.
* local epochs: `E` passes over the client's data per round, i.e. `ceil(n_k * E / B)`
  steps; the stream restarts each round, and a smaller client's extra steps (the
  round runs `ceil(N_max * E / B)` steps for everyone) are masked out.

Padded slots never enter a batch: masked batch positions have weight 0 in the loss, and
a step with no real example leaves parameters and optimizer state untouched.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_dx.core import _models
from fedjax_dx.core._data import ClientData

Params = Any


class LocalBudget(NamedTuple):
  """How much each client trains per round: exactly one of `steps`, `epochs`."""

  steps: int | None = None
  epochs: int | None = None

  @classmethod
  def create(cls, local_steps: int | None, local_epochs: int | None) -> "LocalBudget":
    if (local_steps is None) == (local_epochs is None):
      raise ValueError(
          "give exactly one of local_steps and local_epochs, got "
          f"local_steps={local_steps!r}, local_epochs={local_epochs!r}")
    for name, value in (("local_steps", local_steps), ("local_epochs", local_epochs)):
      if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return cls(steps=local_steps, epochs=local_epochs)


class Batch(NamedTuple):
  """One local step's examples (a client's, no clients axis)."""

  x: jax.Array  # [B, *feature_shape] features
  y: jax.Array  # [B] labels
  weight: jax.Array  # [B] float32: 1 for a real example of this round's budget, else 0


class BatchSlots(NamedTuple):
  """Which of a client's examples each local step of a round uses."""

  slots: jax.Array  # [S, B] int32: example index of each batch position
  weight: jax.Array  # [S, B] float32: 1 for a real example of this round's budget, else 0


def gather_batch(client: "Client", slots: jax.Array, weight: jax.Array) -> Batch:
  """One step's `Batch` from the client's examples at `slots` ([B])."""
  return Batch(x=client.features[slots], y=client.labels[slots], weight=weight)


POISSON_OVERFLOW = 1e-9  # chance a Poisson batch holds more examples than its slots


def poisson_bound(batch: int, max_examples: int) -> int:
  """Slots for a Poisson batch of expected size `batch` from up to `max_examples`
  examples: P(count > bound) < POISSON_OVERFLOW for every client size (the binomial
  tail grows with n at a fixed mean, so the largest client sets it)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if max_examples <= batch:
    return max(max_examples, 1)
  bound = int(stats.binom.isf(POISSON_OVERFLOW, max_examples, batch / max_examples)) + 1
  return min(max(bound, batch), max_examples)


def _poisson_batches(budget: LocalBudget, batch: int, num_steps: Callable, client: Client,
                     key, position, epochs_window: int, work=None):
  """Poisson batches (DP-SGD's `batch_sampling="poisson"`): in every step each of the
  client's n examples is in independently with probability batch / n; the chosen ones
  fill the first slots of `poisson_bound` (a count past it, probability < 1e-9, is
  cut). The steps are the budget's (epochs: n * epochs / batch per client, rounded
  up). `position` counts the steps taken, so every round draws anew."""
  del epochs_window
  n = client.num_examples
  max_examples = client.labels.shape[0]
  steps = num_steps(max_examples)
  bound = poisson_bound(batch, max_examples)
  if budget.steps is not None:
    units = budget.steps if work is None else jnp.minimum(work, budget.steps)
    active = units
  else:
    units = budget.epochs if work is None else jnp.minimum(work, budget.epochs)
    active = jnp.ceil(n * units / batch).astype(jnp.int32)
  rate = jnp.minimum(1.0, batch / jnp.maximum(n, 1).astype(jnp.float32))
  real = jnp.arange(max_examples) < n

  def one_step(step):
    draw = jax.random.uniform(jax.random.fold_in(key, position + step), (max_examples,))
    chosen = (draw < rate) & real
    slots = jnp.argsort(~chosen, stable=True)[:bound]
    return slots, (chosen[slots] & (step < active) & (n > 0)).astype(jnp.float32)

  slots, weight = jax.vmap(one_step)(jnp.arange(steps))
  return BatchSlots(slots=slots, weight=weight), (position + active).astype(jnp.int32)


class ClientState(NamedTuple):
  """Carry of one client's local training (one round)."""

  params: Params  # the client's model, same tree as the global model
  opt_state: optax.OptState  # client optimizer state
  loss_sum: jax.Array  # [] float32: sum of per-example training losses this round
  examples_seen: jax.Array  # [] int32: real examples used for gradients this round
  steps_taken: jax.Array  # [] int32: steps that held at least one real example
  correction: Params = None  # SCAFFOLD: c - c_k, added to every gradient
  noise_key: jax.Array = None  # [2] uint32: DP-SGD's noise key (split every step)


class ClientOutput(NamedTuple):
  """What a client hands back after a round."""

  params: Params  # trained client model
  opt_state: optax.OptState  # client optimizer state after training
  position: jax.Array  # [] int32: stream position for the next round
  train_loss: jax.Array  # [] float32: mean training loss over the round (NaN if none)
  examples_seen: jax.Array  # [] int32
  steps_taken: jax.Array  # [] int32


class Client(NamedTuple):
  """One client's slice of `ClientData` (no leading clients axis)."""

  features: jax.Array  # [N_max, *feature_shape]
  labels: jax.Array  # [N_max]
  num_examples: jax.Array  # []


# A keyed bijection of uint32 (murmur3's finalizer after adding the key) and its inverse.
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
_M1_INV, _M2_INV = pow(_M1, -1, 2**32), pow(_M2, -1, 2**32)


def _mix(seed, i):
  h = i + seed
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_M1)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(_M2)
  return h ^ (h >> 16)


def _unmix(seed, h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_M2_INV)
  h = h ^ (h >> 13) ^ (h >> 26)
  h = h * jnp.uint32(_M1_INV)
  h = h ^ (h >> 16)
  return h - seed


def epoch_order(key: jax.Array, epoch: jax.Array, num_examples: jax.Array,
                max_examples: int) -> jax.Array:
  """The order in which a client visits its examples in `epoch`.

  A seed drawn with `jax.random` from `fold_in(key, epoch)` keys a bijection `h` of
  32-bit integers; the client's examples are visited in increasing `h(i)`. All sort keys
  are distinct, so the order is a permutation, it ignores padding (`max_examples` only
  sets the output length), and a single-operand integer sort is several times faster
  than `argsort` of random floats, which dominated the round on CPU.

  Returns:
    `[max_examples]` int32 whose first `num_examples` entries are a random permutation
    of `0 .. num_examples - 1` (the rest are padding slots).
  """
  seed = jax.random.bits(jax.random.fold_in(key, epoch), (), jnp.uint32)
  index = jnp.arange(max_examples, dtype=jnp.uint32)
  sort_keys = jnp.where(index < num_examples, _mix(seed, index), jnp.uint32(0xFFFFFFFF))
  return _unmix(seed, jnp.sort(sort_keys)).astype(jnp.int32)


def is_active(value) -> bool:
  """Whether a hyperparameter switches its term on: nonzero, or traced (a grid axis)."""
  return isinstance(value, jax.core.Tracer) or bool(value)


def check_hyperparameter(value, name: str, *, minimum: float | None = None,
                         above: float | None = None) -> None:
  """Range check of a concrete hyperparameter; traced ones (grid axes) are checked by
  the caller that builds the grid."""
  if isinstance(value, jax.core.Tracer):
    return
  if minimum is not None and not value >= minimum:
    raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
  if above is not None and not value > above:
    raise ValueError(f"{name} must be > {above:g}, got {value!r}")


class LocalTrainer(NamedTuple):
  """Pure functions of one client's local training, to be scanned and vmapped.

  `client_batches` lays out the round's minibatches (`[S, B]` indices), `client_init`
  starts from the given model, `client_step` takes one batch, `client_final` reports.
  """

  client_batches: Callable[..., tuple[BatchSlots, jax.Array]]
  client_init: Callable[[Params, optax.OptState], ClientState]
  client_step: Callable[[ClientState, Batch], ClientState]
  client_final: Callable[[ClientState, jax.Array], ClientOutput]
  num_steps: Callable[[int], int]
  batch_size: int
  budget: LocalBudget


def local_trainer(model: _models.Model, optimizer: optax.GradientTransformation, *,
                  batch_size: int, budget: LocalBudget) -> LocalTrainer:
  """Builds the client_init / client_step / client_final of local training.

  Args:
    model: the model.
    optimizer: the client optimizer: any optax `GradientTransformation`, with the
      client-side transformations of `fedjax_dx.client` chained in (FedProx:
      `optax.chain(client.proximal(mu), opt)`; SCAFFOLD:
      `optax.chain(client.scaffold_correction(), opt)`, the correction passed to each
      step as an extra argument) or around it (example-level DP-SGD:
      `client.dp_sgd(opt, ...)`, which brings its own per-example gradient and needs a
      `noise_key` at `client_init`).
    batch_size: examples per local step.
    budget: local steps or local epochs per round.

  Returns:
    A `LocalTrainer`; `train_clients` runs it for every client at once.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  batch = int(batch_size)
  num_steps = functools.partial(_num_steps, budget, batch)
  needs_noise_key = getattr(optimizer, "needs_noise_key", False)

  def client_init(params, opt_state, correction=None, noise_key=None) -> ClientState:
    if needs_noise_key and noise_key is None:
      raise ValueError("example-level DP-SGD needs a noise_key at client_init")
    return ClientState(params=params, opt_state=opt_state,
                       loss_sum=jnp.zeros((), jnp.float32),
                       examples_seen=jnp.zeros((), jnp.int32),
                       steps_taken=jnp.zeros((), jnp.int32), correction=correction,
                       noise_key=noise_key if needs_noise_key else None)

  poisson = getattr(optimizer, "batch_sampling", "shuffle") == "poisson"
  if hasattr(optimizer, "gradient"):  # a transformation with its own gradient (DP-SGD)
    # Poisson batches sit in padded slots: the sum is divided by the expected batch.
    gradient = functools.partial(optimizer.gradient, model,
                                 expected_batch=batch if poisson else None)
    step_optimizer, marks = optimizer, {"private_gradient": True}
  else:
    gradient = functools.partial(_gradient, model)
    step_optimizer, marks = optax.with_extra_args_support(optimizer), {}
  return LocalTrainer(
      client_batches=functools.partial(
          _poisson_batches if poisson else _client_batches, budget, batch, num_steps),
      client_init=client_init,
      client_step=functools.partial(_client_step, step_optimizer, gradient, marks),
      client_final=_client_final, num_steps=num_steps, batch_size=batch, budget=budget)


def _num_steps(budget: LocalBudget, batch: int, max_examples: int) -> int:
  if budget.steps is not None:
    return budget.steps
  return math.ceil(max_examples * budget.epochs / batch)


def _client_batches(budget: LocalBudget, batch: int, num_steps: Callable, client: Client,
                    key, position, epochs_window: int, work=None):
  """This round's minibatch layout (`BatchSlots`, `[S, B]`) and the stream position
  after it. Only indices: each step gathers its own examples (`gather_batch`), so a
  round never materialises all its batches (S x B x features) at once.

  `work` (optional, traced int): the client does only this many of the budget's
  units (steps or epochs) this round, e.g. a straggler; the rest of the layout is
  masked out, so its shape does not change.
  """
  n = client.num_examples
  n_safe = jnp.maximum(n, 1)
  if budget.steps is not None:
    units = budget.steps if work is None else jnp.minimum(work, budget.steps)
    start, limit = position, position + units * batch
  else:
    units = budget.epochs if work is None else jnp.minimum(work, budget.epochs)
    start, limit = jnp.zeros((), jnp.int32), n * units
  first_epoch = start // n_safe
  max_examples = client.labels.shape[0]
  orders = jax.vmap(epoch_order, in_axes=(None, 0, None, None))(
      key, first_epoch + jnp.arange(epochs_window), n, max_examples)
  steps = num_steps(max_examples)
  positions = start + jnp.arange(steps * batch)
  epoch = jnp.clip(positions // n_safe - first_epoch, 0, epochs_window - 1)
  slots = orders[epoch, positions % n_safe]
  weight = ((positions < limit) & (n > 0)).astype(jnp.float32)
  return (BatchSlots(slots=slots.reshape(steps, batch),
                     weight=weight.reshape(steps, batch)),
          limit.astype(jnp.int32))


def _gradient(model, state: ClientState, batch: Batch, count):
  """The masked mean loss of the batch and its gradient."""
  def loss_fn(params):
    return _models.batch_loss_sum(model, model.apply(params, batch.x), batch.y,
                                  batch.weight) / jnp.maximum(count, 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return loss, grads, state.noise_key


def _client_step(optimizer, gradient: Callable, marks: dict, state: ClientState,
                 batch: Batch) -> ClientState:
  """One local step: the gradient (plain, or the transformation's own: DP-SGD), then
  the client optimizer (with SCAFFOLD's correction as an extra argument)."""
  count = batch.weight.sum()
  loss, grads, noise_key = gradient(state, batch, count)
  extra = dict(marks) if state.correction is None else {**marks,
                                                         "correction": state.correction}
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **extra)
  params = optax.apply_updates(state.params, updates)
  # A step without real examples (a small client past its epochs) changes nothing.
  take = count > 0
  keep_if_empty = lambda new, old: jnp.where(take, new, old)
  return state._replace(
      params=jax.tree.map(keep_if_empty, params, state.params),
      opt_state=jax.tree.map(keep_if_empty, opt_state, state.opt_state),
      loss_sum=state.loss_sum + loss * count,
      examples_seen=state.examples_seen + count.astype(jnp.int32),
      steps_taken=state.steps_taken + take.astype(jnp.int32), noise_key=noise_key)


def _client_final(state: ClientState, position) -> ClientOutput:
  seen = state.examples_seen
  return ClientOutput(
      params=state.params, opt_state=state.opt_state, position=position,
      train_loss=jnp.where(seen > 0, state.loss_sum / jnp.maximum(seen, 1), jnp.nan),
      examples_seen=seen, steps_taken=state.steps_taken)


def epochs_window(budget: LocalBudget, batch_size: int, num_examples: np.ndarray) -> int:
  """How many epochs one round can reach for any client (a static shape).

  Computed on the host from concrete client sizes, once per run.
  """
  if budget.epochs is not None:
    return budget.epochs
  sizes = np.asarray(num_examples)
  smallest = int(sizes[sizes > 0].min()) if np.any(sizes > 0) else 1
  return math.ceil(budget.steps * batch_size / smallest) + 1


def train_clients(trainer: LocalTrainer, params: Params, opt_state: optax.OptState,
                  data: ClientData, keys: jax.Array, positions: jax.Array, *,
                  epochs_window: int, stacked: bool, correction: Params = None, work: jax.Array | None = None,
                  noise_keys: jax.Array | None = None) -> ClientOutput:
  """Runs local training of every client in parallel (`lax.scan` inside `vmap`).

  Args:
    trainer: from `local_trainer`.
    params: starting parameters: one model shared by all (`stacked=False`, FedAvg), or
      one per client on a leading axis (`stacked=True`, local-only training).
    opt_state: the matching optimizer state (shared or stacked like `params`).
    data: the clients' training data, `C` clients.
    keys: `[C, 2]` uint32, each client's data-order key.
    positions: `[C]` int32, each client's stream position.
    epochs_window: from `epochs_window` (static).
    stacked: whether params/opt_state carry a leading clients axis.
    correction: SCAFFOLD's per-client gradient correction `[C, ...]`, or None.
    work: `[C]` int32, the budget units (steps or epochs) each client does this round
      (stragglers do fewer), or None for the full budget.
    noise_keys: `[C, 2]` uint32, each client's DP-SGD noise key (this round's), or None.

  Returns:
    `ClientOutput` with a leading clients axis on every field.
  """
  def one_client(params, opt_state, features, labels, num_examples, key, position,
                 correction, work, noise_key):
    return train_client(trainer, params, opt_state,
                        Client(features, labels, num_examples), key, position,
                        epochs_window=epochs_window, correction=correction, work=work, noise_key=noise_key)

  model_axis = 0 if stacked else None
  return jax.vmap(one_client, in_axes=(model_axis, model_axis, 0, 0, 0, 0, 0, 0, 0, 0))(
      params, opt_state, data.features, data.labels, data.num_examples, keys, positions,
      correction, work, noise_keys)


def train_client(trainer: LocalTrainer, params: Params, opt_state: optax.OptState,
                 client: Client, key: jax.Array, position: jax.Array, *,
                 epochs_window: int, correction: Params = None, work: jax.Array | None = None,
                 noise_key: jax.Array | None = None) -> ClientOutput:
  """One client's local training for one round: batches, then a `lax.scan` of steps."""
  layout, end = trainer.client_batches(client, key, position, epochs_window, work)
  state = trainer.client_init(params, opt_state, correction, noise_key)

  def step(state, slots_and_weight):
    return trainer.client_step(state, gather_batch(client, *slots_and_weight)), None

  # No unrolling: unroll=4 compiled 2x slower and ran no faster on CPU (W1 and W2 of
  # benchmarks/throughput.py at 100 and 1000 clients).
  state, _ = jax.lax.scan(step, state, (layout.slots, layout.weight))
  return trainer.client_final(state, end)


def client_keys(key: jax.Array, num_clients: int) -> jax.Array:
  """One key per client index: `fold_in(key, k)`, so a client's key ignores padding."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_clients))


def check_batch_size(batch_size: int, data: ClientData) -> None:
  """Refuses a batch larger than every client (host-side, concrete data)."""
  largest = int(np.max(np.asarray(data.num_examples)))
  if batch_size > largest:
    raise ValueError(
        f"batch_size={batch_size} is larger than every client's training set (the "
        f"largest has {largest} examples); use batch_size <= {largest}")
