"""Client sampling masks."""

import numpy as np
import pytest

import fedjax_dx as fdx


def test_uniform_sampling_draws_exactly_m_clients_with_data():
  sizes = np.array([10, 0, 5, 7, 3, 0, 8])
  mask = fdx.sample_participation(0, 200, sizes, 3)
  assert mask.shape == (200, 7) and np.all(mask.sum(1) == 3)
  assert np.all(mask[:, sizes == 0] == 0)
  shares = mask.mean(0)[sizes > 0]
  np.testing.assert_allclose(shares, 3 / 5, atol=0.1)
  np.testing.assert_array_equal(mask, fdx.sample_participation(0, 200, sizes, 3))
  assert not np.array_equal(mask, fdx.sample_participation(1, 200, sizes, 3))


def test_size_sampling_favours_large_clients():
  sizes = np.array([100, 10, 10, 10, 10])
  mask = fdx.sample_participation(0, 500, sizes, 1, by="size")
  np.testing.assert_allclose(mask.mean(0), sizes / sizes.sum(), atol=0.06)


def test_sampling_more_clients_than_exist_is_refused():
  with pytest.raises(ValueError, match=r"clients_per_round=4: cannot sample more clients "
                                       r"than exist \(3 with data\)"):
    fdx.sample_participation(0, 2, [1, 0, 2, 3], 4)
  with pytest.raises(ValueError, match=r"sampling must be one of"):
    fdx.sample_participation(0, 2, [1, 2], 1, by="age")
