"""The federated round engine: train every client, encode, sum, decode, server update.

One round = begin -> vmap(train -> encode) -> sum -> decode -> server optax update. The
engine alone gathers and scatters per-client rows and sums messages; what happens to an
update between a client and the server is the aggregator chain (`fedjax_dx.agg`), and
how the clients are walked (all at once, only the sampled cohort, in chunks, streamed
from host memory) is chosen by the round's shape and `stream`, never by the chain.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_dx import agg as _agg
from fedjax_dx.agg import _functional
from fedjax_dx.core import _local
from fedjax_dx.core._data import ClientData, check_client_data
from fedjax_dx.privacy import _secagg

Params = Any


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
  fine_tune_window: int = flax.struct.field(pytree_node=False, default=0)  # personalization
  aggregator: dict = None  # {stage name: its server state} (e.g. adaptive clip norm)
  client_rows: dict = None  # {stage name: [C, ...] per-client rows} (error feedback)

  @property
  def clip_norm(self):
    """Adaptive clipping's current norm ([] float32), or None."""
    return (self.aggregator or {}).get("clip")

  @property
  def client_residuals(self):
    """Compression's error-feedback residuals ([C, P] float32), or None."""
    return (self.client_rows or {}).get("compress")


class Algorithm(NamedTuple):
  """A training method as pure functions.

  Attributes:
    init: `(params, train_data, rng) -> state`; checks the data (host side).
    apply: `(state, train_data, participation [C] or None) -> (state, round_metrics)`;
      one round, pure and jittable.
    run: `(state, train_data, num_rounds=None, participation=None) -> (state, metrics)`;
      many rounds in one compiled `lax.scan` (`participation`: `[R, C]`); checks its
      inputs before compiling. Metrics carry a leading rounds axis. `run.compiled` is
      the jitted scan, `run.rounds` the same function not jitted (to vmap over seeds),
      `run.check(state, data, participation)` the host-side checks.
    name: a short method name (e.g. "fedavg").
    personalize: `(state, train_data) -> [C, ...] params`, each client's own model
      (FedAvg + local fine-tuning), pure and jittable; None for methods that train one
      global model.
    stream: `(state, host_data, participation=None, *, chunk) -> (state, metrics)`: one
      round with the client data in host memory, sent to the device chunk by chunk
      (transfers overlap training); the FedAvg family only.
    aggregator: the round's aggregator chain (`fedjax_dx.agg.Chain`), or None.
    halves: the round cut at the wire (`RoundHalves`: the server's begin, one client's
      half, the server's end), for one process per hospital; the FedAvg family only.
  """

  init: Callable[..., Any]
  apply: Callable[..., Any]
  run: Callable[..., Any]
  name: str
  personalize: Callable[..., Any] | None = None
  stream: Callable[..., Any] | None = None
  aggregator: Any = None
  halves: Any = None


class Systems(NamedTuple):
  """Systems heterogeneity (FedProx paper): stragglers do part of the budget."""

  stragglers: float = 0.0  # share of each round's participants that straggle
  policy: str = "drop"  # "drop" (FedAvg discards them) or "keep" (FedProx)


STRAGGLER_POLICIES = ("drop", "keep")
# Keys for what is not a data order: split(rng, 5)[purpose], purpose >= 2.
STRAGGLER_KEY, FINE_TUNE_KEY, CYCLE_KEY = 2, 3, 4
NOISE_KEY = CYCLE_KEY  # the aggregator's keys; cyclic never aggregates, so they never meet
SGD_TAG = 0xD0000001  # fold_in tag of example-level DP-SGD's noise keys


def round_keys(state, num_clients: int, budget: _local.LocalBudget):
  """Each client's data-order key this round (fixed when the budget is in steps: the
  client's stream position moves instead)."""
  stream_key, round_base = jax.random.split(state.rng)
  if budget.steps is not None:
    return _local.client_keys(stream_key, num_clients)
  return _local.client_keys(jax.random.fold_in(round_base, state.round), num_clients)


def side_key(state, purpose: int):
  """`split(rng, 5)[purpose]`, purpose >= 2: never one of the data-order keys."""
  return jax.random.split(state.rng, 5)[purpose]


