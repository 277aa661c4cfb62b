"""The test suite's jit store: a jitted call seen in an earlier run skips tracing and lowering.

JAX's persistent compilation cache (which the suite keeps, `conftest.py`) spares a rerun
XLA's compile, but each process still traces and lowers every program before it can
look the program up: most of the pytest workers' time in a warm run. This store keys a
top-level jitted call by what decides its program, without tracing it, and remembers
which entry of JAX's cache holds the executable:

  * the function: its code (bytecode, constants, names), defaults and, recursively,
    what its closure holds (functions, partials, bound methods, tuples and named
    tuples, dicts, lists, sets, dataclass fields, the attributes of objects of this
    project's, JAX's, Flax's and optax's classes, numbers, strings, dtypes, abstract
    values, shardings, primitives and sentinels by their module-level names, and the
    contents of numpy and JAX arrays); anything else (a tracer, a jaxpr, a random
    generator, an object of another library) leaves the call to JAX;
  * the call: the values of static arguments; the tree structure, type, weak type,
    shape, sharding and commitment of every other argument; the jit's options;
  * the environment: every .py file of the project (fedjax_dx/, tests/, benchmarks/,
    configs/, examples/), the versions of every installed distribution, XLA_FLAGS, the
    devices and JAX's tracing configuration (`config.trace_context()`).

On a hit the executable is read from JAX's cache (the same entry a trace would have
found: the program is the same, op for op) and run; its fast path is handed to JAX's
C++ dispatch, so later calls are JAX's own. On a miss, or if anything fails on the
way, JAX traces, lowers and compiles as without the store, which then records the
call (only calls with no effects, no callbacks and no hoisted constants, whose
executable is in JAX's cache).

Entries live in a folder per environment (`<directory>/<environment digest>/`): after
a source edit the others cannot be found, and a folder unused for a day is removed.

What the key cannot see: module-level state a function reads while it is traced
(other than the source files above), and code patched at run time; so the store is
off in tests that monkeypatch, as the program store is (`conftest._program_store`).
Set `FEDJAX_DX_TEST_JIT_STORE=0` to trace every program as JAX does, and
`FEDJAX_DX_TEST_JIT_STORE_LOG=<file>` to log each call JAX could not dispatch by
itself (function, what the store did, seconds) as a JSON line.
"""

import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import io
import json
import os
import pickle
import shutil
import sys
import threading
import time
import types
import weakref

import numpy as np

_KNOWN_PACKAGES = ("fedjax_dx", "tests", "benchmarks", "configs", "jax", "flax", "optax")
_SOURCE_FOLDERS = ("fedjax_dx", "tests", "benchmarks", "configs", "examples")

_directory: str | None = None
_active = False  # per test (conftest)
_environment: bytes | None = None
_local = threading.local()  # .compiles: [(executable, cache key, options, device ids)]
                            # while a call is being recorded, else None
_hits = 0
_log_path = os.environ.get("FEDJAX_DX_TEST_JIT_STORE_LOG")
_saves = 0


class _NoKey(Exception):
  """A value the key cannot describe: the call is left to JAX."""

  def __init__(self, what=None):
    super().__init__(what if isinstance(what, str) else
                     f"{what.__module__}.{what.__qualname__}" if isinstance(what, type)
                     else "")


def _type_key(t: type) -> tuple:
  return ("type", t.__module__, t.__qualname__)


def _known(t: type) -> bool:
  return t.__module__.split(".")[0] in _KNOWN_PACKAGES


