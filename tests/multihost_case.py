"""The run both sides of the multi-host test compute (clients made one at a time)."""

import jax
import numpy as np
import optax

import fedjax_dx as fdx

NUM_CLIENTS, MAX_EXAMPLES, NUM_FEATURES, ROUNDS, SEED = 6, 20, 5, 3, 7
SIZES = [20, 9, 14, 3, 17, 11]


def client(k):
  rng = np.random.default_rng(100 + k)
  x = rng.normal(size=(SIZES[k], NUM_FEATURES)).astype(np.float32)
  return x, (x.sum(1) + rng.normal(size=SIZES[k]) > 0).astype(np.int32)


def algorithm():
  model = fdx.mlp(hidden=(8,), num_classes=2)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, NUM_FEATURES), np.float32))
  return fdx.fedavg(model, optax.sgd(0.1), batch_size=4, local_epochs=1), params
