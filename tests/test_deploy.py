"""The deployed round (`fedjax_dx.deploy`): Flower's ClientApp and the server's loop end
on the simulated run's global model, bit for bit; the wire format checks what arrives;
bad hospitals and settings are refused by name; and a real deployment (a SuperLink and
one SuperNode per hospital, separate processes on loopback) ends where the simulation
does."""

import copy
import os

import jax
import numpy as np
import pytest

from tests.conftest import TEST_CACHE

if os.environ.get("CI", "").lower() == "true":
  import flwr  # noqa: F401  (CI installs the test extra, which has Flower: never skipped)
else:
  pytest.importorskip("flwr", reason="Flower is the deploy extra: pip install "
                      "'fedjax_dx[deploy]'")

from fedjax_dx import deploy  # noqa: E402
from fedjax_dx import study  # noqa: E402
from fedjax_dx.deploy import _loopback, _plan, _wire  # noqa: E402
from fedjax_dx.study import _build  # noqa: E402

ROUNDS = 2


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
  config = study.load_config("test")
  data = _build.load_data(config).data
  paths = deploy.export_hospitals(data, str(tmp_path_factory.mktemp("hospitals")))
  return config, data, paths


def _config(base, **overrides):
  config = copy.deepcopy(base)
  for field, value in overrides.items():
    config[field] = value
  return config


def _assert_same_tree(actual, expected):
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               actual, expected)