def _value_key(obj, memo: dict, depth: int = 0):
  """A value of nested tuples of str, bytes and ints, equal for two objects that a
  trace cannot tell apart (see the module docstring); raises `_NoKey`."""
  if depth > 80:
    raise _NoKey("depth")
  t = type(obj)
  if obj is None or t in (int, bool, str, bytes):
    return (t.__name__, obj)
  if t is float:
    return ("float", obj.hex())
  if t is complex:
    return ("complex", obj.real.hex(), obj.imag.hex())
  if isinstance(obj, np.dtype):
    return ("dtype", obj.str, str(obj))
  if isinstance(obj, np.generic):
    return ("scalar", obj.dtype.str, obj.tobytes())
  if isinstance(obj, enum.Enum):
    return ("enum", _type_key(t), obj.name)
  if isinstance(obj, type):
    return _type_key(obj)
  if isinstance(obj, types.ModuleType):
    return ("module", obj.__name__)
  if t is object:  # a sentinel: keyed by the module-level name it is known by
    return ("global", *_global_name(obj))
  key = id(obj)
  if key in memo:
    return ("seen", memo[key][0])
  memo[key] = (len(memo), obj)  # the object kept alive: its id is not reused meanwhile
  deeper = lambda value: _value_key(value, memo, depth + 1)

  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import core, dtypes  # pylint: disable=g-import-not-at-top
  from jax._src.random import prng  # pylint: disable=g-import-not-at-top

  if isinstance(obj, types.FunctionType):
    cells = []
    for cell in obj.__closure__ or ():
      try:
        cells.append(deeper(cell.cell_contents))
      except ValueError:  # an empty cell
        raise _NoKey("empty cell") from None
    return ("function", _code_key(obj.__code__), obj.__module__,
            tuple(map(deeper, obj.__defaults__ or ())),
            tuple(sorted((k, deeper(v)) for k, v in (obj.__kwdefaults__ or {}).items())),
            tuple(cells))
  if isinstance(obj, functools.partial):
    return ("partial", deeper(obj.func), tuple(map(deeper, obj.args)),
            tuple(sorted((k, deeper(v)) for k, v in obj.keywords.items())))
  if isinstance(obj, types.MethodType):
    return ("method", deeper(obj.__self__), deeper(obj.__func__))
  if isinstance(obj, (types.BuiltinFunctionType, np.ufunc)):
    owner = getattr(obj, "__self__", None)
    if owner is not None and not isinstance(owner, types.ModuleType):
      raise _NoKey("C method")  # a bound method of a C object: its state is not visible
    return ("builtin", getattr(obj, "__module__", None), obj.__name__)
  if isinstance(obj, tuple):
    return ("tuple", _type_key(t), tuple(map(deeper, obj)))
  if t is list:
    return ("list", tuple(map(deeper, obj)))
  if t is dict:
    return ("dict", tuple(sorted((repr(deeper(k)), deeper(v)) for k, v in obj.items())))
  if t in (set, frozenset):
    return ("set", tuple(sorted(repr(deeper(v)) for v in obj)))
  if isinstance(obj, core.Tracer):
    raise _NoKey("tracer")
  if isinstance(obj, (core.AbstractValue, dtypes.ExtendedDType)):
    return ("aval", _type_key(t), repr(obj), repr(getattr(obj, "weak_type", None)))
  if isinstance(obj, prng.PRNGImpl):
    return ("prng", obj.name)
  if isinstance(obj, core.Primitive):
    return ("primitive", _type_key(t), obj.name, *_global_name(obj))
  if isinstance(obj, np.ndarray):
    if obj.dtype.hasobject:
      raise _NoKey("object array")
    return ("ndarray", obj.dtype.str, obj.shape,
            hashlib.sha256(np.ascontiguousarray(obj).tobytes()).digest())
  if isinstance(obj, prng.PRNGKeyArray):
    return ("keys", obj._impl.name, deeper(jax.random.key_data(obj)))  # pylint: disable=protected-access
  if isinstance(obj, jax.Array):
    return ("array", repr(jax.typeof(obj)), _sharding_key(obj.sharding),
            hashlib.sha256(np.asarray(obj).tobytes()).digest())
  if isinstance(obj, (jax.sharding.Sharding, jax.sharding.Mesh)):
    return _sharding_key(obj)
  if hasattr(obj, "_fun") and hasattr(obj, "_jit_info"):  # a jitted function
    return ("jitted", deeper(obj._fun), repr(obj._jit_info))  # pylint: disable=protected-access
  if isinstance(obj, weakref.ReferenceType):
    return ("weakref", deeper(obj()))
  if dataclasses.is_dataclass(obj) and _known(t):  # its fields (not Flax's module ids)
    return ("dataclass", _type_key(t),
            tuple((f.name, deeper(getattr(obj, f.name))) for f in dataclasses.fields(obj)))
  if _known(t) and hasattr(obj, "__dict__") and all(
      "__slots__" not in vars(base) or not base.__slots__ for base in t.__mro__[:-1]):
    return ("object", _type_key(t), tuple(sorted((k, deeper(v))
                                                 for k, v in vars(obj).items())))
  raise _NoKey(t)


_globals: dict = {}  # id -> (module, name, value): the known packages' sentinels, primitives
_globals_scanned = [0]  # len(sys.modules) when last scanned


def _global_name(obj) -> tuple:
  """The module and name of a sentinel (`object()`) or primitive of the known packages
  (two primitives may share a name; no two globals share a module and a name)."""
  from jax._src import core  # pylint: disable=g-import-not-at-top
  if id(obj) not in _globals and _globals_scanned[0] != len(sys.modules):
    _globals_scanned[0] = len(sys.modules)
    for name, module in list(sys.modules.items()):
      if name.split(".")[0] in _KNOWN_PACKAGES and module is not None:
        for attribute, value in list(vars(module).items()):
          if type(value) is object or isinstance(value, core.Primitive):
            _globals.setdefault(id(value), (name, attribute, value))
  if id(obj) not in _globals:
    raise _NoKey("not a module's global")
  return _globals[id(obj)][:2]


