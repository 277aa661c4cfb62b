"""Small synthetic hospitals for demos, tests and the throughput benchmark."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dx._data import FederatedData, stack_clients


def synthetic_binary(seed: int, num_clients: int, examples_per_client, *,
                     num_features: int = 13, test_fraction: float = 0.25,
                     heterogeneity: float = 0.5) -> FederatedData:
  """Binary diagnosis data from a shared logistic model with per-hospital shifts.

  Hospital `k` draws features `x ~ N(mu_k, I)` with `mu_k ~ N(0, heterogeneity^2)`, and
  labels from `sigmoid(x . w + b_k)` with a shared `w` and a site offset `b_k ~
  N(0, heterogeneity^2)` (prevalence differs across sites).

  Args:
    seed: integer seed.
    num_clients: number of hospitals.
    examples_per_client: an int, or one int per client (total, before the test split).
    num_features: features per patient.
    test_fraction: share of each hospital's examples held out for testing.
    heterogeneity: scale of the per-site covariate and prevalence shifts.

  Returns:
    `FederatedData` with `num_classes=2`.
  """
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  sizes = np.broadcast_to(np.asarray(examples_per_client), (num_clients,)).astype(int)
  if np.any(sizes < 2):
    raise ValueError(
        f"examples_per_client must be >= 2 (one train, one test), got {sizes.min()}")
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
  key_w, key_sites, key_x, key_y = jax.random.split(jax.random.PRNGKey(seed), 4)
  w = jax.random.normal(key_w, (num_features,)) * 1.5 / np.sqrt(num_features)
  mu = heterogeneity * jax.random.normal(key_sites, (num_clients, num_features))
  offset = heterogeneity * jax.random.normal(jax.random.fold_in(key_sites, 1),
                                             (num_clients,))
  width = int(sizes.max())
  x = mu[:, None, :] + jax.random.normal(key_x, (num_clients, width, num_features))
  p = jax.nn.sigmoid(x @ w + offset[:, None])
  y = jax.random.bernoulli(key_y, p).astype(jnp.int32)
  x, y = np.asarray(x, np.float32), np.asarray(y)
  num_test = np.maximum(1, np.round(sizes * test_fraction).astype(int))
  num_test = np.minimum(num_test, sizes - 1)
  train = stack_clients([x[k, :sizes[k] - num_test[k]] for k in range(num_clients)],
                        [y[k, :sizes[k] - num_test[k]] for k in range(num_clients)],
                        num_classes=2, name="train")
  test = stack_clients([x[k, sizes[k] - num_test[k]:sizes[k]] for k in range(num_clients)],
                       [y[k, sizes[k] - num_test[k]:sizes[k]] for k in range(num_clients)],
                       num_classes=2, name="test")
  return FederatedData(train=train, test=test, num_classes=2)
