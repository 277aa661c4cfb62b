"""MedMNIST 28x28: official split sizes through TFDS, checksums, clear errors."""

import os
import shutil

import numpy as np
import pytest

import fedjax_dx as fdx
from fedjax_dx.datasets import _medmnist

OFFICIAL = {"breastmnist": (546, 78, 156), "pneumoniamnist": (4708, 524, 624),
            "retinamnist": (1080, 120, 400)}


@pytest.mark.parametrize("subset", sorted(OFFICIAL))
def test_official_split_sizes_through_tfds(subset, medmnist_dir, tmp_path):
  import fedjax_dx.datasets as ds

  raw_dir = medmnist_dir(subset)
  arrays = ds.medmnist_arrays(subset, raw_dir=raw_dir, data_dir=str(tmp_path))
  info = _medmnist.SUBSETS[subset]
  sizes = tuple(len(arrays[s][1]) for s in ("train", "validation", "test"))
  assert sizes == OFFICIAL[subset] == info.sizes
  direct = _medmnist.load_npz(subset, data_dir=raw_dir)
  for split, (images, labels) in arrays.items():
    assert images.shape[1:] == (28, 28, info.channels) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, direct[split][0])
    np.testing.assert_array_equal(labels, direct[split][1])
    assert labels.min() >= 0 and labels.max() < info.num_classes


def test_checksum_mismatch_is_refused(medmnist_dir, tmp_path):
  corrupted = tmp_path / "breastmnist.npz"
  shutil.copy(os.path.join(medmnist_dir("breastmnist"), "breastmnist.npz"), corrupted)
  with open(corrupted, "r+b") as f:
    f.seek(1000)
    f.write(b"\x00\x01\x02")
  with pytest.raises(_medmnist.MedMnistError,
                     match=r"checksum mismatch .*expected md5 750601b1f35ba3300ea97c75c52ff8f6, "
                           r"got [0-9a-f]{32}"):
    _medmnist.load_npz("breastmnist", data_dir=str(tmp_path))


def test_unknown_subset_and_missing_file(tmp_path):
  with pytest.raises(_medmnist.MedMnistError, match=r"unknown MedMNIST subset 'mnist'"):
    _medmnist.load_npz("mnist", data_dir=str(tmp_path))
  with pytest.raises(_medmnist.MedMnistError, match=r"chestmnist.*multi-label"):
    _medmnist.subset_info("chestmnist")
  with pytest.raises(_medmnist.MedMnistError,
                     match=r"pneumoniamnist.npz not found .*source='download'"):
    _medmnist.load_npz("pneumoniamnist", source="local", data_dir=str(tmp_path))


def test_partitioned_medmnist_gives_each_client_train_and_test(medmnist_dir, tmp_path):
  import fedjax_dx.datasets as ds

  data = ds.medmnist("breastmnist", 5, partition="dirichlet", alpha=0.5, seed=1,
                     raw_dir=medmnist_dir("breastmnist"), data_dir=str(tmp_path))
  assert data.num_clients == 5 and data.num_classes == 2
  assert int(np.sum(data.train.num_examples)) == 546
  assert int(np.sum(data.test.num_examples)) == 156
  assert np.all(np.asarray(data.test.num_examples) > 0)
  assert data.train.features.shape[2:] == (28, 28, 1)
  assert float(data.train.features.max()) <= 1.0
  with pytest.raises(ValueError, match=r"partition must be one of"):
    ds.medmnist("breastmnist", 5, partition="by_scanner",
                raw_dir=medmnist_dir("breastmnist"), data_dir=str(tmp_path))


def test_cnn_takes_28x28_images():
  import jax
  import jax.numpy as jnp

  model = fdx.cnn(num_classes=5, group_norm=True)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 3)))
  assert model.apply(params, jnp.zeros((4, 28, 28, 3))).shape == (4, 5)
  names = str(jax.tree_util.tree_structure(params))
  assert "BatchNorm" not in names and "GroupNorm" in names


def test_download_from_a_local_server_checks_md5(medmnist_dir, tmp_path):
  from tests.test_heart_disease import serve

  served = tmp_path / "served"
  served.mkdir()
  shutil.copy(os.path.join(medmnist_dir("breastmnist"), "breastmnist.npz"), served)
  target = tmp_path / "downloads"
  with serve(str(served)) as url:
    arrays = _medmnist.load_npz("breastmnist", source="download", data_dir=str(target),
                                url=url + "{name}.npz")
  assert len(arrays["train"][1]) == 546
  assert (target / "breastmnist.npz").is_file()
  (served / "breastmnist.npz").write_bytes(b"not an npz")
  with serve(str(served)) as url:
    with pytest.raises(_medmnist.MedMnistError, match="checksum mismatch"):
      _medmnist.load_npz("breastmnist", source="download", data_dir=str(tmp_path / "x"),
                         url=url + "{name}.npz")
  assert not (tmp_path / "x" / "breastmnist.npz").exists()
