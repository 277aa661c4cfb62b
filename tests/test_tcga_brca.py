"""Fed-TCGA-BRCA: FLamby's files and counts, the TFDS builder (local files and an
md5-checked download from a local server), and a survival study end to end."""

import hashlib
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from fedjax_dx.datasets import _tcga_brca as tb
from tests.test_heart_disease import serve

# FLamby's Fed-TCGA-BRCA table: patients per region, train and test.
TRAIN = [248, 156, 164, 129, 129, 40]
TEST = [63, 40, 42, 33, 33, 11]


def _served(tcga_dir, root):
  """FLamby's repository layout under `root`, for the download from a local server."""
  for name, path in tb.PATHS.items():
    os.makedirs(os.path.dirname(root / path), exist_ok=True)
    shutil.copy(os.path.join(tcga_dir, name), root / path)


def test_files_are_flambys_and_give_its_regions(tcga_dir):
  for name in tb.FILES:
    with open(os.path.join(tcga_dir, name), "rb") as f:
      assert hashlib.md5(f.read()).hexdigest() == tb.MD5[name]
  regions = tb.process(tb.read_local(tcga_dir))
  assert [len(r.train_times) for r in regions] == TRAIN
  assert [len(r.test_times) for r in regions] == TEST
  # FLamby's FedTcgaBrca(center=k, train=...): columns 1..39, then E and T, brca.csv's
  # order; patients absent from the split file are left out.
  table = pd.read_csv(os.path.join(tcga_dir, "brca.csv"))
  split = pd.read_csv(os.path.join(tcga_dir, "train_test_split.csv"))
  for k in (0, 5):
    for fold, arrays in (("train", regions[k][:3]), ("test", regions[k][3:])):
      pids = split[split["fold2"] == f"{fold}_{k}"]["pid"]
      rows = table[table["pid"].isin(pids)]
      np.testing.assert_array_equal(arrays[0], rows.iloc[:, 1:40].to_numpy(np.float32))
      np.testing.assert_array_equal(arrays[1], rows["E"].to_numpy(np.int32))
      np.testing.assert_array_equal(arrays[2], rows["T"].to_numpy(np.float32))


def test_builder_reads_local_files_and_an_md5_checked_download(tcga_dir, tmp_path):
  import fedjax_dx as fdx
  import fedjax_dx.datasets as ds
  local = ds.tcga_brca(raw_dir=tcga_dir, data_dir=str(tmp_path / "local"))
  assert local.train.labels.shape == (6, 248, 2)
  np.testing.assert_array_equal(np.asarray(local.train.num_examples), TRAIN)
  np.testing.assert_array_equal(np.asarray(local.test.num_examples), TEST)
  regions = tb.process(tb.read_local(tcga_dir))
  xs, ys = fdx.unstack_clients(local.test)
  for k, r in enumerate(regions):
    np.testing.assert_array_equal(xs[k], r.test_features)
    np.testing.assert_array_equal(ys[k], np.stack([r.test_events, r.test_times], 1))
  served = tmp_path / "served"
  _served(tcga_dir, served)
  with serve(str(served)) as url:
    downloaded = ds.tcga_brca(source="download", url=url,
                              data_dir=str(tmp_path / "downloaded"))
  np.testing.assert_array_equal(np.asarray(downloaded.train.labels),
                                np.asarray(local.train.labels))
  (served / tb.PATHS["brca.csv"]).write_bytes(b"pid,E,T\n")
  with serve(str(served)) as url:
    with pytest.raises(ds.TcgaBrcaError, match=re.escape(
        f"checksum mismatch for {url}{tb.PATHS['brca.csv']}: expected md5 "
        f"{tb.MD5['brca.csv']}")):
      ds.tcga_brca(source="download", url=url, data_dir=str(tmp_path / "bad"))
  with pytest.raises(ds.TcgaBrcaError, match=r"missing brca.csv, train_test_split.csv"):
    tb.read_local(str(tmp_path))


def test_a_survival_study_scores_c_index_on_each_region(tcga_dir, tmp_path):
  """configs/flamby_tcga.py, shortened: every row carries a C-index in [0, 1] and no
  classification metric; the table names the regions; cox is refused on a
  classification data set and a classifier on survival data, by name."""
  from configs import flamby_tcga, heart_disease
  from fedjax_dx import study
  from tests.test_study import PROGRAMS
  config = flamby_tcga.get_config()
  config.methods, config.num_seeds, config.rounds, config.local_steps = (
      "centralized,fedavg", 2, 2, 5)
  config.fast_compile = False  # the shared program cache's setting
  config.per_method.centralized.rounds = 2
  config.dataset.raw_dir = tcga_dir
  config.dataset.data_dir = str(tmp_path / "data")
  paths = study.run_study(config, str(tmp_path / "study"), quiet=True, programs=PROGRAMS)
  metrics = pd.read_json(paths["metrics"], lines=True, dtype={"client": str})
  test = metrics[metrics["split"] == "test"]
  assert test["c_index"].between(0, 1).all() and test["accuracy"].isna().all()
  assert set(test["client_name"]) == {f"region {k}" for k in range(6)} | {"pooled"}
  assert (test[test["client"] == "pooled"]["num_examples"] == sum(TEST)).all()
  table = (tmp_path / "study" / "summary_table.md").read_text()
  assert "Final test c_index" in table and "| region 5 | pooled |" in table
  for dataset, model, message in [
      ("heart_disease", "cox", "config.model.name = 'cox': expected a classifier"),
      ("tcga_brca", "logistic_regression",
       "config.model.name = 'logistic_regression': expected cox for a survival")]:
    bad = (heart_disease if dataset == "heart_disease" else flamby_tcga).get_config()
    bad.model.name = model
    with pytest.raises(study.StudyError, match=re.escape(message)):
      study.run_study(bad, str(tmp_path / "bad"), quiet=True)