def _code_key(code: types.CodeType) -> tuple:
  """What a code object does (`marshal.dumps` is not deterministic: it flags objects
  by their reference counts)."""
  return ("code", code.co_filename, code.co_qualname, code.co_code,
          tuple(_code_key(c) if isinstance(c, types.CodeType) else (type(c).__name__, repr(c))
                for c in code.co_consts),
          code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
          code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags,
          code.co_exceptiontable)


def _sharding_key(sharding) -> tuple:
  devices = getattr(sharding, "_device_assignment", None)
  if devices is None:
    devices = getattr(sharding, "devices", ())
    devices = devices.flat if hasattr(devices, "flat") else devices
  return ("sharding", _type_key(type(sharding)), repr(sharding),
          tuple(d.id for d in devices))


def _argument_key(x) -> tuple:
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import core  # pylint: disable=g-import-not-at-top
  if isinstance(x, core.Tracer):
    raise _NoKey("tracer argument")
  if isinstance(x, jax.Array):
    return ("array", repr(jax.typeof(x)), _sharding_key(x.sharding),
            bool(getattr(x, "_committed", True)))
  if isinstance(x, (np.ndarray, np.generic)) and not x.dtype.hasobject:
    return ("numpy", repr(jax.typeof(x)))
  if type(x) in (int, float, bool, complex):
    return ("python", repr(jax.typeof(x)))
  raise _NoKey(type(x))


def _environment_digest() -> bytes:
  global _environment
  if _environment is None:
    digest = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in _SOURCE_FOLDERS:
      for path, dirs, files in os.walk(os.path.join(root, folder)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
          with open(os.path.join(path, name), "rb") as f:
            digest.update(os.path.relpath(os.path.join(path, name), root).encode()
                          + b"\0" + f.read() + b"\0")
    versions = sorted((d.metadata["Name"] or "", d.version)
                      for d in importlib.metadata.distributions())
    import jax  # pylint: disable=g-import-not-at-top
    digest.update(repr((versions, sys.version, os.environ.get("XLA_FLAGS", ""),
                        [(d.id, d.device_kind, d.platform) for d in jax.devices()]))
                  .encode())
    _environment = digest.digest()
  return _environment


def _call_key(fun, jit_info, static_argnums, static_argnames, args, kwargs):
  """The store key of a call and its dynamic arguments, flattened as JAX flattens them
  for the executable (positional arguments, then keyword arguments by name)."""
  from jax._src import config  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  static = {i % len(args) for i in static_argnums if -len(args) <= i < len(args)}
  static_values = ([a for i, a in enumerate(args) if i in static]
                   + [v for k, v in sorted(kwargs.items()) if k in static_argnames])
  for value in static_values:
    hash(value)  # an unhashable static argument: JAX's error, not a key
  dynamic = (tuple(a for i, a in enumerate(args) if i not in static),
             {k: v for k, v in kwargs.items() if k not in static_argnames})
  leaves, tree = jax.tree.flatten(dynamic)
  memo: dict = {}
  key = (_value_key(fun, memo), repr(jit_info), tuple(sorted(static)),
         tuple(sorted(k for k in kwargs if k in static_argnames)),
         tuple(_value_key(v, memo) for v in static_values),
         str(tree), tuple(map(_argument_key, leaves)), _context_key(config.trace_context()))
  digest = hashlib.sha256(_environment_digest() + repr(key).encode()).hexdigest()
  return digest, leaves


def _context_key(context) -> tuple:
  """JAX's tracing configuration (its values, and the axis environment's names and
  sizes: outside any trace, none)."""
  from jax._src import core  # pylint: disable=g-import-not-at-top
  key = []
  for value in context:
    if isinstance(value, core.AxisEnv):
      value = (sorted(map(repr, value.axis_sizes.items())),
               sorted(map(repr, value.spmd_axis_names)),
               sorted(map(repr, value.explicit_mesh_axis_names)))
    text = repr(value)
    if " at 0x" in text:  # an object without a describing repr
      raise _NoKey("context")
    key.append(text)
  return tuple(key)


_pruned: set = set()  # store directories whose other environments this process pruned


def _path(call_key: str) -> str:
  """Where a call's entry lives: in its environment's folder, as only entries of the
  current environment can be found (a source edit leaves the others unreachable)."""
  folder = os.path.join(_directory, _environment_digest().hex()[:16])
  if _directory not in _pruned:
    _pruned.add(_directory)
    _prune(folder)
  return os.path.join(folder, call_key[:2], call_key + ".pkl")


def _prune(current: str, unused_for_s: float = 86400.0) -> None:
  """Marks `current` used and removes the other environments' folders unused for a day
  (not at once: another checkout may share the cache)."""
  os.makedirs(current, exist_ok=True)
  os.utime(current)
  parent = os.path.dirname(current)
  for name in os.listdir(parent):
    folder = os.path.join(parent, name)
    try:
      if folder != current and time.time() - os.stat(folder).st_mtime > unused_for_s:
        shutil.rmtree(folder, ignore_errors=True)
    except OSError:
      pass


class _Pickler(pickle.Pickler):
  """Pickles an unloaded executable with its XLA executable as a reference to JAX's
  cache entry (as `jax.experimental.serialize_executable`, which copies it)."""

  def __init__(self, file, entries: dict):
    super().__init__(file)
    self.entries = entries  # id(XLA executable) -> (cache key, options, device ids)

  def persistent_id(self, obj):
    from jax._src.lib import xla_client as xc  # pylint: disable=g-import-not-at-top
    if isinstance(obj, xc.LoadedExecutable):
      entry = self.entries.get(id(obj))
      if entry is None:
        raise pickle.PicklingError("an executable not read from or written to JAX's cache")
      return ("cached", *entry)
    if isinstance(obj, xc.Device):
      return ("device", obj.id)
    if isinstance(obj, xc.Client):
      return ("client",)
    return None


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, backend):
    super().__init__(file)
    self.backend = backend
    self.devices = {d.id: d for d in backend.devices()}

  def persistent_load(self, pid):
    from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
    from jax._src.lib import xla_client as xc  # pylint: disable=g-import-not-at-top
    if pid[0] == "cached":
      _, cache_key, options, device_ids = pid
      executable, _ = compilation_cache.get_executable_and_time(
          cache_key, xc.CompileOptions.ParseFromString(options), self.backend,
          xc.DeviceList(tuple(self.devices[i] for i in device_ids)))
      if executable is None:
        raise pickle.UnpicklingError("not in JAX's cache")
      return executable
    if pid[0] == "device":
      return self.devices[pid[1]]
    if pid[0] == "client":
      return self.backend
    raise pickle.UnpicklingError(pid)


