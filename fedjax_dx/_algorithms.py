"""Federated averaging and the two baselines (centralized, local-only), one engine.

Each algorithm is a small factory returning pure `init` / `apply` functions (optax
style) plus `run`, which executes many rounds inside one compiled `lax.scan`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_dx import _aggregation
from fedjax_dx import _compression
from fedjax_dx import _local
from fedjax_dx import _models
from fedjax_dx import _privacy
from fedjax_dx import _secagg
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
  fine_tune_window: int = flax.struct.field(pytree_node=False, default=0)  # personalization
  clip_norm: jax.Array = None  # [] float32: adaptive DP clipping's current norm
  client_residuals: jax.Array = None  # [C, P] float32: compression error feedback


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
  """

  init: Callable[..., Any]
  apply: Callable[..., Any]
  run: Callable[..., Any]
  name: str
  personalize: Callable[..., Any] | None = None
  stream: Callable[..., Any] | None = None


def _keys(state, num_clients: int, budget: _local.LocalBudget):
  stream_key, round_base = jax.random.split(state.rng)
  if budget.steps is not None:
    return _local.client_keys(stream_key, num_clients)
  return _local.client_keys(jax.random.fold_in(round_base, state.round), num_clients)


def _side_key(state, purpose: int):
  """Keys for what is not a data order (stragglers, fine-tuning, cyclic order):
  `split(rng, 5)[purpose]`, purpose >= 2, never one of the data-order keys."""
  return jax.random.split(state.rng, 5)[purpose]


_STRAGGLER_KEY, _FINE_TUNE_KEY, _CYCLE_KEY = 2, 3, 4
_NOISE_KEY = _CYCLE_KEY  # DP noise; cyclic never adds noise, so the two never meet
# fold_in tags of the round's noise key (client ids, also folded in, stay below them).
_SGD_TAG, _COMPRESS_TAG, _SECAGG_TAG, _DROPOUT_TAG, _COUNT_TAG = (
    0xD0000001, 0xD0000002, 0xD0000003, 0xD0000004, 0xD0000005)


