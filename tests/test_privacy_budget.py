"""The accounting matches the sampling that runs, a budget stops training, and each
hospital sees its own example-level epsilon."""

import dp_accounting
import numpy as np
import pandas as pd
import pytest

import fedjax_dx as fdx
from fedjax_dx import study
from fedjax_dx.core import _sampling
from fedjax_dx.privacy import _accounting
from fedjax_dx.study import _build

from configs import test as test_config

PROGRAMS = study.ProgramCache()


def test_fixed_size_cohorts_are_accounted_as_sampled_without_replacement():
  """3 of 12 clients per round, drawn without replacement: dp-accounting's
  SampledWithoutReplacement event under replace-one neighbours, with the noise
  relative to the replace-one sensitivity 2C; more than the Poisson figure here."""
  ledger = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  ledger.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(
          12, 3, dp_accounting.GaussianDpEvent(1.5 / 2)), 20))
  fixed = fdx.privacy_epsilon(1.5, 3 / 12, 20, 1e-5, sampling="without_replacement",
                              population=12)
  assert fixed == pytest.approx(ledger.get_epsilon(1e-5), rel=1e-9)
  assert fixed > fdx.privacy_epsilon(1.5, 3 / 12, 20, 1e-5)
  z = fdx.noise_for_epsilon(8.0, 1e-5, 3 / 12, 20, sampling="without_replacement",
                            population=12)
  assert fdx.privacy_epsilon(z, 3 / 12, 20, 1e-5, sampling="without_replacement",
                             population=12) == pytest.approx(8.0, rel=1e-2)
  with pytest.raises(ValueError, match="accounted by the rdp accountant only"):
    fdx.privacy_epsilon(1.5, 3 / 12, 20, 1e-5, "pld", sampling="without_replacement",
                        population=12)
  with pytest.raises(ValueError, match="needs population"):
    fdx.privacy_epsilon(1.5, 3 / 12, 20, 1e-5, sampling="without_replacement")


def test_poisson_participation_draws_each_client_independently():
  sizes = np.array([10, 0, 10, 10, 10, 10, 10, 10, 10])  # client 1 has no data
  masks = _sampling.sample_participation(3, 4000, sizes, 2, by="poisson")
  again = _sampling.sample_participation(3, 4000, sizes, 2, by="poisson")
  np.testing.assert_array_equal(masks, again)
  assert masks[:, 1].sum() == 0
  counts = masks.sum(1)
  assert len(set(counts.tolist())) > 3  # the cohort's size varies
  rate = 2 / 8
  np.testing.assert_allclose(masks[:, sizes > 0].mean(0), rate, atol=0.03)
  np.testing.assert_allclose(counts.mean(), 2.0, atol=0.1)


def _config(**changes):
  config = test_config.get_config()
  config.methods = "fedavg"
  config.num_seeds = 1
  config.membership_audit = False
  config.dataset.num_clients = 6
  for field, value in changes.items():
    config[field] = value
  return config


def _pooled(tmp_path, name, **changes):
  result = study.run(_config(**changes), str(tmp_path / name), quiet=True,
                     programs=PROGRAMS)
  metrics = result.metrics
  return metrics[(metrics["client"] == "pooled") & (metrics["split"] == "test")
                 & (metrics["method"] == "fedavg")].sort_values("round"), result


def test_studies_account_the_sampling_they_run(tmp_path):
  """Central DP with 3 of 6 clients per round: by default Poisson cohorts (a varying
  number of participants, the mean divided by the expected 3) accounted as Poisson;
  `sampling = uniform` runs fixed-size cohorts, accounted without replacement."""
  poisson, _ = _pooled(tmp_path, "poisson", dp="central", clients_per_round=3)
  assert set(poisson["dp_sampling"]) == {"poisson"}
  assert poisson["epsilon"].iloc[-1] == pytest.approx(
      fdx.privacy_epsilon(1.0, 0.5, 4, 1e-5), rel=1e-5)
  chain = _build.aggregator_chain(_config(dp="central", clients_per_round=3), "fedavg")
  assert chain.find(fdx.agg.Mean).expected_clients == 3
  participants = _sampling.sample_participation(0, 4, np.full(6, 1), 3, by="poisson")
  assert len(set(participants.sum(1).tolist())) > 1  # seed 0's cohorts vary in size
  fixed, _ = _pooled(tmp_path, "fixed", dp="central", clients_per_round=3,
                     sampling="uniform")
  assert set(fixed["dp_sampling"]) == {"without replacement"}
  assert fixed["epsilon"].iloc[-1] == pytest.approx(fdx.privacy_epsilon(
      1.0, 0.5, 4, 1e-5, sampling="without_replacement", population=6), rel=1e-5)
  assert fixed["epsilon_guarantee"].all()


