"""FedAvg over the engine, and its presets FedProx, FedAvgM and FedOpt.

`fedavg` assembles the round from its parts: local training (`core._local`), the
aggregator chain (`fedjax_dx.agg`), systems heterogeneity and the server optimizer. Its
keyword options (`OPTIONS`: DP, compression, secure sum, guard, stragglers) are
translated into the same chain (`_options_chain`) that `aggregator=agg.chain(...)` gives.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import optax

from fedjax_dx import agg as _agg
from fedjax_dx import client as _client
from fedjax_dx.agg import _compress
from fedjax_dx.agg import _functional
from fedjax_dx.agg import _robust
from fedjax_dx.core import _local
from fedjax_dx.core import _models
from fedjax_dx.core._engine import Algorithm
from fedjax_dx.core._engine import ClientWork
from fedjax_dx.core._engine import federated
from fedjax_dx.core._engine import STRAGGLER_POLICIES
from fedjax_dx.core._engine import Systems
from fedjax_dx.privacy import _accounting

_WEIGHTINGS = _agg.WEIGHTINGS


# The keyword options of `fedavg` that build its aggregator chain, client work and
# systems (the chain API, `aggregator=agg.chain(...)`, says the same in stages).
OPTIONS = {
    "prox_mu": 0.0, "stragglers": 0.0, "straggler_policy": "drop", "fine_tune_steps": 0,
    "dp_clip": None, "dp_noise": 0.0, "dp_mode": "central", "dp_expected_clients": None,
    "dp_adaptive_quantile": None, "dp_clip_learning_rate": 0.2, "dp_count_noise": None,
    "compression": "none", "compression_bits": 8, "topk_fraction": 0.01,
    "error_feedback": True, "secure_aggregation": False, "secagg_bits": 32,
    "secagg_bound": None, "secagg_dropout": 0.0, "secagg_tolerance": 0.3, "guard": None,
}


def fedavg(model: _models.Model, client_optimizer: optax.GradientTransformation, *,
           batch_size: int, local_steps: int | None = None,
           local_epochs: int | None = None,
           server_optimizer: optax.GradientTransformation | None = None,
           weighting: str = "num_examples", aggregator: str | _agg.Chain = "mean",
           systems: Systems | None = None, cohort_size: int | None = None,
           client_chunk: int | None = None, name: str = "fedavg",
           **options) -> Algorithm:
  """Federated averaging, with a pluggable server optimizer (FedOpt) and aggregator.

  Each round every client starts from the global model, trains locally (vmapped over
  clients), and its update `delta_k = w_k - w` goes through the aggregator chain: by
  default the mean with weights `p_k * n_k` (or `p_k` for `weighting="uniform"`), `p_k`
  the participation mask. The server then treats `-aggregate` as a gradient: with the
  default `optax.sgd(1.0)` the new global model is exactly the weighted mean of the
  client models.

  Args:
    model: the model.
    client_optimizer: optax optimizer of local training (state reset each round).
    batch_size: examples per local step.
    local_steps: local steps per round (client streams continue across rounds).
    local_epochs: local epochs per round (give this or `local_steps`).
    server_optimizer: optax optimizer on the pseudo-gradient; default `sgd(1.0)`.
    weighting: "num_examples" (n_k) or "uniform" (when `aggregator` is a name).
    aggregator: an aggregator chain (`fedjax_dx.agg.chain(...)`: clipping, noise,
      compression, secure sum, robust reducers, a guard), or a name: "mean", "median",
      "trimmed_mean", "krum".
    systems: systems heterogeneity, `Systems(stragglers, policy)`: the share of each
      round's participants that do only a random part of the budget, and whether
      their partial work is dropped (FedAvg) or kept (FedProx). Default: none.
    cohort_size: with partial participation, train only the participants: each round
      gathers the first `cohort_size` participating clients and trains just them, so
      compute and memory follow the sampled clients, not all C (a round with more
      participants than `cohort_size` is refused by `run`). None trains every client
      and masks out the rest.
    client_chunk: memory-bounded rounds: train the (cohort's) clients in groups of this
      many, one group after another (`lax.scan`), adding up the weighted updates, so
      the round's memory grows with the group, not with the client count. Needs a
      linear chain (no robust reducer, no guard). See `choose_client_chunk`.
    name: method name in results.
    **options: the same features as keyword flags (each builds a stage, a client-side
      transformation or the systems model; see `OPTIONS` for the defaults):
      `prox_mu` (FedProx's proximal weight: `optax.chain(fedjax_dx.client.proximal(mu),
      client_optimizer)`; the fine-tuning of `fine_tune_steps` uses it too), `stragglers` (share of each round's
      participants that do only a random part of the budget) and `straggler_policy`
      ("drop": FedAvg discards their updates; "keep": FedProx averages them in),
      `fine_tune_steps` (`Algorithm.personalize`: each client's global model after this
      many local steps on its own data), client-level DP (`dp_clip`, `dp_noise`,
      `dp_mode` "central" | "local", `dp_expected_clients`, adaptive clipping
      `dp_adaptive_quantile`, `dp_clip_learning_rate`, `dp_count_noise`), example-level
      DP-SGD (`dp_mode="example"`: each example's gradient clipped to `dp_clip`, noise
      `dp_noise`), `compression` ("quantize" with `compression_bits`, "topk" with
      `topk_fraction`; `error_feedback`), secure aggregation (`secure_aggregation`,
      `secagg_bits`, `secagg_bound` (default `dp_clip`, else 1.0), `secagg_dropout`,
      `secagg_tolerance`), and `guard` (True or a norm ratio: drop non-finite or blown-up
      updates, `fedjax_dx.agg.guard`).

  Returns:
    An `Algorithm`.

  Example:
    >>> algo = fedavg(logistic_regression(), optax.sgd(0.1), batch_size=16,
    ...               local_epochs=1)
    >>> state = algo.init(params, data.train, jax.random.PRNGKey(0))
    >>> state, metrics = algo.run(state, data.train, num_rounds=10)
  """
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise TypeError(f"fedavg got unknown option(s) {unknown}; options are "
                    f"{sorted(OPTIONS)}")
  if systems is not None:
    given = sorted({"stragglers", "straggler_policy"} & set(options))
    if given:
      raise ValueError(f"fedavg got systems= and the flags {given}; give one of them")
    options.update(stragglers=systems.stragglers, straggler_policy=systems.policy)
  options = {**OPTIONS, **options}
  if weighting not in _WEIGHTINGS:
    raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
  budget = _local.LocalBudget.create(local_steps, local_epochs)
  systems, work = check_round_options(options, budget, cohort_size, client_chunk)
  if isinstance(aggregator, _agg.Chain):
    flags = sorted(k for k in _CHAIN_OPTIONS if options[k] != OPTIONS[k]
                   and not (k in ("dp_clip", "dp_noise")
                            and options["dp_mode"] == "example"))
    if flags:
      raise ValueError(f"fedavg got an aggregator chain and the flags {flags}, which "
                       "build a chain too; put those stages in the chain instead")
    chain = aggregator
  else:
    chain = _options_chain(weighting, aggregator, options)
  if _local.is_active(options["prox_mu"]):  # FedProx: a client transformation
    client_optimizer = optax.chain(_client.proximal(options["prox_mu"]), client_optimizer)
  if options["dp_clip"] is not None and options["dp_mode"] == "example":
    client_optimizer = _client.dp_sgd(client_optimizer, clip_norm=options["dp_clip"],
                                      noise_multiplier=options["dp_noise"])
  return federated(model, client_optimizer, batch_size=batch_size, budget=budget,
                   server_optimizer=server_optimizer or optax.sgd(1.0), aggregator=chain,
                   systems=systems, work=work, cohort_size=cohort_size,
                   client_chunk=client_chunk, name=name)


# The options `_options_chain` turns into stages (the others are client work/systems).
_CHAIN_OPTIONS = tuple(k for k in OPTIONS if k.startswith(("dp_", "compression", "secagg_"))
                       and k not in ("dp_mode",)) + (
                           "topk_fraction", "error_feedback", "secure_aggregation", "guard")


def check_round_options(options, budget, cohort_size, client_chunk):
  """Systems and client-work options: `(Systems, ClientWork)`, or a named error."""
  _local.check_hyperparameter(options["prox_mu"], "prox_mu (FedProx's mu)", minimum=0.0)
  stragglers, policy = options["stragglers"], options["straggler_policy"]
  if policy not in STRAGGLER_POLICIES:
    raise ValueError(f"straggler_policy must be one of {STRAGGLER_POLICIES}, got "
                     f"{policy!r}")
  if not 0 <= stragglers <= 1:
    raise ValueError(f"stragglers (share of participants) must lie in [0, 1], got "
                     f"{stragglers!r}")
  fine_tune_steps = options["fine_tune_steps"]
  if not isinstance(fine_tune_steps, (int, np.integer)) or fine_tune_steps < 0:
    raise ValueError(f"fine_tune_steps must be an integer >= 0, got {fine_tune_steps!r}")
  for field, value in (("cohort_size", cohort_size), ("client_chunk", client_chunk)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
      raise ValueError(f"{field} must be a positive integer or None, got {value!r}")
  full_budget = budget.steps if budget.steps is not None else budget.epochs
  if stragglers > 0 and full_budget < 2:
    raise ValueError(
        f"stragglers={stragglers} needs a budget of at least 2 local "
        f"{'steps' if budget.steps else 'epochs'} (stragglers do 1 .. budget-1), got "
        f"{full_budget}")
  return (Systems(stragglers, policy),
          ClientWork(fine_tune_steps=int(fine_tune_steps)))


def _options_chain(weighting: str, aggregator, options: dict) -> _agg.Chain:
  """The aggregator chain the keyword options describe, checked with the flags' names:
  guard -> clip -> mean -> noise -> compression -> secure sum (+ a robust reducer)."""
  dp_clip, mode = options["dp_clip"], options["dp_mode"]
  _check_dp_options(options)
  client_dp = dp_clip is not None and mode != "example"
  compression = options["compression"]
  if compression not in ("none", "quantize", "topk"):
    raise ValueError(f"compression must be one of ('none', 'quantize', 'topk'), got "
                     f"{compression!r}")
  if aggregator is _functional.weighted_mean:
    aggregator = "mean"
  reducer = (_robust.by_name(aggregator) if isinstance(aggregator, str)
             else _FunctionReducer(aggregator))
  stages = []
  if options["guard"] not in (None, False):
    stages.append(_agg.guard(10.0 if options["guard"] is True else options["guard"]))
  if client_dp:
    stages.append(_agg.clip(dp_clip, adaptive_quantile=options["dp_adaptive_quantile"],
                            learning_rate=options["dp_clip_learning_rate"],
                            count_noise=options["dp_count_noise"]))
  stages.append(_agg.mean("uniform" if client_dp else weighting,
                          options["dp_expected_clients"]))
  if client_dp:
    stages.append(_agg.gaussian(options["dp_noise"], mode))
  if compression != "none":
    stages.append(_compress.Compress(
        compression, bits=options["compression_bits"],
        fraction=options["topk_fraction"], error_feedback=options["error_feedback"]))
  if reducer is not None:
    stages.append(reducer)
  if options["secure_aggregation"]:
    _check_secagg_options(options, reducer, compression)
    bound = options["secagg_bound"]
    stages.append(_agg.secure_sum(
        options["secagg_bits"], bound=(dp_clip if client_dp else 1.0) if bound is None
        else bound, dropout=options["secagg_dropout"],
        tolerance=options["secagg_tolerance"]))
  return _agg.chain(*stages)


def _check_dp_options(options: dict) -> None:
  dp_clip, mode = options["dp_clip"], options["dp_mode"]
  if dp_clip is not None:
    if not dp_clip > 0:
      raise ValueError(f"dp_clip (clipping norm) must be > 0, got {dp_clip!r}")
    if not options["dp_noise"] >= 0:
      raise ValueError(f"dp_noise (noise multiplier) must be >= 0, got "
                       f"{options['dp_noise']!r}")
    if mode not in _accounting.DP_MODES:
      raise ValueError(f"dp_mode must be one of {_accounting.DP_MODES}, got {mode!r}")
    expected = options["dp_expected_clients"]
    if expected is not None and expected < 1:
      raise ValueError(f"dp_expected_clients must be >= 1, got {expected!r}")
    if options["dp_adaptive_quantile"] is not None and mode != "central":
      raise ValueError(f"adaptive clipping (dp_adaptive_quantile) needs dp_mode="
                       f"'central', got {mode!r}")
  elif options["dp_noise"]:
    raise ValueError(f"dp_noise={options['dp_noise']} needs dp_clip (noise is scaled "
                     "to the clipping norm)")
  elif options["dp_adaptive_quantile"] is not None:
    raise ValueError("dp_adaptive_quantile needs dp_clip (the initial clipping norm)")


def _check_secagg_options(options: dict, reducer, compression: str) -> None:
  bits = options["secagg_bits"]
  if not isinstance(bits, (int, np.integer)) or not 8 <= bits <= 32:
    raise ValueError(f"secagg_bits must be an integer in [8, 32], got {bits!r}")
  if reducer is not None:
    raise ValueError(f"secure aggregation reveals only the sum of updates, so it needs "
                     f"aggregator='mean', got {reducer.name!r}")
  if compression != "none":
    raise ValueError(f"secure aggregation already quantizes updates to secagg_bits="
                     f"{bits}; use compression='none' with it, got {compression!r}")


@dataclasses.dataclass(frozen=True)
class _FunctionReducer(_agg.Reducer):
  """A reducer from a plain function `(deltas [C, ...], weights [C]) -> update`."""

  function: Callable = None

  @property
  def name(self):  # type: ignore[override]
    return getattr(self.function, "__name__", "custom")

  @property
  def min_participants(self):  # type: ignore[override]
    return getattr(self.function, "min_participants", 1)

  def reduce(self, messages, weights):
    return self.function(messages, weights)


def fedprox(model, client_optimizer, *, mu: float, name: str = "fedprox",
            straggler_policy: str = "keep", **kwargs):
  """FedProx (Li et al., 2020): FedAvg whose client loss adds `(mu/2)||w - w_global||^2`.

  Stragglers' partial work is kept (the paper's FedProx); see `fedavg` for the rest.
  """
  _local.check_hyperparameter(mu, "FedProx mu", minimum=0.0)
  if kwargs.get("systems") is None:
    kwargs["straggler_policy"] = straggler_policy
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
