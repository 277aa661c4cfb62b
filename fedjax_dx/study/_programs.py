"""Compiled programs: one per compile key (`_fields.COMPILE_FIELDS`), lowered lazily.

Equal keys share a program, so a sweep over traced hyperparameters (learning rates, seeds,
noise) compiles once; a field that changes a program's shape or branches is in the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any

import jax
import jax.extend.core  # pylint: disable=unused-import (`_fill_on_host` reads jaxprs)
import jax.numpy as jnp
import numpy as np

from fedjax_dx.core import _data
from fedjax_dx.core import _metrics
from fedjax_dx.core import _prng
from fedjax_dx.core import _scale
from fedjax_dx.core import _sharding
from fedjax_dx.privacy import _membership
from fedjax_dx.study import _fields
from fedjax_dx.study import _store
from fedjax_dx.study._build import (build_method, build_model, dataset_errors,
                                    load_data, pooled_normalized)
from fedjax_dx.study._schema import StudyError
from fedjax_dx.study._storage import to_plain


def enable_compilation_cache(directory: str, programs: bool = True) -> None:
  """Turns on JAX's persistent compilation cache in `directory` for every program
  (even fast compiles: a study compiles many small ones) and, with `programs`, the
  program store in `directory/programs` (`_store`: a rerun of a study loads its
  compiled programs instead of tracing, lowering and compiling them again)."""
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _store.enable(os.path.join(directory, "programs") if programs else None)


# Everything that decides a compiled program; points that agree share one compile.
_COMPILE_FIELDS = _fields.COMPILE_FIELDS


class _LazyExecutable:
  """A program: loaded from the program store, or lowered and compiled (and then kept
  in the store under `store_key`); either on a worker thread ahead of its first use,
  or on demand.

  Args:
    lower: `() -> jax.stages.Lowered`, called on the calling thread (tracing stays
      on the thread that set JAX's thread-local configuration).
    keep_alive: the objects the in-process cache key names by id().
    store_key: its program store key (None: not stored).
    options: XLA compiler options.
  """

  def __init__(self, lower, keep_alive, store_key: str | None = None, options=None):
    self._lower = lower
    self.options = options
    self.lowered, self.executable, self.future = None, None, None
    self.compile_s = 0.0
    self.loaded = False  # True: from the program store, neither traced nor compiled
    self.store_key = store_key
    self._keep_alive = keep_alive

  def lower(self) -> "_LazyExecutable":
    if self.lowered is None and self.executable is None:
      self.lowered = self._lower()
    return self

  def compile(self):
    if self.future is not None:
      self.future.result()  # loaded or compiled (or busy) on a worker thread
    return self._compile_now()

  def _load(self) -> None:
    compiled = _store.load(self.store_key)
    if compiled is not None:
      self.executable, self.loaded = compiled, True

  def _compile_now(self):
    options = self.options
    if self.executable is None:
      self.lower()  # a stored program that could not be loaded
      start = time.perf_counter()
      if self.store_key is None:
        self.executable = self.lowered.compile(options)
      else:  # compiled by XLA (not read from JAX's cache), then stored
        self.executable, storable = _store.compile_fresh(self.lowered, options)
        if storable:
          _store.save(self.store_key, self.executable, _store.fingerprint(self.lowered))
      self.compile_s = time.perf_counter() - start
      self.lowered = None
    return self

  def __call__(self, *args):
    self.compile()
    if not self.loaded:
      return self.executable(*args)
    try:
      return self.executable(*args)
    except (jax.errors.JaxRuntimeError, TypeError) as e:
      # A stored program that cannot run here (XLA could not serialize it whole, or
      # it does not take these arguments): forget it and compile the program again.
      logging.warning("a stored program could not run (%s: %s); compiling it again",
                      type(e).__name__, str(e).splitlines()[0][:300])
      _store.forget(self.store_key)
      self.executable, self.loaded, self.store_key = None, False, None
      return self.compile().executable(*args)


class _StoredJit:
  """`jax.jit(fn)` whose compiled programs (one per argument signature) come from the
  program store when it holds them (`ProgramCache.lazy`), compiled with XLA
  `options`."""

  def __init__(self, cache: "ProgramCache", identity, fn, keep_alive, options=None):
    self.cache, self.identity, self.fn = cache, identity, fn
    self._keep_alive, self.options = keep_alive, options
    self.programs: dict[str, _LazyExecutable] = {}

  def __call__(self, *args):
    return self._program(args, ahead=False)(*args)

  def prepare(self, *args) -> _LazyExecutable:
    """Lowers the program for arguments like `args` (shapes, dtypes, shardings) now
    and loads or compiles it on a worker thread, so that a later call with such
    arguments finds it ready instead of compiling it on the calling thread. Returns
    it (callable with such arguments)."""
    return self._program(args, ahead=True)

  def _program(self, args, ahead: bool) -> _LazyExecutable:
    signature = json.dumps(_store.describe_arguments(args))
    if signature not in self.programs:
      self.programs[signature] = self.cache.lazy(
          self.identity, lambda: _prng.lower(jax.jit(self.fn), args, self.options),
          args,
          self._keep_alive, options=self.options, ahead=ahead)
    return self.programs[signature]


class _Bootstrap:
  """The patient bootstrap as two programs: the resamples' draws (PRNG, integer
  arithmetic: compiled with `draw_options`, a fraction of the compile at full
  optimisation, the same draws) and the metrics of the resampled sets."""

  def __init__(self, draws: _StoredJit, metrics: _StoredJit, stacked: bool,
               num_resamples: int):
    self.draws = draws  # (keys [S], outputs, mask) -> draws [S, (M,) ...]
    self.metrics = metrics  # (draws, outputs, labels, mask) -> {metric: ...}
    self.stacked, self.num_resamples = stacked, num_resamples

  def __call__(self, keys, outputs, labels, mask):
    return self.metrics(self.draws(keys, outputs, mask), outputs, labels, mask)

  def prepare(self, keys, outputs, labels, mask) -> None:
    """`_StoredJit.prepare` of both programs for arguments like these (`outputs` may
    be a `jax.ShapeDtypeStruct`: `ProgramCache.test_outputs_like`)."""
    # Shapes, not arrays: no zeros to make and move (on the device that holds `keys`).
    like = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                     sharding=keys.sharding)
    outputs = like(outputs.shape, outputs.dtype)
    self.draws.prepare(keys, outputs, mask)
    # The draws' shapes (`_metrics.bootstrap_site_draws` per seed and model), without
    # tracing the draws program a second time.
    lead = (keys.shape[0],) + ((outputs.shape[1],) if self.stacked else ())
    (c, n), r = mask.shape, self.num_resamples
    index = jax.dtypes.canonicalize_dtype(jnp.int_)
    draws = (like(lead + (c, r, n), index), like(lead + (r, c * n), index))
    self.metrics.prepare(draws, outputs, labels, mask)


def _stacked_on_models_axis(per_model: list):
  """Results of one model of every seed at a time (`[S, ...]` trees, host arrays),
  stacked as a stacked program's: `[S, M, ...]`."""
  return jax.tree.map(lambda *models: np.stack(models, axis=1), *per_model)


