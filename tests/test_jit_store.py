"""The suite's jit store (`tests/_jit_store.py`) serves a call only the program JAX
would have traced for it: on tiny functions, each case against a trace of its own."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import _jit_store


@pytest.fixture
def store(tmp_path):
  if not _jit_store.installed():
    pytest.skip("the jit store is off here (FEDJAX_DX_TEST_JIT_STORE=0 or "
                "FEDJAX_DX_TEST_CACHE empty)")
  with _jit_store.stored_in(str(tmp_path)):
    yield


def _traced(fun, *args, **jit_options):
  """`fun(*args)` jitted with the store off: what JAX itself computes."""
  with _jit_store.stored_in("/nonexistent-jit-store"):
    _jit_store.activate(False)
    return jax.jit(fun, **jit_options)(*args)


def _scaled(scale):
  return lambda x: jnp.tanh(x * scale) + scale


def _hits_and_saves_after(call):
  hits, saves = _jit_store.counts()
  result = call()
  new_hits, new_saves = _jit_store.counts()
  return result, new_hits - hits, new_saves - saves


def test_a_stored_call_is_served_to_a_new_function_and_equals_a_trace(store):
  x = jnp.linspace(-2.0, 2.0, 7)
  first, hits, saves = _hits_and_saves_after(lambda: jax.jit(_scaled(0.5))(x))
  assert (hits, saves) == (0, 1)
  # A new function object (JAX's own caches miss) with the same code and closure.
  second, hits, saves = _hits_and_saves_after(lambda: jax.jit(_scaled(0.5))(x))
  assert (hits, saves) == (1, 0)
  expected = _traced(_scaled(0.5), x)
  np.testing.assert_array_equal(second, expected)
  np.testing.assert_array_equal(first, expected)
  # Later calls are JAX's fast path on the served executable.
  np.testing.assert_array_equal(jax.jit(_scaled(0.5))(x + 1), _traced(_scaled(0.5), x + 1))


def test_a_closure_value_static_argument_or_argument_type_is_another_program(store):
  x = jnp.linspace(-2.0, 2.0, 7)
  for scale in (0.5, 0.25, 0.5):
    np.testing.assert_array_equal(jax.jit(_scaled(scale))(x), _traced(_scaled(scale), x))
  power = lambda x, n: x ** n
  for n in (2, 3, 2):
    np.testing.assert_array_equal(jax.jit(power, static_argnums=1)(x, n),
                                  _traced(power, x, n, static_argnums=1))
  for argument in (jnp.arange(7, dtype=jnp.int32), jnp.arange(7.0), 3.0, 3,
                   np.arange(7, dtype=np.float32), jnp.arange(7.0)[None]):
    served = jax.jit(lambda v: v * 2 + 1)(argument)
    expected = _traced(lambda v: v * 2 + 1, argument)
    assert served.dtype == expected.dtype and served.shape == expected.shape
    assert served.weak_type == expected.weak_type
    np.testing.assert_array_equal(served, expected)


def test_keyword_and_closed_over_arrays_are_part_of_the_key(store):
  x = jnp.arange(4.0)
  for table in (np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 5.0])):
    fun = lambda v, *, shift: v * table + shift
    np.testing.assert_array_equal(jax.jit(fun)(x, shift=1.0),
                                  _traced(lambda v: v * table + 1.0, x))


def test_what_the_key_cannot_describe_is_left_to_jax(store):
  rng = np.random.default_rng(0)  # drawn from while tracing: a new constant each trace
  x = jnp.zeros(3)
  # Two function objects (JAX's own caches would reuse one's trace).
  first, _, saves = _hits_and_saves_after(
      lambda: jax.jit(lambda v: v + rng.standard_normal())(x))
  second, hits, more_saves = _hits_and_saves_after(
      lambda: jax.jit(lambda v: v + rng.standard_normal())(x))
  assert saves == more_saves == hits == 0
  assert not np.array_equal(first, second)


def test_a_call_with_effects_is_not_stored(store):
  def noisy(x):
    jax.debug.callback(lambda v: None, x)
    return x + 1
  x = jnp.ones(2)
  for _ in range(2):
    result, hits, saves = _hits_and_saves_after(lambda: jax.jit(noisy)(x))
    assert (hits, saves) == (0, 0)
    np.testing.assert_array_equal(result, [2.0, 2.0])


def test_other_environments_folders_are_removed_once_unused_for_a_day(tmp_path):
  current, recent, old = (tmp_path / name for name in ("current", "recent", "old"))
  for folder in (recent, old):
    (folder / "ab").mkdir(parents=True)
  day_and_a_bit_ago = time.time() - 90000
  os.utime(old, (day_and_a_bit_ago, day_and_a_bit_ago))
  _jit_store._prune(str(current))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "recent"]


def test_remembered_accounting_answers_are_dp_accountings_for_that_very_call(
    tmp_path, monkeypatch):
  """conftest keeps `_accounting._epsilon` / `_calibrated` answers in the program store:
  a call made before is answered without dp-accounting and equals its computation;
  another value or type of any argument is computed; off, everything is computed."""
  from fedjax_dx.privacy import _accounting  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _store  # pylint: disable=g-import-not-at-top
  from tests import conftest  # pylint: disable=g-import-not-at-top
  if not conftest.TEST_CACHE:
    pytest.skip("FEDJAX_DX_TEST_CACHE is empty: nothing is remembered")
  computed = []
  accountant = _accounting._accountant  # pylint: disable=protected-access
  monkeypatch.setattr(_accounting, "_accountant",
                      lambda *a, **k: computed.append(a) or accountant(*a, **k))
  epsilon = _accounting._epsilon  # pylint: disable=protected-access
  args = (1.3, 0.1, 7, 1e-5, "rdp", "poisson", 0)
  expected = epsilon.__wrapped__(*args)
  assert len(computed) == 1
  monkeypatch.setattr(conftest, "_accounting_remembered", [True])
  _store.enable(str(tmp_path))
  try:
    epsilon.cache_clear()
    assert epsilon(*args) == expected and len(computed) == 2
    assert len(list(tmp_path.rglob("remembered/*/*.json"))) == 1
    epsilon.cache_clear()  # as a new process
    assert epsilon(*args) == expected and len(computed) == 2
    for other in [(1.3, 0.1, 8, *args[3:]), (np.float64(1.3), *args[1:]),
                  (1.3, 0.1, 7, 1e-5, "pld", "poisson", 0)]:
      epsilon.cache_clear()
      assert epsilon(*other) == epsilon.__wrapped__(*other)
    assert len(computed) == 2 + 2 * 3
    assert epsilon(np.float64(1.3), *args[1:]) == expected  # same value, its own entry
    assert len(list(tmp_path.rglob("remembered/*/*.json"))) == 4
    conftest._accounting_remembered[0] = False  # pylint: disable=protected-access
    epsilon.cache_clear()
    assert epsilon(*args) == expected and len(computed) == 9
  finally:
    _store.enable(None)
    epsilon.cache_clear()