def _load(call_key: str, args_flat):
  """(outputs, fast-path data) of the stored call, or None."""
  from jax._src import pjit  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  try:
    with open(_path(call_key), "rb") as f:
      unloaded, out_tree = _Unpickler(f, jax.devices()[0].client).load()
    executable = unloaded.load()
  except Exception:  # pylint: disable=broad-except
    return None  # traced, and stored again
  out_flat = executable.call(*args_flat)
  fastpath = pjit._get_fastpath_data(  # pylint: disable=protected-access
      executable, out_tree, args_flat, out_flat, (), [], None, [])
  return out_tree.unflatten(out_flat), fastpath


def _save(call_key: str, executable, out_tree) -> bool:
  global _saves
  unloaded = getattr(executable, "_unloaded_executable", None)
  compiles = getattr(_local, "compiles", [])
  if (unloaded is None or unloaded.keepalive or unloaded.host_callbacks
      or unloaded.ordered_effects or unloaded.unordered_effects or unloaded.mut):
    return False
  entries = {id(exe): rest for exe, *rest in compiles}
  try:
    with io.BytesIO() as buffer:
      _Pickler(buffer, entries).dump((unloaded, out_tree))
      blob = buffer.getvalue()
    path = _path(call_key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(temporary, "wb") as f:
      f.write(blob)
    os.replace(temporary, path)
    _saves += 1
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _wrap_cache_miss(fun, cache_miss, static_argnums, static_argnames, jitted):
  """JAX's `cache_miss` for one jitted function, with the store in front of it."""
  from jax._src import config, core  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  unsuitable = []  # set once a call of this function had no fast path

  def miss(*args, **kwargs):
    started = time.perf_counter()
    outcome, result = _miss(*args, **kwargs)
    if _log_path:
      with open(_log_path, "a") as f:
        f.write(json.dumps([getattr(fun, "__qualname__", repr(fun)), outcome,
                            time.perf_counter() - started, os.getpid()]) + "\n")
    return result

  def _miss(*args, **kwargs):
    global _hits
    if not _active:
      return "off", cache_miss(*args, **kwargs)
    if unsuitable:
      return "no fast path", cache_miss(*args, **kwargs)
    if (not core.trace_state_clean() or config.disable_jit.value
        or getattr(jitted[0], "_jit_info", None) is None):
      return "inside a trace", cache_miss(*args, **kwargs)
    try:
      call_key, args_flat = _call_key(fun, jitted[0]._jit_info, static_argnums,  # pylint: disable=protected-access
                                      static_argnames, args, kwargs)
    except Exception as e:  # pylint: disable=broad-except  # _NoKey, or a value that fails to describe itself
      return f"no key: {e}", cache_miss(*args, **kwargs)
    if os.path.exists(_path(call_key)):
      loaded = _load(call_key, args_flat)
      if loaded is not None:
        _hits += 1
        return "hit", (*loaded, False)
    _local.compiles, _local.executable = [], None
    try:
      result = cache_miss(*args, **kwargs)
      outs, fastpath, _ = result
      if fastpath is None:
        unsuitable.append(True)
        return "no fast path", result
      if _local.executable is not None:
        return ("saved" if _save(call_key, _local.executable, jax.tree.structure(outs))
                else "not saved"), result
      return "not captured", result
    finally:  # no longer collected: the executables are not kept alive
      _local.compiles, _local.executable = None, None

  return miss


def install(directory: str) -> bool:
  """Puts the store in front of every function jitted from now on; False where this
  JAX lacks a hook it needs (the suite then runs with JAX's behaviour)."""
  global _directory
  if os.environ.get("FEDJAX_DX_TEST_JIT_STORE") == "0":
    return False
  try:
    from jax._src import compiler, pjit  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    real_pjit = _jax.pjit
    real_call_impl = pjit._pjit_call_impl_python  # pylint: disable=protected-access
    real_strategy = compiler._resolve_compilation_strategy  # pylint: disable=protected-access
    real_compile = compiler.compile_or_get_cached
    assert pjit._jax is _jax and callable(pjit._get_fastpath_data)  # pylint: disable=protected-access
  except (ImportError, AttributeError, AssertionError):
    return False
  _directory = directory

  def strategy(*args, **kwargs):
    cache_key, options = real_strategy(*args, **kwargs)
    _local.strategy = (cache_key, options)
    return cache_key, options

  def compile_or_get_cached(backend, computation, devices, compile_options,
                            host_callbacks, executable_devices, *rest, **kwargs):
    _local.strategy = (None, None)
    executable = real_compile(backend, computation, devices, compile_options,
                              host_callbacks, executable_devices, *rest, **kwargs)
    cache_key, options = _local.strategy
    compiles = getattr(_local, "compiles", None)
    if compiles is not None and cache_key is not None:
      compiles.append((executable, cache_key, options.SerializeAsString(),
                       tuple(d.id for d in executable_devices)))
    return executable

  def call_impl(*args, **params):
    result = real_call_impl(*args, **params)
    _, compiled, _, const_args = result
    if getattr(_local, "compiles", None) is not None:
      _local.executable = (None if const_args or params["jaxpr"].effects
                           else compiled)
    return result

  class _JaxWithStore(types.ModuleType):
    """`jax._src.lib._jax` as `pjit` sees it: the same but for `pjit`."""

    def __getattr__(self, name):
      return getattr(_jax, name)

  def store_pjit(name, fun, cache_miss, static_argnums, static_argnames, *rest):
    jitted = [None]
    function = real_pjit(name, fun, _wrap_cache_miss(
        fun, cache_miss, tuple(static_argnums), tuple(static_argnames), jitted),
        static_argnums, static_argnames, *rest)
    jitted[0] = function
    return function

  seen_by_pjit = _JaxWithStore(_jax.__name__)
  seen_by_pjit.pjit = store_pjit
  pjit._jax = seen_by_pjit  # pylint: disable=protected-access
  pjit._pjit_call_impl_python = call_impl  # pylint: disable=protected-access
  compiler._resolve_compilation_strategy = strategy  # pylint: disable=protected-access
  compiler.compile_or_get_cached = compile_or_get_cached
  return True


def activate(active: bool) -> None:
  """Turns the store on or off (per test)."""
  global _active
  _active = active and _directory is not None


@contextlib.contextmanager
def stored_in(directory: str):
  """The store kept in `directory` meanwhile, and on (tests of the store itself)."""
  global _directory
  if _directory is None:
    raise RuntimeError("the jit store is not installed")
  previous, was_active = _directory, _active
  _directory = directory
  activate(True)
  try:
    yield
  finally:
    _directory = previous
    activate(was_active)


def installed() -> bool:
  return _directory is not None


def counts() -> tuple[int, int]:
  """(calls loaded from the store, calls stored) in this process."""
  return _hits, _saves
