"""Compiled programs: one per compile key (`_fields.COMPILE_FIELDS`), lowered lazily.

Equal keys share a program, so a sweep over traced hyperparameters (learning rates, seeds,
noise) compiles once; a field that changes a program's shape or branches is in the key.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dx.core import _data
from fedjax_dx.core import _metrics
from fedjax_dx.core import _scale
from fedjax_dx.core import _sharding
from fedjax_dx.privacy import _membership
from fedjax_dx.study import _fields
from fedjax_dx.study._build import (build_method, build_model, dataset_errors,
                                    load_data, pooled_normalized)
from fedjax_dx.study._schema import StudyError
from fedjax_dx.study._storage import to_plain


def enable_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` for every program
  (even fast compiles: a study compiles many small ones)."""
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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


UNSET_OPTIONS = "unset"  # a ProgramCache that takes its first study's options


class ProgramCache:
  """Algorithms, compiled programs, evaluators and data sets shared across the seeds
  and points of a study, and across studies given the same cache (`run_study`'s
  `programs`). Programs are keyed by everything that decides them (method, compile
  fields, model, shapes), so a cached program computes exactly what a new one would.

  Args:
    options: XLA compiler options of every program (`compiler_options(config)`);
      by default those of the first study that uses the cache.
  """

  def __init__(self, options: dict[str, Any] | None | str = UNSET_OPTIONS):
    self.options = options  # XLA compiler options of every program
    self.algorithms, self.evaluators, self.data, self.models = {}, {}, {}, {}
    self.runs, self.params, self.chunks, self.attacks = {}, {}, {}, {}
    self.pool, self.reported, self.sharded = None, set(), {}
    self.pooled = {}  # dataset key -> FLamby's pooled-normalized sets (or None)
    self.bootstraps = {}  # (survival, stacked, resamples) -> the jitted bootstrap

  def model(self, config, num_classes):
    key = (json.dumps(config.model.to_dict(), sort_keys=True), num_classes)
    if key not in self.models:
      self.models[key] = build_model(config, num_classes)
    return self.models[key]

  def algorithm(self, config, method, model, canaries_from: int | None = None):
    key = (method, json.dumps({f: to_plain(config[f]) for f in _COMPILE_FIELDS},
                              sort_keys=True), model.num_classes, canaries_from)
    if key not in self.algorithms:
      self.algorithms[key] = build_method(config, method, model, canaries_from)
    return self.algorithms[key]

  def fit_client_chunk(self, config, method, model, params, train, rng):
    """`config` with `client_chunk` resolved: -1 becomes the largest group that fits in
    device memory (0 when all clients fit at once); a given size is checked to fit."""
    key = (method, json.dumps({f: to_plain(config[f]) for f in _COMPILE_FIELDS},
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
    """Evaluates a seeds axis of models on the train and test splits in one call:
    `[train metrics, test metrics, test outputs]`, the outputs per test example
    (`_metrics.outputs`: class probabilities, or a Cox model's risk score) for the
    predictions file.

    kind "global" and "stacked" take the (stacked) parameters only, so every method
    with the same model and seed count shares one compiled evaluator; "personalized"
    takes the state (fine-tuning needs it). The program is lowered now and compiled on
    a worker thread (`compile_soon`).
    """
    key = (id(model), kind, id(algorithm) if kind == "personalized" else None,
           data.train.features.is_fully_addressable, str(jax.tree.structure(models)),
           str([(x.shape, str(x.dtype)) for x in jax.tree.leaves((models, data))]))
    if key not in self.evaluators:
      apply_all = jax.vmap(model.apply, in_axes=(None, 0))  # [C, N, out]
      if kind == "global":
        fn = lambda params, train, test: [
            *(_metrics.evaluate(model, params, d) for d in (train, test)),
            _metrics.outputs(model, apply_all(params, test.features))]
      elif kind == "stacked":
        fn = lambda params, train, test: [
            *(_metrics.evaluate_stacked(model, params, d) for d in (train, test)),
            _metrics.outputs(model, jax.vmap(apply_all, in_axes=(0, None))(
                params, test.features))]
      else:
        def fn(state, train, test):
          personal = algorithm.personalize(state, train)
          return [*(_metrics.evaluate_personalized(model, personal, d)
                    for d in (train, test)),
                  _metrics.outputs(model, jax.vmap(model.apply)(personal,
                                                                test.features))]
      lowered = jax.jit(jax.vmap(fn, in_axes=(0, None, None))).lower(
          models, data.train, data.test)
      self.evaluators[key] = _LazyExecutable(lowered, (model, algorithm))
      self.compile_soon(self.evaluators[key], self.options)
    return self.evaluators[key]

  def bootstrapper(self, survival: bool, stacked: bool, num_resamples: int):
    """`(keys [S], outputs [S, (M,) C, N, K], labels, mask) -> {metric: [S, (M,) R,
    C + 1]}`: `_metrics.bootstrap_sites` of every seed's (and model's) outputs."""
    key = (survival, stacked, num_resamples)
    if key not in self.bootstraps:
      sites = lambda k, o, y, m: _metrics.bootstrap_sites(
          k, o, y, m, survival=survival, num_resamples=num_resamples)
      if stacked:  # model m resamples with fold_in(key, m) too
        inner = lambda k, o, y, m: jax.vmap(
            lambda i, om: sites(jax.random.fold_in(k, i), om, y, m))(
                jnp.arange(o.shape[0]), o)
      else:
        inner = sites
      self.bootstraps[key] = jax.jit(jax.vmap(inner, in_axes=(0, 0, None, None)))
    return self.bootstraps[key]

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
          lambda params, start, train, test: _membership.membership_inference(
              model, params, train, test, reference_params=start),
          in_axes=(0, 0, None, None))))
    return self.attacks[id(model)][1]

  def global_data(self, data):
    """`data` as global arrays over every device of every process (multi-host)."""
    if id(data) not in self.sharded:
      self.sharded[id(data)] = (data, _sharding.shard_clients(data))
    return self.sharded[id(data)][1]

  def pooled_sets(self, config):
    """FLamby's pooled-normalized pooled train and test sets (`_build.pooled_normalized`),
    or None."""
    key = json.dumps(to_plain(config.dataset), sort_keys=True)
    if key not in self.pooled:
      self.pooled[key] = dataset_errors(config, pooled_normalized)
    return self.pooled[key]

  def dataset(self, config):
    key = (json.dumps(to_plain(config.dataset), sort_keys=True)
           + f"|{config.seed}|{config.bucket_clients}")
    if key not in self.data:
      loaded = load_data(config)
      if config.bucket_clients:  # pad to a power of two: one compile per bucket
        data = loaded.data
        bucket = _scale.client_bucket(data.num_clients)
        loaded = loaded._replace(data=_data.FederatedData(
            train=_data.pad_clients(data.train, bucket),
            test=_data.pad_clients(data.test, bucket), num_classes=data.num_classes))
      self.data[key] = loaded
    return self.data[key]


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
