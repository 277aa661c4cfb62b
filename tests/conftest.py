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
context (`_one_mlir_context_per_thread`), and a pytest-xdist worker ends as soon as its
results are sent (`pytest_unconfigure`).

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

import sys  # noqa: E402
import threading  # noqa: E402

import jax  # noqa: E402

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
  """The program store for in-process studies (see the module's docstring)."""
  from fedjax_dx.study import _store  # pylint: disable=g-import-not-at-top
  if (not TEST_CACHE or "monkeypatch" in request.fixturenames
      or request.module.__name__.endswith("test_program_store")):
    yield
    return
  _store.enable(os.path.join(TEST_CACHE, "programs"))
  try:
    yield
  finally:
    _store.enable(None)
