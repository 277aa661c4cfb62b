"""The study's vocabulary: methods, data sets, metrics, the error type, and config access.

A study is a config (+ sweep) -> every method x point x seed -> tidy results on disk.

Results (big_vision style, read back by pandas):
  DIR/config.json     the full config, package versions, device
  DIR/points/*.jsonl  one file per finished (point, seed): the resume record
  DIR/metrics.jsonl   one JSON object per evaluation (method, seed, round, client, split)
  DIR/summary.csv     final metrics mean/std over seeds, rounds/bytes to a target
Every file is written to a temporary name, then renamed: a crash never leaves half a file.
"""

from __future__ import annotations

from typing import Callable

from fedjax_dx.study import _fields


BASELINES = ("centralized", "local")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi",
              "fedadagrad", "fedavg_ft", "cyclic")


# Fields a config may set per method (config.per_method.<method>.<field>).
METHOD_FIELDS = _fields.METHOD_FIELDS
DATASETS = ("heart_disease", "medmnist", "synthetic", "fedprox", "tcga_brca",
            "csv", "parquet", "tfds", "loader")
SURVIVAL_DATASETS = ("tcga_brca",)  # labels (event, time); model.name = cox


def is_survival(dataset) -> bool | None:
  """Whether `config.dataset` gives survival data (None: a loader's, known once loaded)."""
  if dataset.name == "loader":
    return None
  if dataset.name in ("csv", "parquet"):
    return bool(dataset.get("event_column") or dataset.get("time_column"))
  return dataset.name in SURVIVAL_DATASETS
MIA_COLUMNS = ("mia_auc", "mia_tpr_at_1pct_fpr", "mia_class_balanced_auc",
               "mia_calibrated_auc", "mia_calibrated_tpr_at_1pct_fpr")
METRICS = ("loss", "accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity",
           "f1", "pr_auc", "brier", "ece", "c_index")


class StudyError(ValueError):
  """A config, sweep or workdir that cannot run; the message names the field."""


def split_list(text: str, field: str, cast: Callable) -> list:
  try:
    return [cast(v.strip()) for v in str(text).split(",") if v.strip()]
  except ValueError as e:
    raise StudyError(f"config.{field}: cannot read {text!r}: {e}") from e


def get_field(config, field: str):
  node = config
  for part in field.split("."):
    if part not in node:
      raise StudyError(f"config.{field}: no such field (sweep or override)")
    node = node[part]
  return node


def set_field(config, field: str, value) -> None:
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def caster(config, field: str) -> Callable:
  if field in ("sweep", "name", "num_seeds", "seed"):
    raise StudyError(f"config.sweep: {field!r} cannot be swept (use num_seeds for seeds)")
  current = get_field(config, field)
  if isinstance(current, bool):
    def cast(v):
      try:
        return {"true": True, "false": False}[v.lower()]
      except KeyError:
        raise ValueError(f"{field} takes true/false") from None
    return cast
  if isinstance(current, (int, float, str)):
    return type(current)
  raise StudyError(f"config.sweep: {field!r} is not a single value and cannot be swept")


# Strategies whose rounds can run in memory-bounded client chunks (`client_chunk`).
CHUNKABLE = ("fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi",
              "fedadagrad", "fedavg_ft")


# Strategies whose clients are sharded over every process's devices (multi-host).
SHARDED = tuple(m for m in STRATEGIES if m != "cyclic")


# Strategies that can run with client-level DP (`config.dp`).
PRIVATE = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
            "fedavg_ft")
# Strategies whose aggregation takes the guard (SCAFFOLD: its control variates too).
GUARDED = PRIVATE + ("scaffold",)
