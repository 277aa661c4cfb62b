"""Fed-TCGA-BRCA (FLamby): survival of 1,088 breast-cancer patients in 6 regions.

The raw files are FLamby's (github.com/owkin/FLamby, `flamby/datasets/fed_tcga_brca/`):
`brca.csv` (`pid`, 39 clinical covariates, `E` event, `T` time in days) and
`train_test_split.csv` (`fold2` = `train_k` / `test_k`, k the region 0..5). They come
from a local directory (given) or FLamby's public repository at a pinned commit, each
checked against its md5. As in FLamby's `FedTcgaBrca`, covariates are used as they are
(no standardization) and examples keep `brca.csv`'s row order within each region.

Data: The Cancer Genome Atlas (TCGA-BRCA) open-access clinical data (NCI Genomic Data
Commons, https://portal.gdc.cancer.gov/; use follows the GDC data access policies, open
tier; cite TCGA: Nature 490, 61-70, 2012). Preprocessing: FLamby (MIT licence; du
Terrail et al., NeurIPS 2022 Datasets and Benchmarks).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import urllib.request
from typing import NamedTuple

import numpy as np

COMMIT = "edacf54d5211520583b0133d55ac39b6fda8324b"
URL = f"https://raw.githubusercontent.com/owkin/FLamby/{COMMIT}/"
# File name -> its path in FLamby's repository.
PATHS = {
    "brca.csv": "flamby/datasets/fed_tcga_brca/brca.csv",
    "train_test_split.csv":
        "flamby/datasets/fed_tcga_brca/dataset_creation_scripts/train_test_split.csv",
}
MD5 = {
    "brca.csv": "989df4ddec084f749d9593146d7ba92f",
    "train_test_split.csv": "e648057e47463ee7763924d779cd7f2d",
}
FILES = tuple(PATHS)
SOURCES = ("auto", "local", "download")
NUM_REGIONS = 6
NUM_FEATURES = 39
REGION_NAMES = tuple(f"region {k}" for k in range(NUM_REGIONS))


class TcgaBrcaError(ValueError):
  """The raw Fed-TCGA-BRCA files are missing, corrupted or malformed."""


class RegionArrays(NamedTuple):
  """One region's processed data."""

  train_features: np.ndarray  # [n_train, 39] float32
  train_events: np.ndarray  # [n_train] int32: 1 = death observed, 0 = censored
  train_times: np.ndarray  # [n_train] float32: days
  test_features: np.ndarray
  test_events: np.ndarray
  test_times: np.ndarray


def _check_md5(name: str, data: bytes, where: str) -> None:
  actual = hashlib.md5(data).hexdigest()
  if actual != MD5[name]:
    raise TcgaBrcaError(
        f"checksum mismatch for {where}: expected md5 {MD5[name]}, got {actual}; the "
        f"file is not FLamby's {name} (commit {COMMIT})")


def read_local(raw_dir: str) -> dict[str, bytes]:
  """The two raw files from `raw_dir` (md5-checked)."""
  missing = [n for n in FILES if not os.path.isfile(os.path.join(raw_dir, n))]
  if missing:
    raise TcgaBrcaError(
        f"Fed-TCGA-BRCA raw files not found in {raw_dir!r}: missing {', '.join(missing)} "
        f"(expected {', '.join(FILES)} from {URL}flamby/datasets/fed_tcga_brca/); put "
        "them there, or ask for the download (source='download')")
  raw = {}
  for name in FILES:
    path = os.path.join(raw_dir, name)
    with open(path, "rb") as f:
      raw[name] = f.read()
    _check_md5(name, raw[name], path)
  return raw


def download(url: str = URL, timeout: float = 60.0) -> dict[str, bytes]:
  """The two raw files from FLamby's repository (md5-checked)."""
  raw = {}
  for name, path in PATHS.items():
    address = url + path
    try:
      with urllib.request.urlopen(address, timeout=timeout) as response:
        raw[name] = response.read()
    except OSError as e:
      raise TcgaBrcaError(
          f"could not download {address}: {e}. Without internet, pass a raw directory "
          f"holding {', '.join(FILES)}") from e
    _check_md5(name, raw[name], address)
  return raw


def raw_files(source: str = "auto", raw_dir: str | None = None,
              url: str = URL) -> dict[str, bytes]:
  """`raw_dir`'s files (source "local", or "auto" with a directory), else downloaded."""
  if source not in SOURCES:
    raise TcgaBrcaError(f"source must be one of {SOURCES}, got {source!r}")
  if source == "local" or (source == "auto" and raw_dir):
    if not raw_dir:
      raise TcgaBrcaError("source='local' needs raw_dir, the directory holding "
                          f"{', '.join(FILES)}")
    return read_local(raw_dir)
  return download(url)


def _rows(name: str, data: bytes) -> list[dict[str, str]]:
  try:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
  except (UnicodeDecodeError, csv.Error) as e:
    raise TcgaBrcaError(f"{name}: not a CSV file ({e})") from e


def process(raw: dict[str, bytes]) -> list[RegionArrays]:
  """FLamby's `FedTcgaBrca(center=k, train=...)` arrays for the six regions: columns
  1..39 of `brca.csv` as covariates, `E` and `T` as the survival target, each region's
  train and test patients from `fold2`, in `brca.csv`'s order (patients missing from
  the split file are left out, as FLamby's `isin` selection leaves them)."""
  table = _rows("brca.csv", raw["brca.csv"])
  split = {r["pid"]: r["fold2"] for r in _rows("train_test_split.csv",
                                                raw["train_test_split.csv"])}
  if not table or len(table[0]) != NUM_FEATURES + 3:
    raise TcgaBrcaError(f"brca.csv: expected pid, {NUM_FEATURES} covariates, E and T "
                        f"columns, got {len(table[0]) if table else 0} columns")
  columns = list(table[0])
  if columns[0] != "pid" or columns[-2:] != ["E", "T"]:
    raise TcgaBrcaError(f"brca.csv: expected columns pid, ..., E, T, got {columns[0]}, "
                        f"..., {columns[-2]}, {columns[-1]}")
  covariates = columns[1:1 + NUM_FEATURES]
  parts = {(f, k): ([], [], []) for f in ("train", "test") for k in range(NUM_REGIONS)}
  for line, row in enumerate(table, start=2):
    fold = split.get(row["pid"])
    if fold is None:  # 8 of brca.csv's 1,096 patients: FLamby's isin() leaves them out
      continue
    which, _, region = fold.partition("_")
    try:
      x = [float(row[c]) for c in covariates]
      event, time = float(row["E"]), float(row["T"])
      key = (which, int(region))
    except ValueError as e:
      raise TcgaBrcaError(f"brca.csv, line {line}: {e}") from e
    if key not in parts or event not in (0.0, 1.0) or not np.isfinite(time) or time < 0:
      raise TcgaBrcaError(f"brca.csv, line {line}: fold {fold!r}, E {event}, T {time}: "
                          "expected train_k / test_k (k in 0..5), E 0 or 1, T >= 0")
    for target, value in zip(parts[key], (x, event, time)):
      target.append(value)

  def arrays(which, k):
    x, e, t = parts[(which, k)]
    return (np.asarray(x, np.float32).reshape(-1, NUM_FEATURES),
            np.asarray(e, np.int32), np.asarray(t, np.float32))

  return [RegionArrays(*arrays("train", k), *arrays("test", k))
          for k in range(NUM_REGIONS)]