def choose_share(key: jax.Array, eligible: jax.Array, fraction) -> jax.Array:
  """`round(fraction * m)` of the `m` eligible clients (`[C]` bool), uniformly."""
  scores = jnp.where(eligible, jax.random.uniform(key, eligible.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(scores))
  return eligible & (rank < jnp.round(fraction * eligible.sum()).astype(jnp.int32))


def adaptive_update_noise(noise_multiplier, count_noise):
  """The update noise of adaptive clipping (Andrew et al., 2021, Theorem 1): with the
  unclipped count noised at std `count_noise` (sensitivity 1/2), updates noised at the
  returned multiplier make the pair a Gaussian mechanism of `noise_multiplier`."""
  if not isinstance(noise_multiplier, jax.core.Tracer) and not (
      2 * count_noise > noise_multiplier):
    raise ValueError(
        f"adaptive clipping with noise multiplier {noise_multiplier} needs "
        f"dp_count_noise > {noise_multiplier / 2:g} (the count's noise must be more than "
        f"half the update noise), got {count_noise:g}; raise dp_count_noise or use "
        "fixed clipping")
  return (noise_multiplier**-2 - (2 * count_noise)**-2)**-0.5


def _num_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def straggler_work(key: jax.Array, participation: jax.Array, fraction: float,
                   full_budget: int) -> tuple[jax.Array, jax.Array]:
  """Which participants straggle this round and how much work each client does.

  As in the FedProx paper's systems heterogeneity: `round(fraction * m)` of the `m`
  participants, chosen uniformly, do a uniformly random number of budget units
  (epochs or steps) in `[1, full_budget)`; everyone else does the full budget.

  Args:
    key: this round's straggler key.
    participation: `[C]` participation mask (> 0 takes part).
    fraction: share of participants that straggle, in [0, 1].
    full_budget: local epochs (or steps) of a full round, >= 2.

  Returns:
    `(is_straggler [C] bool, work [C] int32)`.
  """
  choose_key, work_key = jax.random.split(key)
  num_clients = participation.shape[0]
  is_straggler = choose_share(choose_key, participation > 0, fraction)
  partial = jax.random.randint(work_key, (num_clients,), 1, full_budget)
  return is_straggler, jnp.where(is_straggler, partial, full_budget).astype(jnp.int32)


def _participation_vector(participation, num_clients):
  if participation is None:
    return jnp.ones((num_clients,), jnp.float32)
  return jnp.asarray(participation, jnp.float32)


def _make_run(apply: Callable, check: Callable) -> Callable:
  """Wraps `apply` into a jitted multi-round `lax.scan` with host-side checks."""

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
    check(state, data, participation)
    return scan_rounds(state, data, jnp.asarray(participation))

  run.compiled = scan_rounds
  run.rounds = rounds  # the same, not jitted (to vmap or jit with other rounds)
  run.check = check
  return run


def _check_clients_and_participation(state, data: ClientData,
                                     participation: np.ndarray) -> None:
  if state.positions.shape[0] != data.num_clients:
    raise ValueError(
        f"data has {data.num_clients} clients but the state was initialised for "
        f"{state.positions.shape[0]}")
  if np.any((participation < 0) | ~np.isfinite(participation)):
    raise ValueError("participation must hold finite values >= 0 (1 = takes part)")


def _check_run_inputs(state, data: ClientData, participation: np.ndarray) -> None:
  _check_clients_and_participation(state, data, participation)
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
           prox_mu: float = 0.0, stragglers: float = 0.0,
           straggler_policy: str = "drop", fine_tune_steps: int = 0,
           cohort_size: int | None = None, client_chunk: int | None = None,
           dp_clip: float | None = None, dp_noise: float = 0.0, dp_mode: str = "central",
           dp_expected_clients: int | None = None,
           dp_adaptive_quantile: float | None = None, dp_clip_learning_rate: float = 0.2,
           dp_count_noise: float | None = None, compression: str = "none",
           compression_bits: int = 8, topk_fraction: float = 0.01,
           error_feedback: bool = True, secure_aggregation: bool = False,
           secagg_bits: int = 32, secagg_bound: float | None = None,
           secagg_dropout: float = 0.0, secagg_tolerance: float = 0.3,
           name: str = "fedavg") -> Algorithm:
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
    stragglers: share of each round's participants that do only a random part of the
      budget (FedProx paper; see `straggler_work`).
    straggler_policy: "drop" (FedAvg: stragglers' updates are discarded) or "keep"
      (FedProx: their partial work is averaged in).
    fine_tune_steps: personalization (FedAvg + fine-tuning): `Algorithm.personalize`
      gives each client the global model after this many local steps of the client
      optimizer on its own training data; 0 for none.
    cohort_size: with partial participation, train only the participants: each round
      gathers the first `cohort_size` participating clients and trains just them, so
      compute and memory follow the sampled clients, not all C (a round with more
      participants than `cohort_size` is refused by `run`). None trains every client
      and masks out the rest.
    client_chunk: memory-bounded rounds: train the (cohort's) clients in groups of this
      many, one group after another (`lax.scan`), adding up the weighted updates, so
      the round's memory grows with the group, not with the client count. Needs the
      "mean" aggregator (robust aggregators need all updates at once). See
      `choose_client_chunk` for a size that fits the device. None: all at once.
    dp_clip: the clipping norm of differential privacy. Client level (DP-FedAvg,
      McMahan et al. 2018, `dp_mode` "central" or "local"): each client's update is
      clipped to this L2 norm and every participant counts alike. Example level
      (`dp_mode="example"`, DP-SGD inside local training): each example's gradient is
      clipped to it. None: no clipping.
    dp_noise: the noise multiplier z: "central" adds N(0, (z dp_clip)^2) to the sum of
      clipped updates at the server; "local" has each client add it to its own update
      before sending; "example" adds it to every local step's sum of clipped example
      gradients. `fedjax_dx.privacy_epsilon` turns z into epsilon.
    dp_mode: "central", "local" or "example".
    dp_expected_clients: the fixed denominator of the DP average (the expected number
      of participants); None divides by the actual number.
    dp_adaptive_quantile: adaptive clipping (Andrew et al., 2021; central mode): the
      clipping norm starts at `dp_clip` and follows this quantile of the clients'
      update norms, `C <- C exp(-dp_clip_learning_rate (b - quantile))`, `b` the noised
      share of unclipped updates. The count gets noise `dp_count_noise` (default
      expected participants / 20) and the update noise shrinks so that the pair is
      still a Gaussian mechanism of multiplier `dp_noise` (so the budget is unchanged).
    dp_clip_learning_rate: adaptive clipping's geometric step size.
    dp_count_noise: adaptive clipping's noise std on the unclipped count.
    compression: what clients upload: "none", "quantize" (`compression_bits`-bit
      stochastic quantization, unbiased) or "topk" (the `topk_fraction` largest
      entries); see `fedjax_dx.upload_bytes` for the size.
    compression_bits: 1, 2, 4, 8 or 16.
    topk_fraction: share of the update's entries top-k keeps.
    error_feedback: with compression, each client keeps what compression dropped and
      adds it to its next update (state `client_residuals`).
    secure_aggregation: the server sees only masked integer updates (`_secagg`,
      Bonawitz et al. 2017): weighted updates are encoded in fixed point modulo
      `2^secagg_bits`, masked pairwise, and only their sum is recovered. Needs the
      "mean" aggregator.
    secagg_bits: bits of the modulus (8 .. 32).
    secagg_bound: each coordinate of an update is clipped to `[-bound, bound]` before
      encoding (default `dp_clip`, else 1.0).
    secagg_dropout: share of each round's senders that drop out after masking
      (simulated); the survivors' sum is recovered.
    secagg_tolerance: the largest share of dropouts the protocol survives (its secret
      sharing threshold); a round with more discards its update (`secagg_failed`).
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
                    aggregator=aggregator, prox_mu=prox_mu, stragglers=stragglers,
                    straggler_policy=straggler_policy, fine_tune_steps=fine_tune_steps,
                    cohort_size=cohort_size, client_chunk=client_chunk, dp_clip=dp_clip,
                    dp_noise=dp_noise, dp_mode=dp_mode,
                    dp_expected_clients=dp_expected_clients,
                    dp_adaptive_quantile=dp_adaptive_quantile,
                    dp_clip_learning_rate=dp_clip_learning_rate,
                    dp_count_noise=dp_count_noise, compression=compression,
                    compression_bits=compression_bits, topk_fraction=topk_fraction,
                    error_feedback=error_feedback, secure_aggregation=secure_aggregation,
                    secagg_bits=secagg_bits, secagg_bound=secagg_bound,
                    secagg_dropout=secagg_dropout, secagg_tolerance=secagg_tolerance,
                    name=name)


def fedprox(model, client_optimizer, *, mu: float, name: str = "fedprox",
            straggler_policy: str = "keep", **kwargs):
  """FedProx (Li et al., 2020): FedAvg whose client loss adds `(mu/2)||w - w_global||^2`.

  Stragglers' partial work is kept (the paper's FedProx); see `fedavg` for the rest.
  """
  _local.check_hyperparameter(mu, "FedProx mu", minimum=0.0)
  return fedavg(model, client_optimizer, prox_mu=mu, name=name,
                straggler_policy=straggler_policy, **kwargs)


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
             stragglers: float = 0.0, straggler_policy: str = "keep",
             cohort_size: int | None = None, client_chunk: int | None = None,
             name: str = "scaffold") -> Algorithm:
  """SCAFFOLD (Karimireddy et al., 2020), option II, with client SGD at `learning_rate`.

  Each client's gradient is corrected by `c - c_k`; after `K_k` local steps it updates
  `c_k <- c_k - c + (w - y_k) / (K_k * learning_rate)`. The server moves
  `w <- w + server_learning_rate * sum_k weight_k (y_k - w)` and
  `c <- c + (1/N) sum_{k in S} (c_k_new - c_k)`, N the clients with data. The `c_k`
  live in the state on the clients axis and persist while a client sits out.
  """
  _local.check_hyperparameter(learning_rate, "SCAFFOLD learning_rate", above=0.0)
  return _federated(model, optax.sgd(learning_rate), batch_size=batch_size,
                    local_steps=local_steps, local_epochs=local_epochs,
                    server_optimizer=optax.sgd(server_learning_rate), weighting=weighting,
                    aggregator="mean", prox_mu=0.0, stragglers=stragglers,
                    straggler_policy=straggler_policy, fine_tune_steps=0,
                    cohort_size=cohort_size, client_chunk=client_chunk, name=name,
                    scaffold_learning_rate=learning_rate)


