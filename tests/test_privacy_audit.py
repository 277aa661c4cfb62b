"""The canary audit: an empirical epsilon (lower bound) beside the accountant's.

Canary clients upload crafted updates along their own directions, each in with
probability 1/2; the final model's move along each direction scores it; jax-privacy's
CanaryScoreAuditor bounds epsilon from below. The audit must see leakage where there
is no noise, see almost none under heavy noise, stay below the accountant, and catch
a mechanism that adds less noise than it claims.
"""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_dx as fdx
from fedjax_dx import agg
from fedjax_dx import study
from fedjax_dx.privacy import _audit

from configs import test as test_config

# Looked up, not imported: jax-privacy takes about 1 s to import, paid only by a worker
# that runs an audit (`_audit` imports it).
if importlib.util.find_spec("jax_privacy") is None:
  pytest.skip("the audit needs jax-privacy (Python >= 3.11)", allow_module_level=True)

CANARIES, ROUNDS, CLIENTS = 100, 10, 4


@dataclasses.dataclass(frozen=True)
class WrongSensitivity(agg.Gaussian):
  """A broken mechanism for the test: claims noise z (its privacy event) but adds
  noise scaled to a twentieth of the sensitivity."""

  def decode(self, state, total, ctx, clients):
    weaker = dataclasses.replace(self, noise_multiplier=self.noise_multiplier / 20)
    return agg.Gaussian.decode(weaker, state, total, ctx, clients)


@pytest.fixture(scope="module")
def federation():
  data = fdx.synthetic_binary(seed=0, num_clients=CLIENTS, examples_per_client=40)
  model = fdx.mlp([32], 2)  # 449 parameters: 100 orthogonal canary directions fit
  params = model.init(jax.random.PRNGKey(0), data.train.features[0, :1])
  return model, params, _audit.with_canaries(data.train, CANARIES)


def _audited(federation, noise_stage, seeds):
  """One compiled FedAvg with canaries; each seed draws other canaries in."""
  model, params, train = federation
  chain = agg.chain(agg.canaries(CLIENTS, CANARIES, 1.0), agg.clip(1.0),
                    agg.mean("uniform"), noise_stage)
  algo = fdx.fedavg(model, optax.sgd(0.05), batch_size=4, local_steps=2,
                    aggregator=chain)
  run = jax.jit(algo.run.rounds)
  results = []
  for seed in seeds:
    state = algo.init(params, train, jax.random.PRNGKey(seed))
    participation = _audit.canary_participation(
        seed, np.ones((ROUNDS, CLIENTS), np.float32), CANARIES)
    state, _ = run(state, train, jnp.asarray(participation))
    scores = _audit.canary_scores(params, state.params,
                                  state.aggregator["canaries"]["directions"])
    results.append(_audit.audit(scores, _audit.canary_inclusion(seed, CANARIES),
                                delta=1e-5))
  claimed = chain.epsilon(rounds=ROUNDS, sampling_rate=1.0, delta=1e-5)
  return results, claimed


def test_canaries_craft_orthonormal_updates_and_join_with_probability_half():
  directions = np.asarray(agg.canary_directions(0, 20, 50))
  np.testing.assert_allclose(directions @ directions.T, np.eye(20), atol=1e-5)
  inside = np.concatenate([_audit.canary_inclusion(s, 200) for s in range(10)])
  assert 0.45 < inside.mean() < 0.55
  participation = _audit.canary_participation(3, np.ones((5, 2), np.float32), 200)
  np.testing.assert_array_equal(participation[:, 2:],
                                np.tile(_audit.canary_inclusion(3, 200), (5, 1)))


def test_without_noise_the_audit_sees_leakage(federation):
  (result,), claimed = _audited(federation, agg.gaussian(0.0), [0])
  assert claimed == float("inf")
  assert result.auroc == 1.0  # every canary that was in is told apart
  assert result.epsilon_one_run > 1.5 and result.epsilon_clopper_pearson > 1.5


def test_heavy_noise_leaves_the_audit_near_zero(federation):
  (result,), claimed = _audited(federation, agg.gaussian(30.0), [0])
  assert result.epsilon_one_run < 0.3 and claimed < 1.0


def test_the_lower_bound_stays_below_the_accountant(federation):
  """Over a small grid of noise and seeds, no bound exceeds the accountant's epsilon
  (each holds with 95% confidence: at most a rare exception is allowed)."""
  exceed = 0
  for noise in (1.0, 3.0):
    results, claimed = _audited(federation, agg.gaussian(noise), [0, 1, 2])
    exceed += sum(r.epsilon_one_run > claimed for r in results)
    assert all(r.epsilon_one_run > 0 for r in results) or noise > 1
  assert exceed <= 1


