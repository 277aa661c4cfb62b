"""Test set-up: CPU backend with 4 simulated devices (for the sharding tests), compiled
for speed.

Nearly all of the suite's time is XLA compiling small programs, so the tests compile
them with XLA's fast settings (backend optimisation level 0, no fusion emitters on
CPU: several times faster compiles of the same programs, which run a little slower)
and keep them in a persistent compilation cache, so a rerun loads what the last run
compiled. Subprocesses (study and benchmark entry points) inherit both through the
environment. `FEDJAX_DX_TEST_CACHE` names another cache directory; an empty value
turns the cache off; `FEDJAX_DX_TEST_FULL_OPT=1` compiles with XLA's defaults.

Lowering is the larger part of a warm run: each thread lowers its programs in one MLIR
context (`_one_mlir_context_per_thread`), JAX's PRNG lowerings are traced once per
process rather than once per program (`_prng_lowerings_traced_once`), and a
pytest-xdist worker ends as soon as its results are sent (`pytest_unconfigure`).

A top-level jitted call seen in an earlier run skips tracing and lowering altogether:
the jit store (`tests/_jit_store.py`, in `<cache>/jit`) keys it by the function's code
and closure, its arguments' types and the project's source, and serves the executable
from JAX's cache (warm suite: about 20 % less CPU time, 3:44 -> 3:18 in alternated
runs); off in tests that monkeypatch, `FEDJAX_DX_TEST_JIT_STORE=0` turns it off.

dp-accounting's epsilons and calibrations (seconds each) are kept in the program store
as a study keeps its calibrated noise, keyed by the call's arguments, the fedjax_dx
source and dp-accounting's version (`_accounting_remembered_in_the_store`: warm suite
169.6 -> 158.3 s alternated, 20 CPU-s less); on and off with the program store.

In-process studies use the program store in that directory too (`_program_store`), so
a rerun loads their compiled programs instead of tracing and lowering them again;
except in a test that monkeypatches (the store's key sees the source, not code patched
at run time) and `test_program_store.py` (which drives the store itself); a test that
asserts what a study compiles turns it off around that study
(`test_study._program_store_off`).
"""

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST_XLA_FLAGS = ("--xla_backend_optimization_level=0",
                  "--xla_cpu_use_fusion_emitters=false")
TEST_CACHE = os.environ.get("FEDJAX_DX_TEST_CACHE",
                            str(ROOT / ".pytest_cache" / "jax_cache"))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ.get("FEDJAX_DX_TEST_FULL_OPT") != "1":
  flags = os.environ.get("XLA_FLAGS", "").split()
  os.environ["XLA_FLAGS"] = " ".join(
      flags + [f for f in FAST_XLA_FLAGS if f.split("=")[0] not in
               {g.split("=")[0] for g in flags}])
if TEST_CACHE:
  os.makedirs(TEST_CACHE, exist_ok=True)
  # Read by jax in this process and in every subprocess a test starts.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = TEST_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  # No size cap: a cap makes JAX rescan every entry on each write (quadratic). An entry
  # read while another worker writes it fails to decompress, and JAX compiles instead.

import functools  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import pytest  # noqa: E402


def _one_mlir_context_per_thread() -> None:
  """Lowers every program of a thread in one MLIR context instead of a new one each.

  JAX makes a fresh MLIR context for each program it lowers (`mlir.make_ir_context`:
  every dialect loaded and registered again). A warm run of this suite lowers some
  3,700 programs, most of them small (eager operations of the tests' references), and
  the contexts were about a quarter of the lowering time (py-spy). The programs are the
  same, op for op: a warm run hits the same persistent-cache entries and writes none.
  A lowering inside a lowering (a PRNG helper lowered while a round is) gets a fresh
  context, as the outer one's insertion point is active in the shared one. Set
  `FEDJAX_DX_TEST_FRESH_MLIR_CONTEXTS=1` for JAX's own behaviour; without JAX's hook
  (a JAX that renames it) the tests run with JAX's behaviour too.
  """
  if os.environ.get("FEDJAX_DX_TEST_FRESH_MLIR_CONTEXTS") == "1":
    return
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
    fresh = mlir.make_ir_context
  except (ImportError, AttributeError):
    return
  local = threading.local()

  def shared_context():
    context = getattr(local, "context", None)
    if context is None:
      context = local.context = fresh()
    try:
      current = ir.Context.current
    except ValueError:  # no context active on this thread
      current = None
    if current is not None and current == context:
      return fresh()
    return context

  mlir.make_ir_context = shared_context


_one_mlir_context_per_thread()


class _NoKey(Exception):
  """A function whose behaviour is not decided by what `_trace_key` can see."""


