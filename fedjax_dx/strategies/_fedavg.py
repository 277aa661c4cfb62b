"""FedAvg over the engine, and its presets FedProx, FedAvgM and FedOpt.

`fedavg` assembles the round from its parts: local training (`core._local`) with the
client optimizer (and any client-side transformation of `fedjax_dx.client` in it), the
aggregator chain (`fedjax_dx.agg`), systems heterogeneity (`Systems`) and the server
optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import optax

from fedjax_dx import agg as _agg
from fedjax_dx import client as _client
from fedjax_dx.agg import _functional
from fedjax_dx.agg import _robust
from fedjax_dx.core import _local
from fedjax_dx.core import _models
from fedjax_dx.core._engine import Algorithm
from fedjax_dx.core._engine import check_round_shape
from fedjax_dx.core._engine import check_systems
from fedjax_dx.core._engine import ClientWork
from fedjax_dx.core._engine import federated
from fedjax_dx.core._engine import Systems
from fedjax_dx.strategies import _fedopt

_WEIGHTINGS = _agg.WEIGHTINGS


def fedavg(model: _models.Model, client_optimizer: optax.GradientTransformation, *,
           batch_size: int, local_steps: int | None = None,
           local_epochs: int | None = None,
           server_optimizer: optax.GradientTransformation | None = None,
           weighting: str = "num_examples", aggregator: str | Callable | _agg.Chain = "mean",
           systems: Systems | None = None, cohort_size: int | None = None,
           client_chunk: int | None = None, fine_tune_steps: int = 0,
           name: str = "fedavg") -> Algorithm:
  """Federated averaging, with a pluggable server optimizer (FedOpt) and aggregator.

  Each round every client starts from the global model, trains locally (vmapped over
  clients), and its update `delta_k = w_k - w` goes through the aggregator chain: by
  default the mean with weights `p_k * n_k` (or `p_k` for `weighting="uniform"`), `p_k`
  the participation mask. The server then treats `-aggregate` as a gradient: with the
  default `optax.sgd(1.0)` the new global model is exactly the weighted mean of the
  client models.

  Args:
    model: the model.
    client_optimizer: optax optimizer of local training (state reset each round), with
      any client-side transformation in it: `fedjax_dx.client.proximal(mu)` chained in
      front (FedProx), or `fedjax_dx.client.dp_sgd(...)` around it (example-level DP).
    batch_size: examples per local step.
    local_steps: local steps per round (client streams continue across rounds).
    local_epochs: local epochs per round (give this or `local_steps`).
    server_optimizer: optax optimizer on the pseudo-gradient; default `sgd(1.0)`.
    weighting: "num_examples" (n_k) or "uniform" (when `aggregator` is a name).
    aggregator: an aggregator chain (`fedjax_dx.agg.chain(...)`: clipping, noise,
      compression, secure sum, robust reducers, a guard), a name ("mean", "median",
      "trimmed_mean", "krum"), or a function `(updates [C, ...], weights [C]) -> update`
      (`fedjax_dx.trimmed_mean(0.2)`, ...).
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
    fine_tune_steps: personalization (`Algorithm.personalize`): each client's global
      model after this many local steps on its own data; 0: none.
    name: method name in results.

  Returns:
    An `Algorithm`.

  Example:
    >>> private = agg.chain(agg.clip(1.0), agg.mean("uniform"), agg.gaussian(1.1))
    >>> algo = fedavg(logistic_regression(), optax.sgd(0.1), batch_size=16,
    ...               local_epochs=1, aggregator=private)
    >>> state = algo.init(params, data.train, jax.random.PRNGKey(0))
    >>> state, metrics = algo.run(state, data.train, num_rounds=10)
  """
  if weighting not in _WEIGHTINGS:
    raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
  budget = _local.LocalBudget.create(local_steps, local_epochs)
  systems = check_systems(systems or Systems(), budget)
  check_round_shape(cohort_size, client_chunk)
  if not isinstance(fine_tune_steps, (int, np.integer)) or fine_tune_steps < 0:
    raise ValueError(f"fine_tune_steps must be an integer >= 0, got {fine_tune_steps!r}")
  return federated(model, client_optimizer, batch_size=batch_size, budget=budget,
                   server_optimizer=server_optimizer or optax.sgd(1.0),
                   aggregator=as_chain(aggregator, weighting), systems=systems,
                   work=ClientWork(fine_tune_steps=int(fine_tune_steps)),
                   cohort_size=cohort_size, client_chunk=client_chunk, name=name)


def as_chain(aggregator, weighting: str = "num_examples") -> _agg.Chain:
  """An aggregator chain from a chain, a reducer name or a reducer function."""
  if isinstance(aggregator, _agg.Chain):
    return aggregator
  if aggregator is _functional.weighted_mean:
    aggregator = "mean"
  reducer = (_robust.by_name(aggregator) if isinstance(aggregator, str)
             else _FunctionReducer(aggregator))
  return _agg.chain(_agg.mean(weighting), *([reducer] if reducer is not None else []))


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


def fedprox(model, client_optimizer, *, mu: float, systems: Systems | None = None,
            name: str = "fedprox", **kwargs):
  """FedProx (Li et al., 2020): FedAvg whose client loss adds `(mu/2)||w - w_global||^2`
  (`optax.chain(fedjax_dx.client.proximal(mu), client_optimizer)`).

  Stragglers' partial work is kept by default (the paper's FedProx): `systems` defaults
  to `Systems(policy="keep")`; see `fedavg` for the rest.
  """
  _local.check_hyperparameter(mu, "FedProx mu", minimum=0.0)
  if isinstance(client_optimizer, _client.DpSgd):  # DP-SGD stays the outermost
    client_optimizer = _client.dp_sgd(
        optax.chain(_client.proximal(mu), client_optimizer.inner),
        clip_norm=client_optimizer.clip_norm,
        noise_multiplier=client_optimizer.noise_multiplier,
        batch_sampling=client_optimizer.batch_sampling,
        canaries=client_optimizer.canaries)
  else:
    client_optimizer = optax.chain(_client.proximal(mu), client_optimizer)
  return fedavg(model, client_optimizer,
                systems=systems or Systems(policy="keep"), name=name, **kwargs)


def fedavgm(model, client_optimizer, *, server_learning_rate: float = 1.0,
            server_momentum: float = 0.9, name: str = "fedavgm", **kwargs):
  """FedAvgM (Hsu et al., 2019): server SGD with momentum on the averaged update."""
  return fedavg(model, client_optimizer, name=name,
                server_optimizer=optax.sgd(server_learning_rate, momentum=server_momentum),
                **kwargs)


def fedopt(model, client_optimizer, *, server: str, server_learning_rate: float,
           b1: float = 0.9, b2: float = 0.999, tau: float = 1e-8, form: str = "paper",
           name: str | None = None, **kwargs):
  """FedOpt (Reddi et al., 2021): FedAdam, FedYogi or FedAdagrad on the pseudo-gradient.

  Args:
    server: "adam", "yogi" or "adagrad".
    server_learning_rate: the server step size.
    b1, b2: moment decays; tau: the adaptivity (added to `sqrt(v)`).
    form: "paper" (default): Algorithm 2 as published, no bias correction,
      `v_{-1} = tau^2`; "flamby": the same from `v_{-1} = 0`, as FLamby's
      `fed_opt.py`; "bias_corrected": optax's adam / yogi / adagrad.
    **kwargs: `fedavg`'s parameters.
  """
  if form == "paper":
    opt = _fedopt.fedopt_server(server, server_learning_rate, b1=b1, b2=b2, tau=tau)
  elif form == "flamby":
    opt = _fedopt.fedopt_server(server, server_learning_rate, b1=b1, b2=b2, tau=tau,
                                initial_v=0.0)
  elif form == "bias_corrected":
    opt = _fedopt.bias_corrected_server(server, server_learning_rate, b1=b1, b2=b2,
                                        tau=tau)
  else:
    raise ValueError(f"FedOpt form must be one of {_fedopt.FORMS}, got {form!r}")
  return fedavg(model, client_optimizer, server_optimizer=opt, name=name or f"fed{server}",
                **kwargs)
