"""The harness end to end: configs/test.py in a temp dir, bad input, resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_COLUMNS = ["loss", "accuracy", "auc", "sensitivity", "specificity", "f1",
                  "balanced_accuracy"]


def run(*args, wait=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  command = [sys.executable, "-m", "benchmarks.run", "--quiet", *args]
  if not wait:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def test_end_to_end_tiny_study(tmp_path):
  workdir = tmp_path / "study"
  result = run("--config=configs/test.py", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  assert "report:" in result.stdout
  meta = json.loads((workdir / "config.json").read_text())
  assert meta["config"]["name"] == "test"
  assert "jax" in meta["versions"] and meta["device"]["platform"] == "cpu"

  metrics = pd.read_json(workdir / "metrics.jsonl", lines=True, dtype={"client": str})
  for column in ["method", "seed", "round", "num_clients", "client", "split",
                 *METRIC_COLUMNS, "bytes_up", "bytes_down", "cumulative_bytes", "wall_s", "compile_s"]:
    assert column in metrics.columns, column
  assert set(metrics["method"]) == {"fedavg", "fedprox", "scaffold", "fedadam",
                                    "centralized", "local_0", "local_1", "local_2"}
  assert set(metrics["split"]) == {"train", "test"}
  assert set(metrics["seed"]) == {0, 1}
  assert sorted(set(metrics["round"])) == [0, 2, 4]
  assert set(metrics["client"]) == {"0", "1", "2", "pooled"}
  fed = metrics[(metrics["method"] == "fedavg") & (metrics["client"] == "pooled")
                & (metrics["split"] == "test") & (metrics["seed"] == 0)]
  # 3 clients, 2 rounds per evaluation, logistic regression 13 -> 1 = 14 float32.
  assert fed["bytes_up"].tolist() == [0, 14 * 4 * 3 * 2, 14 * 4 * 3 * 2]
  assert fed["cumulative_bytes"].tolist() == [0, 672, 1344]
  scaffold = metrics[(metrics["method"] == "scaffold") & (metrics["client"] == "pooled")
                     & (metrics["split"] == "test") & (metrics["seed"] == 0)]
  assert scaffold["cumulative_bytes"].tolist() == [0, 1344, 2688]  # + control variates
  central = metrics[(metrics["method"] == "centralized") & (metrics["round"] == 4)]
  assert central["cumulative_bytes"].iloc[0] > 0  # raw data moved once

  summary = pd.read_csv(workdir / "summary.csv", dtype={"client": str})
  for m in METRIC_COLUMNS:
    assert f"{m}_mean" in summary.columns and f"{m}_std" in summary.columns
  for column in ["rounds_to_target", "bytes_to_target", "num_seeds", "method", "client"]:
    assert column in summary.columns
  assert (summary["num_seeds"] == 2).all()
  pooled_fed = summary[(summary["method"] == "fedavg") & (summary["client"] == "pooled")]
  final = metrics[(metrics["method"] == "fedavg") & (metrics["client"] == "pooled")
                  & (metrics["split"] == "test") & (metrics["round"] == 4)]
  assert pooled_fed["accuracy_mean"].iloc[0] == pytest.approx(final["accuracy"].mean())
  for name in ("convergence.png", "communication.png", "comparison.png",
               "label_distribution.png", "report.html"):
    assert (workdir / name).stat().st_size > 1000, name
  html = (workdir / "report.html").read_text()
  assert html.count("data:image/png;base64,") >= 4


@pytest.mark.parametrize("flag,message", [
    ("--config.no_such_field=1", "no_such_field"),
    ("--config.rounds=abc", "rounds"),
    ("--config.rounds=0", "config.rounds = 0: expected an integer >= 1"),
    ("--config.methods=fedavg,fedmagic", "config.methods: unknown ['fedmagic']"),
    ("--config.sweep=dataset.nope=1,2", "config.dataset.nope: no such field"),
    ("--config.sweep=learning_rate=0.1,-1",
     "config.learning_rate = -1.0: expected a number > 0 (in sweep point"),
    ("--config.local_epochs=2", "exactly one of local_steps and local_epochs"),
    ("--config.optimizer=adam", "sgd when methods include scaffold"),
    ("--config.mu=-0.5", "config.mu = -0.5: expected a number >= 0 (FedProx)"),
    ("--config.aggregator=mode", "config.aggregator = 'mode'"),
])
def test_bad_config_exits_nonzero_and_writes_nothing(tmp_path, flag, message):
  workdir = tmp_path / "study"
  result = run("--config=configs/test.py", f"--workdir={workdir}", flag)
  assert result.returncode != 0
  assert message in result.stderr
  assert not workdir.exists()


def test_client_sampling_counts_only_sampled_clients_bytes(tmp_path):
  workdir = tmp_path / "sampled"
  result = run("--config=configs/test.py", f"--workdir={workdir}", "--noreport",
               "--config.methods=fedavg", "--config.clients_per_round=2",
               "--config.num_seeds=1")
  assert result.returncode == 0, result.stderr
  metrics = pd.read_json(workdir / "metrics.jsonl", lines=True, dtype={"client": str})
  fed = metrics[(metrics["client"] == "pooled") & (metrics["split"] == "test")]
  # 2 of 3 clients per round, 2 rounds per evaluation, 14 float32 parameters.
  assert fed["bytes_up"].tolist() == [0, 14 * 4 * 2 * 2, 14 * 4 * 2 * 2]
  result = run("--config=configs/test.py", f"--workdir={tmp_path / 'x'}",
               "--config.clients_per_round=4")
  assert result.returncode != 0 and "cannot sample more clients than exist" in result.stderr
  assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_workdir_of_another_study_is_refused_untouched(tmp_path):
  workdir = tmp_path / "study"
  assert run("--config=configs/test.py", f"--workdir={workdir}",
             "--config.rounds=2", "--noreport").returncode == 0
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  result = run("--config=configs/test.py", f"--workdir={workdir}", "--config.rounds=3")
  assert result.returncode != 0
  assert "holds another study" in result.stderr and "rounds" in result.stderr
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  result = run("--config=configs/test.py", f"--workdir={other}")
  assert result.returncode != 0 and "holds no study" in result.stderr


def test_killed_sweep_resumes_to_the_same_results(tmp_path):
  # Points of different client counts compile separately: slow enough to kill mid-way.
  sweep = "--config.sweep=dataset.num_clients=3,4,5"
  resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
  process = run("--config=configs/test.py", f"--workdir={resumed}", sweep, "--noreport",
                wait=False)
  deadline = time.time() + 300
  points = resumed / "points"
  while time.time() < deadline and process.poll() is None:
    if points.is_dir() and len(list(points.glob("*.jsonl"))) >= 1:
      break
    time.sleep(0.05)
  assert process.poll() is None, "the sweep finished before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  done_before = len(list(points.glob("*.jsonl")))
  assert 1 <= done_before < 6
  assert not (resumed / "metrics.jsonl").exists()

  assert run("--config=configs/test.py", f"--workdir={resumed}", sweep,
             "--noreport").returncode == 0
  assert run("--config=configs/test.py", f"--workdir={fresh}", sweep,
             "--noreport").returncode == 0
  timing = ["wall_s", "compile_s"]
  a = pd.read_json(resumed / "metrics.jsonl", lines=True).drop(columns=timing)
  b = pd.read_json(fresh / "metrics.jsonl", lines=True).drop(columns=timing)
  assert len(a) == len(b) and set(a["num_clients"]) == {3, 4, 5}
  pd.testing.assert_frame_equal(a, b)
  timing = ["wall_s_mean", "compile_s_mean"]
  sa = pd.read_csv(resumed / "summary.csv").drop(columns=timing)
  sb = pd.read_csv(fresh / "summary.csv").drop(columns=timing)
  pd.testing.assert_frame_equal(sa, sb)
