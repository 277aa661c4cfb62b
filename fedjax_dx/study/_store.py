"""The program store: a study's compiled programs kept on disk across processes.

JAX's persistent compilation cache skips XLA's compile on a rerun, but every run still
traces and lowers each program (most of a warm run of a small study). The store keeps
the compiled executables themselves, keyed by everything that decides them, so a rerun
of a study loads its programs in milliseconds and runs the very same machine code.

A key is a SHA-256 of:
  * the environment: the source of every fedjax_dx module, the versions of Python,
    jax, jaxlib, flax, optax, numpy and ml_collections, the backend and its devices,
    every jax configuration value that is not about caching or logging, and XLA_FLAGS;
  * the program: what the study's in-process `ProgramCache` already keys it by (the
    method, the compile fields, the model's config; `_fields.COMPILE_FIELDS`), the XLA
    options, and the type, shape, sharding and tree structure of every argument.

Editing any fedjax_dx file, upgrading a library or changing a compile field therefore
misses, and the program is traced and compiled as without a store. What the key cannot
see is code changed at run time (a test that monkeypatches a builder), so the store is
on only where `enable_compilation_cache` turns it on (the command line's
`--compilation_cache`, default on), never from JAX's own cache settings alone.

XLA:CPU serializes an executable without its kernels when it was read from JAX's
persistent cache or when an identical module was loaded earlier in the process (the
copy loads, then fails: "Function ..._kernel not found"). So the store compiles its
programs itself with JAX's cache bypassed on the compiling thread only (`compile_fresh`),
does not store a module this process loaded, and a stored program that fails on its
first call is forgotten and compiled again (`_programs._LazyExecutable`).

Entries are written through a temporary file and a rename; one that cannot be read
(damaged, from another jaxlib) is recompiled and replaced. Like JAX's cache, entries
are pickles: keep the directory your own.

The store also remembers a few numbers a study computes on the host before it compiles
anything and that take seconds (`remembered`: DP noise calibrated to a target epsilon),
as JSON in its remembered/ folder, keyed the same way plus the versions of the
libraries that compute them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import platform
import sys
import threading
from typing import Any, Callable

import jax

_DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections")
# jax configuration values that do not change a program.
_IGNORED_CONFIG = ("cache", "log", "explain", "traceback", "timeout", "profil")

_directory: str | None = None  # set by `enable`
_environment: dict | None = None
_lock = threading.Lock()
_toggle_lock = threading.Lock()
_local = threading.local()  # .hits: JAX persistent-cache hits on this thread
_loaded_modules: set[str] = set()  # fingerprints of the modules loaded in this process


def _count_cache_hits(event: str, **_) -> None:
  if event == "/jax/compilation_cache/cache_hits":
    _local.hits = getattr(_local, "hits", 0) + 1


jax.monitoring.register_event_listener(_count_cache_hits)


def cache_hits() -> int:
  """JAX persistent-cache hits of this thread so far: an executable read from JAX's
  cache cannot be stored (XLA:CPU serializes a deserialized executable without its
  kernels: "Function ..._kernel not found" when it runs)."""
  return getattr(_local, "hits", 0)


_fresh = threading.local()  # .depth: `compile_fresh` calls running on this thread
_cache_switch_installed = False


def _bypass_on_fresh_threads(compilation_cache) -> None:
  """Makes JAX's persistent cache answer "not used" to a thread inside `compile_fresh`
  only (installed once). JAX reads and writes its cache only where
  `compilation_cache.is_cache_used` says so, a process-wide answer; switching that off
  while the store compiled made every other thread's compiles meanwhile skip the cache
  too, so a study's worker threads (or a test run's other studies) compiled programs
  that no later run found in JAX's cache."""
  global _cache_switch_installed
  with _toggle_lock:
    if _cache_switch_installed:
      return
    jax_is_cache_used = compilation_cache.is_cache_used

    def is_cache_used(backend):
      if getattr(_fresh, "depth", 0):
        return False
      return jax_is_cache_used(backend)

    compilation_cache.is_cache_used = is_cache_used
    _cache_switch_installed = True


def compile_fresh(lowered: jax.stages.Lowered, options) -> tuple[Any, bool]:
  """`lowered.compile(options)` by XLA itself, not read from JAX's persistent cache,
  and whether the result can be stored.

  XLA:CPU serializes an executable without its kernels ("Function ..._kernel not
  found" when the stored copy runs) when it was read from JAX's cache, or when an
  identical module was loaded in this process before; the store takes neither. Only
  this thread's compile skips JAX's cache: other threads compiling meanwhile read and
  write it as usual.
  """
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  if not callable(getattr(compilation_cache, "is_cache_used", None)):  # another jax
    return lowered.compile(options), False
  _bypass_on_fresh_threads(compilation_cache)
  _fresh.depth = getattr(_fresh, "depth", 0) + 1
  try:
    hits = cache_hits()
    compiled = lowered.compile(options)
    return compiled, cache_hits() == hits
  finally:
    _fresh.depth -= 1


def enable(directory_: str | None) -> None:
  """Keeps compiled programs in `directory_` (None: off)."""
  global _directory
  _directory = directory_