def _trace_key(obj, files: list, depth: int = 0):
  """A hashable value equal for two functions that trace alike: the code objects, the
  defaults and, recursively, what their closures hold (functions, partials, tuples,
  numbers, strings, dtypes, abstract values, JAX's PRNG implementations, small numpy
  arrays); anything else raises `_NoKey`. Appends each code object's file to `files`."""
  if depth > 12:
    raise _NoKey
  deeper = lambda value: _trace_key(value, files, depth + 1)
  if isinstance(obj, types.FunctionType):
    files.append(obj.__code__.co_filename)
    return ("function", obj.__code__, tuple(map(deeper, obj.__defaults__ or ())),
            tuple(sorted((k, deeper(v)) for k, v in (obj.__kwdefaults__ or {}).items())),
            tuple(deeper(cell.cell_contents) for cell in obj.__closure__ or ()))
  if isinstance(obj, functools.partial):
    return ("partial", deeper(obj.func), tuple(map(deeper, obj.args)),
            tuple(sorted((k, deeper(v)) for k, v in obj.keywords.items())))
  if isinstance(obj, tuple):
    return ("tuple", tuple(map(deeper, obj)))
  if isinstance(obj, (int, float, bool, str, bytes, type(None), np.dtype)):
    return (type(obj), obj)
  from jax._src import core, dtypes  # pylint: disable=g-import-not-at-top
  from jax._src.random import prng  # pylint: disable=g-import-not-at-top
  if isinstance(obj, (core.AbstractValue, dtypes.ExtendedDType)):
    return (type(obj), obj)
  if isinstance(obj, prng.PRNGImpl):
    return ("prng", obj.name)
  if isinstance(obj, np.ndarray) and obj.size <= 64:
    return ("array", obj.dtype, obj.shape, obj.tobytes())
  raise _NoKey


def _prng_lowerings_traced_once() -> None:
  """Traces each of JAX's PRNG lowerings once per process instead of once per program.

  JAX lowers its PRNG operations (`random_bits`, `random_fold_in`, `random_split`,
  `threefry2x32`, ...) by tracing their Python implementation into a jaxpr
  (`mlir.lower_fun`) in every program that uses them: about 12 % of the pytest
  workers' time in a warm run (py-spy), half of it that tracing. These traces are
  decided by the implementation, its closure's values, the argument types and JAX's
  tracing configuration, so a trace of the same key is reused (the lowering itself,
  into the program's module, still runs). The programs are the same, op for op: a warm
  run hits the same persistent-cache entries and writes none. Only functions of
  `jax/_src/random/` are reused, and only those whose closures hold values
  `_trace_key` can compare. Set `FEDJAX_DX_TEST_TRACE_PRNG_LOWERINGS=1` for JAX's own
  behaviour; without JAX's hooks (a JAX that renames them) the tests run with it too.
  """
  if os.environ.get("FEDJAX_DX_TEST_TRACE_PRNG_LOWERINGS") == "1":
    return
  try:
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.interpreters import partial_eval  # pylint: disable=g-import-not-at-top
    trace = partial_eval.trace_to_jaxpr_dynamic
    context = jax_config.trace_context
    if mlir.pe is not partial_eval:
      return
  except (ImportError, AttributeError):
    return
  random_sources = os.sep + os.path.join("jax", "_src", "random") + os.sep
  traced: dict = {}

  def trace_once(fun, in_avals, *, keep_inputs=None, lower=False, auto_dce=False):
    key = None
    if lower and not fun.transforms and fun.in_type is None:
      files: list = []
      try:
        key = (_trace_key(fun.f, files), _trace_key(fun.params, files), tuple(in_avals),
               None if keep_inputs is None else tuple(keep_inputs), auto_dce, context())
        hash(key)
      except (_NoKey, TypeError):
        key = None
      if not any(random_sources in f for f in files):
        key = None
    if key is None:
      return trace(fun, in_avals, keep_inputs=keep_inputs, lower=lower,
                   auto_dce=auto_dce)
    if key not in traced:
      if len(traced) >= 8192:
        traced.clear()
      traced[key] = trace(fun, in_avals, keep_inputs=keep_inputs, lower=lower,
                          auto_dce=auto_dce)
    jaxpr, out_avals, consts = traced[key]
    return jaxpr, list(out_avals), list(consts)

  class _PartialEval(types.ModuleType):
    """`partial_eval` as `mlir` sees it: the same but for `trace_to_jaxpr_dynamic`."""

    def __getattr__(self, name):
      return getattr(partial_eval, name)

  seen_by_mlir = _PartialEval(partial_eval.__name__)
  seen_by_mlir.trace_to_jaxpr_dynamic = trace_once
  mlir.pe = seen_by_mlir


