"""The stage protocol and `chain`: a federated aggregation as small composable parts.

A stage is one round-time mechanism (clipping, noise, compression, secure sum, a robust
reducer, a guard) as pure functions split across the wire, like an optax transformation:

* `init(params, num_clients) -> (server_state, client_rows)`: its state; `client_rows`
  carry a leading clients axis (they shard like the data), either may be None.
* `statics(ctx) -> values`: Python values known when tracing (a fixed clipping norm, a
  noise multiplier) that later stages read from the round context.
* `begin(server_state, ctx) -> (round_values, client_values)`: per-round values every
  client needs before it encodes (a dropout set, a fixed-point scale); `client_values`
  are `[C]` arrays, read per client in `encode`.
* `encode(server_state, row, message, client, ctx) -> (message, row, client_metrics)`:
  one client's side, run per client under `vmap` (`client` holds that client's slice of
  the per-client values: `id`, `weight`, `sending`, ...).
* `decode(server_state, total, ctx, clients) -> (total, server_state, metrics)`: the
  server's side, run once on the sum of the messages (`clients` holds the trained
  clients' values and client metrics, `[G]`).

A stage that needs every client's message at once (a robust reducer, the guard) is not
`linear`: it works in `screen` (before the sum) or `reduce` (instead of the sum), and
the chunked and streamed executors refuse it. Stages are frozen dataclasses, so equal
pipelines are equal and hash alike.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.flatten_util

from fedjax_dx.agg import _functional
from fedjax_dx.privacy import _accounting


@dataclasses.dataclass(frozen=True)
class Stage:
  """Base class of the stages: every hook is a no-op."""

  name: ClassVar[str] = "stage"  # key of its state in the server state
  linear: ClassVar[bool] = True  # messages may be summed group by group
  flat: ClassVar[bool] = False  # encodes one flat float vector per client
  needs_unit_weights: ClassVar[bool] = False  # every client must count alike (DP)

  def init(self, params, num_clients: int):
    del params, num_clients
    return None, None

  def statics(self, ctx: dict) -> dict:
    """Python values of the round known when tracing (a fixed clipping norm, the noise
    multiplier), read by later stages; never arrays computed in the round."""
    del ctx
    return {}

  def begin(self, state, ctx: dict) -> tuple[dict, dict]:
    del state, ctx
    return {}, {}

  def encode(self, state, row, message, client: dict, ctx: dict):
    del state, client, ctx
    return message, row, {}

  def decode(self, state, total, ctx: dict, clients: dict):
    del ctx, clients
    return total, state, {}

  def upload_bytes(self, num_params: int, current: int) -> int:
    """Bytes one client uploads after this stage, given `current` before it."""
    del num_params
    return current

  def privacy_event(self, rounds: int, sampling_rate: float, sampling: str = "poisson",
                    population: int = 0):
    """The `GaussianRelease` this stage spends over `rounds` rounds, or None
    (`sampling`: how clients were drawn, "poisson" or "without_replacement" from
    `population`)."""
    del rounds, sampling_rate, sampling, population
    return None


@dataclasses.dataclass(frozen=True)
class Screen(Stage):
  """A stage that looks at every client's message of the round at once (not linear)."""

  linear: ClassVar[bool] = False

  def screen(self, state, messages, clients: dict, ctx: dict):
    """`(messages [G, ...], clients) -> (messages, clients, metrics)`; may zero weights."""
    del state, ctx
    return messages, clients, {}


@dataclasses.dataclass(frozen=True)
class Reducer(Stage):
  """A stage that replaces the sum: combines every message of the round at once."""

  linear: ClassVar[bool] = False
  min_participants: ClassVar[int] = 1

  def reduce(self, messages, weights):
    return _functional.weighted_mean(messages, weights)


