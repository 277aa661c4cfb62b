"""FedOpt's server optimizers as published (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2): FedAdagrad, FedYogi and FedAdam.

On the averaged client change `delta` (the negative of the pseudo-gradient the engine
hands its server optimizer):

  m_t = b1 m_{t-1} + (1 - b1) delta
  v_t = v_{t-1} + delta^2                                       (adagrad)
  v_t = v_{t-1} - (1 - b2) delta^2 sign(v_{t-1} - delta^2)      (yogi)
  v_t = b2 v_{t-1} + (1 - b2) delta^2                           (adam)
  x_{t+1} = x_t + lr m_t / (sqrt(v_t) + tau)

with m_{-1} = 0 and v_{-1} = tau^2 (Algorithm 2 asks v_{-1} >= tau^2). No bias
correction: unlike optax's adam and yogi, early rounds move the model by
(1 - b1) / (sqrt(1 - b2) + ...) of the corrected step, as in the paper and in FLamby
(`flamby/strategies/fed_opt.py`, which starts from v_{-1} = 0: `initial_v=0.0`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SERVERS = ("adam", "yogi", "adagrad")
FORMS = ("paper", "flamby", "bias_corrected")


class FedOptState(NamedTuple):
  m: optax.Params  # like params: first moment of the averaged client change
  v: optax.Params  # like params: second moment (adagrad: running sum of squares)


def fedopt_server(server: str, learning_rate: float, *, b1: float = 0.9,
                  b2: float = 0.999, tau: float = 1e-8,
                  initial_v: float | None = None) -> optax.GradientTransformation:
  """The server optimizer of Algorithm 2 of Reddi et al. (2021), as an optax
  transformation of the engine's pseudo-gradient (`params - average client params`).

  Args:
    server: "adam", "yogi" or "adagrad".
    learning_rate: the server step size `lr` (eta in the paper).
    b1: first-moment decay (all three servers, as in the paper).
    b2: second-moment decay (adam and yogi; adagrad ignores it).
    tau: the adaptivity: the constant added to `sqrt(v_t)`.
    initial_v: `v_{-1}`; default `tau**2`, the paper's smallest allowed value
      (FLamby starts from 0).

  Returns:
    An `optax.GradientTransformation` whose update, added to the global model,
    is `lr * m_t / (sqrt(v_t) + tau)` in the direction of the clients' change.

  Example:
    >>> algo = fdx.fedavg(model, optax.sgd(0.05), batch_size=8, local_steps=10,
    ...                   server_optimizer=fdx.fedopt_server("adam", 0.01))
  """
  if server not in SERVERS:
    raise ValueError(f"FedOpt server must be one of {SERVERS}, got {server!r}")
  for name, value, ok, expected in (
      ("learning_rate", learning_rate, lambda v: v > 0, "> 0"),
      ("b1", b1, lambda v: 0 <= v < 1, "in [0, 1)"),
      ("b2", b2, lambda v: 0 <= v < 1, "in [0, 1)"),
      ("tau", tau, lambda v: v > 0, "> 0")):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
      raise ValueError(f"fedopt_server {name} = {value!r}: expected a finite number "
                       f"{expected}")
  v0 = tau**2 if initial_v is None else initial_v
  if not (isinstance(v0, (int, float)) and math.isfinite(v0) and v0 >= 0):
    raise ValueError(f"fedopt_server initial_v = {initial_v!r}: expected a number >= 0")

  def init(params):
    return FedOptState(m=jax.tree.map(jnp.zeros_like, params),
                       v=jax.tree.map(lambda p: jnp.full_like(p, v0), params))

  def update(pseudo_gradient, state, params=None):
    del params
    delta = jax.tree.map(jnp.negative, pseudo_gradient)
    m = jax.tree.map(lambda m, d: b1 * m + (1 - b1) * d, state.m, delta)
    if server == "adam":
      v = jax.tree.map(lambda v, d: b2 * v + (1 - b2) * d * d, state.v, delta)
    elif server == "yogi":
      v = jax.tree.map(lambda v, d: v - (1 - b2) * d * d * jnp.sign(v - d * d),
                       state.v, delta)
    else:
      v = jax.tree.map(lambda v, d: v + d * d, state.v, delta)
    step = jax.tree.map(lambda m, v: learning_rate * m / (jnp.sqrt(v) + tau), m, v)
    return step, FedOptState(m=m, v=v)

  return optax.GradientTransformation(init, update)


def bias_corrected_server(server: str, learning_rate: float, *, b1: float = 0.9,
                          b2: float = 0.999, tau: float = 1e-8
                          ) -> optax.GradientTransformation:
  """optax's adam, yogi or adagrad on the pseudo-gradient (bias-corrected moments for
  adam and yogi, optax's own initial accumulators): the form this project used before
  it followed the paper, kept as an explicit option."""
  if server == "adam":
    return optax.adam(learning_rate, b1=b1, b2=b2, eps=tau)
  if server == "yogi":
    return optax.yogi(learning_rate, b1=b1, b2=b2, eps=tau)
  if server == "adagrad":
    return optax.adagrad(learning_rate, initial_accumulator_value=0.0, eps=tau)
  raise ValueError(f"FedOpt server must be one of {SERVERS}, got {server!r}")
