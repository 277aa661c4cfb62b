"""Two processes on one machine (JAX's multi-controller runtime, gloo collectives on
CPU, 2 devices each) train the same FedAvg rounds as one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

import fedjax_dx as fdx
from tests import multihost_case as case
from tests.conftest import TEST_CACHE, subprocess_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(process_id, port, out, num_processes=2):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = subprocess_xla_flags()  # only the fast-compile flags
  return subprocess.Popen(
      [sys.executable, "-m", "tests.multihost_worker", f"--coordinator=127.0.0.1:{port}",
       f"--num_processes={num_processes}", f"--process_id={process_id}", f"--out={out}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_equal_one(tmp_path):
  out = tmp_path / "params.npz"
  port = _free_port()
  workers = [_start(p, port, out) for p in (0, 1)]
  outputs = [w.communicate(timeout=300) for w in workers]
  for w, (stdout, stderr) in zip(workers, outputs):
    assert w.returncode == 0, stderr[-3000:]
  # Each process made only the clients on its own 2 devices (6 clients padded to 8).
  assert "process 0 of 2: loaded clients [0, 1, 2, 3]" in outputs[0][0]
  assert "process 1 of 2: loaded clients [4, 5]" in outputs[1][0]

  data = fdx.stack_clients(*zip(*[case.client(k) for k in range(case.NUM_CLIENTS)]),
                           num_classes=2)
  algo, params = case.algorithm()
  state, metrics = algo.run(algo.init(params, data, jax.random.PRNGKey(case.SEED)), data,
                            num_rounds=case.ROUNDS)
  got = np.load(out)
  for i, leaf in enumerate(jax.tree.leaves(state.params)):
    np.testing.assert_allclose(got[f"leaf{i}"], np.asarray(leaf), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got["losses"], np.asarray(metrics["train_loss"]), rtol=1e-5)


def test_a_process_count_unlike_the_coordinators_is_refused(tmp_path):
  port = _free_port()
  workers = [_start(0, port, tmp_path / "a.npz", num_processes=2),
             _start(1, port, tmp_path / "b.npz", num_processes=3)]
  outputs = [w.communicate(timeout=300) for w in workers]
  assert workers[1].returncode != 0
  assert ("num_processes=3 on process 1, but the coordinator 127.0.0.1:"
          in outputs[1][1]), outputs[1][1][-2000:]
  assert "start every process with --num_processes=2" in outputs[1][1]
  # The coordinator refuses too, at once and by name (not a collective timing out).
  assert "process(es) [1] started with num_processes=[3]" in outputs[0][1], (
      outputs[0][1][-2000:])
  for w in workers:
    assert w.returncode == 2  # neither trains alone


def test_bad_distributed_arguments_are_named():
  import pytest
  for kwargs, message in [
      (dict(coordinator_address="localhost", num_processes=2, process_id=0),
       "coordinator_address must be 'host:port'"),
      (dict(coordinator_address="h:1", num_processes=2, process_id=2),
       r"process_id must lie in \[0, num_processes = 2\), got 2"),
      (dict(coordinator_address="h:1", num_processes=0, process_id=0),
       "num_processes must be an integer >= 1, got 0")]:
    with pytest.raises(ValueError, match=message):
      fdx.distributed.initialize(**kwargs)
  mesh = fdx.client_mesh(jax.devices()[:2])
  with pytest.raises(ValueError, match="100 clients need at least 4 devices at 30 "
                     "clients per device, but the mesh has 2"):
    fdx.distributed.check_devices_hold(100, mesh, 30)


STUDY_METHODS = "fedavg,fedprox,centralized,local"


def _study(workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = subprocess_xla_flags()  # only the fast-compile flags
  # benchmarks.run, with the test cache written by every process (a rerun loads the
  # programs in both; tests/multihost_study.py).
  command = [sys.executable, "-m", "tests.multihost_study", "--config=configs/test.py",
             f"--workdir={workdir}", f"--compilation_cache={TEST_CACHE}", "--noreport",
             "--quiet",
             f"--config.methods={STUDY_METHODS}", *flags]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_a_two_process_study_writes_the_single_process_results(tmp_path):
  import json
  import pandas as pd
  port = _free_port()
  hosts = [_study(tmp_path / "multi", f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={p}", "--local_device_count=2")
           for p in (0, 1)]
  _single_process_study(tmp_path / "single")  # here, while the two processes run
  for process in hosts:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  read = lambda name: pd.read_json(tmp_path / name / "metrics.jsonl", lines=True,
                                   dtype={"client": str}).drop(columns=["wall_s",
                                                                        "compile_s"])
  # The 3 synthetic clients were padded to 4 and spread over 2 x 2 devices.
  pd.testing.assert_frame_equal(read("multi"), read("single"), rtol=1e-5)
  meta = json.loads((tmp_path / "multi" / "config.json").read_text())
  assert meta["device"]["processes"] == 2 and meta["device"]["count"] == 4


def _single_process_study(workdir):
  """The study `_study` runs, in this process (the harness tests' program cache)."""
  from tests import test_study  # pylint: disable=g-import-not-at-top
  config = test_study.test_config.get_config()
  config.methods = STUDY_METHODS
  test_study.study.run_study(config, str(workdir), quiet=True,
                             programs=test_study.PROGRAMS)


def _both_stop_with(workdir, message):
  """Runs a 2-process study into `workdir`; both processes must exit 2 saying
  `message`. Returns their stderr."""
  port = _free_port()
  hosts = [_study(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  f"--process_id={p}", "--local_device_count=2") for p in (0, 1)]
  outputs = [h.communicate(timeout=300) for h in hosts]
  for host, (_, stderr) in zip(hosts, outputs):
    assert host.returncode == 2, stderr[-3000:]
    assert message in stderr, stderr[-3000:]
  return [stderr for _, stderr in outputs]


def test_a_workdir_refused_by_process_0_stops_every_process(tmp_path):
  # Process 0 alone reads the workdir; the others must stop with its reason rather
  # than wait for it in the next collective.
  workdir = tmp_path / "taken"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("not a study")
  stderr = _both_stop_with(workdir, "is not empty and holds no study (no config.json)")
  assert "process 0 stopped the study: workdir" in stderr[1]
  assert sorted(os.listdir(workdir)) == ["notes.txt"]  # nothing written


def test_a_workdir_process_0_cannot_write_stops_every_process(tmp_path):
  # A study to resume whose points/ folder is a file: process 0 cannot record results.
  workdir = tmp_path / "study"
  _single_process_study(workdir)
  for path in (workdir / "points").iterdir():
    path.unlink()
  (workdir / "points").rmdir()
  (workdir / "points").write_text("not a folder")
  alone = _study(workdir)
  _, stderr = alone.communicate(timeout=300)
  assert alone.returncode == 2 and "error: cannot write the study: [Errno 17]" in stderr
  stderr = _both_stop_with(workdir, "cannot write the study: [Errno 17] File exists")
  assert "process 0 stopped the study: cannot write" in stderr[1]


def test_a_process_started_without_its_peers_stops_with_one_line_after_the_timeout(
    tmp_path):
  """Process 1 alone (its coordinator never started): after --distributed_timeout
  seconds it stops with exit 2 and a line saying what to start, not after 2 minutes
  with a C++ stack trace; nothing is written."""
  import time  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  alone = _study(tmp_path / "study", f"--coordinator_address=127.0.0.1:{_free_port()}",
                 "--num_processes=2", "--process_id=1", "--local_device_count=2",
                 "--distributed_timeout=1")
  _, stderr = alone.communicate(timeout=120)
  assert alone.returncode == 2, stderr[-3000:]
  assert ("error: process 1 of 2: not every process joined the coordinator at "
          "127.0.0.1:") in stderr
  assert "within 1 s; start all 2 processes" in stderr
  assert "Traceback" not in stderr and "Stack trace" not in stderr
  assert time.perf_counter() - start < 60
  assert not (tmp_path / "study").exists()
