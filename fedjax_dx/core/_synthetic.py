"""Synthetic hospitals: controlled heterogeneity for demos, tests, benchmarks and studies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dx.core._data import FederatedData, stack_clients


def _split_train_test(x, y, sizes, num_train, num_classes):
  num_clients = len(sizes)
  num_train = np.clip(num_train, 1, sizes - 1)
  train = stack_clients([x[k, :num_train[k]] for k in range(num_clients)],
                        [y[k, :num_train[k]] for k in range(num_clients)],
                        num_classes=num_classes, name="train")
  test = stack_clients([x[k, num_train[k]:sizes[k]] for k in range(num_clients)],
                       [y[k, num_train[k]:sizes[k]] for k in range(num_clients)],
                       num_classes=num_classes, name="test")
  return FederatedData(train=train, test=test, num_classes=num_classes)


def synthetic_binary(seed: int, num_clients: int, examples_per_client=200, *,
                     num_features: int = 13, test_fraction: float = 0.25,
                     heterogeneity: float = 0.5, prevalence_skew: float | None = None,
                     covariate_shift: float | None = None, size_skew: float = 0.0,
                     label_noise: float = 0.0) -> FederatedData:
  """Binary diagnosis data from a shared logistic model, with hospital heterogeneity.

  Hospital `k` draws features `x ~ N(mu_k, I)` and labels from `sigmoid(x . w + b_k)`
  with a shared `w`. The knobs, each one number:

  * `covariate_shift` (scanner / population shift): `mu_k ~ N(0, covariate_shift^2 I)`;
  * `prevalence_skew` (disease prevalence differs by site): `b_k ~ N(0, skew^2)`;
  * `size_skew`: site sizes `examples_per_client * lognormal(0, size_skew)` (normalised
    to keep the mean), at least 2 each;
  * `label_noise`: site `k` flips each label with probability `label_noise * u_k`,
    `u_k ~ U(0, 1)` (sites differ in annotation quality).

  `heterogeneity` is the default of both shift knobs.

  Args:
    seed: integer seed.
    num_clients: number of hospitals.
    examples_per_client: an int, or one int per client (total, before the test split).
    num_features: features per patient.
    test_fraction: share of each hospital's examples held out for testing.
    heterogeneity: default scale of covariate shift and prevalence skew.
    prevalence_skew: see above.
    covariate_shift: see above.
    size_skew: see above.
    label_noise: see above, in [0, 1].

  Returns:
    `FederatedData` with `num_classes=2`.
  """
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
  for name, value in (("heterogeneity", heterogeneity), ("size_skew", size_skew),
                      ("prevalence_skew", prevalence_skew),
                      ("covariate_shift", covariate_shift)):
    if value is not None and value < 0:
      raise ValueError(f"{name} must be >= 0, got {value}")
  if not 0 <= label_noise <= 1:
    raise ValueError(f"label_noise must lie in [0, 1], got {label_noise}")
  prevalence_skew = heterogeneity if prevalence_skew is None else prevalence_skew
  covariate_shift = heterogeneity if covariate_shift is None else covariate_shift
  sizes = np.broadcast_to(np.asarray(examples_per_client), (num_clients,)).astype(float)
  key_w, key_sites, key_x, key_y, key_sizes, key_noise = jax.random.split(
      jax.random.PRNGKey(seed), 6)
  if size_skew > 0:
    factors = np.exp(size_skew * np.asarray(jax.random.normal(key_sizes, (num_clients,))))
    sizes = sizes * factors / factors.mean()
  sizes = np.maximum(2, np.round(sizes)).astype(int)
  w = jax.random.normal(key_w, (num_features,)) * 1.5 / np.sqrt(num_features)
  mu = covariate_shift * jax.random.normal(key_sites, (num_clients, num_features))
  offset = prevalence_skew * jax.random.normal(jax.random.fold_in(key_sites, 1),
                                               (num_clients,))
  width = int(sizes.max())
  x = mu[:, None, :] + jax.random.normal(key_x, (num_clients, width, num_features))
  p = jax.nn.sigmoid(x @ w + offset[:, None])
  y = jax.random.bernoulli(key_y, p)
  flip_rate = label_noise * jax.random.uniform(key_noise, (num_clients, 1))
  flips = jax.random.bernoulli(jax.random.fold_in(key_noise, 1), flip_rate, y.shape)
  y = (y ^ flips).astype(jnp.int32)
  num_test = np.maximum(1, np.round(sizes * test_fraction).astype(int))
  return _split_train_test(np.asarray(x, np.float32), np.asarray(y), sizes,
                           sizes - num_test, 2)


def fedprox_device_sizes(key: jax.Array, num_devices: int) -> np.ndarray:
  """Samples per device in FedProx's recipe: `int(lognormal(4, 2)) + 50`."""
  return np.asarray(jnp.exp(4.0 + 2.0 * jax.random.normal(key, (num_devices,)))
                    ).astype(np.int64) + 50