def directory() -> str | None:
  """Where programs are kept, or None when the store is off (and in multi-process
  runs, whose programs span other processes' devices)."""
  if _directory is None or jax.process_count() > 1:
    return None
  return _directory


def _source_digest() -> str:
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(package):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, package).encode() + b"\0")
      with open(path, "rb") as f:
        digest.update(f.read() + b"\0")
  return digest.hexdigest()


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "absent"


def _fixed() -> dict:
  """The parts of the environment a process cannot change (computed once)."""
  global _environment
  with _lock:
    if _environment is None:
      devices = jax.devices()
      _environment = {
          "source": _source_digest(),
          "python": sys.version, "machine": platform.machine(),
          "versions": {name: _version(name) for name in _DISTRIBUTIONS},
          "backend": [jax.default_backend(), devices[0].client.platform_version,
                      [(d.id, d.device_kind) for d in devices]],
      }
  return _environment


def environment() -> str:
  """The digest of everything outside a program that decides what it compiles to."""
  config = {k: repr(v) for k, v in sorted(jax.config.values.items())
            if not any(word in k for word in _IGNORED_CONFIG)}
  record = {**_fixed(), "config": config, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def describe_arguments(args) -> list:
  """The tree structure and, per leaf, the type (with weak typing), shape, dtype and
  sharding: what a compiled program accepts."""
  leaves, tree = jax.tree.flatten(args)
  return [str(tree), [(repr(jax.typeof(x)), repr(getattr(x, "sharding", None)))
                      for x in leaves]]


def key(*parts) -> str:
  """The store key of a program described by `parts` (JSON-able, with
  `describe_arguments` of its arguments)."""
  text = json.dumps([environment(), parts], sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()


def _path(program_key: str) -> str:
  return os.path.join(directory(), program_key[:2], program_key + ".pkl")


def holds(program_key: str) -> bool:
  """Whether a program is stored under `program_key` (it may still fail to load)."""
  return directory() is not None and os.path.exists(_path(program_key))


def fingerprint(lowered: jax.stages.Lowered) -> str:
  """The digest of a lowered module (what XLA compiles)."""
  return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def load(program_key: str) -> jax.stages.Compiled | None:
  """The stored program, or None (none stored, or one this jaxlib cannot load)."""
  if directory() is None:
    return None
  path = _path(program_key)
  if not os.path.exists(path):
    return None
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  try:
    with open(path, "rb") as f:
      payload, in_tree, out_tree, device_ids, module = pickle.load(f)
    by_id = {d.id: d for d in jax.devices()}
    compiled = serialize_executable.deserialize_and_load(
        payload, in_tree, out_tree,
        execution_devices=[by_id[i] for i in device_ids])
  except Exception:  # pylint: disable=broad-except
    return None  # compiled again and replaced
  with _lock:
    _loaded_modules.add(module)
  return compiled


def forget(program_key: str) -> None:
  """Removes a stored program (one that failed to run)."""
  if directory() is not None:
    try:
      os.remove(_path(program_key))
    except OSError:
      pass


def save(program_key: str, compiled: jax.stages.Compiled, module: str) -> bool:
  """Stores `compiled` (of the module with fingerprint `module`, compiled by
  `compile_fresh`); False where it cannot be (an identical module was loaded in this
  process, a program with constant arguments, an unwritable directory): the study goes
  on, compiling it again next time."""
  if directory() is None or compiled is None:
    return False
  with _lock:
    if module in _loaded_modules:
      return False
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study._storage import write_atomic  # pylint: disable=g-import-not-at-top
  try:
    device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
    blob = pickle.dumps((*serialize_executable.serialize(compiled), device_ids, module))
    write_atomic(_path(program_key), blob)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def remembered(name: str, args: list, compute: Callable[[], float],
               distributions: tuple[str, ...] = ()) -> float:
  """`compute()`, a number decided by `args` alone (JSON-able), the fedjax_dx source
  and the versions of `distributions`: read back from the store where an earlier run
  kept it, else computed and kept (written through a temporary file and a rename;
  computed afresh where the store is off, the entry is damaged or cannot be written).
  A value is kept only once `compute` returns: an error is raised each time.

  Example:
    >>> noise = remembered("noise_for_epsilon", [4.0, 1e-5, 0.1, 300],
    ...                    lambda: noise_for_epsilon(4.0, 1e-5, 0.1, 300),
    ...                    distributions=("dp-accounting",))
  """
  if directory() is None:
    return compute()
  entry = key("remembered", name, args, {d: _version(d) for d in distributions})
  path = os.path.join(directory(), "remembered", entry[:2], entry + ".json")
  try:
    with open(path) as f:
      return float(json.load(f)["value"])
  except (OSError, ValueError, KeyError, TypeError):
    pass
  value = compute()
  from fedjax_dx.study._storage import write_atomic  # pylint: disable=g-import-not-at-top
  try:
    write_atomic(path, json.dumps({"name": name, "args": args, "value": value},
                                  default=repr))
  except OSError:
    pass
  return value