@dataclasses.dataclass(frozen=True)
class Chain:
  """Stages composed: encode runs forward, decode in reverse (see `chain`)."""

  stages: tuple[Stage, ...]

  @property
  def linear(self) -> bool:
    """Whether the round's messages may be summed group by group (chunks, streams)."""
    return all(s.linear for s in self.stages)

  @property
  def flat_from(self) -> int | None:
    """Index of the first stage that needs flat vectors (flattening happens before it)."""
    return next((i for i, s in enumerate(self.stages) if s.flat), None)

  @property
  def modular(self) -> bool:
    """Whether messages are integers summed modulo 2^32 (secure sum, always last)."""
    return bool(self.stages) and getattr(self.stages[-1], "modular", False)

  @property
  def weighting(self) -> "Stage":
    return next((s for s in self.stages if getattr(s, "is_weighting", False)),
                _default_mean())

  @property
  def reducer(self) -> Reducer | None:
    return next((s for s in self.stages if isinstance(s, Reducer)), None)

  @property
  def min_participants(self) -> int:
    reducer = self.reducer
    return 1 if reducer is None else reducer.min_participants

  def find(self, kind: type) -> Stage | None:
    return next((s for s in self.stages if isinstance(s, kind)), None)

  def init(self, params, num_clients: int) -> tuple[dict, dict]:
    """`({name: server_state}, {name: client_rows})` of the stages that keep state."""
    server, rows = {}, {}
    for stage in self.stages:
      state, row = stage.init(params, num_clients)
      if state is not None:
        server[stage.name] = state
      if row is not None:
        rows[stage.name] = row
    return server, rows

  def statics(self, num_clients: int) -> dict:
    """The round's static values: `num_clients`, `expected_clients` and each stage's."""
    ctx = {"num_clients": num_clients,
           "expected_clients": self.weighting.expected_clients}
    for stage in self.stages:
      ctx.update(stage.statics(ctx))
    return ctx

  def begin(self, server: dict, ctx: dict) -> dict:
    for stage in self.stages:
      round_values, client_values = stage.begin(server.get(stage.name), ctx)
      ctx.update(round_values)
      ctx["clients"].update(client_values)
    return ctx

  def encode(self, server: dict, rows: dict, messages, clients: dict, ctx: dict):
    """Every client's side, for the `[G]` clients of `messages` (vmapped per client,
    with the screens between). Returns `(messages, rows, clients, metrics)`: `rows`
    holds the new client rows, `clients` the per-client values and client metrics."""
    rows = dict(rows)
    metrics = {}
    flat_from = self.flat_from
    segment: list[tuple[int, Stage]] = []

    def run_segment(messages, clients):
      if not segment:
        return messages, clients
      stages = tuple(segment)

      def one_client(message, client, own_rows):
        new_rows, client_metrics = {}, {}
        for index, stage in stages:
          if index == flat_from:
            message = jax.flatten_util.ravel_pytree(message)[0]
          message, row, extra = stage.encode(server.get(stage.name),
                                             own_rows.get(stage.name), message, client,
                                             ctx)
          if row is not None:
            new_rows[stage.name] = row
          client_metrics.update(extra)
          client = {**client, **extra}  # later stages see a changed weight (the guard)
        return message, new_rows, client_metrics

      own = {s.name: rows[s.name] for _, s in stages if s.name in rows}
      messages, new_rows, client_metrics = jax.vmap(one_client)(messages, clients, own)
      rows.update(new_rows)
      segment.clear()
      return messages, {**clients, **client_metrics}

    for index, stage in enumerate(self.stages):
      if isinstance(stage, Screen):
        messages, clients = run_segment(messages, clients)
        if index == flat_from:
          messages = jax.vmap(lambda m: jax.flatten_util.ravel_pytree(m)[0])(messages)
        messages, clients, extra = stage.screen(server.get(stage.name), messages,
                                                clients, ctx)
        metrics.update(extra)
      else:
        segment.append((index, stage))
    messages, clients = run_segment(messages, clients)
    return messages, rows, clients, metrics

  def decode(self, server: dict, total, params, ctx: dict, clients: dict):
    """The server's side on the sum (reverse order); unflattens where encode
    flattened. Returns `(update like params, server, metrics)`."""
    server, metrics = dict(server), {}
    flat_from = self.flat_from
    for index in reversed(range(len(self.stages))):
      stage = self.stages[index]
      total, state, extra = stage.decode(server.get(stage.name), total, ctx, clients)
      if state is not None:
        server[stage.name] = state
      metrics.update(extra)
      if index == flat_from:
        total = jax.flatten_util.ravel_pytree(params)[1](total)
    return total, server, metrics

  def upload_bytes(self, num_params: int) -> int:
    """Bytes one client uploads per round (float32 parameters before any stage)."""
    size = 4 * num_params
    for stage in self.stages:
      size = stage.upload_bytes(num_params, size)
    return size

  def privacy_events(self, rounds: int, sampling_rate: float, sampling: str = "poisson",
                     population: int = 0) -> list:
    """The privacy events of the stages that spend privacy (a Gaussian stage)."""
    events = [stage.privacy_event(rounds, sampling_rate, sampling, population)
              for stage in self.stages]
    return [event for event in events if event is not None]

  def epsilon(self, *, rounds: int, sampling_rate: float, delta: float,
              accountant: str = "rdp", sampling: str = "poisson",
              population: int = 0) -> float:
    """The epsilon at `delta` this chain spends in `rounds` rounds (dp-accounting).

    Args:
      rounds: rounds run (each one release of every noising stage).
      sampling_rate: the chance a client takes part in a round (1: all take part).
      delta: the delta of the (epsilon, delta) guarantee.
      accountant: "rdp" (Renyi DP) or "pld" (privacy loss distributions).
      sampling: how each round's clients are drawn: "poisson" (each independently
        with probability `sampling_rate`) or "without_replacement" (a fixed-size
        cohort of `sampling_rate * population` clients; rdp, replace-one).
      population: clients a fixed-size cohort is drawn from.

    Example:
      >>> private = agg.chain(agg.clip(1.0), agg.mean("uniform"), agg.gaussian(1.1))
      >>> private.epsilon(rounds=50, sampling_rate=0.1, delta=1e-5)
    """
    events = self.privacy_events(rounds, sampling_rate, sampling, population)
    if not events:
      raise ValueError("aggregator chain: no stage spends privacy, so it has no epsilon "
                       "(client-level DP is agg.clip(...) ... agg.gaussian(...))")
    return _accounting.epsilon_of(events, delta, accountant)


