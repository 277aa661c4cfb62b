"""FedProx's proximal term as a client-side gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from fedjax_dx.core import _local


class ProximalState(NamedTuple):
  """State of `proximal`."""

  anchor: Any  # the model the term pulls towards: the parameters given to `init`


def proximal(mu: float) -> optax.GradientTransformation:
  """FedProx (Li et al., 2020): adds `mu (w - w_global)` to every client gradient, the
  gradient of `(mu/2) ||w - w_global||^2`.

  The anchor is the model the client optimizer is initialised with: each round the
  engine initialises the client optimizer at the global model, so chained in front of
  it this is FedProx's local objective.

  Args:
    mu: the proximal weight (>= 0; may be traced, e.g. a grid axis).

  Returns:
    An optax `GradientTransformation`; chain it before the client optimizer.

  Example:
    >>> opt = optax.chain(fdx.client.proximal(0.01), optax.sgd(0.05))
    >>> algo = fdx.fedavg(model, opt, batch_size=16, local_steps=20)
  """
  _local.check_hyperparameter(mu, "FedProx mu", minimum=0.0)

  def init(params):
    return ProximalState(anchor=params)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("proximal needs the current parameters (optax's params argument)")
    return jax.tree.map(lambda g, w, a: g + mu * (w - a), grads, params,
                        state.anchor), state

  return optax.GradientTransformation(init, update)