def test_a_mechanism_with_too_little_noise_is_caught(federation):
  """Noise scaled to a twentieth of the sensitivity while claiming z = 12: the
  audit's lower bound exceeds the epsilon the mechanism claims."""
  honest, claimed = _audited(federation, agg.gaussian(12.0), [0])
  broken, claimed_broken = _audited(federation, WrongSensitivity(12.0), [0])
  assert claimed_broken == pytest.approx(claimed)
  assert honest[0].epsilon_one_run <= claimed
  assert broken[0].epsilon_one_run > claimed_broken


def _audit_config(**changes):
  config = test_config.get_config()
  config.methods = "fedavg,centralized"
  config.num_seeds = 1
  config.rounds = 4
  config.membership_audit = False
  config.model.name = "mlp"
  config.model.hidden = "16"
  config.dp = "central"
  config.dp_noise = 0.0
  config.privacy_audit = True
  config.audit_canaries = 40
  for field, value in changes.items():
    config[field] = value
  return config


def test_a_study_reports_both_bounds_and_hides_the_canaries(tmp_path):
  result = study.run(_audit_config(), str(tmp_path / "audit"), quiet=True)
  metrics = result.metrics
  fed = metrics[(metrics["method"] == "fedavg") & (metrics["split"] == "test")]
  assert set(fed["client"]) == {"0", "1", "2", "pooled"}  # no canary rows
  final = fed[(fed["round"] == 4) & (fed["client"] == "pooled")].iloc[0]
  assert final["epsilon_lower"] > 1.0 and final["epsilon_lower_confidence"] == 0.95
  assert final["audit_canaries"] == 40 and final["audit_auroc"] == 1.0
  central = metrics[metrics["method"] == "centralized"]
  assert central["epsilon_lower"].isna().all()  # not private: not audited
  row = result.summary[(result.summary["method"] == "fedavg")
                       & (result.summary["client"] == "pooled")].iloc[0]
  assert row["epsilon_lower"] == pytest.approx(final["epsilon_lower"])
  paths = study.make_report(str(tmp_path / "audit"))
  assert "privacy_bounds" in paths
  assert "canary audit, lower bound" in open(paths["report"]).read()


def test_audits_the_study_cannot_run_are_refused(tmp_path):
  with pytest.raises(study.StudyError, match="config.privacy_audit = True: expected "
                     "false with fixed-size cohorts"):
    study.run(_audit_config(clients_per_round=2, sampling="uniform"),
              str(tmp_path / "x"), quiet=True)


def _example_audit(federation, noise):
  """DP-SGD (Poisson batches) with 100 canary examples spread over the hospitals."""
  model, params, _ = federation
  data = fdx.synthetic_binary(seed=0, num_clients=CLIENTS, examples_per_client=60)
  train, inside = _audit.with_canary_examples(data.train, CANARIES, seed=0)
  opt = fdx.client.dp_sgd(optax.sgd(0.5), clip_norm=1.0, noise_multiplier=noise,
                          batch_sampling="poisson", canaries=CANARIES)
  algo = fdx.fedavg(model, opt, batch_size=8, local_steps=20)
  state, _ = algo.run(algo.init(params, train, jax.random.PRNGKey(1)), train,
                      num_rounds=5)
  size = sum(x.size for x in jax.tree.leaves(params))
  scores = _audit.canary_scores(params, state.params,
                                agg.canary_directions(0, CANARIES, size))
  return _audit.audit(scores, inside, delta=1e-5), train, data


def test_example_level_canaries_leak_without_noise_and_not_with_it(federation):
  """Canary examples (marked rows the DP-SGD gradient replaces by the clipping norm
  against the canary's direction): the ones that are in sit in the hospitals' rows
  (and only they); without noise the audit tells them apart, with noise 8 it cannot."""
  leaky, train, data = _example_audit(federation, 0.0)
  added = np.asarray(train.num_examples) - np.asarray(data.train.num_examples)
  assert added.sum() == _audit.canary_inclusion(0, CANARIES).sum()
  assert leaky.auroc > 0.85 and leaky.epsilon_one_run > 0.8
  private, _, _ = _example_audit(federation, 8.0)
  assert private.epsilon_one_run < 0.3


def test_a_study_audits_example_level_dp(tmp_path):
  result = study.run(_audit_config(dp="example", batch_size=4, audit_canaries=30),
                     str(tmp_path / "example"), quiet=True)
  metrics = result.metrics
  final = metrics[(metrics["method"] == "fedavg") & (metrics["split"] == "test")
                  & (metrics["round"] == 4) & (metrics["client"] == "pooled")].iloc[0]
  assert final["audit_canaries"] == 30 and final["epsilon_lower"] >= 0
  assert final["dp_sampling"] == "poisson batches"
  # The canary examples never reach an evaluation: test sizes are the real ones.
  sizes = metrics[(metrics["method"] == "fedavg") & (metrics["split"] == "train")
                  & (metrics["client"] != "pooled")]["num_examples"]
  assert sizes.max() <= 40