CASES = {
    "fedavg": ("fedavg", {}),
    "fedprox": ("fedprox", {}),
    "fedadam": ("fedadam", {}),
    "scaffold": ("scaffold", {}),
    # Client-level DP with the noise drawn by the server (it holds the key), Poisson
    # sampling of 2 of 3 hospitals per round by the project's sampler.
    "central_dp_sampled": ("fedavg", {"dp": "central", "dp_noise": 0.7,
                                      "clients_per_round": 2}),
    # Noise and clipping in each hospital's process; example-level DP-SGD there too.
    "local_dp": ("fedavg", {"dp": "local", "dp_noise": 0.5}),
    "example_dp": ("fedprox", {"dp": "example", "dp_noise": 0.8}),
    "secure_sum": ("fedavg", {"secure_aggregation": True}),
    # Error-feedback residuals stay in each hospital's context state.
    "topk_error_feedback": ("fedavg", {"compression": "topk", "topk_fraction": 0.3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flower_apps_end_on_the_simulated_global_model(hospitals, case):
  base, data, paths = hospitals
  method, overrides = CASES[case]
  config = _config(base, **overrides)
  grid = deploy.InProcessGrid(deploy.app.client, [{"data-path": p} for p in paths])
  state, scores = deploy.serve(grid, config, method, seed=4, rounds=ROUNDS,
                               compilation_cache="", log=lambda line: None)
  simulated = deploy.simulate(config, method, 4, data, ROUNDS)
  _assert_same_tree(state.params, simulated.params)
  if method == "scaffold":  # the server's c, and each hospital's own c_k in its context
    _assert_same_tree(state.control, simulated.control)
  for k, node in enumerate(grid.get_node_ids()):
    held = _wire.from_record(grid.contexts[node].state["mine"],
                             _plan.own_rows(simulated, k), f"hospital {k}")
    np.testing.assert_array_equal(held["position"], simulated.positions[k])
    _assert_same_tree(held["rows"], jax.tree.map(lambda r, k=k: r[k],
                                                  simulated.client_rows))
    if method == "scaffold":
      _assert_same_tree(held["control"], jax.tree.map(lambda c, k=k: c[k],
                                                      simulated.client_controls))
  assert sorted(scores) == [0, 1, 2]
  assert all(0 <= s["accuracy"] <= 1 and s["test-examples"] == 10
             for s in scores.values())


def test_wire_records_round_trip_and_name_what_does_not_match():
  tree = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                    "bias": np.zeros((3,), np.float32)},
          "round": np.int32(7), "key": np.array([1, 2], np.uint32),
          "sending": np.array([True, False])}
  record = deploy.to_record(tree)
  assert set(record.keys()) == {"['dense']['kernel']", "['dense']['bias']", "['round']",
                                "['key']", "['sending']"}
  back = deploy.from_record(record, tree)
  _assert_same_tree(back, tree)
  assert back["round"].shape == () and back["sending"].dtype == bool
  wrong_dtype = dict(tree, round=np.float32(7))
  with pytest.raises(deploy.WireError, match=r"\['round'\] is int32\[\], expected "
                     r"float32\[\]"):
    deploy.from_record(record, wrong_dtype, "the test record")
  wrong_shape = dict(tree, key=np.zeros((3,), np.uint32))
  with pytest.raises(deploy.WireError, match=r"\['key'\] is uint32\[2\], expected "
                     r"uint32\[3\]"):
    deploy.from_record(record, wrong_shape)
  with pytest.raises(deploy.WireError, match=r"missing \[\"\['extra'\]\"\]"):
    deploy.from_record(record, dict(tree, extra=np.zeros(1)))
  del record["['round']"]
  with pytest.raises(deploy.WireError, match="the test record: keys do not match"):
    deploy.from_record(record, tree, "the test record")


def test_bad_hospitals_and_settings_are_refused_by_name(hospitals, tmp_path):
  base, data, paths = hospitals
  sizes = np.asarray(data.train.num_examples)
  plan = lambda config, method="fedavg": deploy.make_plan(
      config, method, 0, sizes, data.train.feature_shape, data.num_classes)
  with pytest.raises(deploy.DeployError, match="method 'centralized': a deployment runs"):
    plan(base, "centralized")
  with pytest.raises(deploy.DeployError, match="config.aggregator = 'median'"):
    plan(_config(base, aggregator="median"))
  with pytest.raises(deploy.DeployError, match="config.learning_rate"):
    plan(_config(base, learning_rate=-1.0))
  with pytest.raises(deploy.DeployError, match="config.privacy_audit"):
    plan(_config(base, dp="central", privacy_audit=True))
  with pytest.raises(deploy.DeployError, match="node config data-path is empty"):
    deploy.load_hospital("")
  with pytest.raises(deploy.DeployError, match="no such file"):
    deploy.load_hospital(str(tmp_path / "missing.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(deploy.DeployError, match="junk.npz.*not a hospital data file"):
    deploy.load_hospital(str(tmp_path / "junk.npz"))
  # Two SuperNodes given the same hospital's file: refused before any round.
  grid = deploy.InProcessGrid(deploy.app.client, [{"data-path": paths[0]},
                                                  {"data-path": paths[0]}])
  with pytest.raises(deploy.DeployError, match="both hold hospital 0"):
    deploy.serve(grid, base, "fedavg", rounds=1, compilation_cache="",
                 log=lambda line: None)
  # A SuperNode started without its data path: its error comes back by name.
  grid = deploy.InProcessGrid(deploy.app.client, [{"data-path": paths[0]}, {}])
  with pytest.raises(deploy.DeployError, match="describing the hospitals: node 1001 "
                     "failed: DeployError: node config data-path is empty"):
    deploy.serve(grid, base, "fedavg", rounds=1, compilation_cache="",
                 log=lambda line: None)
  # Fewer hospitals than the run needs.
  grid = deploy.InProcessGrid(deploy.app.client, [{"data-path": p} for p in paths[:2]])
  with pytest.raises(deploy.DeployError, match="only 2 of 3 hospitals"):
    deploy.serve(grid, base, "fedavg", rounds=1, hospitals=3, timeout_s=1,
                 compilation_cache="", log=lambda line: None)


def _require_namespace():
  why_not = _loopback.namespace_available()
  if why_not:
    message = f"a loopback-only network namespace is needed: {why_not}"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message + "; CI=true requires it")
    pytest.skip(message)


def test_loopback_deployment_ends_on_the_simulated_model(hospitals, tmp_path):
  """A SuperLink and two SuperNodes as separate processes on 127.0.0.1 in a
  loopback-only namespace, two rounds of FedAvg with the project's secure-sum stage
  across them (each hospital sends only a masked uint32 vector; the server unmasks
  their sum): the global model equals the simulation's, and every process ended.
  (Each path of the chain is checked through Flower's ClientApp in-process above; this
  run is the real transport, its processes and their cost.)"""
  _require_namespace()
  base, data, _ = hospitals
  method, overrides, hospitals_used = "fedavg", {"secure_aggregation": True}, 2
  config = _config(base, **overrides)
  result = deploy.run_loopback(config, method, str(tmp_path / "deployed"), seed=2,
                               rounds=ROUNDS, hospitals=hospitals_used,
                               network_namespace="on", compilation_cache=TEST_CACHE,
                               timeout_s=600, evaluate=False, log=lambda line: None)
  used = jax.tree.map(lambda x: x[:hospitals_used], data)
  simulated = deploy.simulate(config, method, 2, used, ROUNDS)
  expected = dict(_wire.leaf_paths(jax.tree.map(np.asarray, simulated.params)))
  assert sorted(result.params) == sorted(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(result.params[path], value, path)
  assert [row["round"] for row in result.rounds] == list(range(1, ROUNDS + 1))
  assert all(row["num_uploads"] == hospitals_used for row in result.rounds)
  assert all(row["hospital_compile_s_mean"] >= 0 and row["upload_bytes"] > 0
             for row in result.rounds)
  num_params = sum(v.size for v in expected.values())  # a uint32 per parameter each
  assert all(row["upload_bytes"] >= hospitals_used * 4 * num_params
             for row in result.rounds)
  assert result.evaluation == {}  # (evaluation: the in-process tests and the command)
  # Every process the deployment started has ended.
  assert not _loopback._marked(str(tmp_path / "deployed" / "flwr_home"))


def test_deploy_command_refuses_bad_input_in_one_line_before_starting_anything(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  command = os.path.join(os.path.dirname(sys.executable), "fedjax-dx")
  run = lambda *args: subprocess.run([command, "deploy", *args], cwd=tmp_path,
                                     capture_output=True, text=True, timeout=300)
  wrong = run("--config=test", "--method=median", "--workdir=d")
  assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
  assert "error: method 'median': a deployment runs one of fedavg" in wrong.stderr
  assert not (tmp_path / "d").exists()  # refused before any file or process
  typo = run("--config=test", "--config.round=3", "--workdir=d")
  assert typo.returncode == 2 and "did you mean 'rounds'" in typo.stderr
