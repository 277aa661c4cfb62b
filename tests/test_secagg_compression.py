"""Secure aggregation (exact sums, masks hide updates, dropout recovery) and compression
(unbiased quantization, top-k with error feedback), alone and inside the round."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_dx as fdx
from fedjax_dx import agg
from fedjax_dx.privacy import _secagg as sa
from tests.test_algorithms import assert_trees_close, init_params, make_data

RNG = jax.random.PRNGKey(11)


def _masked_vectors(round_key, encoded, ids, participating, bits):
  return jax.vmap(sa.mask, in_axes=(None, 0, 0, None, None, None))(
      round_key, encoded, ids, ids, participating, bits)


@pytest.mark.parametrize("bits", [32, 16, 8])
def test_secure_sum_equals_the_sum_of_the_encoded_updates_exactly(bits):
  rng = np.random.default_rng(bits)
  ids = jnp.array([0, 3, 4, 7, 9])  # client ids of the participants
  encoded = jnp.asarray(rng.integers(0, 2**bits, size=(5, 50)), jnp.uint32)
  all_in = jnp.ones(5, bool)
  masked = _masked_vectors(RNG, encoded, ids, all_in, bits)
  assert np.mean(np.asarray(masked) == np.asarray(encoded)) < 0.05  # masks are on
  received = masked.sum(0, dtype=jnp.uint32)
  total = sa.unmask(RNG, received, ids, all_in, jnp.zeros(5, bool), bits)
  want = np.asarray(encoded, np.uint64).sum(0) % 2**bits
  np.testing.assert_array_equal(np.asarray(total, np.uint64), want)
  # Pairwise masks alone cancel in the sum (only the self masks remain).
  pairs = jax.vmap(sa.pairwise_mask, in_axes=(None, 0, None, None, None))(
      RNG, ids, ids, all_in, 50)
  np.testing.assert_array_equal(np.asarray(pairs.sum(0, dtype=jnp.uint32)), 0)


def test_encoding_round_trips_signed_weighted_sums():
  rng = np.random.default_rng(0)
  updates = jnp.asarray(rng.normal(size=(4, 30)), jnp.float32)
  weights = jnp.array([0.1, 0.2, 0.3, 0.4])
  for bits in (32, 16):
    scale = sa.fixed_point_scale(5.0, weights.sum(), 4, bits)
    keys = jax.random.split(RNG, 4)
    encoded = jax.vmap(sa.encode, in_axes=(0, 0, 0, None, None, None))(
        keys, updates, weights, scale, 5.0, bits)
    decoded = sa.decode(encoded.sum(0, dtype=jnp.uint32), scale, bits)
    want = np.asarray(weights) @ np.asarray(updates)
    # Each of the 4 encodings rounds by less than one unit (and float32 keeps 24 bits).
    np.testing.assert_allclose(np.asarray(decoded), want, atol=4 / float(scale),
                               rtol=2e-7)


def test_a_masked_update_is_independent_of_the_update():
  from scipy import stats  # pylint: disable=g-import-not-at-top
  bits, size, rounds = 16, 16, 1500
  ids = jnp.arange(3)
  extremes = {"zeros": np.zeros(size), "max": np.full(size, 2**bits - 1)}
  histograms = {}
  for name, value in extremes.items():
    encoded = jnp.asarray(np.stack([value, value, value]), jnp.uint32)

    def client0(key):
      return _masked_vectors(key, encoded, ids, jnp.ones(3, bool), bits)[0]

    seen = jax.vmap(client0)(jax.random.split(RNG, rounds))  # one per round key
    top = np.asarray(seen).ravel() >> (bits - 4)  # 16 bins of the top 4 bits
    histograms[name] = np.bincount(top, minlength=16)
    # Uniform whatever the update: a chi-square test does not reject it.
    assert stats.chisquare(histograms[name]).pvalue > 1e-3
  # ... and the two histograms are indistinguishable from each other.
  assert stats.chi2_contingency(np.stack(list(histograms.values()))).pvalue > 1e-3
  # Over random updates, the masked value does not correlate with the update.
  rng = np.random.default_rng(1)
  updates = jnp.asarray(rng.integers(0, 2**bits, size=(rounds, 3, size)), jnp.uint32)
  seen = jax.vmap(lambda k, e: _masked_vectors(k, e, ids, jnp.ones(3, bool), bits)[0])(
      jax.random.split(RNG, rounds), updates)
  r = np.corrcoef(np.asarray(updates[:, 0]).ravel().astype(float),
                  np.asarray(seen).ravel().astype(float))[0, 1]
  assert abs(r) < 0.03


@pytest.mark.parametrize("dropped_ids", [(), (2,), (0, 5), (1, 3)])
def test_dropouts_still_give_the_survivors_exact_sum(dropped_ids):
  bits = 32
  ids = jnp.arange(6) * 2  # participants 0, 2, ..., 10
  rng = np.random.default_rng(len(dropped_ids))
  encoded = jnp.asarray(rng.integers(0, 2**32, size=(6, 40)), jnp.uint32)
  masked = _masked_vectors(RNG, encoded, ids, jnp.ones(6, bool), bits)
  dropped = np.isin(np.arange(6), dropped_ids)
  received = jnp.where(jnp.asarray(~dropped)[:, None], masked, 0).sum(0, dtype=jnp.uint32)
  total = sa.unmask(RNG, received, ids, jnp.asarray(~dropped), jnp.asarray(dropped), bits)
  want = np.asarray(encoded, np.uint64)[~dropped].sum(0) % 2**32
  np.testing.assert_array_equal(np.asarray(total, np.uint64), want)


def test_round_bytes_count_the_four_protocol_rounds():
  up, down = sa.round_bytes(num_params=1000, bits=32, participants=4, dropped=1)
  share = 2 * 32 + 2 * 4 + 28
  assert up == 4 * 64 + 4 * 3 * share + 3 * 4000 + 3 * 3 * 32
  assert down == 16 * 64 + 4 * 3 * share + 9 * 4
  # The mask overhead grows with the square of the participants, the payload linearly.
  assert sa.round_bytes(1000, 32, 8, 0)[0] - 8 * 4000 > 4 * (up - 3 * 4000)


def _setup(model=None):
  model = model or fdx.mlp(hidden=(8,), num_classes=2)
  _, _, data = make_data()
  return model, data, init_params(model)


def test_secure_fedavg_equals_fedavg_and_survives_dropouts():
  model, data, params = _setup()
  make = lambda **kw: fdx.fedavg(model, optax.sgd(0.3), batch_size=3, local_steps=4,
                                 **kw)
  plain = make()
  want, _ = plain.run(plain.init(params, data, RNG), data, num_rounds=3)
  for chunk in (None, 3):
    secure = make(aggregator=agg.chain(agg.mean(), agg.secure_sum(bound=10.0)),
                  client_chunk=chunk)
    state, metrics = secure.run(secure.init(params, data, RNG), data, num_rounds=3)
    assert_trees_close(state.params, want.params, atol=1e-6)
    assert not np.any(metrics["secagg_failed"])
  # One of 4 drops out after masking each round (tolerance 0.3 allows floor(1.2) = 1):
  # one round equals FedAvg over the other three, whichever it was.
  secure = make(aggregator=agg.chain(agg.mean(),
                                     agg.secure_sum(bound=10.0, dropout=0.25)))
  state, metrics = secure.run(secure.init(params, data, RNG), data, num_rounds=1)
  assert int(metrics["secagg_dropped"][0]) == 1 and int(metrics["num_uploads"][0]) == 3
  matches = []
  for k in range(4):
    without_k = np.ones((1, 4), np.float32)
    without_k[0, k] = 0
    ref, _ = plain.run(plain.init(params, data, RNG), data, participation=without_k)
    matches.append(all(np.allclose(a, b, atol=1e-6) for a, b in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(ref.params))))
  assert sum(matches) == 1
  # Two of four drop: more than the protocol tolerates, so the round is discarded.
  failing = make(aggregator=agg.chain(agg.mean(),
                                      agg.secure_sum(bound=10.0, dropout=0.5)))
  state, metrics = failing.run(failing.init(params, data, RNG), data, num_rounds=1)
  assert bool(metrics["secagg_failed"][0])
  assert_trees_close(state.params, params, atol=0)


def test_a_dropout_share_within_the_tolerance_never_fails_a_round():
  """2 to 20 senders, dropout shares up to the tolerance 0.3: floor(d * m) drop and
  the protocol (which survives floor(0.3 * m)) never fails; above it, rounds fail."""
  num_clients = 20

  def begin(stage, senders, key):
    sending = jnp.arange(num_clients) < senders
    ctx = {"clients": {"sending": sending, "raw_weight": sending.astype(jnp.float32)},
           "scale_weights": jnp.ones((num_clients,)), "noise_key": key}
    started, _ = stage.begin(None, ctx)
    return started["secagg_dropped"].sum(), started["secagg_failed"]

  for dropout in (0.1, 0.2, 0.25, 0.3, 0.5):
    run = jax.jit(functools.partial(begin, agg.secure_sum(dropout=dropout,
                                                          tolerance=0.3)))
    for senders in range(2, num_clients + 1):
      dropped, failed = run(senders, jax.random.PRNGKey(senders))
      assert int(dropped) == math.floor(dropout * senders + 1e-6), (dropout, senders)
      assert bool(failed) == (int(dropped) > math.floor(0.3 * senders + 1e-6)), (
          dropout, senders)
      if dropout <= 0.3:
        assert not bool(failed), (dropout, senders)


def test_quantization_is_unbiased_and_uses_the_stated_levels():
  x = jnp.asarray(np.random.default_rng(0).normal(size=64), jnp.float32)
  for bits in (4, 8):
    draws = jax.vmap(lambda k: fdx.stochastic_quantize(k, x, bits))(
        jax.random.split(RNG, 4000))
    assert len(np.unique(np.asarray(draws))) <= 2**bits + 1  # levels (+ float rounding)
    step = 2 * float(jnp.abs(x).max()) / (2**bits - 1)
    # Each draw is within one step of x, and the mean converges to x:
    # std of a two-point rounding is at most step / 2.
    assert float(jnp.abs(draws - x).max()) <= step * (1 + 1e-5)
    np.testing.assert_allclose(np.asarray(draws.mean(0)), np.asarray(x),
                               atol=5 * step / 2 / np.sqrt(4000))


def test_top_k_keeps_exactly_k_largest_entries():
  x = jnp.array([0.1, -3.0, 0.0, 2.0, -0.5, 0.0, 1.0])
  sparse, kept = fdx.top_k(x, 3)
  assert int(kept.sum()) == 3
  np.testing.assert_array_equal(np.asarray(sparse), [0, -3.0, 0, 2.0, 0, 0, 1.0])
  zeros = jnp.zeros(5)
  assert int(fdx.top_k(zeros, 2)[1].sum()) == 2  # k kept even when all tie


def test_upload_bytes_are_exact():
  assert fdx.upload_bytes("none", 1000) == 4000
  assert fdx.upload_bytes("quantize", 1001, bits=4) == 501 + 4
  assert fdx.upload_bytes("quantize", 1000, bits=8) == 1000 + 4
  assert fdx.upload_bytes("topk", 1000, topk_fraction=0.01) == 10 * 8
  assert fdx.upload_bytes("topk", 10, topk_fraction=0.01) == 8  # at least one entry


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_top_k_with_error_feedback_matches_a_sequential_reference():
  model, data, params = _setup()
  frac, lr, rounds = 0.25, 0.3, 3
  algo = fdx.fedavg(model, optax.sgd(lr), batch_size=3, local_steps=4,
                    aggregator=agg.chain(agg.mean(), agg.top_k(frac)))
  state = algo.init(params, data, RNG)
  local = fdx.local_only(model, optax.sgd(lr), batch_size=3, local_steps=4)
  global_flat = _flat(params)
  residuals = np.zeros((4, global_flat.size))
  sizes = np.asarray(data.num_examples, float)
  k = fdx.upload_bytes("topk", global_flat.size, topk_fraction=frac) // 8
  for _ in range(rounds):
    # Reference: each client's local update from the current global model (same data
    # streams as FedAvg's), plus its residual, top-k, averaged with weights n_k.
    start = jax.tree.map(lambda x: x, state.params)
    lstate = local.init(start, data, RNG).replace(positions=state.positions)
    lstate, _ = local.run(lstate, data, num_rounds=1)
    lstate = lstate.replace(round=state.round)
    sent = []
    for c in range(4):
      corrected = _flat(jax.tree.map(lambda p: p[c], lstate.params)) - global_flat
      corrected = corrected + residuals[c]
      keep = np.argsort(-np.abs(corrected), kind="stable")[:k]
      sparse = np.zeros_like(corrected)
      sparse[keep] = corrected[keep]
      residuals[c] = corrected - sparse
      sent.append(sparse)
    global_flat = global_flat + (sizes / sizes.sum()) @ np.stack(sent)
    state, _ = algo.apply(state, data)
    np.testing.assert_allclose(_flat(state.params), global_flat, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.client_residuals), residuals, atol=1e-5)
    assert np.all((np.asarray(state.client_residuals) != 0).sum(1)
                  <= global_flat.size - k + 1e-9)
  # Nothing is lost overall: the model moved by the sent parts, the rest waits.
  plain = fdx.fedavg(model, optax.sgd(lr), batch_size=3, local_steps=4,
                     aggregator=agg.chain(agg.mean(), agg.top_k(1.0)))
  full, _ = plain.run(plain.init(params, data, RNG), data, num_rounds=1)
  ref = fdx.fedavg(model, optax.sgd(lr), batch_size=3, local_steps=4)
  ref_state, _ = ref.run(ref.init(params, data, RNG), data, num_rounds=1)
  assert_trees_close(full.params, ref_state.params, atol=1e-6)


def test_quantized_fedavg_is_close_to_fedavg_and_chunking_changes_nothing():
  model, data, params = _setup()
  make = lambda **kw: fdx.fedavg(model, optax.sgd(0.3), batch_size=3, local_steps=4,
                                 **kw)
  plain = make()
  want, _ = plain.run(plain.init(params, data, RNG), data, num_rounds=2)
  q16 = make(aggregator=agg.chain(agg.mean(), agg.quantize(16)))
  got, _ = q16.run(q16.init(params, data, RNG), data, num_rounds=2)
  assert_trees_close(got.params, want.params, atol=1e-3)
  for kw in (dict(aggregator=agg.chain(agg.mean(), agg.quantize(4))),
             dict(aggregator=agg.chain(agg.mean(), agg.top_k(0.2)))):
    whole = make(**kw)
    chunked = make(client_chunk=3, **kw)
    a, _ = whole.run(whole.init(params, data, RNG), data, num_rounds=2)
    b, _ = chunked.run(chunked.init(params, data, RNG), data, num_rounds=2)
    assert_trees_close(a.params, b.params, atol=1e-6)
    assert_trees_close(a.client_residuals, b.client_residuals, atol=1e-6)


@pytest.mark.parametrize("build,message", [
    (lambda: agg.chain(agg.mean(), "zip"), r"chain takes stages .* got 'zip'"),
    (lambda: agg.quantize(3), r"compression_bits must be one"),
    (lambda: agg.top_k(0.0), r"topk_fraction must lie in \(0, 1\]"),
    (lambda: agg.secure_sum(40), r"secagg_bits must be an integer"),
    (lambda: agg.chain(agg.median(), agg.secure_sum()), r"needs aggregator='mean'"),
    (lambda: agg.chain(agg.top_k(0.1), agg.secure_sum()), r"already quantizes"),
    (lambda: agg.secure_sum(bound=0.0), r"secagg_bound must be > 0"),
    (lambda: agg.secure_sum(tolerance=1.0), r"secagg_tolerance must lie"),
])
def test_bad_compression_and_secagg_arguments_are_named(build, message):
  with pytest.raises((ValueError, TypeError), match=message):
    fdx.fedavg(fdx.logistic_regression(), optax.sgd(0.1), batch_size=2, local_steps=1,
               aggregator=build())


def test_pairwise_mask_signs_are_antisymmetric():
  ids = jnp.array([1, 4])
  a = sa.pairwise_mask(RNG, ids[0], ids, jnp.ones(2, bool), 8)
  b = sa.pairwise_mask(RNG, ids[1], ids, jnp.ones(2, bool), 8)
  np.testing.assert_array_equal(np.asarray(a + b), 0)
  assert list(itertools.islice(np.asarray(a), 1))[0] != 0


def test_bits_are_checked_against_the_participants_and_the_error_stays_within_a_tenth():
  """At the most participants its bits allow, the decoded mean of bound-sized updates
  is within bound / 10 of the float mean (each encoding rounds by under one unit); one
  participant more is refused before compiling, naming the bits that fit. (8 bits and
  127 participants had given a NaN model, 100 an error as large as the update.)"""
  bits, bound = 8, 1.0
  most = sa.max_participants(bits)
  assert most == 11 and sa.max_participants(16) == 2978
  rng = np.random.default_rng(3)
  updates = rng.uniform(-bound, bound, size=(most, 200)).astype(np.float32)
  weights = np.full(most, 1.0 / most, np.float32)
  scale = sa.fixed_point_scale(bound, weights.sum(), most, bits)
  keys = jax.random.split(RNG, most)
  encoded = jax.vmap(sa.encode, in_axes=(0, 0, 0, None, None, None))(
      keys, jnp.asarray(updates), jnp.asarray(weights), scale, bound, bits)
  decoded = sa.decode(encoded.sum(0, dtype=jnp.uint32), scale, bits)
  error = np.abs(np.asarray(decoded) - updates.mean(0)).max()
  assert error <= bound / 10
  assert error > 0  # 8 bits do round: the bound is what is tested
  model = fdx.logistic_regression()
  xs = [np.ones((2, 5), np.float32)] * (most + 1)
  ys = [np.array([0, 1])] * (most + 1)
  data = fdx.stack_clients(xs, ys, num_classes=2)
  algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=2, local_steps=1,
                    aggregator=agg.chain(agg.mean(), agg.secure_sum(bits)))
  state = algo.init(model.init(RNG, jnp.zeros((1, 5))), data, RNG)
  with pytest.raises(ValueError, match=r"secagg_bits = 8 fits at most 11 participants "
                                       r"per round .* got 12; use secagg_bits >= 9"):
    algo.run(state, data, 1)
  participation = np.ones((1, most + 1), np.float32)
  participation[0, 0] = 0  # 11 participants fit
  algo.run(state, data, participation=participation)


def test_study_refuses_too_few_secagg_bits_and_shows_failed_secure_rounds(tmp_path,
                                                                       monkeypatch):
  """The study: too few bits for its clients is refused before anything is written;
  a dropout within tolerance trains (3 clients at 0.3 had failed every round, the
  pooled test loss never moving) with `secagg_failed_rounds` = 0 on every row; a run
  whose every secure round fails stops with an error naming the method and seed."""
  import re  # pylint: disable=g-import-not-at-top
  from fedjax_dx import study  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _build  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _execute  # pylint: disable=g-import-not-at-top
  from tests.test_study import _study_frame  # pylint: disable=g-import-not-at-top
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.methods, config.secure_aggregation, config.secagg_bits = "fedavg", True, 8
  config.dataset.num_clients = 12
  with pytest.raises(study.StudyError, match=re.escape(
      "config.secagg_bits = 8 fits at most 11 participants per round")):
    study.run_study(config, str(tmp_path / "bits"), quiet=True)
  assert not (tmp_path / "bits" / "config.json").exists()
  frame = _study_frame(tmp_path, "dropout", methods="fedavg", secure_aggregation=True,
                       secagg_dropout=0.3, num_seeds=1)
  assert (frame["secagg_failed_rounds"] == 0).all()
  pooled = frame[(frame["client"] == "pooled") & (frame["split"] == "test")]
  assert pooled["loss"].nunique() == 3  # rounds 0, 2 and 4: the model moved
  build = _build.aggregator_chain

  def beyond_tolerance(config, method, canaries_from=None):  # what the config checks
    chain = build(config, method, canaries_from)  # refuse, to test the stop
    return agg.chain(*chain.stages[:-1], agg.secure_sum(bound=1.0, dropout=0.5,
                                                        tolerance=0.3))

  monkeypatch.setattr(_build, "aggregator_chain", beyond_tolerance)
  monkeypatch.setattr(_execute, "aggregator_chain", beyond_tolerance)
  with pytest.raises(study.StudyError, match=r"fedavg seed 0: secure aggregation failed "
                                             r"in 4 of 4 rounds .* it never trained"):
    _study_frame(tmp_path, "failing", methods="fedavg", secure_aggregation=True,
                 num_seeds=1, programs=study.ProgramCache())
