"""The program store (`fedjax_dx.study._store`): compiled programs kept across
processes, keyed by everything that decides them.

A stored program must compute exactly what a fresh compile computes; any change to what
decides a program (an argument's shape, dtype or weak type, the XLA flags, a jax
setting, the package's source, the program's identity) must miss; a damaged entry is
compiled again and replaced; nothing is stored unless the store is turned on.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from fedjax_dx import study
from fedjax_dx.study import _programs
from fedjax_dx.study import _store


@pytest.fixture
def store(tmp_path):
  _store.enable(str(tmp_path / "programs"))
  yield tmp_path / "programs"
  _store.enable(None)


def _program(cache, identity, fn, *args):
  return cache.lazy(identity, lambda: jax.jit(fn).lower(*args), args, None, None,
                    ahead=False)


def _step(params, batch):
  return jax.tree.map(lambda p: p - 0.1 * jnp.tanh(batch @ p).mean(), params)


def test_a_stored_program_computes_what_a_fresh_compile_computes(store):
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  batch = jnp.arange(15.0).reshape(5, 3) / 7
  cache = _programs.ProgramCache()
  fresh = _program(cache, ("step",), _step, params, batch)
  assert not fresh.loaded and fresh.store_key is not None
  expected = fresh(params, batch)  # compiled, then stored
  cache.close()  # (one read from JAX's cache is compiled again to store, meanwhile)
  assert len(list(store.rglob("*.pkl"))) == 1
  loaded = _program(_programs.ProgramCache(), ("step",), _step, params, batch)
  assert loaded.loaded and loaded.lowered is None  # neither traced nor compiled
  got = loaded(params, batch)
  np.testing.assert_array_equal(got["w"], expected["w"])


def test_what_decides_a_program_changes_its_key(store, monkeypatch):
  def key(*args, identity=("step",)):
    return _store.key(identity, _store.describe_arguments(args))

  x, scale = jnp.ones((3, 4)), jnp.asarray(1.0, jnp.float32)
  base = key(x, scale)
  assert base == key(jnp.zeros((3, 4)), jnp.asarray(2.0, jnp.float32))  # values: no
  assert jax.typeof(jnp.asarray(1.0)).weak_type  # a Python scalar's type is weak
  variants = {
      "identity": key(x, scale, identity=("other",)),
      "shape": key(jnp.ones((3, 5)), scale),
      "dtype": key(jnp.ones((3, 4), jnp.bfloat16), scale),
      "weak type": key(x, jnp.asarray(1.0)),
      "tree": key({"a": x}, scale),
  }
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "")
                     + " --xla_cpu_enable_fast_min_max=true")
  variants["XLA flags"] = key(x, scale)
  monkeypatch.undo()
  with jax.default_matmul_precision("highest"):
    variants["a jax setting"] = key(x, scale)
  fixed = _store._fixed()
  monkeypatch.setattr(_store, "_environment", {**fixed, "source": "edited"})
  variants["the package source"] = key(x, scale)
  monkeypatch.setattr(_store, "_environment", {
      **fixed, "versions": {**fixed["versions"], "jaxlib": "0.0.1"}})
  variants["a library version"] = key(x, scale)
  monkeypatch.undo()
  assert key(x, scale) == base
  for what, changed in variants.items():
    assert changed != base, f"a change of {what} kept the key"
  assert len(set(variants.values())) == len(variants)


def test_a_damaged_entry_is_compiled_again_and_replaced(store):
  params, batch = {"w": jnp.ones((3, 4))}, jnp.ones((2, 3))
  cache = _programs.ProgramCache()
  first = _program(cache, ("step",), _step, params, batch)
  expected = first(params, batch)
  cache.close()
  (entry,) = store.rglob("*.pkl")
  entry.write_bytes(b"not a program")
  cache = _programs.ProgramCache()
  again = _program(cache, ("step",), _step, params, batch)
  np.testing.assert_array_equal(again(params, batch)["w"], expected["w"])
  assert not again.loaded and again.compile_s > 0
  cache.close()
  assert entry.read_bytes() != b"not a program"  # replaced by the new compile
  assert _program(_programs.ProgramCache(), ("step",), _step, params, batch).loaded


def test_a_calibrated_noise_is_kept_and_read_back_to_the_bit(store, monkeypatch):
  """A private study's rerun reads its DP noise calibration from the store instead of
  searching dp-accounting's accountant again (seconds per calibration of a
  subsampled mechanism): the same
  number to the bit; another target misses; a damaged entry is computed again and
  replaced; with the store off nothing is kept; an error is raised every time."""
  import dp_accounting  # pylint: disable=g-import-not-at-top
  from fedjax_dx.privacy import _accounting  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _build  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study._schema import StudyError  # pylint: disable=g-import-not-at-top
  searches = []
  search = dp_accounting.calibrate_dp_mechanism
  monkeypatch.setattr(dp_accounting, "calibrate_dp_mechanism",
                      lambda *a, **k: searches.append(a) or search(*a, **k))
  config = test_config.get_config()
  config.dp, config.dp_target_epsilon, config.dp_delta = "central", 3.0, 1e-5
  config.rounds, config.dp_accountant = 40, "rdp"
  sampling = _build.DpSampling(1.0, "poisson", 0, "poisson")

  def in_a_new_process():  # nothing remembered in memory
    _accounting._calibrated.cache_clear()
    _accounting._epsilon.cache_clear()
    return _build.privacy_noise(config, sampling)

  first = in_a_new_process()
  assert len(searches) == 1
  (entry,) = store.rglob("remembered/*/*.json")
  assert in_a_new_process() == first and len(searches) == 1
  assert first == _accounting._calibrated.__wrapped__(3.0, 1e-5, 1.0, 40, "rdp",
                                                      "poisson", 0)
  config.dp_target_epsilon = 4.0
  assert in_a_new_process() != first and len(searches) == 3  # (+ the line above)
  assert len(list(store.rglob("remembered/*/*.json"))) == 2
  config.dp_target_epsilon = 3.0
  entry.write_text("{damaged")
  assert in_a_new_process() == first and len(searches) == 4
  assert in_a_new_process() == first and len(searches) == 4  # replaced
  _store.enable(None)
  config.dp_target_epsilon = 5.0
  in_a_new_process()
  assert len(searches) == 5 and len(list(store.rglob("remembered/*/*.json"))) == 2
  _store.enable(str(store))
  config.dp_target_epsilon = 1e-4
  for _ in range(2):
    with pytest.raises(StudyError, match="is not reached"):
      in_a_new_process()


def test_a_study_stores_nothing_unless_the_store_is_on(tmp_path):
  config = test_config.get_config()
  config.methods, config.num_seeds, config.bootstrap_resamples = "fedavg", 1, 0
  _store.enable(None)
  study.run_study(config, str(tmp_path / "off"), quiet=True)
  assert _store.directory() is None
  assert not list(tmp_path.rglob("*.pkl"))


def test_a_study_rerun_loads_its_programs_and_ends_the_same(store, tmp_path):
  config = test_config.get_config()
  config.methods, config.num_seeds = "fedavg,local", 1
  # Shapes no other test's study has: XLA:CPU cannot store a module this process loaded
  # before (`_store`), and other tests load theirs from the suite's store.
  config.dataset.num_clients, config.dataset.examples_per_client = 7, 23
  frames = []
  for name in ("first", "second"):
    cache = study.ProgramCache()
    study.run_study(config, str(tmp_path / name), quiet=True, programs=cache)
    runs = list(cache.runs.values()) + list(cache.evaluators.values())
    assert all(p.loaded for p in runs) == (name == "second")
    frames.append(study.load_results(str(tmp_path / name)).metrics)
  timing = ["wall_s", "compile_s"]
  np.testing.assert_array_equal(frames[0].drop(columns=timing).to_numpy(str),
                                frames[1].drop(columns=timing).to_numpy(str))


_FROM_JAX_CACHE = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from fedjax_dx.study import _programs, _store
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    step = lambda w, x: w - 0.1 * jnp.tanh(x @ w).mean()
    w, x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), jnp.arange(15.0).reshape(5, 3)
    _store.enable(sys.argv[2] if sys.argv[3] == "store" else None)
    cache = _programs.ProgramCache()
    program = cache.lazy(("step",), lambda: jax.jit(step).lower(w, x), (w, x), None,
                         None, ahead=False)
    hits = _store.cache_hits()
    result = np.asarray(program(w, x))
    print(program.loaded, _store.cache_hits() - hits, result.tobytes().hex())
""")