class _OneModelAtATimeBootstrap:
  """The bootstrap of stacked models (`[S, M, ...]` outputs) by the one-model
  programs (`one`, a `_Bootstrap` of `[S, ...]` outputs), model m of every seed at a
  time: model m resamples with `fold_in(key, m)`, as the stacked program does (the
  same draws). `config.fast_compile_metrics`: one bootstrap program to trace and
  compile instead of two."""

  def __init__(self, one: _Bootstrap):
    self.one = one

  def __call__(self, keys, outputs, labels, mask):
    outputs = jax.device_get(outputs)  # sliced on the host: no slicing program
    found = jax.device_get([
        self.one(_fold_in_each(keys, m), jnp.asarray(outputs[:, m]), labels, mask)
        for m in range(outputs.shape[1])])
    return _stacked_on_models_axis(found)

  def prepare(self, keys, outputs, labels, mask) -> None:
    """`_Bootstrap.prepare` of the one-model programs for outputs like one model's."""
    self.one.prepare(keys, jax.ShapeDtypeStruct(outputs.shape[:1] + outputs.shape[2:],
                                                outputs.dtype), labels, mask)


# `fold_in(keys[s], m)` of every seed's key (`_OneModelAtATimeBootstrap`)
_fold_in_each = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))


class _OneModelAtATimeEvaluator:
  """The evaluator of stacked models (`[S, M, ...]`, local training's model per
  client) as the global evaluator `one` (of `[S, ...]` models), model m of every seed
  at a time (`config.fast_compile_metrics`). Called as the stacked program is, with
  its results' shapes (`[S, M, ...]`, host arrays).

  No stacked program to trace and compile, and the local models' round-0
  evaluation is the other methods' (the same initial models, the same program:
  `ProgramCache.initial_evaluation`), so every method's round-0 rows agree to the
  bit. Measured (cold, CPU-s of the whole run, 3 alternated runs): flamby_heart
  25.2 -> 20.1, the default study 27.3 -> 24.5, flamby_tcga 23.6 -> 22.5; a warm
  flamby_tcga 5.50 -> 4.79 s. Against the stacked program, counts and C-indexes are
  the same and a float sum (loss, Brier, ECE, PR-AUC) may differ in its last bits,
  as XLA orders its additions for another shape: at most 5e-7 in the default study,
  4e-6 relative in flamby_tcga's Cox losses of 1,800-patient sets; rarely a
  probability's last bit flips a tie in an AUC (one row of the default study's
  3,150, by 3e-5)."""

  def __init__(self, one):
    self.one = one

  @property
  def loaded(self) -> bool:  # as the global evaluator's: from the program store
    return self.one.loaded

  def __call__(self, models, train, test, each=None):
    models = jax.device_get(models)  # sliced on the host: no slicing program
    each = each or (lambda one, one_models: one(one_models, train, test))
    found = jax.device_get([
        each(self.one, jax.tree.map(lambda x, m=m: jax.device_put(x[:, m]), models))
        for m in range(jax.tree.leaves(models)[0].shape[1])])
    return _stacked_on_models_axis(found)


class _AttackApart:
  """The membership audit as two programs (`ProgramCache.attack` with
  `config.fast_compile_metrics`): `losses` computes the per-example losses of the
  models and of their starting models (`_membership.attack_losses`) at full
  optimisation, `scores` the attack's AUCs and true-positive rates from them
  (`_membership.attack_from_losses`) at level 0. Called and prepared as the
  one-program audit is: `(models, starts, train, test) -> {score: [S]}`."""

  def __init__(self, losses: _StoredJit, scores: _StoredJit):
    self.losses, self.scores = losses, scores

  def __call__(self, models, starts, train, test):
    return self.scores(self.losses(models, starts, train, test), train, test)

  def prepare(self, models, starts, train, test) -> None:
    self.losses.prepare(models, starts, train, test)
    like = jax.eval_shape(self.losses.fn, models, starts, train, test)
    self.scores.prepare(like, train, test)