@pytest.mark.parametrize("changes,message", [
    (dict(dp="central", clients_per_round=3, sampling="size"),
     "config.sampling = 'size': expected auto, uniform or poisson with dp"),
    (dict(dp="central", clients_per_round=3, sampling="uniform", dp_accountant="pld"),
     "config.dp_accountant = 'pld': expected rdp for fixed-size cohorts"),
    (dict(dp="central", dp_noise=0.3, dp_budget=1.0),
     "config.dp_budget = 1.0: fedavg spends epsilon .* in its first round already"),
])
def test_sampling_the_accountant_cannot_vouch_for_is_refused(tmp_path, changes,
                                                             message):
  with pytest.raises(study.StudyError, match=message):
    study.run(_config(**changes), str(tmp_path / "x"), quiet=True, programs=PROGRAMS)
  assert not (tmp_path / "x").exists()


def test_a_budget_stops_training_at_the_last_round_within_it(tmp_path):
  """dp_budget = 6 with full participation at noise 1: the accountant's epsilon after
  r rounds; training stops at the last r within 6, the rows and the summary table say
  so."""
  spend = lambda r: fdx.privacy_epsilon(1.0, 1.0, r, 1e-5)
  last = max(r for r in range(1, 9) if spend(r) <= 6.0)
  assert 1 <= last < 8
  rows, result = _pooled(tmp_path, "budget", dp="central", rounds=8, eval_every=2,
                         dp_budget=6.0)
  assert rows["round"].max() == last
  assert rows["epsilon"].iloc[-1] == pytest.approx(spend(last), rel=1e-5)
  assert spend(last + 1) > 6.0
  assert set(rows["dp_budget_rounds"]) == {last}
  table = (tmp_path / "budget" / "summary_table.md").read_text()
  assert f"stopped by dp_budget = 6 after round {last}" in table
  assert result.summary["dp_budget_rounds"].iloc[0] == last
  # A budget the whole run keeps within changes nothing but the dp_budget column.
  rows, _ = _pooled(tmp_path, "roomy", dp="central", rounds=4, dp_budget=100.0)
  assert rows["round"].max() == 4 and "dp_budget_rounds" not in rows


def test_each_hospital_sees_its_own_example_level_epsilon(tmp_path):
  """DP-SGD in hospitals of different sizes: each site's rows carry its own epsilon
  (batch / n_k sampling over its own steps); the pooled row the worst; with shuffled
  batches marked as an approximation (accounted as Poisson), with Poisson batches (the
  default) a guarantee."""
  config = _config(dp="example", batch_size=4, dp_batches="shuffle")
  config.dataset.size_skew = 1.0
  result = study.run(config, str(tmp_path / "example"), quiet=True, programs=PROGRAMS)
  metrics = result.metrics
  final = metrics[(metrics["split"] == "test") & (metrics["round"] == 4)
                  & (metrics["method"] == "fedavg")].set_index("client")
  sizes = [int(final.loc[str(k), "num_examples"]) for k in range(6)]
  partition = pd.read_json(tmp_path / "example" / "partition.json").iloc[:, 0]
  train_sizes = np.asarray(partition["label_counts"]).sum(1)
  expected = _accounting.example_level_epsilons(1.0, 4, train_sizes, 4 * 3, 1e-5)
  got = [final.loc[str(k), "epsilon_hospital"] for k in range(6)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert len(set(np.round(got, 4))) > 1 and len(set(sizes)) > 1
  assert final.loc["pooled", "epsilon"] == pytest.approx(max(expected), rel=1e-5)
  assert not final["epsilon_guarantee"].any()
  assert "not a guarantee" in final.loc["pooled", "dp_sampling"]
  poisson, _ = _pooled(tmp_path, "poisson_batches", dp="example", batch_size=4)
  assert poisson["epsilon_guarantee"].all()
  assert set(poisson["dp_sampling"]) == {"poisson batches"}
  partition = pd.read_json(tmp_path / "poisson_batches" / "partition.json").iloc[:, 0]
  sizes = np.asarray(partition["label_counts"]).sum(1)
  assert poisson["epsilon"].iloc[-1] == pytest.approx(
      fdx.example_level_epsilon(1.0, 4, sizes, 4 * 3, 1e-5), rel=1e-5)
