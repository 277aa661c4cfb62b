"""Partitioners: every example to exactly one client, minimums, seeds, figures."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedjax_dx.core import _partition as part


def assert_exact_cover(parts, n):
  joined = np.concatenate(parts)
  assert len(joined) == n
  assert np.array_equal(np.sort(joined), np.arange(n))


sizes = st.integers(20, 400)
clients = st.integers(1, 12)
seeds = st.integers(0, 2**31 - 1)


@settings(max_examples=40, deadline=None)
@given(n=sizes, k=clients, seed=seeds)
def test_iid(n, k, seed):
  parts = part.iid(n, k, seed)
  assert_exact_cover(parts, n)
  lengths = [len(p) for p in parts]
  assert max(lengths) - min(lengths) <= 1
  assert all(np.array_equal(a, b) for a, b in zip(parts, part.iid(n, k, seed)))


@settings(max_examples=40, deadline=None)
@given(n=sizes, k=clients, seed=seeds, sigma=st.floats(0, 3),
       minimum=st.integers(0, 5))
def test_quantity_skew(n, k, seed, sigma, minimum):
  if k * minimum > n:
    with pytest.raises(ValueError, match=f"cannot give each of num_clients={k}"):
      part.quantity_skew(n, k, seed, sigma=sigma, min_examples=minimum)
    return
  parts = part.quantity_skew(n, k, seed, sigma=sigma, min_examples=minimum)
  assert_exact_cover(parts, n)
  assert min(len(p) for p in parts) >= minimum


@settings(max_examples=40, deadline=None)
@given(n=sizes, k=st.integers(1, 8), seed=seeds, alpha=st.floats(0.05, 100),
       num_classes=st.integers(2, 6))
def test_dirichlet(n, k, seed, alpha, num_classes):
  labels = np.random.default_rng(seed).integers(0, num_classes, n)
  try:
    parts = part.dirichlet(labels, k, alpha, seed, min_examples=1)
  except ValueError as e:  # allowed only with a clear reason
    assert "fewer than min_examples" in str(e)
    return
  assert_exact_cover(parts, n)
  assert min(len(p) for p in parts) >= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
  labels = np.repeat(np.arange(4), 500)

  def mean_max_share(alpha):
    counts = part.label_counts(labels, part.dirichlet(labels, 10, alpha, 0), 4)
    return np.mean(counts.max(1) / counts.sum(1))

  assert mean_max_share(0.1) > mean_max_share(1.0) > mean_max_share(100.0)
  assert mean_max_share(100.0) < 0.35  # near IID: about 1/4


@settings(max_examples=40, deadline=None)
@given(n=st.integers(60, 400), k=st.integers(2, 10), seed=seeds,
       num_classes=st.integers(2, 6), per_client=st.integers(1, 3))
def test_pathological(n, k, seed, num_classes, per_client):
  labels = np.arange(n) % num_classes
  per_client = min(per_client, num_classes)
  if k * per_client < num_classes:
    with pytest.raises(ValueError, match="cannot cover all"):
      part.pathological(labels, k, per_client, seed)
    return
  parts = part.pathological(labels, k, per_client, seed)
  assert_exact_cover(parts, n)
  for p in parts:
    assert len(np.unique(labels[p])) == per_client


def test_natural_and_minimum_errors():
  groups = np.array([0, 0, 1, 2, 2, 2])
  assert [p.tolist() for p in part.natural(groups)] == [[0, 1], [2], [3, 4, 5]]
  with pytest.raises(ValueError, match=r"groups \[1\] hold fewer than min_examples=2"):
    part.natural(groups, min_examples=2)
  with pytest.raises(ValueError, match=r"cannot give each of num_clients=10 clients "
                                       r"min_examples=5 examples: only 30"):
    part.iid(30, 10, 0, min_examples=5)
  with pytest.raises(ValueError, match=r"alpha must be > 0"):
    part.dirichlet(np.zeros(10, int), 2, 0.0, 0)
  labels = np.array([0] * 50 + [1] * 2)
  with pytest.raises(ValueError, match=r"Dirichlet\(alpha=0.01\) over 20 clients"):
    part.dirichlet(labels, 20, 0.01, 0, min_examples=2, max_tries=20)


def test_label_count_figure(tmp_path):
  labels = np.random.default_rng(0).integers(0, 3, 300)
  parts = part.dirichlet(labels, 6, 0.5, 0)
  counts = part.label_counts(labels, parts, 3)
  assert counts.sum() == 300 and counts.shape == (6, 3)
  path = part.plot_label_counts(counts, str(tmp_path / "labels.png"),
                                title="Dirichlet(0.5)", class_names=["a", "b", "c"])
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