class _SurvivalEvaluator:
  """A Cox model's evaluator as two programs: `main` evaluates everything but the
  C-index (`_metrics.evaluate_before_c_index`) with the study's options, `c_index`
  counts it from main's risk scores (`_metrics.c_index_of`) at backend level 1:
  counting (comparisons, integers and one division) gives the same numbers at any
  optimisation, and at level 0 it was half of a FLamby TCGA evaluation's time.
  Called as the one-program evaluator is: `(models, train, test) -> [train
  metrics, test metrics, test outputs]`, the same numbers.

  `c_index` takes one seeds axis of models' scores (host arrays): stacked models
  (`[S, M, ...]`) are counted one model index at a time, so the global and the
  stacked evaluators of a data set share one program."""

  def __init__(self, main: _LazyExecutable, c_index: _StoredJit, stacked: bool):
    self.main = main  # (models, train, test) -> [(train metrics, scores), (test ..), outputs]
    self.c_index = c_index  # (train scores, test scores, train, test) -> [train, test]
    self.stacked = stacked

  def __call__(self, models, train, test):
    (train_metrics, train_scores), (test_metrics, test_scores), outputs = self.main(
        models, train, test)
    train_scores, test_scores = jax.device_get((train_scores, test_scores))
    if self.stacked:  # [S, M, C, N]: model m of every seed at a time
      found = jax.device_get([self.c_index(train_scores[:, m], test_scores[:, m], train,
                                           test) for m in range(train_scores.shape[1])])
      found = _stacked_on_models_axis(found)
    else:
      found = jax.device_get(self.c_index(train_scores, test_scores, train, test))
    for metrics, c_index in zip((train_metrics, test_metrics), found):
      metrics["clients"]["c_index"] = c_index["clients"]
      metrics["pooled"]["c_index"] = c_index["pooled"]
    return [train_metrics, test_metrics, outputs]


