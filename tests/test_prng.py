"""The study's PRNG lowering (`fedjax_dx.core._prng`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


# Random123's known answers for Threefry-2x32 with 20 rounds: (key, counter) -> output.
THREEFRY_KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


def test_unrolled_threefry_of_study_programs_gives_the_same_bits_as_jax():
  """Programs a study compiles at full optimisation lower JAX's Threefry hash unrolled
  on CPU (`_prng.lower`): no while loop left, Random123's known answers, and the same
  bits as JAX's own lowering for keys, splits, folds, uniforms, integers and
  permutations; level 0 (fast_compile, or the suite's XLA_FLAGS) keeps JAX's."""
  from jax.extend.random import threefry_2x32  # pylint: disable=g-import-not-at-top
  from fedjax_dx.core import _prng  # pylint: disable=g-import-not-at-top
  full = {"xla_backend_optimization_level": 2}
  assert _prng.lowering_parameters({"xla_backend_optimization_level": 0}) is None
  assert _prng.lowering_parameters({"xla_backend_optimization_level": 1}) is None
  if _prng.UNROLLED_RULE is None:
    pytest.skip("this jax has no separate rolled CPU lowering of threefry2x32")
  assert _prng.lowering_parameters(full) is not None

  hash_ = jax.jit(lambda key, count: threefry_2x32(key, count))
  for key, counter, expected in THREEFRY_KNOWN_ANSWERS:
    args = (np.array(key, np.uint32), np.array(counter, np.uint32))
    got = _prng.lower(hash_, args, full).compile(full)(*args)
    assert [int(v) for v in np.asarray(got)] == list(expected)

  def draws(key):
    keys = jax.random.split(key, 4)
    return [keys, jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(9)),
            jax.random.bits(keys[0], (257,)), jax.random.uniform(keys[1], (31, 7)),
            jax.random.randint(keys[2], (50, 13), 0, 11),
            jax.random.permutation(keys[3], 40)]
  key = jax.random.PRNGKey(2026)
  unrolled = _prng.lower(jax.jit(draws), (key,), full)
  default = jax.jit(draws).lower(key)
  assert "stablehlo.while" in default.as_text()
  assert "stablehlo.while" not in unrolled.as_text()
  for seed in range(5):
    key = jax.random.PRNGKey(seed)
    for a, b in zip(unrolled.compile(full)(key), default.compile(full)(key)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