def straggler_work(key: jax.Array, participation: jax.Array, fraction: float,
                   full_budget: int, has_data: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Which participants straggle this round and how much work each client does.

  As in the FedProx paper's systems heterogeneity: `round(fraction * m)` of the `m`
  participants, chosen uniformly, do a uniformly random number of budget units
  (epochs or steps) in `[1, full_budget)`; everyone else does the full budget.

  Args:
    key: this round's straggler key.
    participation: `[C]` participation mask (> 0 takes part).
    fraction: share of participants that straggle, in [0, 1].
    full_budget: local epochs (or steps) of a full round, >= 2.
    has_data: `[C]` bool, the clients with examples (None: all): only they count
      among the `m` participants (padding clients have none).

  Every draw of client `k` comes from `fold_in(key', k)`: padding clients appended to
  the clients axis (buckets, device counts, hosts) change no real client's draw.

  Returns:
    `(is_straggler [C] bool, work [C] int32)`.
  """
  choose_key, work_key = jax.random.split(key)
  num_clients = participation.shape[0]
  eligible = participation > 0
  if has_data is not None:
    eligible = eligible & has_data
  is_straggler = _agg.choose_share(choose_key, eligible, fraction)
  partial = jax.vmap(lambda k: jax.random.randint(
      jax.random.fold_in(work_key, k), (), 1, full_budget))(jnp.arange(num_clients))
  return is_straggler, jnp.where(is_straggler, partial, full_budget).astype(jnp.int32)


def check_systems(systems: Systems, budget: _local.LocalBudget) -> Systems:
  """`systems` if it can run with `budget`, else a ValueError naming the field."""
  stragglers, policy = systems
  if policy not in STRAGGLER_POLICIES:
    raise ValueError(f"straggler_policy must be one of {STRAGGLER_POLICIES}, got "
                     f"{policy!r}")
  if not 0 <= stragglers <= 1:
    raise ValueError(f"stragglers (share of participants) must lie in [0, 1], got "
                     f"{stragglers!r}")
  full_budget = budget.steps if budget.steps is not None else budget.epochs
  if stragglers > 0 and full_budget < 2:
    raise ValueError(
        f"stragglers={stragglers} needs a budget of at least 2 local "
        f"{'steps' if budget.steps else 'epochs'} (stragglers do 1 .. budget-1), got "
        f"{full_budget}")
  return systems


def check_round_shape(cohort_size, client_chunk) -> None:
  for field, value in (("cohort_size", cohort_size), ("client_chunk", client_chunk)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{field} must be a positive integer or None, got {value!r}")


def participation_vector(participation, num_clients):
  if participation is None:
    return jnp.ones((num_clients,), jnp.float32)
  return jnp.asarray(participation, jnp.float32)


def make_run(apply: Callable, check: Callable,
             check_data: Callable | None = None) -> Callable:
  """Wraps `apply` into a jitted multi-round `lax.scan` with host-side checks:
  `check_data(data)` (what `init` checks of the data: shapes, masks, finite features,
  labels in range) and `check(state, data, participation)`."""

  def rounds(state, data, participation):
    return jax.lax.scan(lambda s, p: apply(s, data, p), state, participation)

  scan_rounds = jax.jit(rounds)

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
    if check_data is not None:
      check_data(data)
    check(state, data, participation)
    return scan_rounds(state, data, jnp.asarray(participation))

  run.compiled = scan_rounds
  run.rounds = rounds  # the same, not jitted (to vmap or jit with other rounds)
  run.check = check
  return run


def check_clients_and_participation(state, data: ClientData,
                                    participation: np.ndarray) -> None:
  if state.positions.shape[0] != data.num_clients:
    raise ValueError(
        f"data has {data.num_clients} clients but the state was initialised for "
        f"{state.positions.shape[0]}")
  if np.any((participation < 0) | ~np.isfinite(participation)):
    raise ValueError("participation must hold finite values >= 0 (1 = takes part)")


def check_run_inputs(state, data: ClientData, participation: np.ndarray) -> None:
  check_clients_and_participation(state, data, participation)
  with_data = np.asarray(data.num_examples) > 0
  active = (participation > 0) & with_data[None, :]
  empty_rounds = np.flatnonzero(~active.any(axis=1))
  if empty_rounds.size:
    raise ValueError(
        f"participation: round(s) {empty_rounds[:5].tolist()} have zero participating "
        "clients with data; every round needs at least one")


def check_init_inputs(model, data: ClientData, batch_size: int) -> None:
  check_client_data(data, model.num_classes, name="train_data")
  _local.check_batch_size(batch_size, data)


class Gathers(NamedTuple):
  """How a round reads and writes per-client arrays of its trained clients."""

  take: Callable  # [C, ...] -> [G, ...] (the identity when every client trains)
  get: Callable  # like take, out-of-range members (chunk padding) read as 0
  put: Callable  # (full [C, ...], new [G, ...]) -> full with the members' rows set
  add: Callable  # (full, new) -> full with the members' rows added

  @classmethod
  def of(cls, members, everyone: bool) -> "Gathers":
    if everyone:  # no gathers or scatters: they would cross devices when sharded
      same = lambda full: full
      return cls(same, same, lambda full, new: new, jnp.add)
    return cls(lambda full: full[members],
               lambda full: full.at[members].get(mode="fill", fill_value=0),
               lambda full, new: full.at[members].set(new, mode="drop"),
               lambda full, new: full.at[members].add(new, mode="drop"))


class ClientWork(NamedTuple):
  """What the round does around local training besides the client optimizer (the
  client-side transformations, FedProx's proximal term, SCAFFOLD's correction and
  DP-SGD, are in the client optimizer: `fedjax_dx.client`)."""

  scaffold_learning_rate: float | None = None  # SCAFFOLD: keep control variates (lr)
  scaffold_form: str = "paper"  # c's update: "paper" (1/N) sum_S, "flamby" n_k-weighted
  fine_tune_steps: int = 0  # personalization: local steps of the global model


class Round:
  """The parts of one federated round, for `federated` to assemble.

  `begin` computes the round's per-client quantities, `train_group` trains a group of
  clients and encodes their updates, `group_sum` sums one group (chunked and streamed
  executors), `end` decodes the sum and applies the server update.
  """

  def __init__(self, model, client_optimizer, *, batch_size, budget, server_optimizer,
               aggregator, systems, work: ClientWork, cohort_size, client_chunk):
    self.chain = aggregator
    self.systems = systems
    self.work = work
    self.budget = budget
    self.full_budget = budget.steps if budget.steps is not None else budget.epochs
    self.cohort_size, self.client_chunk = cohort_size, client_chunk
    self.client_optimizer = client_optimizer
    self.server_optimizer = server_optimizer
    self.uses_controls = work.scaffold_learning_rate is not None
    self.example_dp = getattr(client_optimizer, "needs_noise_key", False)  # DP-SGD
    self.trainer = _local.local_trainer(model, client_optimizer, batch_size=batch_size,
                                        budget=budget)

  def begin(self, state, num_examples, participation) -> dict:
    """The round's arrays: participation, stragglers, cohort, weights, keys, and what
    the chain's stages add (`ctx["clients"]` holds the `[C]` per-client values)."""
    num_clients = num_examples.shape[0]
    participation = participation_vector(participation, num_clients)
    work, dropped = None, jnp.zeros((num_clients,), bool)
    if self.systems.stragglers > 0:
      is_straggler, work = straggler_work(
          jax.random.fold_in(side_key(state, STRAGGLER_KEY), state.round),
          participation, self.systems.stragglers, self.full_budget, num_examples > 0)
      if self.systems.policy == "drop":
        dropped = is_straggler
    if self.cohort_size is None or self.cohort_size >= num_clients:
      cohort = jnp.arange(num_clients)
    else:  # train only the participants: gather them (first `cohort_size` of them)
      cohort = jnp.argsort(participation <= 0, stable=True)[:self.cohort_size]
    raw_weights, total, denominator = self.chain.weighting.weights(
        num_examples, participation, dropped)
    scale_weights = 1.0 / jnp.where(total > 0, denominator, 1.0)
    ctx = dict(participation=participation, work=work, dropped=dropped,
               keys=round_keys(state, num_clients, self.budget), cohort=cohort,
               total=total, denominator=denominator, scale_weights=scale_weights,
               noise_key=jax.random.fold_in(side_key(state, NOISE_KEY), state.round))
    ctx["clients"] = dict(
        id=jnp.arange(num_clients), raw_weight=raw_weights,
        weight=raw_weights * scale_weights,
        sending=(participation > 0) & ~dropped & (num_examples > 0))
    return self.chain.begin(state.aggregator, {**self.statics(num_clients), **ctx})

  def statics(self, num_clients: int) -> dict:
    return self.chain.statics(num_clients)

  def arrays(self, ctx: dict) -> dict:
    """The part of the context that crosses a jit boundary (streamed rounds)."""
    static = self.statics(ctx["num_clients"])
    return {k: v for k, v in ctx.items() if k not in static}

  def train_group(self, state, ctx, group_data, members, everyone=False):
    """Trains the clients `members` ([G] indices; `group_data` holds their rows) from
    the global model and encodes their updates with the chain. Returns
    `(out, messages, rows, clients, metrics, changes)`."""
    take = Gathers.of(members, everyone).take
    correction = None
    if self.uses_controls:
      correction = jax.tree.map(lambda c, ck: c[None] - take(ck), state.control,
                                state.client_controls)
    noise_keys = None
    if self.example_dp:  # fold_in(key, k) for this group's clients only
      noise_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
          jax.random.fold_in(ctx["noise_key"], SGD_TAG), take(jnp.arange(
              ctx["participation"].shape[0])))
    out = _local.train_clients(
        self.trainer, state.params, self.client_optimizer.init(state.params), group_data,
        take(ctx["keys"]), take(state.positions), epochs_window=state.epochs_window,
        stacked=False, correction=correction, work=None if ctx["work"] is None else take(ctx["work"]),
        noise_keys=noise_keys)
    deltas = jax.tree.map(lambda client, glob: client - glob, out.params, state.params)
    clients = jax.tree.map(take, ctx["clients"])
    rows = jax.tree.map(take, state.client_rows)
    messages, rows, clients, metrics = self.chain.encode(state.aggregator, rows, deltas,
                                                         clients, ctx)
    changes = self.control_changes(state, ctx, take, out, deltas, clients)
    return out, messages, rows, clients, metrics, changes

  def control_changes(self, state, ctx, take, out, deltas, clients):
    """SCAFFOLD (option II): each trained client's `c_k_new - c_k`."""
    if not self.uses_controls:
      return None
    trained = ((take(ctx["participation"]) > 0) & ~take(ctx["dropped"])
               & (out.steps_taken > 0))
    if "guarded" in clients:  # a dropped (non-finite) update changes no control variate
      trained = trained & ~clients["guarded"]
    step_scale = 1.0 / (jnp.maximum(out.steps_taken, 1)
                        * self.work.scaffold_learning_rate)

    def control_change(c, delta):
      shape = (-1,) + (1,) * (delta.ndim - 1)
      change = -c[None] - delta * step_scale.reshape(shape)
      return jnp.where(trained.reshape(shape), change, 0.0)

    return jax.tree.map(control_change, state.control, deltas)

  def total(self, messages, weights):
    """The sum the server receives: modular for secure aggregation, else weighted."""
    if self.chain.modular:
      return messages.sum(0, dtype=jnp.uint32)
    reducer = self.chain.reducer
    if reducer is not None:
      return reducer.reduce(messages, weights)
    return _functional.weighted_mean(messages, weights)

  def zero_total(self, state):
    size = sum(x.size for x in jax.tree.leaves(state.params))
    if self.chain.modular:
      return jnp.zeros((size,), jnp.uint32)
    if self.chain.flat_from is not None:
      return jnp.zeros((size,), jnp.float32)
    return jax.tree.map(jnp.zeros_like, state.params)

  def group_sum(self, state, ctx, group_data, members, real):
    """One group of a memory-bounded round: its sum and what the end of the round needs
    of its clients. `real` [G] marks padding slots (weight 0, counted nowhere)."""
    ctx = {**self.statics(ctx["participation"].shape[0]), **ctx}
    out, messages, rows, clients, _, changes = self.train_group(state, ctx, group_data,
                                                                members)
    clients = {**clients, "weight": jnp.where(real, clients["weight"], 0.0),
               "sending": clients["sending"] & real}
    if self.chain.modular:  # a padding slot repeats a member: it must not count twice
      messages = jnp.where(real[:, None], messages, jnp.uint32(0))
    if changes is not None:  # padding slots change no control variate
      changes = jax.tree.map(
          lambda d: jnp.where(real.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0),
          changes)
    small = (out.position, out.train_loss, out.steps_taken)
    return self.total(messages, clients["weight"]), (small, clients, changes, rows)

  def end(self, state, ctx, num_examples, total, small, clients, changes, rows, members,
          everyone):
    """The server's side: decode the sum, apply the server update, scatter the trained
    clients' positions, rows and control variates back to the clients axis."""
    ctx = {**self.statics(num_examples.shape[0]), **ctx}
    update, aggregator, decode_metrics = self.chain.decode(state.aggregator, total,
                                                           state.params, ctx, clients)
    # Every participant dropped as a straggler: the model stays where it is.
    update = jax.tree.map(lambda u: jnp.where(ctx["total"] > 0, u, 0.0), update)
    pseudo_gradient = jax.tree.map(jnp.negative, update)
    updates, server_opt_state = self.server_optimizer.update(
        pseudo_gradient, state.server_opt_state, state.params)
    gathers = Gathers.of(members, everyone)
    member_took_part = gathers.get(ctx["participation"]) > 0
    position = small[0]
    new_state = state.replace(
        params=optax.apply_updates(state.params, updates),
        server_opt_state=server_opt_state,
        positions=gathers.put(state.positions, jnp.where(
            member_took_part, position, gathers.get(state.positions))),
        round=state.round + 1, aggregator=aggregator,
        client_rows={name: gathers.put(state.client_rows[name], row)
                     for name, row in rows.items()})
    if self.uses_controls:
      if self.work.scaffold_form == "flamby":  # c moves by the round's model weights
        weights = clients["weight"]
        control = jax.tree.map(
            lambda c, d: c + jnp.tensordot(weights, d, axes=1), state.control, changes)
      else:  # the paper: c + (1/N) sum over the trained clients
        num_with_data = jnp.maximum((num_examples > 0).sum(), 1)
        control = jax.tree.map(lambda c, d: c + d.sum(0) / num_with_data,
                               state.control, changes)
      new_state = new_state.replace(
          control=control,
          client_controls=jax.tree.map(gathers.add, state.client_controls, changes))
    metrics = self.round_metrics(ctx, num_examples, small, clients, gathers,
                                 member_took_part)
    return new_state, {**metrics, **decode_metrics}

  def round_metrics(self, ctx, num_examples, small, clients, gathers, member_took_part):
    _, train_loss, _ = small
    num_clients = num_examples.shape[0]
    participation, work = ctx["participation"], ctx["work"]
    took_part, with_data = participation > 0, num_examples > 0
    clipped = clients.get("clipped", jnp.zeros(train_loss.shape, bool))
    secagg_dropped = ctx.get("secagg_dropped", jnp.zeros((num_clients,), bool))
    weights = clients["weight"]
    # Not nansum: a NaN from a client that counts (a diverged model) must show.
    loss = jnp.where(weights > 0, weights * train_loss, 0.0).sum()
    if "guarded" in clients:
      guarded = clients["guarded"].any()
      if ctx["expected_clients"] is None:
        # The linear guard zeroes a dropped client's weight without rescaling the rest.
        kept = jnp.where(clients["sending"], weights, 0.0).sum()
        loss = jnp.where(guarded & (kept > 0), loss / jnp.where(kept > 0, kept, 1.0),
                         loss)
      # Every update dropped: no loss was kept (not 0.0).
      loss = jnp.where(guarded & ~(clients["sending"] & ~clients["guarded"]).any(),
                       jnp.nan, loss)
    return {
        "train_loss": jnp.where(ctx["total"] > 0, loss, jnp.nan),
        "client_train_loss": gathers.put(jnp.full((num_clients,), jnp.nan),
                                         jnp.where(member_took_part, train_loss, jnp.nan)),
        "num_participants": (took_part & with_data).sum(),
        "num_uploads": (ctx["clients"]["sending"] & ~secagg_dropped).sum(),
        "num_stragglers": (took_part & with_data & (
            jnp.zeros((), bool) if work is None else work < self.full_budget)).sum(),
        "clip_fraction": (clipped & member_took_part).sum() / jnp.maximum(
            member_took_part.sum(), 1),
    }

  def apply(self, state, data: ClientData, participation=None):
    """One round over all (or the sampled cohort's) clients, at once or in chunks."""
    num_clients = data.num_clients
    ctx = self.begin(state, data.num_examples, participation)
    cohort, chunk = ctx["cohort"], self.client_chunk
    everyone = cohort.shape[0] == num_clients and (chunk is None or chunk >= num_clients)
    encode_metrics = {}
    if chunk is None or chunk >= cohort.shape[0]:
      group_data = data if everyone else jax.tree.map(lambda x: x[cohort], data)
      out, messages, rows, clients, encode_metrics, changes = self.train_group(
          state, ctx, group_data, cohort, everyone=everyone)
      total = self.total(messages, clients["weight"])
      small = (out.position, out.train_loss, out.steps_taken)
      members = cohort
    else:
      total, small, clients, changes, rows, members = self.chunked(state, ctx, data)
    new_state, metrics = self.end(state, ctx, data.num_examples, total, small, clients,
                                  changes, rows, members, everyone)
    return new_state, {**metrics, **encode_metrics}

  def chunked(self, state, ctx, data: ClientData):
    """Memory-bounded: a scan over groups of `client_chunk` clients, summing their
    messages. Padding slots repeat the first member with weight 0 and are not
    scattered back (their member index is out of range)."""
    cohort, chunk, num_clients = ctx["cohort"], self.client_chunk, data.num_clients
    num_groups = -(-cohort.shape[0] // chunk)
    padded = num_groups * chunk
    members = jnp.concatenate([cohort, jnp.full((padded - cohort.shape[0],), cohort[0])])
    real = jnp.arange(padded) < cohort.shape[0]

    def group_step(total, group):
      group_members, group_real = group
      group_data = jax.tree.map(lambda x: x[group_members], data)
      partial, rest = self.group_sum(state, ctx, group_data, group_members, group_real)
      return jax.tree.map(jnp.add, total, partial), rest

    total, rest = jax.lax.scan(group_step, self.zero_total(state),
                               (members.reshape(num_groups, chunk),
                                real.reshape(num_groups, chunk)))
    small, clients, changes, rows = jax.tree.map(
        lambda x: x.reshape((padded,) + x.shape[2:]), rest)
    members = jnp.where(real, members, num_clients)  # out of range: dropped on scatter
    return total, small, clients, changes, rows, members


def check_chunkable(chain: _agg.Chain, what: str) -> None:
  if not chain.linear:
    stage = next(s for s in chain.stages if not s.linear)
    raise ValueError(
        f"{what} needs aggregator='mean': {stage.name!r} is not linear (it needs every "
        f"update of the round at once); use client_chunk=None")


def streamed(round_: Round) -> Callable:
  """The streamed executor: `stream(state, host_data, participation=None, *, chunk)`."""
  stream_begin = jax.jit(lambda state, sizes, p: round_.arrays(
      round_.begin(state, sizes, p)))
  stream_group = jax.jit(round_.group_sum)
  stream_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  stream_end = jax.jit(round_.end, static_argnums=(9,))

  def stream(state: ServerState, host_data: ClientData, participation=None, *,
             chunk: int, device=None):
    """One round whose client data stays in host memory and reaches the device one
    chunk of `chunk` clients at a time; the next chunk's transfer is issued before the
    current chunk's training, so (dispatch being asynchronous) it overlaps the compute.
    Equal to `apply` with `client_chunk=chunk`; device memory holds two chunks of data.

    Args:
      state: the server state (on the device).
      host_data: `ClientData` of NumPy arrays (host memory), all clients.
      participation: `[C]` or None.
      chunk: clients per transfer and per compiled group step.
      device: where to train (default: the first device).

    Returns:
      `(state, metrics)` as from `apply`.
    """
    if round_.cohort_size is not None:
      raise ValueError("stream trains every client in chunks; build the algorithm "
                       "without cohort_size")
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
      raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    check_chunkable(round_.chain, "stream")
    device = device or jax.devices()[0]
    state = jax.device_put(state, device)  # committed: later rounds reuse the compiles
    num_clients = int(np.shape(host_data.num_examples)[0])
    sizes = jax.device_put(np.asarray(host_data.num_examples), device)
    ctx = stream_begin(state, sizes, participation)
    num_groups = -(-num_clients // chunk)

    def transfer(g):
      rows = np.arange(g * chunk, (g + 1) * chunk)
      real = rows < num_clients
      if real.all():  # a slice: no host copy before the transfer
        taken = slice(g * chunk, (g + 1) * chunk)
      else:  # the last group: padding slots repeat client 0 with weight 0
        rows = taken = np.where(real, rows, 0)
      return jax.device_put((jax.tree.map(lambda x: np.asarray(x)[taken], host_data),
                             rows.astype(np.int32), real), device)

    total, parts = round_.zero_total(state), []
    upcoming = transfer(0)
    for g in range(num_groups):
      current = upcoming
      if g + 1 < num_groups:
        upcoming = transfer(g + 1)  # in flight while group g trains
      partial, rest = stream_group(state, ctx, *current)
      total = stream_add(total, partial)
      parts.append(rest)
      del current
    small, clients, changes, rows = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    members = np.arange(num_groups * chunk)
    members = jax.device_put(np.where(members < num_clients, members, num_clients)
                             .astype(np.int32), device)
    return stream_end(state, ctx, sizes, total, small, clients, changes, rows, members,
                      False)

  return stream


class Upload(NamedTuple):
  """What one client's half of a round returns to the server."""

  message: Any  # [1, ...] the client's encoded message (the server weights and sums)
  position: jax.Array  # [1] int32: its data-stream position after the round
  train_loss: jax.Array  # [1] float32: its mean local training loss
  steps_taken: jax.Array  # [1] int32: local steps it took
  values: dict  # [1] per-client values of the chain (weight, sending, clipped, ...)
  control_change: Any  # SCAFFOLD's c_k_new - c_k ([1, ...]), or None
  rows: dict  # [1, ...] its new per-client stage rows (error-feedback residual, ...)


class RoundHalves(NamedTuple):
  """One round of a linear chain cut where a deployment's network is:

  * `begin(state, num_examples [C], participation [C] | None) -> ctx`: the server's
    per-round values (weights, keys, dropout set, fixed-point scale); arrays only.
  * `client(state, ctx, client_data, client) -> Upload`: one client's local training and
    its chain `encode`; `client_data` holds that client alone (leading axis 1) and
    `client` is its index. It reads only row `client` of the per-client state
    (position, stage rows, control variate) and the broadcast global model.
  * `end(state, ctx, num_examples, uploads: {client: Upload}) -> (state, metrics)`: the
    server sums the messages (modulo 2^bits under secure aggregation), decodes the sum,
    applies the server optimizer and stores the clients' positions and rows.

  Calling `client` for each participant and `end` on their uploads gives the round
  `apply` gives (tests). Each part is jitted; nothing in them is vmapped over clients.
  """

  begin: Callable[..., Any]
  client: Callable[..., Any]
  end: Callable[..., Any]


def halves(round_: Round) -> RoundHalves:
  """The round's client half and server halves, callable from separate processes."""
  jit_begin = jax.jit(lambda state, sizes, p: round_.arrays(round_.begin(state, sizes, p)))

  @jax.jit
  def client(state, ctx, client_data, client):
    ctx = {**round_.statics(ctx["participation"].shape[0]), **ctx}
    members = jnp.reshape(jnp.asarray(client, jnp.int32), (1,))
    out, message, rows, values, _, change = round_.train_group(state, ctx, client_data,
                                                               members)
    return Upload(message, out.position, out.train_loss, out.steps_taken, values, change,
                  rows)

  @jax.jit
  def server_total(messages, weights):
    return round_.total(messages, weights)

  jit_end = jax.jit(round_.end, static_argnums=(9,))

  def begin(state, num_examples, participation=None):
    check_chunkable(round_.chain, "a round cut into client and server halves")
    if round_.cohort_size is not None:
      raise ValueError("the round's halves train the clients the server calls; build "
                       "the algorithm without cohort_size")
    return jit_begin(state, jnp.asarray(num_examples), participation)

  def end(state, ctx, num_examples, uploads: dict):
    if not uploads:
      raise ValueError("end needs the uploads of at least one client")
    members = sorted(uploads)
    num_clients = int(np.shape(num_examples)[0])
    parts = [uploads[k] for k in members]
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    # The sum over the whole clients axis in hospital order, absent clients as zero
    # rows of weight 0: the engine's own reduction, so the result is bit-identical.
    rows = jnp.asarray(members, jnp.int32)
    full = jax.tree.map(
        lambda m: jnp.zeros((num_clients,) + m.shape[1:], m.dtype).at[rows].set(m),
        stacked.message)
    weights = jnp.zeros((num_clients,), jnp.float32).at[rows].set(
        stacked.values["weight"])
    total = server_total(full, weights)
    small = (stacked.position, stacked.train_loss, stacked.steps_taken)
    return jit_end(state, ctx, jnp.asarray(num_examples), total, small, stacked.values,
                   stacked.control_change, stacked.rows, rows, False)

  return RoundHalves(begin, client, end)


def federated(model, client_optimizer, *, batch_size: int, budget: _local.LocalBudget,
              server_optimizer, aggregator: _agg.Chain, systems: Systems = Systems(),
              work: ClientWork = ClientWork(), cohort_size: int | None = None,
              client_chunk: int | None = None, name: str) -> Algorithm:
  """Assembles a federated algorithm from its parts (the presets call this).

  Args:
    model: the model.
    client_optimizer: optax optimizer of local training (state reset each round).
    batch_size: examples per local step.
    budget: local steps or epochs per round.
    server_optimizer: optax optimizer on the pseudo-gradient `-(aggregated update)`.
    aggregator: the aggregator chain (`fedjax_dx.agg.chain(...)`).
    systems: stragglers and what happens to their work.
    work: client-side work besides the optimizer (DP-SGD, SCAFFOLD, fine-tuning).
    cohort_size: train only the first `cohort_size` participants of each round.
    client_chunk: train the (cohort's) clients in groups of this many (`lax.scan`).
    name: method name in results.
  """
  if client_chunk is not None:
    check_chunkable(aggregator, f"client_chunk={client_chunk}")
  round_ = Round(model, client_optimizer, batch_size=batch_size, budget=budget,
                 server_optimizer=server_optimizer, aggregator=aggregator,
                 systems=systems, work=work, cohort_size=cohort_size,
                 client_chunk=client_chunk)
  fine_tune_budget = _local.LocalBudget(steps=int(work.fine_tune_steps))
  # Fine-tuning is a hospital's own use of the model: plain gradients, no DP-SGD noise.
  fine_tune_optimizer = getattr(client_optimizer, "inner", client_optimizer)
  fine_tuner = (_local.local_trainer(model, fine_tune_optimizer, batch_size=batch_size,
                                     budget=fine_tune_budget)
                if work.fine_tune_steps else None)

  def init(params, data: ClientData, rng) -> ServerState:
    check_init_inputs(model, data, batch_size)
    aggregator_state, client_rows = aggregator.init(params, data.num_clients)
    controls = round_.uses_controls
    return ServerState(
        params=params, server_opt_state=server_optimizer.init(params),
        positions=jnp.zeros((data.num_clients,), jnp.int32),
        rng=jnp.asarray(rng), round=jnp.zeros((), jnp.int32),
        epochs_window=_local.epochs_window(budget, batch_size, data.num_examples),
        control=jax.tree.map(jnp.zeros_like, params) if controls else None,
        client_controls=jax.tree.map(
            lambda x: jnp.zeros((data.num_clients,) + x.shape, x.dtype), params)
        if controls else None,
        fine_tune_window=(_local.epochs_window(fine_tune_budget, batch_size,
                                               data.num_examples)
                          if work.fine_tune_steps else 0),
        aggregator=aggregator_state, client_rows=client_rows)

  def personalize(state: ServerState, data: ClientData):
    """Each client's global model fine-tuned on its own training data: [C, ...]."""
    keys = _local.client_keys(
        jax.random.fold_in(side_key(state, FINE_TUNE_KEY), state.round),
        data.num_clients)
    out = _local.train_clients(
        fine_tuner, state.params, client_optimizer.init(state.params), data, keys,
        jnp.zeros((data.num_clients,), jnp.int32), epochs_window=state.fine_tune_window,
        stacked=False)
    return out.params

  def check(state, data, participation):
    check_run_inputs(state, data, participation)
    counts = ((participation > 0) & (np.asarray(data.num_examples) > 0)[None, :]).sum(1)
    if cohort_size is not None:
      all_counts = (participation > 0).sum(axis=1)
      over = np.flatnonzero(all_counts > cohort_size)
      if over.size:
        raise ValueError(
            f"cohort_size={cohort_size} but round(s) {over[:5].tolist()} have "
            f"{all_counts[over[:5]].tolist()} participants; raise cohort_size to at "
            f"least {int(all_counts.max())}")
    secure = aggregator.find(_agg.SecureSum)
    if secure is not None:
      _secagg.check_bits(secure.bits, int(counts.max()))
    need = aggregator.min_participants
    short = np.flatnonzero(counts < need)
    if need > 1 and short.size:
      raise ValueError(
          f"aggregator {aggregator.reducer.name} needs at least {need} participating "
          f"clients (2 f + 3) each round; round(s) {short[:5].tolist()} have "
          f"{counts[short[:5]].tolist()}")

  return Algorithm(init=init, apply=round_.apply,
                   run=make_run(round_.apply, check,
                                lambda data: check_init_inputs(model, data, batch_size)),
                   name=name, personalize=personalize if fine_tuner else None,
                   stream=streamed(round_), aggregator=aggregator,
                   halves=halves(round_))
