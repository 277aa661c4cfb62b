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
    output: "sigmoid" (binary task, one logit, binary cross-entropy), "softmax"
      (one logit per class, softmax cross-entropy) or "cox" (survival: one risk
      score, the negative Cox partial log-likelihood over each batch).
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


CONV_IMPLEMENTATIONS = ("gemm", "xla")


def image_patches(x: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
  """'SAME' patches of `x` `[B, H, W, C]` as `[B, H, W, kh * kw * C]` (order: row,
  column, channel, as a flattened `[kh, kw, C, out]` kernel expects). Shifted slices of
  the padded image: no convolution, so nothing becomes a grouped convolution under
  `vmap`."""
  kh, kw = kernel_size
  top, left = (kh - 1) // 2, (kw - 1) // 2
  height, width = x.shape[1], x.shape[2]
  padded = jnp.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
  shifted = [padded[:, i:i + height, j:j + width, :] for i in range(kh)
             for j in range(kw)]
  return jnp.concatenate(shifted, axis=-1)


class GemmConv(nn.Module):
  """A stride-1 'SAME' convolution as patches + one matrix multiply.

  Same parameters (`kernel [kh, kw, C, features]`, `bias`), initialisers and outputs as
  `nn.Conv(features, kernel_size)`, but vmapped over clients (one kernel per client)
  it lowers to a batched GEMM instead of a grouped convolution, which XLA runs far
  below the hardware's speed.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  dtype: Any = None  # computation dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    channels = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    patches = image_patches(x, self.kernel_size)
    y = patches.reshape(-1, kh * kw * channels) @ kernel.reshape(-1, self.features)
    # The bias is added in its own (float32) precision, so its gradient, a sum over
    # every position of every image, is summed in float32 too.
    y = y.astype(bias.dtype).reshape(x.shape[:3] + (self.features,)) + bias
    return y.astype(dtype)


def _average_pool_2x2(x):
  batch, height, width, channels = x.shape
  if height % 2 or width % 2:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


class _CNN(nn.Module):
  channels: Sequence[int]
  dense: int
  num_outputs: int
  group_norm: bool
  conv: str = "gemm"
  dtype: Any = jnp.float32  # activations and matrix products; parameters stay float32

  @nn.compact
  def __call__(self, x):
    if x.ndim == 3:
      x = x[..., None]
    x = x.astype(self.dtype)
    for index, width in enumerate(self.channels):
      if self.conv == "gemm":  # same parameter names as nn.Conv: interchangeable
        x = GemmConv(width, (3, 3), dtype=self.dtype, name=f"Conv_{index}")(x)
      else:
        x = nn.Conv(width, (3, 3), dtype=self.dtype)(x)
      if self.group_norm:
        x = nn.GroupNorm(num_groups=min(8, width), dtype=self.dtype)(x)
      x = _average_pool_2x2(nn.relu(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense, dtype=self.dtype)(x))
    # Logits in float32: the loss, softmax and metrics keep full precision.
    return nn.Dense(self.num_outputs, dtype=self.dtype)(x).astype(jnp.float32)


COMPUTE_DTYPES = ("float32", "bfloat16")


def cnn(num_classes: int = 2, channels: Sequence[int] = (16, 32), dense: int = 64,
        group_norm: bool = False, output: str = "softmax", conv: str = "gemm",
        compute_dtype: str = "float32") -> Model:
  """A small CNN for 28x28 images: (conv 3x3, ReLU, 2x2 average pool) per width, dense.

  No batch norm: per-client batch statistics break federated averaging; `group_norm`
  adds GroupNorm after each convolution instead.

  Args:
    conv: "gemm" (default): convolutions as patches + matrix multiply (`GemmConv`),
      fast under the clients axis; "xla": `nn.Conv` (the same function and parameters;
      vmapped over clients it becomes a slow grouped convolution).
    compute_dtype: "float32" (default) or "bfloat16": mixed precision, where the user
      allows it: activations and matrix products in bfloat16 (half the memory traffic,
      bf16 tensor cores on GPUs), parameters, gradients, optimizer state, logits and
      loss in float32.

  Example:
    >>> model = fdx.cnn(num_classes=2, channels=(32, 64), dense=128)
    >>> params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28)))
  """
  if conv not in CONV_IMPLEMENTATIONS:
    raise ValueError(f"conv must be one of {CONV_IMPLEMENTATIONS}, got {conv!r}")
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got "
                     f"{compute_dtype!r}")
  num_outputs = 1 if output == "sigmoid" else num_classes
  return from_flax(_CNN(channels=tuple(channels), dense=dense, num_outputs=num_outputs,
                        group_norm=group_norm, conv=conv,
                        dtype=jnp.dtype(compute_dtype)), num_classes, output)


def cox(hidden: Sequence[int] = ()) -> Model:
  """A Cox proportional-hazards model: a linear risk score (FLamby's Fed-TCGA-BRCA
  baseline, `nn.Linear(39, 1)`), or an MLP's with `hidden` widths. Train it on
  survival data (`stack_survival`); its loss is the negative partial log-likelihood
  with Breslow's ties, its metric the concordance index."""
  module = _MLP(hidden=tuple(hidden), num_outputs=1)
  return Model(init=lambda rng, x: module.init(rng, x)["params"],
               apply=lambda params, x: module.apply({"params": params}, x),
               num_classes=2, output="cox")


def batch_loss_sum(model: Model, logits: jax.Array, labels: jax.Array,
                   weight: jax.Array) -> jax.Array:
  """The loss of a batch summed over its real examples (`weight`), to divide by their
  count: cross-entropies, or the Cox partial likelihood's terms (not per example:
  each depends on the batch's risk sets)."""
  if model.output == "cox":
    from fedjax_dx.core import _survival  # pylint: disable=g-import-not-at-top
    return _survival.cox_loss_terms(logits[..., 0], labels[..., 0], labels[..., 1],
                                    weight).sum()
  return (per_example_loss(model, logits, labels) * weight).sum()


def per_example_loss(model: Model, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of each example: `[B]`."""
  if model.output == "cox":
    raise ValueError("a Cox model's loss is not per example (each term depends on the "
                     "batch's risk set): per-example gradients (DP-SGD) and the "
                     "membership audit do not apply to it")
  if model.output == "sigmoid":
    return optax.sigmoid_binary_cross_entropy(logits[..., 0], labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def probabilities(model: Model, logits: jax.Array) -> jax.Array:
  """Class probabilities `[B, num_classes]` from logits."""
  if model.output == "sigmoid":
    p = jax.nn.sigmoid(logits[..., 0])
    return jnp.stack([1.0 - p, p], axis=-1)
  return jax.nn.softmax(logits, axis=-1)