def _default_mean():
  from fedjax_dx.agg import _mean  # pylint: disable=g-import-not-at-top
  return _mean.mean()


def _order_error(message: str) -> ValueError:
  return ValueError(f"aggregator chain: {message}")


def check_chain(stages: tuple[Stage, ...]) -> None:
  """The ordering rules of a chain, with the errors a user sees."""
  names = [type(s).__name__ for s in stages]
  for i, stage in enumerate(stages):
    if getattr(stage, "modular", False) and i != len(stages) - 1:
      raise _order_error(
          f"secure aggregation must be the last stage (it reveals only the sum), got "
          f"{names}")
  secure = any(getattr(s, "modular", False) for s in stages)
  reducers = [s for s in stages if isinstance(s, Reducer)]
  if len(reducers) > 1:
    raise _order_error(f"at most one robust reducer, got {names}")
  if reducers and secure:
    raise _order_error(
        f"secure aggregation reveals only the sum of updates, so it needs "
        f"aggregator='mean', got {type(reducers[0]).__name__}")
  compressors = [s for s in stages if getattr(s, "is_compression", False)]
  if compressors and secure:
    raise _order_error(
        "secure aggregation already quantizes updates to its bits; use no compression "
        "with it")
  weightings = [i for i, s in enumerate(stages) if getattr(s, "is_weighting", False)]
  if len(weightings) > 1:
    raise _order_error(f"at most one mean (weighting) stage, got {names}")
  weighting = stages[weightings[0]] if weightings else _default_mean()
  for i, stage in enumerate(stages):
    if stage.needs_unit_weights and weighting.weighting != "uniform":
      raise _order_error(
          f"{type(stage).__name__} (differential privacy) needs every client to count "
          f"alike: use mean(weighting='uniform'), got weighting={weighting.weighting!r}")
    if getattr(stage, "needs_clip", False) and not any(
        getattr(s, "is_clip", False) for s in stages[:i]):
      raise _order_error(
          f"{type(stage).__name__} is scaled to the clipping norm: put a clip stage "
          f"before it, got {names}")
    if getattr(stage, "is_clip", False) and weightings and i > weightings[0]:
      raise _order_error(f"clip before weighting (mean), got {names}")
  adaptive = any(getattr(s, "is_clip", False) and s.adaptive for s in stages)
  local = [s for s in stages if getattr(s, "mode", "central") == "local"]
  if adaptive and local:
    raise _order_error(
        "adaptive clipping (adaptive_quantile) needs central noise: the server noises "
        "the clipped count, and local noise would leave it unprotected; use "
        "gaussian(..., mode='central') or a fixed clip")
  for i, stage in enumerate(stages):
    if isinstance(stage, Screen) and any(getattr(s, "is_clip", False)
                                         or getattr(s, "is_compression", False)
                                         for s in stages[:i]):
      raise _order_error(
          f"{type(stage).__name__} must see the raw updates: put it before clipping "
          f"and compression, got {names}")


def chain(*stages: Stage) -> Chain:
  """Composes stages into one aggregation pipeline.

  Encode runs forward (per client), decode in reverse (on the server). Rules checked
  here: secure aggregation last; one robust reducer at most, and none with secure
  aggregation or compression with it; differential privacy needs uniform weighting and
  a clip before the noise; a guard before clipping and compression.

  Example:
    >>> private = chain(clip(1.0), mean(weighting="uniform"), gaussian(1.1))
    >>> algo = fedavg(model, optax.sgd(0.1), batch_size=16, local_steps=10,
    ...               aggregator=private)
  """
  for stage in stages:
    if not isinstance(stage, Stage):
      raise TypeError(f"chain takes stages (fedjax_dx.agg.*), got {stage!r}")
  check_chain(tuple(stages))
  return Chain(tuple(stages))
