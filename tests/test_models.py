"""The batched-GEMM convolution equals XLA's convolution (alone, vmapped over clients,
and inside a FedAvg round)."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import fedjax_dx as fdx
from fedjax_dx.core import _models
from tests.test_algorithms import assert_trees_close, assert_trees_equal

RNG = jax.random.PRNGKey(3)


@pytest.mark.parametrize("shape,features,kernel", [
    ((2, 7, 9, 1), 4, (3, 3)), ((3, 6, 6, 5), 8, (3, 3)), ((1, 8, 5, 2), 3, (5, 3))])
def test_gemm_conv_equals_nn_conv(shape, features, kernel):
  x = jax.random.normal(RNG, shape)
  reference = nn.Conv(features, kernel)
  params = reference.init(RNG, x)
  gemm = _models.GemmConv(features, kernel)
  assert_trees_equal(gemm.init(RNG, x), params)  # same shapes and initial values
  np.testing.assert_allclose(gemm.apply(params, x), reference.apply(params, x),
                             atol=1e-5, rtol=1e-5)


def test_gemm_cnn_equals_the_plain_cnn_under_the_clients_axis():
  fast, plain = fdx.cnn(3, (4, 8), 16), fdx.cnn(3, (4, 8), 16, conv="xla")
  x = jax.random.normal(RNG, (3, 5, 28, 28))  # 3 clients x 5 images
  labels = jax.random.randint(RNG, (3, 5), 0, 3)
  params = fast.init(RNG, x[0, :1])
  assert_trees_equal(params, plain.init(RNG, x[0, :1]))
  # One model per client (different per client, as in local training).
  stacked = jax.vmap(lambda k: fast.init(k, x[0, :1]))(jax.random.split(RNG, 3))

  def grads(model):
    def loss(p, xs, ys):
      return fdx.per_example_loss(model, model.apply(p, xs), ys).mean()
    return jax.jit(jax.vmap(jax.value_and_grad(loss)))(stacked, x, labels)

  (fast_loss, fast_grads), (plain_loss, plain_grads) = grads(fast), grads(plain)
  np.testing.assert_allclose(fast_loss, plain_loss, rtol=1e-5)
  assert_trees_close(fast_grads, plain_grads, atol=1e-5)


def _two_cnn_rounds(seed, **cnn_options):
  """Final parameters and per-round train losses of 2 FedAvg rounds of a small CNN on
  3 clients of random images (the same data and start for every `cnn_options`)."""
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, 28, 28)).astype(np.float32) for n in (6, 4, 9)]
  ys = [rng.integers(0, 2, n) for n in (6, 4, 9)]
  data = fdx.stack_clients(xs, ys, num_classes=2)
  model = fdx.cnn(2, (4, 8), 16, **cnn_options)
  params = model.init(RNG, data.features[0, :1])
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=3, local_epochs=1)
  state, metrics = algo.run(algo.init(params, data, RNG), data, num_rounds=2)
  return state.params, np.asarray(metrics["train_loss"])


def test_fedavg_round_with_gemm_convolutions_equals_the_plain_round():
  gemm, _ = _two_cnn_rounds(0, conv="gemm")
  xla, _ = _two_cnn_rounds(0, conv="xla")
  assert_trees_close(gemm, xla, atol=1e-5)


def test_unknown_conv_is_named():
  with pytest.raises(ValueError, match=r"conv must be one of \('gemm', 'xla'\), got 'fft'"):
    fdx.cnn(conv="fft")


def test_bfloat16_cnn_computes_in_bfloat16_and_keeps_float32_parameters():
  full, mixed = fdx.cnn(2, (4, 8), 16), fdx.cnn(2, (4, 8), 16, compute_dtype="bfloat16")
  x = jax.random.normal(RNG, (6, 28, 28))
  labels = jax.random.randint(RNG, (6,), 0, 2)
  params = full.init(RNG, x[:1])
  assert_trees_equal(params, mixed.init(RNG, x[:1]))  # the same float32 parameters
  # Every matrix product takes bfloat16 operands; the logits come back in float32.
  products = [e for e in jax.make_jaxpr(mixed.apply)(params, x).eqns
              if e.primitive.name == "dot_general"]
  assert len(products) == 4
  assert all(v.aval.dtype == jax.numpy.bfloat16 for e in products for v in e.invars)
  # Compiled whole (one XLA program each) rather than op by op: the same arithmetic.
  logits = jax.jit(mixed.apply)(params, x)
  assert logits.dtype == jax.numpy.float32
  np.testing.assert_allclose(logits, jax.jit(full.apply)(params, x), atol=0.05, rtol=0.05)

  def loss(model, p):
    return fdx.per_example_loss(model, model.apply(p, x), labels).mean()
  full_grads = jax.jit(jax.grad(lambda p: loss(full, p)))(params)
  mixed_grads = jax.jit(jax.grad(lambda p: loss(mixed, p)))(params)
  cosine = lambda a, b: np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
  for a, b in zip(jax.tree.leaves(full_grads), jax.tree.leaves(mixed_grads)):
    assert b.dtype == jax.numpy.float32
    assert cosine(np.ravel(a), np.ravel(b)) > 0.9  # the first layer's, the least exact
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  full_flat, mixed_flat = flat(full_grads), flat(mixed_grads)
  assert cosine(full_flat, mixed_flat) > 0.999
  assert np.linalg.norm(mixed_flat - full_flat) < 0.05 * np.linalg.norm(full_flat)


def test_fedavg_round_in_bfloat16_follows_the_float32_round():
  full, full_loss = _two_cnn_rounds(1, compute_dtype="float32")
  mixed, mixed_loss = _two_cnn_rounds(1, compute_dtype="bfloat16")
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(mixed))
  np.testing.assert_allclose(mixed_loss, full_loss, rtol=0.03)
  assert_trees_close(mixed, full, atol=0.02)


def test_unknown_compute_dtype_is_named():
  with pytest.raises(ValueError, match=r"compute_dtype must be one of \('float32', "
                     r"'bfloat16'\), got 'float16'"):
    fdx.cnn(compute_dtype="float16")


@pytest.mark.parametrize("name,shape", [
    ("logistic_regression", (13,)), ("mlp", (13,)), ("cox", (39,)),
    ("cnn", (28, 28, 1)), ("cnn_bfloat16", (28, 28, 3))])
def test_a_models_initial_parameters_depend_on_the_examples_shape_only(name, shape):
  """A study initialises its models from a zero example of the data's shape
  (`MethodRun`, `ProgramCache.initial_params`, which is keyed by that shape): every
  model family's parameters from it equal those from a real example, bit for bit."""
  model = {"logistic_regression": lambda: _models.logistic_regression(2),
           "mlp": lambda: _models.mlp([8, 4], 3), "cox": lambda: _models.cox([6]),
           "cnn": lambda: fdx.cnn(2, (4, 8), 16),
           "cnn_bfloat16": lambda: fdx.cnn(5, (4,), 8, compute_dtype="bfloat16")}[name]()
  real = np.random.default_rng(4).normal(size=(1, *shape)).astype(np.float32) * 3 + 1
  keys = jax.random.split(RNG, 3)
  init = jax.jit(jax.vmap(model.init, in_axes=(0, None)))
  assert_trees_equal(init(keys, np.zeros_like(real)), init(keys, real))
