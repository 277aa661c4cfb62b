"""Synthetic hospitals: FedProx's Synthetic(alpha, beta) recipe and the heterogeneity knobs."""

import jax
import numpy as np
import pytest

import fedjax_dx as fdx
from fedjax_dx.core import _synthetic


def numpy_recipe(alpha, beta, iid, num_devices, cap, rng):
  """FedProx's generate_synthetic, transcribed with NumPy (sizes capped like ours)."""
  dim, classes = 60, 10
  sizes = np.minimum(rng.lognormal(4, 2, num_devices).astype(int) + 50, cap)
  mean_w = rng.normal(0, alpha, num_devices)
  big_b = rng.normal(0, beta, num_devices)
  cov = np.arange(1, dim + 1) ** -1.2
  w_global, b_global = rng.normal(0, 1, (dim, classes)), rng.normal(0, 1, classes)
  labels = []
  for k in range(num_devices):
    mean_x = np.zeros(dim) if iid else rng.normal(big_b[k], 1, dim)
    w = w_global if iid else rng.normal(mean_w[k], 1, (dim, classes))
    b = b_global if iid else rng.normal(mean_w[k], 1, classes)
    x = mean_x + np.sqrt(cov) * rng.normal(size=(sizes[k], dim))
    labels.append(np.argmax(x @ w + b, axis=1))
  return labels


def max_class_share(labels_per_device):
  return np.mean([np.bincount(y, minlength=10).max() / len(y) for y in labels_per_device])


def device_labels(data):
  out = [fdx.unstack_clients(part)[1] for part in (data.train, data.test)]
  return [np.concatenate([a, b]) for a, b in zip(*out)]


def test_device_sizes_follow_lognormal_4_2_plus_50():
  sizes = _synthetic.fedprox_device_sizes(jax.random.PRNGKey(0), 20000)
  assert sizes.min() >= 50
  assert np.median(sizes - 50) == pytest.approx(np.exp(4), rel=0.08)
  assert np.mean(sizes - 50 > np.exp(6)) == pytest.approx(0.1587, abs=0.01)  # P(z > 1)


def test_fedprox_split_shapes_and_feature_covariance():
  data = fdx.synthetic_fedprox(0, 0.0, 0.0, iid=True, num_devices=30, max_examples=400)
  assert data.num_classes == 10 and data.train.feature_shape == (60,)
  train_n, test_n = np.asarray(data.train.num_examples), np.asarray(data.test.num_examples)
  total = train_n + test_n
  np.testing.assert_array_equal(train_n, np.floor(total * 0.9))
  sizes = np.minimum(_synthetic.fedprox_device_sizes(
      jax.random.split(jax.random.PRNGKey(0), 8)[0], 30), 400)
  np.testing.assert_array_equal(total, sizes)
  x = np.concatenate(fdx.unstack_clients(data.train)[0])
  np.testing.assert_allclose(x.var(0), np.arange(1, 61) ** -1.2, rtol=0.15)
  np.testing.assert_allclose(x.mean(0), 0, atol=0.05)


@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (1.0, 1.0)])
def test_label_skew_matches_the_numpy_recipe(alpha, beta):
  ours = []
  for seed in range(4):
    data = fdx.synthetic_fedprox(seed, alpha, beta, num_devices=50, max_examples=300)
    ours += device_labels(data)
  reference = numpy_recipe(alpha, beta, False, 200, 300, np.random.default_rng(0))
  assert max_class_share(ours) == pytest.approx(max_class_share(reference), abs=0.06)


def test_more_heterogeneity_gives_more_label_skew():
  iid = fdx.synthetic_fedprox(0, 0.0, 0.0, iid=True, num_devices=40, max_examples=300)
  skewed = fdx.synthetic_fedprox(0, 1.0, 1.0, num_devices=40, max_examples=300)
  assert max_class_share(device_labels(skewed)) > max_class_share(device_labels(iid)) + 0.1


def prevalence(data):
  return np.array([labels.mean() for labels in fdx.unstack_clients(data.train)[1]])


def test_hospital_knobs():
  flat = fdx.synthetic_binary(0, 20, 400, prevalence_skew=0.0, covariate_shift=0.0)
  skewed = fdx.synthetic_binary(0, 20, 400, prevalence_skew=2.0, covariate_shift=0.0)
  assert prevalence(skewed).std() > 2 * prevalence(flat).std()

  shifted = fdx.synthetic_binary(0, 20, 400, prevalence_skew=0.0, covariate_shift=2.0)
  site_means = lambda d: np.stack([x.mean(0) for x in fdx.unstack_clients(d.train)[0]])
  assert site_means(shifted).std(0).mean() > 1.5
  assert site_means(flat).std(0).mean() < 0.15

  sizes = lambda d: np.asarray(d.train.num_examples) + np.asarray(d.test.num_examples)
  assert np.all(sizes(flat) == 400)
  uneven = sizes(fdx.synthetic_binary(0, 20, 400, size_skew=1.0))
  assert uneven.std() > 100 and uneven.mean() == pytest.approx(400, rel=0.05)

  clean = fdx.synthetic_binary(0, 40, 400)
  noisy = fdx.synthetic_binary(0, 40, 400, label_noise=0.8)
  np.testing.assert_array_equal(np.asarray(clean.train.features),
                                np.asarray(noisy.train.features))
  flipped = np.array([np.mean(a != b) for a, b in zip(
      fdx.unstack_clients(clean.train)[1], fdx.unstack_clients(noisy.train)[1])])
  # Site k flips at rate 0.8 * u_k, u_k ~ U(0, 1): mean 0.4, sites differ.
  assert flipped.mean() == pytest.approx(0.4, abs=0.1)
  assert flipped.std() > 0.1 and flipped.max() <= 0.9
  with pytest.raises(ValueError, match=r"label_noise must lie in \[0, 1\], got 1.5"):
    fdx.synthetic_binary(0, 2, 10, label_noise=1.5)
  with pytest.raises(ValueError, match=r"alpha and beta must be >= 0"):
    fdx.synthetic_fedprox(0, -1.0, 0.0)