class _MetricsApartEvaluator:
  """A classification model's evaluator as two programs (`config.fast_compile_metrics`):
  `outputs` computes each split's class probabilities and per-example losses
  (`_metrics.classification_outputs`: the model's arithmetic) with the study's
  options, `metrics` counts the metrics from them (`_metrics.metrics_of_outputs`:
  sorts, counts and sums) at backend level 0 (`metrics_options`). Called as the
  one-program evaluator is: `(models, train, test) -> [train metrics, test metrics,
  test outputs]`.

  Counted metrics (accuracy, AUC, sensitivity, specificity, F1, counts) are the
  one program's exactly; a float sum (loss, Brier score, ECE, PR-AUC) may differ in
  its last bit, as XLA orders and fuses its additions differently at another level.
  Measured on the default study: `metrics.jsonl` identical (3,150 rows), while its
  evaluators compiled in 1.5 CPU-s of metrics instead of 5.2 each."""

  def __init__(self, outputs: _LazyExecutable, metrics: _LazyExecutable):
    self.outputs = outputs  # (models, train, test) -> [(probs, losses) of train, test]
    self.metrics = metrics  # (train (probs, losses), test (..), train, test) -> [2 x metrics]

  @property
  def loaded(self) -> bool:  # as `_LazyExecutable`'s: both from the program store
    return self.outputs.loaded and self.metrics.loaded

  def __call__(self, models, train, test):
    train_outputs, test_outputs = self.outputs(models, train, test)
    return [*self.metrics(train_outputs, test_outputs, train, test), test_outputs[0]]


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
    self.c_indexes = {}  # id(model) -> (model, its `_SurvivalEvaluator` C-index program)
    self.counter = None  # `_MetricsApartEvaluator`'s metrics program (`metric_counter`)
    self.runs, self.params, self.chunks, self.attacks = {}, {}, {}, {}
    self.pool, self.reported, self.sharded = None, set(), {}
    # (id(evaluator), id(train), id(test), digest of the models) -> (evaluator, train,
    # test, its result): `initial_evaluation`'s, shared by the methods of a study
    self.initial_evaluations, self.lock = {}, threading.Lock()
    self.pooled = {}  # dataset key -> FLamby's pooled-normalized sets (or None)
    self.bootstraps = {}  # (survival, stacked, resamples) -> the jitted bootstrap
    self.output_shapes = {}  # model and shapes -> (model, its test outputs' shape)
    self.keys = {}  # seeds -> their PRNG keys (`seed_keys`, `bootstrap_keys`)
    # id(model or algorithm) -> (it, the key it was built by): a program's identity in
    # the program store (objects not built here have none and are not stored)
    self.identities: dict[int, tuple[Any, Any]] = {}

  def identity(self, built) -> Any:
    """The key `built` (a model or algorithm of this cache) was built by, or None."""
    found = self.identities.get(id(built))
    return found[1] if found is not None and found[0] is built else None

  def family(self, built) -> str | None:
    """`config.model.name` of `built` (a model or algorithm of this cache), or None:
    read from the key it was built by."""
    identity = self.identity(built)
    if identity is not None and identity[0] == "algorithm":
      identity = identity[1]
    return None if identity is None else json.loads(identity[1])["name"]

  def options_for(self, built, full_optimisation: bool = False) -> dict[str, Any] | None:
    """XLA options of a program of `built` (a model or algorithm): the cache's
    (`compiler_options`), or XLA's defaults with `full_optimisation` (the membership
    audit, whatever `fast_compile`), with `emitter_options` of its model family."""
    options = {} if full_optimisation else dict(self.options or {})
    options.update(emitter_options(self.family(built)) or {})
    return options or None

  def lazy(self, identity, lower, args, keep_alive, options, ahead: bool = True
           ) -> _LazyExecutable:
    """The program `lower()` lowers for `args`: loaded from the program store when it
    holds one for `identity` (None: never stored), the XLA `options` and these
    arguments; else lowered now and compiled (and then stored). With `ahead`, the
    loading or compiling runs on a worker thread (XLA releases the GIL, so it
    overlaps the tracing of the next program)."""
    store_key = None
    if identity is not None and _store.directory() is not None:
      store_key = _store.key(identity, repr(sorted((options or {}).items())),
                             _store.describe_arguments(args))
    task = _LazyExecutable(lower, keep_alive, store_key, options)
    if store_key is not None and _store.holds(store_key):
      if ahead:
        self._submit(task, task._load)
      else:
        task._load()
    else:
      task.lower()
      if ahead:
        self.compile_soon(task)
    return task

  def model(self, config, num_classes):
    key = (json.dumps(config.model.to_dict(), sort_keys=True), num_classes)
    if key not in self.models:
      self.models[key] = build_model(config, num_classes)
      self.identities[id(self.models[key])] = (self.models[key], ("model",) + key)
    return self.models[key]

  def algorithm(self, config, method, model, canaries_from: int | None = None):
    key = (method, json.dumps({f: to_plain(config[f]) for f in _COMPILE_FIELDS},
                              sort_keys=True), model.num_classes, canaries_from)
    if key not in self.algorithms:
      self.algorithms[key] = build_method(config, method, model, canaries_from)
      if self.identity(model) is not None:
        self.identities[id(self.algorithms[key])] = (
            self.algorithms[key], ("algorithm", self.identity(model)) + key)
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

  def seed_keys(self, seeds) -> tuple[jax.Array, jax.Array]:
    """Each seed's keys for its initial model and for its training state, `([S],
    [S])`: `jax.random.split(PRNGKey(seed))`, made once per study (every method
    starts from them), in one program (`_integer_program`)."""
    seeds = tuple(int(s) for s in seeds)
    if seeds not in self.keys:
      def split():
        keys = jax.vmap(jax.random.split)(jnp.stack([jax.random.PRNGKey(s)
                                                     for s in seeds]))
        return keys[:, 0], keys[:, 1]
      self.keys[seeds] = _integer_program(split)
    return self.keys[seeds]

  def bootstrap_keys(self, seeds, key: int) -> jax.Array:
    """Each seed's patient-bootstrap key `[S]`: `fold_in(PRNGKey(key), seed)`, made
    once per study, in one program (`_integer_program`)."""
    found = ("bootstrap", key, tuple(int(s) for s in seeds))
    if found not in self.keys:
      self.keys[found] = _integer_program(lambda: jnp.stack([
          jax.random.fold_in(jax.random.PRNGKey(key), seed) for seed in found[2]]))
    return self.keys[found]

  def initial_states(self, algorithm, params, train, keys):
    """`algorithm.init` of each seed's initial model `params` `[S, ...]` and state key
    `keys` `[S]` on `train` (vmapped over seeds), the same state whichever way:

    - an init that only passes values through and broadcasts fill values (every
      built-in strategy's: zeros, the server optimizer's fill, the keys) is computed
      with NumPy (`_fill_on_host`), no compile: a compile on this thread waits for the
      worker threads' (the default study's 6 inits: 2.1 s on this thread compiled at
      XLA's defaults, 0.05 s with NumPy);
    - another (the privacy audit's canary directions) compiles at XLA's defaults."""
    traced = jax.jit(jax.vmap(lambda p, k: algorithm.init(p, train, k))).trace(params,
                                                                                 keys)
    on_host = _fill_on_host(traced.jaxpr, (params, keys))
    if on_host is not None:
      return jax.tree.unflatten(jax.tree.structure(traced.out_info), on_host)
    return traced.lower().compile()(params, keys)

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
      identity, options = self.identity(algorithm), self.options_for(algorithm)
      self.runs[key] = self.lazy(
          identity and ("rounds", identity),
          lambda: _prng.lower(
              jax.jit(jax.vmap(algorithm.run.rounds, in_axes=(0, None, 0))),
              (states, train, participation), options),
          (states, train, participation), algorithm, options)
    return self.runs[key]

  def evaluator(self, model, kind: str, algorithm, models, data,
                fast_metrics: bool = False, pooled_only: bool = False):
    """Evaluates a seeds axis of models on the train and test splits in one call:
    `[train metrics, test metrics, test outputs]`, the outputs per test example
    (`_metrics.outputs`: class probabilities, or a Cox model's risk score) for the
    predictions file.

    `pooled_only` (FLamby's pooled-normalized sets, one client each, of which a row
    reports the pooled metrics alone): a global or stacked classification model's
    evaluator returns `[train metrics, test metrics]` with only their "pooled" part
    (`_metrics.evaluate_pooled`), half the program. Not with `fast_metrics`' split
    (its pooled sets keep the whole evaluator).

    kind "global" and "stacked" take the (stacked) parameters only, so every method
    with the same model and seed count shares one compiled evaluator; "personalized"
    takes the state (fine-tuning needs it). The program is lowered now and compiled on
    a worker thread (`compile_soon`). With `fast_metrics` (`config.fast_compile_metrics`)
    a classification model's metrics may be counted in a program of their own
    (`_MetricsApartEvaluator`), and stacked models are evaluated by the global
    evaluator one model at a time (`_OneModelAtATimeEvaluator`).
    """
    shapes = (str(jax.tree.structure(models)),
              str([(x.shape, str(x.dtype)) for x in jax.tree.leaves((models, data))]))
    if kind == "stacked" and fast_metrics:
      key = ("one_model_at_a_time", id(model), *shapes, pooled_only)
      if key not in self.evaluators:
        # One model of each seed, through the host (a device slice would compile).
        one = jax.tree.map(lambda x: jax.device_put(np.asarray(x)[:, 0]), models)
        self.evaluators[key] = _OneModelAtATimeEvaluator(self.evaluator(
            model, "global", algorithm, one, data, fast_metrics, pooled_only))
      return self.evaluators[key]
    apart = fast_metrics and self._metrics_apart(model, data)
    pooled_only = (pooled_only and not apart and model.output != "cox"
                   and kind in ("global", "stacked"))
    key = (id(model), kind, id(algorithm) if kind == "personalized" else None,
           data.train.features.is_fully_addressable, *shapes, fast_metrics, pooled_only)
    if key not in self.evaluators and apart:
      self.evaluators[key] = self._metrics_apart_evaluator(model, kind, algorithm,
                                                           models, data)
    if key not in self.evaluators and pooled_only:
      self.evaluators[key] = self._pooled_evaluator(model, kind, models, data)
    if key not in self.evaluators:
      apply_all = jax.vmap(model.apply, in_axes=(None, 0))  # [C, N, out]
      # A Cox model's C-index may come from a program of its own (`_c_index_apart`):
      # this one then returns each split's metrics without it, with the risk scores.
      apart = self._c_index_apart(model, kind, data)
      evaluate = _metrics.evaluate_before_c_index if apart else _metrics.evaluate
      evaluate_stacked = (_metrics.evaluate_stacked_before_c_index if apart
                          else _metrics.evaluate_stacked)
      if kind == "global":
        fn = lambda params, train, test: [
            *(evaluate(model, params, d) for d in (train, test)),
            _test_outputs(model, params, test.features)]
      elif kind == "stacked":
        fn = lambda params, train, test: [
            *(evaluate_stacked(model, params, d) for d in (train, test)),
            _metrics.outputs(model, jax.vmap(apply_all, in_axes=(0, None))(
                params, test.features))]
      else:
        def fn(state, train, test):
          personal = algorithm.personalize(state, train)
          return [*(_metrics.evaluate_personalized(model, personal, d)
                    for d in (train, test)),
                  _metrics.outputs(model, jax.vmap(model.apply)(personal,
                                                                test.features))]
      identity = self._evaluator_identity(model, kind, algorithm)
      options = self.options_for(model)
      program = self.lazy(
          identity and ("evaluator_before_c_index" if apart else "evaluator", kind,
                        identity, key[3]),
          lambda: _prng.lower(jax.jit(jax.vmap(fn, in_axes=(0, None, None))),
                              (models, data.train, data.test), options),
          (models, data.train, data.test), (model, algorithm), options)
      self.evaluators[key] = (_SurvivalEvaluator(
          program, self._c_index(model, models, data), stacked=kind == "stacked")
                              if apart else program)
    return self.evaluators[key]

  def _pooled_evaluator(self, model, kind: str, models, data) -> _LazyExecutable:
    """`evaluator`'s `pooled_only` program: `[train metrics, test metrics]`, each
    `{"pooled": {metric: [S]}}` (stacked: `[S, M]`)."""
    if kind == "global":
      fn = lambda params, train, test: [_metrics.evaluate_pooled(model, params, d)
                                        for d in (train, test)]
    else:
      fn = lambda params, train, test: [jax.vmap(
          lambda p: _metrics.evaluate_pooled(model, p, d))(params)
                                        for d in (train, test)]
    identity = self.identity(model)
    options = self.options_for(model)
    args = (models, data.train, data.test)
    return self.lazy(identity and ("evaluator_pooled", kind, identity),
                     lambda: _prng.lower(jax.jit(jax.vmap(fn, in_axes=(0, None, None))),
                                         args, options),
                     args, (model,), options)

  def _evaluator_identity(self, model, kind: str, algorithm):
    """An evaluator's identity in the program store: its model's, and for kind
    "personalized" its algorithm's too (fine-tuning is part of it); None if either has
    none."""
    identity = self.identity(model)
    if kind == "personalized":
      identity = identity and self.identity(algorithm)
    return identity

  def _metrics_apart(self, model, data=None) -> bool:
    """Whether `config.fast_compile_metrics` splits a model's evaluators
    (`_MetricsApartEvaluator`) and audit (`_AttackApart`): a classification model's,
    on CPU, where the study's programs compile at full optimisation (at
    `fast_compile` one program at level 0 is all there is to gain), on `data` held by
    this process (the audit's caller checks that)."""
    return (model.output != "cox" and jax.default_backend() == "cpu"
            and not _prng.below_full_optimisation(self.options)
            and (data is None or data.train.features.is_fully_addressable))

  def _metrics_apart_evaluator(self, model, kind: str, algorithm, models, data
                               ) -> _MetricsApartEvaluator:
    """`evaluator`'s `_MetricsApartEvaluator`: the outputs program of this model, kind
    and shapes (lowered now, compiled on a worker thread) and the metrics program of
    their shapes (`metric_counter`)."""
    def split_outputs(logits, split):  # (probs [C, N, K], losses [C, N])
      return _metrics.classification_outputs(model, logits, split.labels)

    apply_all = jax.vmap(model.apply, in_axes=(None, 0))  # [C, N, out]
    if kind == "global":  # (stacked models: `_OneModelAtATimeEvaluator` of this one)
      fn = lambda params, train, test: [split_outputs(apply_all(params, d.features), d)
                                        for d in (train, test)]
    else:
      def fn(state, train, test):
        personal = algorithm.personalize(state, train)
        return [split_outputs(jax.vmap(model.apply)(personal, d.features), d)
                for d in (train, test)]
    fn = jax.vmap(fn, in_axes=(0, None, None))
    args = (models, data.train, data.test)
    identity = self._evaluator_identity(model, kind, algorithm)
    options = self.options_for(model)
    outputs = self.lazy(identity and ("evaluator_outputs", kind, identity),
                        lambda: _prng.lower(jax.jit(fn), args, options), args,
                        (model, algorithm), options)
    train_like, test_like = jax.eval_shape(fn, *args)
    counter = self.metric_counter().prepare(train_like, test_like, data.train,
                                            data.test)
    return _MetricsApartEvaluator(outputs, counter)

  def metric_counter(self) -> _StoredJit:
    """The metrics of a seeds axis of each split's `_metrics.classification_outputs`:
    `(train outputs, test outputs, train, test) -> [train metrics, test metrics]`
    (`_metrics.metrics_of_outputs`), compiled with `metrics_options` (one program per
    shapes, whatever the model)."""
    if self.counter is None:
      both = lambda train_outputs, test_outputs, train, test: [
          _metrics.metrics_of_outputs(*train_outputs, train),
          _metrics.metrics_of_outputs(*test_outputs, test)]
      self.counter = _StoredJit(self, ("evaluator_metrics", False),
                                jax.vmap(both, in_axes=(0, 0, None, None)), None,
                                metrics_options())
    return self.counter

  def _c_index_apart(self, model, kind: str, data) -> bool:
    """Whether a Cox model's evaluator computes its C-index in a program of its own
    (`_SurvivalEvaluator`): on CPU at backend optimisation level 0
    (`config.fast_compile`), for global and stacked models, in one process."""
    return (model.output == "cox" and kind in ("global", "stacked")
            and (self.options or {}).get("xla_backend_optimization_level") == 0
            and jax.default_backend() == "cpu"
            and data.train.features.is_fully_addressable)

  def _c_index(self, model, models, data) -> _StoredJit:
    """`_SurvivalEvaluator`'s C-index program of `model`: one for its global and
    stacked evaluators (one seeds axis of models per call), compiled at backend
    level 1 (the same counts as at any level, 6 times faster than at level 0), and
    prepared for `data`'s shapes."""
    if id(model) not in self.c_indexes:
      self.c_indexes[id(model)] = (model, _StoredJit(
          self, self.identity(model) and ("c_index", self.identity(model)),
          jax.vmap(lambda train_scores, test_scores, train, test: [
              _metrics.c_index_of(train_scores, train),
              _metrics.c_index_of(test_scores, test)], in_axes=(0, 0, None, None)),
          None, {**(draw_options() or {}), **(emitter_options(BOOTSTRAP) or {})}))
    c_index = self.c_indexes[id(model)][1]
    seeds = jax.tree.leaves(models)[0].shape[0]
    like = lambda split: jax.ShapeDtypeStruct(  # host arrays: `_SurvivalEvaluator`
        (seeds,) + split.mask.shape, jax.dtypes.canonicalize_dtype(jnp.float32))
    c_index.prepare(like(data.train), like(data.test), data.train, data.test)
    return c_index

  def initial_evaluation(self, evaluator, models, train, test):
    """`evaluator(models, train, test)` of a method's models before training, once per
    value of those models: the methods of a study start from the same initial models
    (`initial_params`), so all the global methods' round-0 evaluations are one (the
    same program on the same values: the same numbers). Measured: 7 of
    configs/flamby_tcga.py's 16 global evaluations, 0.1 s of CPU each at O0."""
    if isinstance(evaluator, _OneModelAtATimeEvaluator):  # model by model
      return evaluator(models, train, test, each=lambda one, one_models:
                       self.initial_evaluation(one, one_models, train, test))
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(models)):
      value = np.ascontiguousarray(leaf)
      digest.update(repr((value.shape, value.dtype.str)).encode() + value.tobytes())
    key = (id(evaluator), id(train), id(test), digest.hexdigest())
    with self.lock:
      found = self.initial_evaluations.get(key)
    if found is None:
      found = (evaluator, train, test, evaluator(models, train, test))
      with self.lock:
        if len(self.initial_evaluations) >= 64:  # a cache kept across many studies
          self.initial_evaluations.clear()
        self.initial_evaluations[key] = found
    return found[3]

  def test_outputs_like(self, model, params, test_features, num_models: int = 0
                        ) -> jax.ShapeDtypeStruct:
    """The shape and dtype (`jax.ShapeDtypeStruct`) of the evaluators' test outputs
    (`_metrics.outputs`) of a seeds axis of models `params` (`[S, ...]`: one model per
    seed), `[S, C, N, K]`, or with `num_models` models per seed `[S, num_models, C, N,
    K]`: what the bootstrap is prepared for (`bootstrapper`)."""
    key = (id(model), str([(x.shape, str(x.dtype)) for x in jax.tree.leaves(
        (params, test_features))]))
    if key not in self.output_shapes:
      self.output_shapes[key] = (model, jax.eval_shape(jax.vmap(
          lambda p: _test_outputs(model, p, test_features)), params))
    found = self.output_shapes[key][1]
    shape = found.shape[:1] + ((num_models,) if num_models else ()) + found.shape[1:]
    return jax.ShapeDtypeStruct(shape, found.dtype)

  def bootstrapper(self, survival: bool, stacked: bool, num_resamples: int,
                   fast: bool = False) -> "_Bootstrap":
    """`(keys [S], outputs [S, (M,) C, N, K], labels, mask) -> {metric: [S, (M,) R,
    C + 1]}`: `_metrics.bootstrap_sites` of every seed's (and model's) outputs; with
    `fast` (`config.fast_compile_metrics`), compiled with `bootstrap_options`, and
    stacked classification models by the one-model programs
    (`_OneModelAtATimeBootstrap`)."""
    key = (survival, stacked, num_resamples, fast)
    if stacked and fast and not survival:
      return _OneModelAtATimeBootstrap(self.bootstrapper(survival, False, num_resamples,
                                                         fast))
    if key not in self.bootstraps:
      def draws(k, o, mask):  # outputs `o` only for the number of models
        if stacked:  # model m resamples with fold_in(key, m)
          return jax.vmap(lambda i: _metrics.bootstrap_site_draws(
              jax.random.fold_in(k, i), mask, num_resamples))(jnp.arange(o.shape[0]))
        return _metrics.bootstrap_site_draws(k, mask, num_resamples)
      metrics = lambda d, o, y, m: _metrics.bootstrap_sites(
          None, o, y, m, survival=survival, num_resamples=num_resamples, draws=d)
      if stacked:
        metrics = jax.vmap(metrics, in_axes=(0, 0, None, None))
      self.bootstraps[key] = _Bootstrap(
          _StoredJit(self, ("bootstrap_draws", stacked, num_resamples),
                     jax.vmap(draws, in_axes=(0, 0, None)), None, draw_options()),
          _StoredJit(self, ("bootstrap",) + key,
                     jax.vmap(metrics, in_axes=(0, 0, None, None)), None,
                     bootstrap_options(survival) if fast
                     else emitter_options(BOOTSTRAP)),
          stacked, num_resamples)
    return self.bootstraps[key]

  def compile_soon(self, task) -> None:
    """Compiles `task` (a `_LazyExecutable`) on a worker thread, so XLA
    compiles (which release the GIL) overlap the tracing of the next method."""
    self._submit(task, task._compile_now)

  def _submit(self, task, work) -> None:
    """Runs `work` (loading or compiling `task`) on a worker thread."""
    import concurrent.futures  # pylint: disable=g-import-not-at-top
    if self.pool is None:
      self.pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
    if task.future is None:
      task.future = self.pool.submit(work)

  def close(self):
    if self.pool is not None:
      self.pool.shutdown()
      self.pool = None

  def attack(self, model, fast_metrics: bool = False):
    """The membership-inference audit of a seeds axis of global models (jitted), at
    full optimisation whatever `fast_compile`. With `fast_metrics`
    (`config.fast_compile_metrics`), where `_metrics_apart` holds for the model, in two
    programs (`_AttackApart`): the per-example losses at full optimisation, the
    attack's scores from them at level 0 (`metrics_options`)."""
    key = (id(model), bool(fast_metrics))
    if key not in self.attacks:
      identity = self.identity(model)
      options = self.options_for(model, full_optimisation=True)
      if fast_metrics and self._metrics_apart(model, None):
        attack = _AttackApart(
            _StoredJit(self, identity and ("attack_losses", identity), jax.vmap(
                lambda params, start, train, test: _membership.attack_losses(
                    model, params, train, test, reference_params=start),
                in_axes=(0, 0, None, None)), model, options),
            _StoredJit(self, ("attack_scores", model.num_classes), jax.vmap(
                lambda losses, train, test: _membership.attack_from_losses(
                    losses, train, test, model.num_classes),
                in_axes=(0, None, None)), None, metrics_options()))
      else:
        attack = _StoredJit(
            self, identity and ("attack", identity), jax.vmap(
                lambda params, start, train, test: _membership.membership_inference(
                    model, params, train, test, reference_params=start),
                in_axes=(0, 0, None, None)), model, options)
      self.attacks[key] = (model, attack)
    return self.attacks[key][1]

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


