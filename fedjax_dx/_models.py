"""Models as pure functions over parameter pytrees, built from Flax modules."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Params = Any


class Model(NamedTuple):
  """What the federated core needs of a model: pure init/apply over parameters.

  Attributes:
    init: `(rng, sample_features [B, *feature_shape]) -> params`.
    apply: `(params, features [B, *feature_shape]) -> logits [B, num_logits]`.
    num_classes: classes of the task.
    output: "sigmoid" (binary task, one logit, binary cross-entropy) or "softmax"
      (one logit per class, softmax cross-entropy).
  """

  init: Callable[[jax.Array, jax.Array], Params]
  apply: Callable[[Params, jax.Array], jax.Array]
  num_classes: int
  output: str = "softmax"


def from_flax(module: nn.Module, num_classes: int, output: str = "softmax") -> Model:
  """Wraps a Flax module whose last layer has 1 (sigmoid) or num_classes outputs.

  Example:
    >>> model = from_flax(nn.Dense(1), num_classes=2, output="sigmoid")
  """
  if output not in ("sigmoid", "softmax"):
    raise ValueError(f"output must be 'sigmoid' or 'softmax', got {output!r}")
  if output == "sigmoid" and num_classes != 2:
    raise ValueError(f"output='sigmoid' needs num_classes=2, got {num_classes}")
  return Model(
      init=lambda rng, x: module.init(rng, x)["params"],
      apply=lambda params, x: module.apply({"params": params}, x),
      num_classes=num_classes,
      output=output)


class _MLP(nn.Module):
  hidden: Sequence[int]
  num_outputs: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_outputs)(x)


def logistic_regression(num_classes: int = 2, output: str | None = None) -> Model:
  """Logistic regression: one logit with sigmoid for binary tasks, else softmax."""
  output = output or ("sigmoid" if num_classes == 2 else "softmax")
  num_outputs = 1 if output == "sigmoid" else num_classes
  return from_flax(_MLP(hidden=(), num_outputs=num_outputs), num_classes, output)


def mlp(hidden: Sequence[int] = (64, 64), num_classes: int = 2,
        output: str = "softmax") -> Model:
  """A ReLU multi-layer perceptron (features are flattened first)."""
  num_outputs = 1 if output == "sigmoid" else num_classes
  return from_flax(_MLP(hidden=tuple(hidden), num_outputs=num_outputs), num_classes,
                   output)


class _CNN(nn.Module):
  channels: Sequence[int]
  dense: int
  num_outputs: int
  group_norm: bool

  @nn.compact
  def __call__(self, x):
    if x.ndim == 3:
      x = x[..., None]
    for width in self.channels:
      x = nn.Conv(width, (3, 3))(x)
      if self.group_norm:
        x = nn.GroupNorm(num_groups=min(8, width))(x)
      x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(self.num_outputs)(x)


def cnn(num_classes: int = 2, channels: Sequence[int] = (16, 32), dense: int = 64,
        group_norm: bool = False, output: str = "softmax") -> Model:
  """A small CNN for 28x28 images: (conv 3x3, ReLU, 2x2 average pool) per width, dense.

  No batch norm: per-client batch statistics break federated averaging; `group_norm`
  adds GroupNorm after each convolution instead.
  """
  num_outputs = 1 if output == "sigmoid" else num_classes
  return from_flax(_CNN(channels=tuple(channels), dense=dense, num_outputs=num_outputs,
                        group_norm=group_norm), num_classes, output)


def per_example_loss(model: Model, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of each example: `[B]`."""
  if model.output == "sigmoid":
    return optax.sigmoid_binary_cross_entropy(logits[..., 0], labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def probabilities(model: Model, logits: jax.Array) -> jax.Array:
  """Class probabilities `[B, num_classes]` from logits."""
  if model.output == "sigmoid":
    p = jax.nn.sigmoid(logits[..., 0])
    return jnp.stack([1.0 - p, p], axis=-1)
  return jax.nn.softmax(logits, axis=-1)
