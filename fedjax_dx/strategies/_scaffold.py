"""SCAFFOLD (Karimireddy et al., 2020): FedAvg with control variates.

The correction `c - c_k` is applied to each client gradient inside local training
(`core._local`); the engine keeps the `c_k` on the clients axis and sums their changes as
a second channel next to the model update.
"""

from __future__ import annotations

import optax

from fedjax_dx import agg as _agg
from fedjax_dx import client as _client
from fedjax_dx.core import _local
from fedjax_dx.core._engine import Algorithm
from fedjax_dx.core._engine import check_round_shape
from fedjax_dx.core._engine import check_systems
from fedjax_dx.core._engine import ClientWork
from fedjax_dx.core._engine import federated
from fedjax_dx.core._engine import Systems

_WEIGHTINGS = _agg.WEIGHTINGS
FORMS = ("paper", "flamby")


def scaffold(model, learning_rate: float, *, batch_size: int,
             local_steps: int | None = None, local_epochs: int | None = None,
             server_learning_rate: float = 1.0, weighting: str = "num_examples",
             systems: Systems | None = None, cohort_size: int | None = None,
             client_chunk: int | None = None, guard: _agg.Stage | None = None,
             form: str = "paper", name: str = "scaffold") -> Algorithm:
  """SCAFFOLD (Karimireddy et al., 2020), option II, with client SGD at `learning_rate`.

  Each client's gradient is corrected by `c - c_k`; after `K_k` local steps it updates
  `c_k <- c_k - c + (w - y_k) / (K_k * learning_rate)`. The server moves
  `w <- w + server_learning_rate * sum_k weight_k (y_k - w)` and
  `c <- c + (1/N) sum_{k in S} (c_k_new - c_k)`, N the clients with data. The `c_k`
  live in the state on the clients axis and persist while a client sits out.
  `systems`: stragglers (default `Systems(policy="keep")`); see `fedavg`.
  `guard`: `agg.guard(...)` to drop non-finite (or blown-up) updates; a dropped
  client counts as not trained this round: its `c_k` stays and adds nothing to `c`.

  `form`: "paper" (above) or "flamby", FLamby's `flamby/strategies/scaffold.py`: each
  client keeps its correction `c_k - c` and its previous local model `y_k` and, at the
  start of a round, adds `(x - y_k) / (server_lr * lr * K)`; with every client taking
  part (as FLamby assumes) that is the paper's algorithm with `c` moved by the
  round's model weights, `c <- c + sum_k w_k (c_k_new - c_k)` (`w_k = n_k / n`),
  instead of the uniform `1/N` (tested against a NumPy transcription of FLamby's
  round).
  """
  if form not in FORMS:
    raise ValueError(f"SCAFFOLD form must be one of {FORMS}, got {form!r}")
  if guard is not None and not isinstance(guard, (_agg.Guard, _agg.FiniteGuard)):
    raise ValueError(f"SCAFFOLD's guard must be agg.guard(...) (its control variates "
                     f"travel as a second channel that other stages would not "
                     f"transform), got {guard!r}")
  _local.check_hyperparameter(learning_rate, "SCAFFOLD learning_rate", above=0.0)
  if weighting not in _WEIGHTINGS:
    raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
  budget = _local.LocalBudget.create(local_steps, local_epochs)
  systems = check_systems(systems or Systems(policy="keep"), budget)
  check_round_shape(cohort_size, client_chunk)
  client_optimizer = optax.chain(_client.scaffold_correction(), optax.sgd(learning_rate))
  return federated(model, client_optimizer, batch_size=batch_size, budget=budget,
                   server_optimizer=optax.sgd(server_learning_rate),
                   aggregator=_agg.chain(*([] if guard is None else [guard]),
                                         _agg.mean(weighting)),
                   systems=systems,
                   work=ClientWork(scaffold_learning_rate=learning_rate,
                                   scaffold_form=form),
                   cohort_size=cohort_size, client_chunk=client_chunk, name=name)