def _fill_on_host(closed_jaxpr, args) -> list[jax.Array] | None:
  """The outputs of `closed_jaxpr` on `args`, computed with NumPy and put on the
  device, where it only passes its inputs through and broadcasts values (zeros, a
  fill value: what the built-in strategies' inits are); else None.

  No XLA compile at all: a compile on the main thread waits for the worker threads'
  compiles (XLA:CPU compiles on a shared pool), measured 0.1 - 1.2 s for each
  strategy's init of the default study while the previous strategy's programs
  compiled."""
  jaxpr = closed_jaxpr.jaxpr
  leaves = jax.tree.leaves(args)
  avals = [v.aval for v in (*jaxpr.invars, *jaxpr.outvars)]
  if (len(leaves) != len(jaxpr.invars)
      or any(getattr(a, "weak_type", True) or not isinstance(a.dtype, np.dtype)
             for a in avals)
      or any(e.primitive.name != "broadcast_in_dim" or e.params.get("sharding")
             for e in jaxpr.eqns)):
    return None
  env = {}
  for var, value in zip(jaxpr.constvars, closed_jaxpr.consts):
    env[var] = np.asarray(value)
  for var, value in zip(jaxpr.invars, jax.device_get(leaves)):
    env[var] = np.asarray(value)
  read = lambda v: (np.asarray(v.val, v.aval.dtype)
                    if isinstance(v, jax.extend.core.Literal) else env[v])
  for eqn in jaxpr.eqns:
    operand = read(eqn.invars[0])
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    expanded = operand.reshape([operand.shape[dims.index(d)] if d in dims else 1
                                for d in range(len(shape))])
    env[eqn.outvars[0]] = np.broadcast_to(expanded, shape).astype(
        eqn.outvars[0].aval.dtype)
  return [jax.device_put(np.array(read(v), v.aval.dtype)) for v in jaxpr.outvars]