def synthetic_fedprox(seed: int, alpha: float, beta: float, *, num_devices: int = 30,
                      iid: bool = False, train_fraction: float = 0.9,
                      max_examples: int | None = None) -> FederatedData:
  """FedProx's Synthetic(alpha, beta) (Li et al., 2020), generated with `jax.random`.

  60 features, 10 classes. Device `k` has `int(lognormal(4, 2)) + 50` samples;
  `u_k ~ N(0, alpha)`, `W_k ~ N(u_k, 1)` (60x10), `b_k ~ N(u_k, 1)`; `B_k ~ N(0, beta)`,
  `v_k ~ N(B_k, 1)` (60); `x ~ N(v_k, Sigma)`, `Sigma_jj = j^(-1.2)`;
  `y = argmax(softmax(x W_k + b_k))`. The IID variant uses one `W, b ~ N(0, 1)` and
  `v = 0`. Each device's first `floor(0.9 n)` samples train, the rest test.

  Args:
    seed: integer seed.
    alpha: how much local models differ.
    beta: how much local data differ.
    num_devices: devices (clients).
    iid: the IID variant.
    train_fraction: share of each device's samples used for training.
    max_examples: cap on samples per device (the lognormal tail reaches ~10^5);
      None keeps the recipe exact.

  Returns:
    `FederatedData` with `num_classes=10`.
  """
  if alpha < 0 or beta < 0:
    raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  dim, num_classes = 60, 10
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  sizes = fedprox_device_sizes(keys[0], num_devices)
  if max_examples is not None:
    sizes = np.minimum(sizes, max_examples)
  u = alpha * jax.random.normal(keys[1], (num_devices,))
  big_b = beta * jax.random.normal(keys[2], (num_devices,))
  if iid:
    w = jnp.broadcast_to(jax.random.normal(keys[3], (dim, num_classes)),
                         (num_devices, dim, num_classes))
    b = jnp.broadcast_to(jax.random.normal(keys[4], (num_classes,)),
                         (num_devices, num_classes))
    v = jnp.zeros((num_devices, dim))
  else:
    w = u[:, None, None] + jax.random.normal(keys[3], (num_devices, dim, num_classes))
    b = u[:, None] + jax.random.normal(keys[4], (num_devices, num_classes))
    v = big_b[:, None] + jax.random.normal(keys[5], (num_devices, dim))
  scale = jnp.sqrt(jnp.arange(1, dim + 1, dtype=jnp.float32) ** -1.2)
  width = int(sizes.max())
  x = v[:, None, :] + scale * jax.random.normal(keys[6], (num_devices, width, dim))
  y = jnp.argmax(jnp.einsum("knd,kdc->knc", x, w) + b[:, None, :], axis=-1)
  num_train = np.floor(sizes * train_fraction).astype(int)  # as FedProx's script does
  return _split_train_test(np.asarray(x, np.float32), np.asarray(y, np.int32), sizes,
                           num_train, num_classes)
