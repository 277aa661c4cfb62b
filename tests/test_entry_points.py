"""The runnable entry points work end to end on tiny settings (subprocesses, CPU)."""

import csv
import os
import subprocess
import sys

import pytest

from tests.conftest import full_optimisation_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, full_optimisation=False):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if full_optimisation:
    env = full_optimisation_env(env)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_quickstart_prints_the_comparison_table():
  result = run_module("benchmarks.quickstart", "--clients=3", "--rounds=4",
                      "--eval_every=2")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert any(line.startswith("hospital 2") for line in lines)
  pooled = [line for line in lines if line.startswith("pooled")]
  assert len(pooled) == 1
  values = [float(v) for v in pooled[0].split()[2:]]
  assert len(values) == 6 and all(0.0 <= v <= 1.0 for v in values)


def test_quickstart_rejects_a_bad_flag():
  result = run_module("benchmarks.quickstart", "--rounds=0")
  assert result.returncode != 0
  assert "rounds" in result.stderr


def test_throughput_writes_its_csv(tmp_path):
  out = tmp_path / "throughput.csv"
  result = run_module("benchmarks.throughput", "--clients=3", "--repeats=1",
                      "--min_call_s=0", "--matmul_size=64", f"--out={out}")
  assert result.returncode == 0, result.stderr
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert [r["workload"] + r["form"] for r in rows] == ["W1vmap", "W1loop", "W2vmap",
                                                       "W2loop"]
  assert list(rows[0]) == ["workload", "form", "clients", "sec_per_round",
                           "client_updates_per_s", "compile_s", "gflops", "peak_gflops"]
  for row in rows:
    assert float(row["sec_per_round"]) > 0 and float(row["compile_s"]) > 0
    assert float(row["client_updates_per_s"]) == pytest.approx(
        3 / float(row["sec_per_round"]), rel=1e-6)


def test_throughput_rejects_an_unknown_workload():
  result = run_module("benchmarks.throughput", "--workloads=W9", "--clients=2")
  assert result.returncode != 0
  assert "W9" in result.stderr


DETERMINISM_SCRIPT = """
import hashlib, jax, numpy as np, optax
import fedjax_dx as fdx
data = fdx.synthetic_binary(seed=4, num_clients=5, examples_per_client=[30, 12, 50, 7, 21])
model = fdx.mlp(hidden=(16,), num_classes=2)
params = model.init(jax.random.PRNGKey(0), data.train.features[0, :1])
algo = fdx.fedavg(model, optax.adam(0.01), batch_size=4, local_steps=6)
state, metrics = algo.run(algo.init(params, data.train, jax.random.PRNGKey(1)), data.train,
                          num_rounds=5)
digest = hashlib.sha256()
for leaf in jax.tree.leaves((state.params, metrics["train_loss"])):
  digest.update(np.asarray(leaf).tobytes())
print(digest.hexdigest())
"""


def test_same_config_and_seed_are_bitwise_identical_across_processes():
  digests = []
  for _ in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    digests.append(result.stdout.strip().splitlines()[-1])
  assert digests[0] == digests[1] and len(digests[0]) == 64


def test_scale_benchmark_writes_csv_and_figure(tmp_path):
  out, figure = tmp_path / "scale.csv", tmp_path / "scale.png"
  result = run_module("benchmarks.scale", "--clients=4,40", "--workloads=W1",
                      "--repeats=1", "--chunk=16", f"--out={out}", f"--figure={figure}",
                      f"--profile_dir={tmp_path / 'profiles'}")
  assert result.returncode == 0, result.stderr
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert [(r["form"], r["clients"], r["client_chunk"]) for r in rows] == [
      ("unchunked", "4", "0"), ("unchunked", "40", "0"), ("chunked", "40", "16")]
  assert all(float(r["memory_bytes"]) > 0 and float(r["sec_per_round"]) > 0
             for r in rows)
  for r in rows:  # what bounds each row, from rates measured in the same run
    assert float(r["peak_gflops"]) > 0 and float(r["peak_gbps"]) > 0
    assert 0 < float(r["of_peak_flops"]) and 0 < float(r["of_peak_bandwidth"])
    assert r["bound"] in ("memory", "compute", "neither")
  assert "profile of W1_chunked_40 (top operations by time):" in result.stdout
  assert figure.stat().st_size > 1000


def test_profile_charges_each_operation_its_self_time(tmp_path, monkeypatch):
  import gzip
  import json
  import jax
  from benchmarks import roofline
  trace_dir = tmp_path / "plugins" / "profile" / "run"
  trace_dir.mkdir(parents=True)
  events = [{"ph": "M", "pid": 1, "name": "process_name",
             "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "tid": 1, "name": "while", "ts": 0, "dur": 100},
            {"ph": "X", "pid": 1, "tid": 1, "name": "dot", "ts": 10, "dur": 30},
            {"ph": "X", "pid": 1, "tid": 1, "name": "fusion", "ts": 50, "dur": 20},
            {"ph": "X", "pid": 1, "tid": 2, "name": "dot", "ts": 20, "dur": 10},
            {"ph": "X", "pid": 2, "tid": 1, "name": "host work", "ts": 0, "dur": 999}]
  with gzip.open(trace_dir / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  monkeypatch.setattr(jax.profiler, "trace", lambda *a, **k: __import__(
      "contextlib").nullcontext())
  rows = roofline.profile(lambda: None, str(tmp_path))
  # Device streams only; the loop keeps the 50 us none of its children ran.
  assert [(name, round(ms * 1e3)) for name, ms, _ in rows] == [
      ("while", 50), ("dot", 40), ("fusion", 20)]
  assert abs(sum(share for _, _, share in rows) - 1.0) < 1e-9


def test_scale_benchmark_rejects_an_unknown_workload():
  result = run_module("benchmarks.scale", "--workloads=W7")
  assert result.returncode != 0 and "W7" in result.stderr


def test_cnn_benchmark_writes_csv(tmp_path):
  out = tmp_path / "cnn.csv"
  # Convolutions run slower than they compile at the fast settings: optimise fully.
  result = run_module("benchmarks.cnn", "--clients=2", "--repeats=1", f"--out={out}",
                      full_optimisation=True)
  assert result.returncode == 0, result.stderr
  rows = out.read_text().splitlines()
  assert rows[0].startswith("conv,clients,sec_per_round") and len(rows) == 3
  assert "gemm / xla =" in result.stdout
