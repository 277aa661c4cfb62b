"""Example-level DP-SGD (Abadi et al., 2016) as a client-side transformation."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_dx.core import _models
from fedjax_dx.privacy import _accounting


class DpSgd(NamedTuple):
  """A client optimizer whose gradients are DP-SGD's; see `dp_sgd`.

  It is an optax transformation (`init`/`update` are the wrapped optimizer's) that also
  brings its own `gradient`: local training asks it for each step's gradient.
  """

  init: Callable  # the wrapped optimizer's init
  update: Callable  # the wrapped optimizer's update; refuses gradients not DP-SGD's
  clip_norm: float  # every example's gradient is clipped to this L2 norm
  noise_multiplier: float  # noise std / clip_norm, added to the clipped sum
  inner: optax.GradientTransformation  # the wrapped optimizer
  # "shuffle": fixed-size batches of a per-epoch shuffle (accounted as Poisson: an
  # approximation); "poisson": each example independently with probability
  # batch / n_k in every step (what the accountant assumes), sum divided by the batch
  batch_sampling: str = "shuffle"
  # The privacy audit's canary examples (`privacy/_audit.py`): an example whose features
  # carry the canary mark contributes `clip_norm` along its canary's direction instead
  # of its gradient; 0 = no canaries
  canaries: int = 0

  needs_noise_key = True  # local training hands each client its own noise key

  def gradient(self, model, state, batch, count, expected_batch=None):
    """`(loss, grads, next noise key)` of one step: per-example gradients (vmap), each
    clipped to `clip_norm`, summed, noised with std `noise_multiplier * clip_norm`, and
    divided by the fixed batch size."""
    def example_loss(params, x, y):
      return _models.per_example_loss(model, model.apply(params, x[None]), y[None])[0]

    losses, per_example = jax.vmap(jax.value_and_grad(example_loss),
                                   in_axes=(None, 0, 0))(state.params, batch.x, batch.y)
    if self.canaries:
      from fedjax_dx.privacy import _audit  # pylint: disable=g-import-not-at-top
      per_example, is_canary = _audit.craft_example_gradients(
          per_example, batch.x, state.params, self.canaries, self.clip_norm)
      losses = jnp.where(is_canary, 0.0, losses)
    leaves = jax.tree.leaves(per_example)
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1)
                         for g in leaves))
    factor = batch.weight * jnp.minimum(1.0, self.clip_norm / jnp.maximum(norms, 1e-12))
    summed = jax.tree.map(lambda g: jnp.tensordot(factor, g, axes=1), per_example)
    noise_key, step_key = jax.random.split(state.noise_key)
    leaves, treedef = jax.tree.flatten(summed)
    keys = jax.random.split(step_key, len(leaves))
    noisy = jax.tree.unflatten(treedef, [
        g + self.noise_multiplier * self.clip_norm * jax.random.normal(k, g.shape, g.dtype)
        for g, k in zip(leaves, keys)])
    # The fixed (expected) batch B; Poisson batches fill padded slots, more than B.
    expected = expected_batch or batch.weight.shape[0]
    grads = jax.tree.map(lambda g: g / expected, noisy)
    loss = (losses * batch.weight).sum() / jnp.maximum(count, 1.0)
    return loss, grads, noise_key

  def epsilon(self, *, batch_size: int, num_examples, steps, delta: float,
              accountant: str = "rdp") -> float:
    """The worst hospital's epsilon after `steps[k]` noised steps on `num_examples[k]`
    examples (sampling rate `batch_size / n_k`)."""
    return _accounting.example_level_epsilon(self.noise_multiplier, batch_size,
                                             num_examples, steps, delta, accountant)


BATCH_SAMPLINGS = ("shuffle", "poisson")


def dp_sgd(optimizer: optax.GradientTransformation, *, clip_norm: float,
           noise_multiplier: float, batch_sampling: str = "shuffle",
           canaries: int = 0) -> DpSgd:
  """Example-level differential privacy for each hospital's local training.

  Every example's gradient is clipped to `clip_norm`, the clipped gradients are summed,
  Gaussian noise of std `noise_multiplier * clip_norm` is added and the sum is divided by
  the batch size; `optimizer` then takes the step. Wrap the whole client optimizer
  (outermost: `dp_sgd(optax.chain(client.proximal(mu), optax.sgd(lr)), ...)`): nested
  inside another optax chain it would see plain gradients, so its update refuses them.

  Args:
    optimizer: the client optimizer.
    clip_norm: per-example clipping norm (> 0; may be traced).
    noise_multiplier: noise std over `clip_norm` (>= 0; may be traced).
    batch_sampling: "shuffle" (fixed-size batches of a per-epoch shuffle; the
      accountant's Poisson figure is then an approximation) or "poisson" (every
      example of the hospital independently with probability batch / n_k in every
      step, in slots padded to a bound the count exceeds with probability < 1e-9:
      what the accountant assumes).
    canaries: the privacy audit's canary examples (`privacy/_audit.py`,
      `with_canary_examples`): how many directions there are; 0 for none.

  Returns:
    A `DpSgd` (an optax transformation with its own gradient and `epsilon`).

  Example:
    >>> opt = fdx.client.dp_sgd(optax.sgd(0.1), clip_norm=1.0, noise_multiplier=1.1)
    >>> algo = fdx.fedavg(model, opt, batch_size=16, local_steps=20)
  """
  from fedjax_dx.core import _local  # pylint: disable=g-import-not-at-top
  _local.check_hyperparameter(clip_norm, "DP-SGD clip_norm", above=0.0)
  _local.check_hyperparameter(noise_multiplier, "DP-SGD noise_multiplier", minimum=0.0)
  if batch_sampling not in BATCH_SAMPLINGS:
    raise ValueError(f"batch_sampling must be one of {BATCH_SAMPLINGS}, got "
                     f"{batch_sampling!r}")
  inner = optax.with_extra_args_support(optimizer)

  def update(grads, state, params=None, *, private_gradient=False, **extra_args):
    if not private_gradient:
      raise ValueError("dp_sgd got gradients that are not DP-SGD's: it must wrap the "
                       "whole client optimizer (outermost), not sit inside an optax chain")
    return inner.update(grads, state, params, **extra_args)

  return DpSgd(optimizer.init, update, clip_norm, noise_multiplier, optimizer,
               batch_sampling, int(canaries))