def _integer_program(fn):
  """`fn()` (PRNG keys from Python ints: integer arithmetic only, the same values at
  any XLA optimisation) as one program compiled with `draw_options`, not op by op at
  XLA's defaults."""
  return jax.jit(fn).trace().lower().compile(draw_options())()


def _test_outputs(model, params, features) -> jax.Array:
  """One model's outputs (`_metrics.outputs`) on every client's examples: `[C, N, K]`
  (the global evaluator's, and the shape the bootstrap is prepared for)."""
  return _metrics.outputs(model, jax.vmap(model.apply, in_axes=(None, 0))(params,
                                                                        features))


# Programs whose numbers XLA:CPU's LLVM IR fusion emitters reproduce bit for bit (the
# MLIR emitters are XLA's default): those of dense and Cox models, and the bootstrap
# of any model's outputs. Measured: `metrics.jsonl` of the default, test, own-data,
# privacy-heart, FedProx and FLamby heart / TCGA configs identical either way, and
# the default study's cold run 17 - 20% shorter (its warm run the same). Not a CNN:
# a pneumoniamnist CNN's Adam training moved.
LLVM_IR_EMITTER_FAMILIES = ("logistic_regression", "mlp", "cox")
BOOTSTRAP = "bootstrap"
_LLVM_IR_EMITTERS = {"xla_cpu_use_fusion_emitters": False}  # XLA:CPU only


