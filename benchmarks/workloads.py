"""The benchmark workloads shared by `throughput.py` and `scale.py`.

Synthetic binary data with 13 float32 features, C clients with 64 examples each; plain
SGD lr 0.05, batch 16, one local epoch (4 steps), FedAvg weighted by sample count.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import fedjax_dx as fdx

EXAMPLES_PER_CLIENT = 64
NUM_FEATURES = 13
BATCH = 16
LEARNING_RATE = 0.05
LOCAL_STEPS = -(-EXAMPLES_PER_CLIENT // BATCH)  # one local epoch

def workload(name: str) -> tuple[fdx.Model, float]:
  """The model and its FLOPs per client update (forward + backward, 64 examples)."""
  if name == "W1":
    model = fdx.logistic_regression()
    weights = NUM_FEATURES * 1
  elif name == "W2":
    model = fdx.mlp(hidden=(64, 64), num_classes=2, output="softmax")
    weights = NUM_FEATURES * 64 + 64 * 64 + 64 * 2
  else:
    raise ValueError(f"--workloads: unknown workload {name!r}, expected W1 or W2")
  return model, 6.0 * weights * EXAMPLES_PER_CLIENT


def make_data(num_clients: int, seed: int = 0) -> fdx.ClientData:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_clients, EXAMPLES_PER_CLIENT, NUM_FEATURES)).astype(np.float32)
  w = rng.normal(size=NUM_FEATURES).astype(np.float32)
  y = (x @ w + rng.normal(size=x.shape[:2]) > 0).astype(np.int32)
  return fdx.ClientData(
      features=jnp.asarray(x), labels=jnp.asarray(y),
      mask=jnp.ones(y.shape, bool),
      num_examples=jnp.full((num_clients,), EXAMPLES_PER_CLIENT, jnp.int32))




def make_image_data(num_clients: int, seed: int = 0) -> fdx.ClientData:
  """The CNN workload's data: 64 random 28x28 single-channel images per client."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_clients, EXAMPLES_PER_CLIENT, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 2, size=x.shape[:2]).astype(np.int32)
  return fdx.ClientData(features=jnp.asarray(x), labels=jnp.asarray(y),
                        mask=jnp.ones(y.shape, bool),
                        num_examples=jnp.full((num_clients,), EXAMPLES_PER_CLIENT,
                                              jnp.int32))