_prng_lowerings_traced_once()

from tests import _jit_store  # noqa: E402

if TEST_CACHE:
  _jit_store.install(os.path.join(TEST_CACHE, "jit"))

_accounting_remembered = [False]  # on per test, with the program store (`_program_store`)


def _accounting_remembered_in_the_store() -> None:
  """dp-accounting's answers kept in the program store across runs, as a study keeps
  its calibrated noise (`_store.remembered`).

  The privacy tests ask dp-accounting for epsilons and calibrations that take
  seconds each (a fixed-size cohort's calibration: 21 evaluations of 0.4 s), some 25
  CPU-seconds of a warm run. `_accounting._calibrated` and `_accounting._epsilon`, the
  two functions the library computes them in (pure functions of their scalar
  arguments, already remembered in memory per process), are answered from the store
  where an earlier run computed the same call: keyed by the arguments' types and
  values, the fedjax_dx source and dp-accounting's version. Off where the program store
  is (tests that monkeypatch, `test_program_store.py`, which counts searches); the
  tests' own dp-accounting references are computed afresh each run.
  """
  from fedjax_dx.privacy import _accounting  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _build, _store  # pylint: disable=g-import-not-at-top
  described = (int, float, str, bool, np.integer, np.floating)
  for name in ("_calibrated", "_epsilon"):
    compute = getattr(_accounting, name)

    def remembered(*args, _compute=compute, _name=name):
      if not (_accounting_remembered[0]
              and all(isinstance(a, described) for a in args)):
        return _compute(*args)
      return _store.remembered(f"tests/{_name}",
                               [[type(a).__name__, repr(a)] for a in args],
                               lambda: _compute(*args), _build._ACCOUNTING)  # pylint: disable=protected-access

    functools.update_wrapper(remembered, compute)
    remembered.__wrapped__ = compute.__wrapped__
    setattr(_accounting, name, remembered)


if TEST_CACHE:
  _accounting_remembered_in_the_store()


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config):
  """A pytest-xdist worker ends here, once it has sent the controller its results (its
  `pytest_sessionfinish` did): without the two full garbage collections, JAX's exit
  handler (which frees every compiled program one by one and collects four more
  times) and the interpreter's teardown, some 5 s at the end of every run, during
  which the controller waits for its workers to exit. Nothing is left to write: the
  compilation cache and the program store write each entry when it is made."""
  output = getattr(config, "workeroutput", None)
  if output is None or "exitstatus" not in output:
    return  # not a worker, or one that has not sent its results
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(int(output["exitstatus"]))  # pylint: disable=protected-access


def subprocess_xla_flags() -> str:
  """The XLA flags this suite compiles with (for a subprocess that must not inherit
  other XLA flags, such as a multi-host worker that sets its own device count)."""
  if os.environ.get("FEDJAX_DX_TEST_FULL_OPT") == "1":
    return ""
  return " ".join(FAST_XLA_FLAGS)


def full_optimisation_env(env: dict) -> dict:
  """`env` without the fast-compile flags, for a subprocess whose time is execution
  (a benchmark of convolutions), not compilation."""
  flags = [f for f in env.get("XLA_FLAGS", "").split() if f not in FAST_XLA_FLAGS]
  return {**env, "XLA_FLAGS": " ".join(flags)}


SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(name: str) -> str:
  """Path of `../shared/data/<name>`: skipped on a user's clone, a failure in CI."""
  path = SHARED_DATA / name
  if not path.is_dir():
    message = (f"{path} not found: real-data tests read the copies in ../shared/data "
               "(present in the project's workspace and CI, not in a user's clone)")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message + "; CI=true requires them")
    pytest.skip(message)
  return str(path)


@pytest.fixture
def heart_dir():
  return shared_data("heart_disease")


@pytest.fixture
def tcga_dir():
  return shared_data("fed_tcga_brca")


@pytest.fixture
def medmnist_dir():
  return lambda subset: shared_data(subset)


@pytest.fixture(autouse=True)
def _program_store(request):
  """The program store for in-process studies and the jit store (see the module's
  docstring)."""
  from fedjax_dx.study import _store  # pylint: disable=g-import-not-at-top
  if not TEST_CACHE or "monkeypatch" in request.fixturenames:
    yield
    return
  _jit_store.activate(True)
  if request.module.__name__.endswith("test_program_store"):
    try:
      yield
    finally:
      _jit_store.activate(False)
    return
  _store.enable(os.path.join(TEST_CACHE, "programs"))
  _accounting_remembered[0] = True
  try:
    yield
  finally:
    _accounting_remembered[0] = False
    _store.enable(None)
    _jit_store.activate(False)