def emitter_options(family: str | None) -> dict[str, Any] | None:
  """The XLA:CPU emitter option of a program of a model `family` (`config.model.name`,
  or `BOOTSTRAP`): the LLVM IR emitters where they give the same numbers
  (`LLVM_IR_EMITTER_FAMILIES`), else XLA's default (None; also on GPU)."""
  if jax.default_backend() == "cpu" and family in (*LLVM_IR_EMITTER_FAMILIES,
                                                   BOOTSTRAP):
    return dict(_LLVM_IR_EMITTERS)
  return None


def metrics_options() -> dict[str, Any] | None:
  """XLA options of `_MetricsApartEvaluator`'s metrics program and `_AttackApart`'s
  scores: backend optimisation level 0 with the LLVM IR emitters on CPU (the default
  study's evaluator metrics: 1.5 CPU-s of compile instead of 4.8, each call 9 ms
  instead of 3)."""
  if jax.default_backend() == "cpu":
    return {"xla_backend_optimization_level": 0, **_LLVM_IR_EMITTERS}
  return None


def bootstrap_options(survival: bool) -> dict[str, Any] | None:
  """XLA options of the bootstrap's metrics program (`_metrics.bootstrap_sites` of
  given draws) with `config.fast_compile_metrics`: for a classification model's
  outputs, backend optimisation level 1 on CPU (the default study's bootstrap: 1.3 s
  of compile instead of 2.1, and as fast to run; level 0 compiled in 0.5 s and ran 8
  times slower); a Cox model's (C-indexes of resamples) at full optimisation. With
  `emitter_options(BOOTSTRAP)`. As with `metrics_options`, a float sum may differ
  in its last bit from full optimisation's (not on the default study)."""
  options = dict(emitter_options(BOOTSTRAP) or {})
  if (jax.default_backend() == "cpu" and not survival
      and not _prng.below_full_optimisation(options)):  # XLA_FLAGS: level 0 or 1
    options["xla_backend_optimization_level"] = 1
  return options or None


def draw_options() -> dict[str, Any] | None:
  """XLA options of the bootstrap's draws (`_metrics.bootstrap_site_draws`): backend
  optimisation level 1 on CPU. The program is integer arithmetic only (the PRNG), so
  every level gives the same draws; level 1 compiles it in a tenth of the time of the
  default level (measured: 0.7 against 3.6 s for the default study's local models)
  and runs it about as fast."""
  if jax.default_backend() == "cpu":
    return {"xla_backend_optimization_level": 1}
  return None


def compiler_options(config) -> dict[str, Any] | None:
  """XLA options of a study's training and evaluation programs before
  `ProgramCache.options_for` adds its model family's (`config.fast_compile`: backend
  optimisation level 0 and, on CPU, the LLVM IR emitters for every model: several
  times faster compiles and slower steps; worth it where compile time dominates, as
  with logistic regression on 4 hospitals)."""
  if not config.fast_compile:
    return None
  options = {"xla_backend_optimization_level": 0}
  if jax.default_backend() == "cpu":  # XLA:CPU's MLIR fusion emitters compile slowly
    options.update(_LLVM_IR_EMITTERS)
  return options
