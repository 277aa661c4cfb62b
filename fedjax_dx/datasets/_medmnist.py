"""MedMNIST v2 28x28 2D subsets from the official npz files (md5-checked)."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import urllib.request
from typing import NamedTuple

import numpy as np

SOURCES = ("auto", "local", "download")
URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"


class Subset(NamedTuple):
  num_classes: int
  channels: int
  md5: str
  sizes: tuple[int, int, int]  # train, validation, test
  description: str


# From the MedMNIST package (medmnist/info.py, v3.0.2). chestmnist is multi-label and
# left out: the core trains single-label classifiers.
SUBSETS = {
    "pathmnist": Subset(9, 3, "a8b06965200029087d5bd730944a56c1", (89996, 10004, 7180),
                        "Colon pathology, 9 tissue types."),
    "dermamnist": Subset(7, 3, "0744692d530f8e62ec473284d019b0c7", (7007, 1003, 2005),
                         "Dermatoscope images, 7 skin lesion classes."),
    "octmnist": Subset(4, 1, "c68d92d5b585d8d81f7112f81e2d0842", (97477, 10832, 1000),
                       "Retinal OCT, 4 classes."),
    "pneumoniamnist": Subset(2, 1, "28209eda62fecd6e6a2d98b1501bb15f", (4708, 524, 624),
                             "Paediatric chest X-ray, normal vs pneumonia."),
    "retinamnist": Subset(5, 3, "bd4c0672f1bba3e3a89f0e4e876791e4", (1080, 120, 400),
                          "Fundus photographs, 5 diabetic retinopathy grades."),
    "breastmnist": Subset(2, 1, "750601b1f35ba3300ea97c75c52ff8f6", (546, 78, 156),
                          "Breast ultrasound, normal/benign vs malignant."),
    "bloodmnist": Subset(8, 3, "7053d0359d879ad8a5505303e11de1dc", (11959, 1712, 3421),
                         "Blood cell microscopy, 8 cell types."),
    "tissuemnist": Subset(8, 1, "ebe78ee8b05294063de985d821c1c34b", (165466, 23640, 47280),
                          "Kidney cortex microscopy, 8 tissue types."),
    "organamnist": Subset(11, 1, "68e3f8846a6bd62f0c9bf841c0d9eacc", (34561, 6491, 17778),
                          "Abdominal CT, axial, 11 organs."),
    "organcmnist": Subset(11, 1, "b9ceb9546e10131b32923c5bbeaea2b1", (12975, 2392, 8216),
                          "Abdominal CT, coronal, 11 organs."),
    "organsmnist": Subset(11, 1, "9ab87b696fb54e2a387ebe992d6ed5f1", (13932, 2452, 8827),
                          "Abdominal CT, sagittal, 11 organs."),
}
_SPLIT_KEYS = {"train": "train", "validation": "val", "test": "test"}


class MedMnistError(ValueError):
  """A MedMNIST file is missing, corrupted or malformed, or the subset is unknown."""


def subset_info(name: str) -> Subset:
  if name not in SUBSETS:
    hint = " (multi-label, not supported)" if name == "chestmnist" else ""
    raise MedMnistError(
        f"unknown MedMNIST subset {name!r}{hint}; expected one of {', '.join(SUBSETS)}")
  return SUBSETS[name]


def _check_md5(name: str, data: bytes, where: str) -> None:
  actual = hashlib.md5(data).hexdigest()
  expected = SUBSETS[name].md5
  if actual != expected:
    raise MedMnistError(
        f"checksum mismatch for {where}: expected md5 {expected}, got {actual}; the file "
        "is corrupted or not the official MedMNIST 28x28 file")


def _read(name: str, source: str, data_dir: str | None, url: str | None) -> bytes:
  file_name = f"{name}.npz"
  candidates = []
  if data_dir:
    candidates = [os.path.join(data_dir, file_name), os.path.join(data_dir, name, file_name)]
  if source in ("auto", "local"):
    for path in candidates:
      if os.path.isfile(path):
        with open(path, "rb") as f:
          data = f.read()
        _check_md5(name, data, path)
        return data
    if source == "local" or data_dir:
      raise MedMnistError(
          f"MedMNIST file {file_name} not found (looked in {candidates or 'no data_dir'}); "
          f"put the official {file_name} there, or ask for the download "
          f"(source='download', from {URL.format(name=name)})")
  address = (url or URL).format(name=name)
  try:
    with urllib.request.urlopen(address, timeout=60) as response:
      data = response.read()
  except OSError as e:
    raise MedMnistError(
        f"could not download {address}: {e}. Without internet, pass a data_dir holding "
        f"{file_name}") from e
  _check_md5(name, data, address)
  if data_dir:
    os.makedirs(data_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{file_name}.")
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, os.path.join(data_dir, file_name))
  return data


def load_npz(name: str, *, source: str = "auto", data_dir: str | None = None,
             url: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads one subset: `{split: (images [N, 28, 28, C] uint8, labels [N] int32)}`.

  Args:
    name: subset, e.g. "pneumoniamnist".
    source: "local" (from `data_dir`), "download", or "auto" (local when `data_dir`
      holds the file, else download).
    data_dir: directory with `<name>.npz` (or `<name>/<name>.npz`); downloads land here.
    url: a download address template with `{name}` (default: the Zenodo record).
  """
  info = subset_info(name)
  if source not in SOURCES:
    raise MedMnistError(f"source must be one of {SOURCES}, got {source!r}")
  data = _read(name, source, data_dir, url)
  with np.load(io.BytesIO(data)) as npz:
    result = {}
    for split, key in _SPLIT_KEYS.items():
      images, labels = npz[f"{key}_images"], npz[f"{key}_labels"]
      if images.ndim == 3:
        images = images[..., None]
      if images.shape[1:] != (28, 28, info.channels) or images.dtype != np.uint8:
        raise MedMnistError(
            f"{name}.npz {key}_images has shape {images.shape} dtype {images.dtype}, "
            f"expected [N, 28, 28, {info.channels}] uint8")
      labels = labels.reshape(len(labels), -1)
      if labels.shape != (len(images), 1):
        raise MedMnistError(f"{name}.npz {key}_labels has shape {labels.shape}, expected "
                            f"[{len(images)}, 1]")
      labels = labels[:, 0].astype(np.int32)
      if labels.min() < 0 or labels.max() >= info.num_classes:
        raise MedMnistError(f"{name}.npz {key}_labels outside [0, {info.num_classes - 1}]")
      result[split] = (images, labels)
  return result