def test_a_program_in_jax_cache_is_compiled_afresh_for_the_store(tmp_path):
  """XLA:CPU serializes an executable it read from JAX's persistent cache without its
  kernels ("Function ..._kernel not found" when that copy runs): the store compiles its
  programs itself, even where JAX's cache holds them, and the stored copy runs."""
  def run(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION")}
    found = subprocess.run(
        [sys.executable, "-c", _FROM_JAX_CACHE, str(tmp_path / "jax"),
         str(tmp_path / "programs"), mode], capture_output=True, text=True, env=env,
        timeout=300)
    assert found.returncode == 0, found.stderr
    loaded, hits, result = found.stdout.split()
    return loaded == "True", int(hits), result

  first = run("no store")  # compiled; JAX's cache holds it now
  assert first[:2] == (False, 0)
  assert run("no store")[:2] == (False, 1)  # what a rerun without the store reads
  filled = run("store")  # compiled by XLA again (JAX's cache not read), then stored
  assert filled[:2] == (False, 0)
  loaded = run("store")
  assert loaded[:2] == (True, 0)  # from the store, and it runs
  assert first[2] == filled[2] == loaded[2]


def test_a_stored_program_that_cannot_run_is_forgotten_and_compiled_again(store):
  # (shapes no other test compiles: a module already loaded in this process is not
  # stored again)
  params, batch = {"w": jnp.ones((5, 2))}, jnp.ones((3, 5))
  expected = _program(_programs.ProgramCache(), ("step",), _step, params, batch)(
      params, batch)
  other = {"w": jnp.ones((6, 2))}  # a different program, copied under the key
  stored = _program(_programs.ProgramCache(), ("other",), _step, other, jnp.ones((3, 6)))
  stored(other, jnp.ones((3, 6)))
  (entry,) = [e for e in store.rglob("*.pkl") if e.name.startswith(stored.store_key)]
  (target,) = [e for e in store.rglob("*.pkl") if e != entry]
  target.write_bytes(entry.read_bytes())  # loads, but fails on these arguments
  program = _program(_programs.ProgramCache(), ("step",), _step, params, batch)
  assert program.loaded
  np.testing.assert_array_equal(program(params, batch)["w"], expected["w"])
  assert not program.loaded and not target.exists()


def test_a_fresh_compile_skips_jax_cache_on_its_own_thread_only(monkeypatch):
  """While the store compiles a program itself (`compile_fresh`, JAX's cache bypassed),
  another thread's compile still reads and writes JAX's persistent cache: switched off
  for the whole process, those programs never reached the cache and every rerun
  compiled them again."""
  import threading  # pylint: disable=g-import-not-at-top
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  backend = jax.devices()[0].client
  if not compilation_cache.is_cache_used(backend):
    pytest.skip("JAX's persistent cache is off (FEDJAX_DX_TEST_CACHE empty)")
  inside, elsewhere, started, release = [], [], threading.Event(), threading.Event()
  lowered = jax.jit(lambda x: x * 3.0 + 1.0).lower(jnp.zeros(3))
  real_compile = type(lowered).compile

  def compile_and_wait(self, *args, **kwargs):  # runs inside compile_fresh
    inside.append(compilation_cache.is_cache_used(backend))
    started.set()
    release.wait(60)
    return real_compile(self, *args, **kwargs)

  def other_thread():
    started.wait(60)
    elsewhere.append(compilation_cache.is_cache_used(backend))
    release.set()

  monkeypatch.setattr(type(lowered), "compile", compile_and_wait)
  other = threading.Thread(target=other_thread)
  other.start()
  try:
    compiled, storable = _store.compile_fresh(lowered, None)
  finally:
    release.set()
    other.join()
  monkeypatch.undo()
  assert inside == [False] and elsewhere == [True]
  assert compilation_cache.is_cache_used(backend)  # and on this thread once it is done
  np.testing.assert_array_equal(compiled(jnp.ones(3)), np.full(3, 4.0))
  assert storable
