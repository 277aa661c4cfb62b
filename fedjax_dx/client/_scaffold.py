"""SCAFFOLD's gradient correction as a client-side transformation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class CorrectionState(NamedTuple):
  """State of `scaffold_correction` (none: the correction arrives with each step)."""


def scaffold_correction() -> optax.GradientTransformationExtraArgs:
  """SCAFFOLD (Karimireddy et al., 2020): adds the client's correction `c - c_k` to every
  local gradient. The engine passes it to each step as the extra argument `correction`
  (the server's and this client's control variates), so chain it first.

  Example:
    >>> opt = optax.chain(fdx.client.scaffold_correction(), optax.sgd(0.1))
  """
  def init(params):
    del params
    return CorrectionState()

  def update(grads, state, params=None, *, correction=None, **extra_args):
    del params, extra_args
    if correction is None:
      raise ValueError("scaffold_correction needs the correction c - c_k of each step "
                       "(fdx.scaffold passes it)")
    return jax.tree.map(jnp.add, grads, correction), state

  return optax.GradientTransformationExtraArgs(init, update)