_STRAGGLER_POLICIES = ("drop", "keep")


def _federated(model, client_optimizer, *, batch_size, local_steps, local_epochs,
               server_optimizer, weighting, aggregator, prox_mu, stragglers,
               straggler_policy, fine_tune_steps, name, cohort_size=None,
               client_chunk=None, dp_clip=None, dp_noise=0.0, dp_mode="central",
               dp_expected_clients=None, dp_adaptive_quantile=None,
               dp_clip_learning_rate=0.2, dp_count_noise=None, compression="none",
               compression_bits=8, topk_fraction=0.01, error_feedback=True,
               secure_aggregation=False, secagg_bits=32, secagg_bound=None,
               secagg_dropout=0.0, secagg_tolerance=0.3,
               scaffold_learning_rate=None) -> Algorithm:
  if weighting not in _WEIGHTINGS:
    raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
  _local.check_hyperparameter(prox_mu, "prox_mu (FedProx's mu)", minimum=0.0)
  if straggler_policy not in _STRAGGLER_POLICIES:
    raise ValueError(f"straggler_policy must be one of {_STRAGGLER_POLICIES}, got "
                     f"{straggler_policy!r}")
  if not 0 <= stragglers <= 1:
    raise ValueError(f"stragglers (share of participants) must lie in [0, 1], got "
                     f"{stragglers!r}")
  if not isinstance(fine_tune_steps, (int, np.integer)) or fine_tune_steps < 0:
    raise ValueError(f"fine_tune_steps must be an integer >= 0, got {fine_tune_steps!r}")
  if cohort_size is not None and (not isinstance(cohort_size, (int, np.integer))
                                  or cohort_size < 1):
    raise ValueError(f"cohort_size must be a positive integer or None, got "
                     f"{cohort_size!r}")
  if dp_clip is not None:
    if not dp_clip > 0:
      raise ValueError(f"dp_clip (clipping norm) must be > 0, got {dp_clip!r}")
    if not dp_noise >= 0:
      raise ValueError(f"dp_noise (noise multiplier) must be >= 0, got {dp_noise!r}")
    if dp_mode not in _privacy.DP_MODES:
      raise ValueError(f"dp_mode must be one of {_privacy.DP_MODES}, got {dp_mode!r}")
    if scaffold_learning_rate is not None:
      raise ValueError("SCAFFOLD with DP is not supported (its control variates would "
                       "leak unclipped updates)")
    if dp_expected_clients is not None and dp_expected_clients < 1:
      raise ValueError(f"dp_expected_clients must be >= 1, got {dp_expected_clients!r}")
    if dp_adaptive_quantile is not None:
      if dp_mode != "central":
        raise ValueError(f"adaptive clipping (dp_adaptive_quantile) needs dp_mode="
                         f"'central', got {dp_mode!r}")
      if not 0 < dp_adaptive_quantile < 1:
        raise ValueError(f"dp_adaptive_quantile must lie in (0, 1), got "
                         f"{dp_adaptive_quantile!r}")
      if not dp_clip_learning_rate > 0:
        raise ValueError(f"dp_clip_learning_rate must be > 0, got "
                         f"{dp_clip_learning_rate!r}")
      if dp_count_noise is not None and not dp_count_noise > 0:
        raise ValueError(f"dp_count_noise must be > 0, got {dp_count_noise!r}")
  elif dp_noise:
    raise ValueError(f"dp_noise={dp_noise} needs dp_clip (noise is scaled to the "
                     "clipping norm)")
  elif dp_adaptive_quantile is not None:
    raise ValueError("dp_adaptive_quantile needs dp_clip (the initial clipping norm)")
  compress = _compression.compressor(compression, bits=compression_bits,
                                     topk_fraction=topk_fraction)
  compressing = compression != "none"
  client_level_dp = dp_clip is not None and dp_mode != "example"
  if secure_aggregation:
    if not isinstance(secagg_bits, (int, np.integer)) or not 8 <= secagg_bits <= 32:
      raise ValueError(f"secagg_bits must be an integer in [8, 32], got {secagg_bits!r}")
    if aggregator not in ("mean", _aggregation.weighted_mean):
      raise ValueError(f"secure aggregation reveals only the sum of updates, so it needs "
                       f"aggregator='mean', got {aggregator!r}")
    if compressing:
      raise ValueError(f"secure aggregation already quantizes updates to secagg_bits="
                       f"{secagg_bits}; use compression='none' with it, got "
                       f"{compression!r}")
    if not 0 <= secagg_tolerance < 1:
      raise ValueError(f"secagg_tolerance must lie in [0, 1), got {secagg_tolerance!r}")
    if not 0 <= secagg_dropout <= 1:
      raise ValueError(f"secagg_dropout must lie in [0, 1], got {secagg_dropout!r}")
    if secagg_bound is None:
      secagg_bound = dp_clip if client_level_dp else 1.0
    if not secagg_bound > 0:
      raise ValueError(f"secagg_bound must be > 0, got {secagg_bound!r}")
  if scaffold_learning_rate is not None and (compressing or secure_aggregation):
    raise ValueError("SCAFFOLD with compression or secure aggregation is not supported "
                     "(its control variates travel uncompressed and unmasked)")
  if client_chunk is not None:
    if not isinstance(client_chunk, (int, np.integer)) or client_chunk < 1:
      raise ValueError(f"client_chunk must be a positive integer or None, got "
                       f"{client_chunk!r}")
    if aggregator not in ("mean", _aggregation.weighted_mean):
      raise ValueError(
          f"client_chunk={client_chunk} needs aggregator='mean': a robust aggregator "
          f"({aggregator!r}) needs every update at once; use client_chunk=None")
  combine = (_aggregation.make_aggregator(aggregator) if isinstance(aggregator, str)
             else aggregator)
  min_participants = getattr(combine, "min_participants", 1)
  budget = _local.LocalBudget.create(local_steps, local_epochs)
  full_budget = budget.steps if budget.steps is not None else budget.epochs
  if stragglers > 0 and full_budget < 2:
    raise ValueError(
        f"stragglers={stragglers} needs a budget of at least 2 local "
        f"{'steps' if budget.steps else 'epochs'} (stragglers do 1 .. budget-1), got "
        f"{full_budget}")
  example_dp = dp_clip is not None and dp_mode == "example"
  trainer = _local.local_trainer(
      model, client_optimizer, batch_size=batch_size, budget=budget, prox_mu=prox_mu,
      example_clip=dp_clip if example_dp else None,
      example_noise=dp_noise if example_dp else 0.0)
  adaptive = client_level_dp and dp_adaptive_quantile is not None
  keeps_residuals = compressing and error_feedback
  flat_updates = compressing or secure_aggregation
  fine_tune_budget = _local.LocalBudget(steps=int(fine_tune_steps))
  fine_tuner = (_local.local_trainer(model, client_optimizer, batch_size=batch_size,
                                     budget=fine_tune_budget)
                if fine_tune_steps else None)
  server_optimizer = server_optimizer or optax.sgd(1.0)
  uses_controls = scaffold_learning_rate is not None
  use_prox = _local.is_active(prox_mu)

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
        client_controls=stacked_zeros if uses_controls else None,
        fine_tune_window=(_local.epochs_window(fine_tune_budget, batch_size,
                                               data.num_examples)
                          if fine_tune_steps else 0),
        clip_norm=jnp.asarray(dp_clip, jnp.float32) if adaptive else None,
        client_residuals=(jnp.zeros((data.num_clients, _num_params(params)), jnp.float32)
                          if keeps_residuals else None))

  def begin(state: ServerState, num_examples, participation):
    """The round's per-client quantities ([C] arrays) from sizes and participation."""
    num_clients = num_examples.shape[0]
    participation = _participation_vector(participation, num_clients)
    work, dropped = None, jnp.zeros((num_clients,), bool)
    if stragglers > 0:
      is_straggler, work = straggler_work(
          jax.random.fold_in(_side_key(state, _STRAGGLER_KEY), state.round),
          participation, stragglers, full_budget)
      if straggler_policy == "drop":
        dropped = is_straggler
    if cohort_size is None or cohort_size >= num_clients:
      cohort = jnp.arange(num_clients)
    else:  # train only the participants: gather them (first `cohort_size` of them)
      cohort = jnp.argsort(participation <= 0, stable=True)[:cohort_size]
    sizes = num_examples.astype(jnp.float32)
    base = (sizes if weighting == "num_examples" and not client_level_dp
            else (sizes > 0).astype(jnp.float32))  # client-level DP: all count alike
    raw_weights = jnp.where(dropped, 0.0, participation * base)
    total = raw_weights.sum()
    denominator = total if dp_expected_clients is None else float(dp_expected_clients)
    noise_key = jax.random.fold_in(_side_key(state, _NOISE_KEY), state.round)
    sending = (participation > 0) & ~dropped & (num_examples > 0)
    ctx = dict(participation=participation, work=work, dropped=dropped,
               keys=_keys(state, num_clients, budget), cohort=cohort,
               raw_weights=raw_weights, total=total, denominator=denominator,
               scale_weights=1.0 / jnp.where(total > 0, denominator, 1.0),
               noise_key=noise_key, sending=sending,
               secagg_dropped=jnp.zeros((num_clients,), bool))
    if secure_aggregation:
      if secagg_dropout > 0:
        ctx["secagg_dropped"] = choose_share(jax.random.fold_in(noise_key, _DROPOUT_TAG),
                                             sending, secagg_dropout)
      ctx["arrived"] = sending & ~ctx["secagg_dropped"]
      ctx["secagg_failed"] = ctx["secagg_dropped"].sum() > _secagg.max_dropouts(
          sending.sum(), secagg_tolerance)
      ctx["secagg_scale"] = _secagg.fixed_point_scale(
          secagg_bound, (raw_weights * ctx["scale_weights"]).sum(), sending.sum(),
          secagg_bits)
    return ctx

  def train_group(state, ctx, group_data, members, everyone=False):
    """Trains the clients `members` ([G] indices; `group_data` holds their rows) from
    the global model; their updates in summable form (flat or masked with secagg)."""
    num_clients = ctx["participation"].shape[0]
    take = (lambda x: x) if everyone else (lambda x: x[members])
    tagged = lambda tag: jax.random.fold_in(ctx["noise_key"], tag)
    correction = None
    if uses_controls:
      correction = jax.tree.map(lambda c, ck: c[None] - take(ck), state.control,
                                state.client_controls)
    client_ids = take(jnp.arange(num_clients))
    # fold_in(key, k) for this group's clients only (= client_keys(key, C)[members]).
    member_keys = lambda key: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key,
                                                                             client_ids)
    work = ctx["work"]
    out = _local.train_clients(
        trainer, state.params, client_optimizer.init(state.params), group_data,
        take(ctx["keys"]), take(state.positions), epochs_window=state.epochs_window,
        stacked=False, anchor=state.params if use_prox else None, correction=correction,
        work=None if work is None else take(work),
        noise_keys=member_keys(tagged(_SGD_TAG)) if example_dp else None)
    deltas = jax.tree.map(lambda client, glob: client - glob, out.params, state.params)
    clipped = jnp.zeros(out.position.shape, bool)
    if client_level_dp:
      deltas, clipped = _privacy.clip_updates(deltas, _clip_norm(state))
      if dp_mode == "local" and _local.is_active(dp_noise):  # each client noises
        deltas = jax.vmap(lambda k, d: jax.tree.map(
            jnp.add, d, _privacy.gaussian_like(k, d, dp_noise * dp_clip)))(
                member_keys(ctx["noise_key"]), deltas)
    residuals = None
    if flat_updates:  # compression and secure aggregation see one vector per client
      deltas = jax.vmap(lambda d: jax.flatten_util.ravel_pytree(d)[0])(deltas)
    if compressing:
      if keeps_residuals:
        deltas = deltas + take(state.client_residuals)
      sent = jax.vmap(compress)(member_keys(tagged(_COMPRESS_TAG)), deltas)
      if keeps_residuals:  # what compression dropped waits for the next round
        residuals = jnp.where(take(ctx["sending"])[:, None], deltas - sent,
                              take(state.client_residuals))
      deltas = sent
    changes = None
    if uses_controls:
      trained = ((take(ctx["participation"]) > 0) & ~take(ctx["dropped"])
                 & (out.steps_taken > 0))
      step_scale = 1.0 / (jnp.maximum(out.steps_taken, 1) * scaffold_learning_rate)

      def control_change(c, delta):  # new c_k - old c_k
        shape = (-1,) + (1,) * (delta.ndim - 1)
        change = -c[None] - delta * step_scale.reshape(shape)
        return jnp.where(trained.reshape(shape), change, 0.0)

      changes = jax.tree.map(control_change, state.control, deltas)
    weights = take(ctx["raw_weights"]) * ctx["scale_weights"]
    if secure_aggregation:  # what the server receives: the sum of masked vectors
      encoded = jax.vmap(_secagg.encode, in_axes=(0, 0, 0, None, None, None))(
          member_keys(tagged(_SECAGG_TAG)), deltas, weights, ctx["secagg_scale"],
          secagg_bound, secagg_bits)
      masked = jax.vmap(_secagg.mask, in_axes=(None, 0, 0, None, None, None))(
          tagged(_SECAGG_TAG), encoded, members, ctx["cohort"],
          ctx["sending"][ctx["cohort"]], secagg_bits)
      deltas = jnp.where(take(ctx["arrived"])[:, None], masked, jnp.uint32(0))
    return out, deltas, changes, weights, clipped, residuals

  def partial_sum(deltas, weights):
    if secure_aggregation:
      return deltas.sum(0, dtype=jnp.uint32)
    return _aggregation.weighted_mean(deltas, weights)

  def zero_update(state):
    size = _num_params(state.params)
    if secure_aggregation:
      return jnp.zeros((size,), jnp.uint32)
    if flat_updates:
      return jnp.zeros((size,), jnp.float32)
    return jax.tree.map(jnp.zeros_like, state.params)

  def group_sum(state, ctx, group_data, members, real):
    """One group of a memory-bounded round: its weighted update sum and what the end
    of the round needs of its clients. `real` [G] marks padding slots (weight 0)."""
    out, deltas, changes, weights, clipped, residuals = train_group(state, ctx,
                                                                    group_data, members)
    weights = jnp.where(real, weights, 0.0)
    if secure_aggregation:  # a padding slot repeats a member: it must not count twice
      deltas = jnp.where(real[:, None], deltas, jnp.uint32(0))
    if changes is not None:  # padding slots change no control variate
      changes = jax.tree.map(
          lambda d: jnp.where(real.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0),
          changes)
    small = (out.position, out.train_loss, out.steps_taken, clipped)
    return partial_sum(deltas, weights), (small, changes, residuals)

  def _clip_norm(state):
    return state.clip_norm if adaptive else dp_clip

  def end(state, ctx, num_examples, update, small, changes, residuals, members,
          everyone):
    """The server's side: unmask, noise, apply the update, scatter client state."""
    num_clients = num_examples.shape[0]
    participation, total = ctx["participation"], ctx["total"]
    scale_weights, noise_key = ctx["scale_weights"], ctx["noise_key"]
    secagg_dropped = ctx["secagg_dropped"]
    cohort = ctx["cohort"]
    position, train_loss, steps_taken, clipped = small
    clip_norm = _clip_norm(state)
    if secure_aggregation:  # the server removes the masks it can rebuild, then decodes
      arrived = ctx["arrived"]
      survivors_sum = _secagg.unmask(
          jax.random.fold_in(noise_key, _SECAGG_TAG), update, cohort, arrived[cohort],
          ctx["sending"][cohort] & secagg_dropped[cohort], secagg_bits)
      update = _secagg.decode(survivors_sum, ctx["secagg_scale"], secagg_bits)
      if dp_expected_clients is None:  # the survivors' weighted mean
        arrived_weight = jnp.where(arrived, ctx["raw_weights"], 0.0).sum()
        update = update * total / jnp.maximum(arrived_weight, 1e-30)
      update = jnp.where(ctx["secagg_failed"], 0.0, update)
    if flat_updates:
      update = jax.flatten_util.ravel_pytree(state.params)[1](update)
    if client_level_dp and dp_mode == "central" and _local.is_active(dp_noise):
      # Central DP: the server noises the sum (sensitivity: the clipping norm).
      noise = dp_noise
      if adaptive:
        noise = adaptive_update_noise(dp_noise, _count_noise(num_clients))
      update = jax.tree.map(jnp.add, update, _privacy.gaussian_like(
          noise_key, update, noise * clip_norm * scale_weights))
    # Every participant dropped as a straggler: the model stays where it is.
    update = jax.tree.map(lambda u: jnp.where(total > 0, u, 0.0), update)
    pseudo_gradient = jax.tree.map(jnp.negative, update)
    updates, server_opt_state = server_optimizer.update(
        pseudo_gradient, state.server_opt_state, state.params)
    if everyone:  # no gathers or scatters: they would cross devices when sharded
      get, put = (lambda full: full), (lambda full, new: new)
      add = jnp.add
    else:  # out-of-range members (chunk padding) read as 0 and are never written
      get = lambda full: full.at[members].get(mode="fill", fill_value=0)
      put = lambda full, new: full.at[members].set(new, mode="drop")
      add = lambda full, new: full.at[members].add(new, mode="drop")
    member_took_part = get(participation) > 0
    weights = get(ctx["raw_weights"]) * scale_weights
    new_state = state.replace(
        params=optax.apply_updates(state.params, updates),
        server_opt_state=server_opt_state,
        positions=put(state.positions, jnp.where(member_took_part, position,
                                                  get(state.positions))),
        round=state.round + 1)
    if uses_controls:
      num_with_data = jnp.maximum((num_examples > 0).sum(), 1)
      new_state = new_state.replace(
          control=jax.tree.map(lambda c, d: c + d.sum(0) / num_with_data, state.control,
                               changes),
          client_controls=jax.tree.map(add, state.client_controls, changes))
    if keeps_residuals:
      new_state = new_state.replace(client_residuals=put(state.client_residuals,
                                                         residuals))
    sending = ctx["sending"]
    unclipped = (get(sending) & ~clipped).sum()
    if adaptive:  # the noised share of unclipped updates moves the norm to the quantile
      count = unclipped.astype(jnp.float32)
      if _local.is_active(dp_noise):
        count = count + _count_noise(num_clients) * jax.random.normal(
            jax.random.fold_in(noise_key, _COUNT_TAG))
      share = count / jnp.where(total > 0, ctx["denominator"], 1.0)
      new_state = new_state.replace(clip_norm=jnp.where(
          total > 0,
          clip_norm * jnp.exp(-dp_clip_learning_rate * (share - dp_adaptive_quantile)),
          clip_norm))
    took_part = participation > 0
    with_data = num_examples > 0
    work = ctx["work"]
    metrics = {
        "train_loss": jnp.where(total > 0, jnp.nansum(weights * train_loss), jnp.nan),
        "client_train_loss": put(jnp.full((num_clients,), jnp.nan),
                                 jnp.where(member_took_part, train_loss, jnp.nan)),
        "num_participants": (took_part & with_data).sum(),
        "num_uploads": (sending & ~secagg_dropped).sum(),
        "num_stragglers": (took_part & with_data & (
            jnp.zeros((), bool) if work is None else work < full_budget)).sum(),
        "clip_fraction": (clipped & member_took_part).sum() / jnp.maximum(
            member_took_part.sum(), 1),
    }
    if adaptive:
      metrics["clip_norm"] = clip_norm
    if secure_aggregation:
      metrics["secagg_dropped"] = secagg_dropped.sum()
      metrics["secagg_failed"] = ctx["secagg_failed"]
    return new_state, metrics

  def _count_noise(num_clients):
    return (dp_count_noise if dp_count_noise is not None
            else (dp_expected_clients or num_clients) / 20)

  def apply(state: ServerState, data: ClientData, participation=None):
    num_clients = data.num_clients
    ctx = begin(state, data.num_examples, participation)
    cohort = ctx["cohort"]
    everyone = cohort.shape[0] == num_clients and (
        client_chunk is None or client_chunk >= num_clients)
    if client_chunk is None or client_chunk >= cohort.shape[0]:
      group_data = data if everyone else jax.tree.map(lambda x: x[cohort], data)
      out, deltas, changes, weights, clipped, residuals = train_group(
          state, ctx, group_data, cohort, everyone=everyone)
      update = (partial_sum(deltas, weights) if flat_updates
                else combine(deltas, weights))
      small = (out.position, out.train_loss, out.steps_taken, clipped)
      members = cohort
    else:  # memory-bounded: a scan over groups of clients, summing weighted updates
      num_groups = -(-cohort.shape[0] // client_chunk)
      padded = num_groups * client_chunk
      # Padding slots repeat the first member with weight 0 (and are not scattered back).
      members = jnp.concatenate([cohort, jnp.full((padded - cohort.shape[0],),
                                                  cohort[0])])
      real = jnp.arange(padded) < cohort.shape[0]

      def group_step(update_sum, group):
        group_members, group_real = group
        partial, rest = group_sum(state, ctx, jax.tree.map(lambda x: x[group_members],
                                                           data),
                                  group_members, group_real)
        return jax.tree.map(jnp.add, update_sum, partial), rest

      update, (small, changes, residuals) = jax.lax.scan(
          group_step, zero_update(state), (members.reshape(num_groups, client_chunk),
                                           real.reshape(num_groups, client_chunk)))
      flat = lambda x: x.reshape((padded,) + x.shape[2:])
      small = tuple(map(flat, small))
      changes = None if changes is None else jax.tree.map(flat, changes)
      residuals = None if residuals is None else flat(residuals)
      members = jnp.where(real, members, num_clients)  # out of range: dropped on scatter
    return end(state, ctx, data.num_examples, update, small, changes, residuals,
               members, everyone)

  stream_begin = jax.jit(begin)
  stream_group = jax.jit(group_sum)
  stream_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  stream_end = jax.jit(end, static_argnums=(8,))

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
    if cohort_size is not None:
      raise ValueError("stream trains every client in chunks; build the algorithm "
                       "without cohort_size")
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
      raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
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

    update, parts = zero_update(state), []
    upcoming = transfer(0)
    for g in range(num_groups):
      current = upcoming
      if g + 1 < num_groups:
        upcoming = transfer(g + 1)  # in flight while group g trains
      partial, rest = stream_group(state, ctx, *current)
      update = stream_add(update, partial)
      parts.append(rest)
      del current
    small, changes, residuals = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    members = np.arange(num_groups * chunk)
    members = jax.device_put(np.where(members < num_clients, members, num_clients)
                             .astype(np.int32), device)
    return stream_end(state, ctx, sizes, update, small, changes, residuals, members,
                      False)

  def personalize(state: ServerState, data: ClientData):
    """Each client's global model fine-tuned on its own training data: [C, ...]."""
    if fine_tuner is None:
      raise ValueError(f"{name} has no personalization; build it with fine_tune_steps > 0")
    keys = _local.client_keys(
        jax.random.fold_in(_side_key(state, _FINE_TUNE_KEY), state.round),
        data.num_clients)
    out = _local.train_clients(
        fine_tuner, state.params, client_optimizer.init(state.params), data, keys,
        jnp.zeros((data.num_clients,), jnp.int32), epochs_window=state.fine_tune_window,
        stacked=False)
    return out.params

  def check(state, data, participation):
    _check_run_inputs(state, data, participation)
    if cohort_size is not None:
      counts = (participation > 0).sum(axis=1)
      over = np.flatnonzero(counts > cohort_size)
      if over.size:
        raise ValueError(
            f"cohort_size={cohort_size} but round(s) {over[:5].tolist()} have "
            f"{counts[over[:5]].tolist()} participants; raise cohort_size to at least "
            f"{int(counts.max())}")
    if min_participants > 1:
      with_data = np.asarray(data.num_examples) > 0
      counts = ((participation > 0) & with_data[None, :]).sum(axis=1)
      short = np.flatnonzero(counts < min_participants)
      if short.size:
        raise ValueError(
            f"aggregator krum needs at least {min_participants} participating clients "
            f"(2 f + 3) each round; round(s) {short[:5].tolist()} have "
            f"{counts[short[:5]].tolist()}")

  return Algorithm(init=init, apply=apply, run=_make_run(apply, check), name=name,
                   personalize=personalize if fine_tune_steps else None, stream=stream)


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
    _check_init_inputs(model, data, batch_size)
    return ServerState(
        params=params, server_opt_state=sgd.init(params),
        positions=jnp.zeros((data.num_clients,), jnp.int32),
        rng=jnp.asarray(rng), round=jnp.zeros((), jnp.int32),
        epochs_window=_local.epochs_window(budget, batch_size, data.num_examples))

  def apply(state: ServerState, data: ClientData, participation=None):
    num_clients = data.num_clients
    participation = _participation_vector(participation, num_clients)
    order = cyclic_order(_side_key(state, _CYCLE_KEY), state.round // num_clients,
                         num_clients)
    k = order[state.round % num_clients]
    client = _local.Client(data.features[k], data.labels[k], data.num_examples[k])
    key = _keys(state, num_clients, budget)[k]
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
                   run=_make_run(apply, _check_clients_and_participation), name=name)


def cyclic_order(key: jax.Array, cycle: jax.Array, num_clients: int) -> jax.Array:
  """The order in which `cyclic` visits the clients in `cycle` (a permutation)."""
  return jax.random.permutation(jax.random.fold_in(key, cycle), num_clients)


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
