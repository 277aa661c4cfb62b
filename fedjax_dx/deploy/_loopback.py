"""A deployment on this machine: one Flower SuperLink and one SuperNode per hospital,
each a separate process on 127.0.0.1, optionally inside a network namespace that has
only loopback (`unshare -n`), so that nothing can reach another address.

`python -m fedjax_dx.deploy._loopback SPEC.json` is the namespace's inner process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from fedjax_dx.deploy import _apps
from fedjax_dx.deploy import _plan
from fedjax_dx.deploy._plan import DeployError

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
              # Flower's SuperExec looks for a new app process to start every 1 s by
              # default; on one machine a quicker look costs nothing.
              "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}

_APP_PYPROJECT = """\
# Written by fedjax_dx.deploy: the Flower App of one deployed study method. Its code is
# the installed fedjax_dx package (no dependencies are installed at run time).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedjax-dx-deploy"
version = "1.0.0"
description = "A fedjax_dx study method deployed with Flower"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedjax-dx"

[tool.flwr.app.components]
serverapp = "fedjax_dx.deploy.app:server"
clientapp = "fedjax_dx.deploy.app:client"

[tool.flwr.app.config]
{config}
"""


@dataclasses.dataclass
class LoopbackResult:
  """What a loopback deployment left in its workdir."""

  workdir: str
  params: dict[str, np.ndarray]  # the final global model, keyed by tree path
  rounds: list[dict[str, Any]]  # one dict per round (rounds.jsonl)
  evaluation: dict[str, dict[str, float]]  # hospital -> test metrics of the final model
  wall_s: float  # process start of the SuperLink to the end of the run
  logs: str  # the directory of every process's log
  data: Any = None  # the FederatedData deployed (its hospitals; for `simulate`)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, what: str, log_path: str,
                   timeout_s: float = 60.0) -> None:
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if process.poll() is not None:
      raise DeployError(f"{what} exited with status {process.returncode} before "
                        f"listening on 127.0.0.1:{port}; see {log_path}:\n"
                        + _tail(log_path))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      if s.connect_ex(("127.0.0.1", port)) == 0:
        return
    time.sleep(0.2)
  raise DeployError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


def _tail(path: str, lines: int = 25) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def _children() -> dict[int, list[int]]:
  children: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, ValueError, IndexError):
        continue
      children.setdefault(ppid, []).append(int(entry))
  return children


def _marked(marker: str) -> list[int]:
  """Processes whose environment holds `marker` (our FLWR_HOME): what Flower started
  for this deployment, also after their parents are gone."""
  found = []
  for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
      try:
        with open(f"/proc/{entry}/environ", "rb") as f:
          if marker.encode() in f.read():
            found.append(int(entry))
      except OSError:
        continue
  return found


def end_processes(started: list[subprocess.Popen], marker: str) -> list[int]:
  """Ends every process this deployment started and what they started, by PID: SIGTERM,
  then SIGKILL after 5 s. Returns the PIDs signalled."""
  tree = _children()
  pids, todo = [], [p.pid for p in started]
  while todo:
    pid = todo.pop()
    if pid not in pids:
      pids.append(pid)
      todo.extend(tree.get(pid, []))
  pids += [p for p in _marked(marker) if p not in pids]
  for pid in pids:
    try:
      os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  deadline = time.time() + 5
  for p in started:
    try:
      p.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      pass
  for pid in pids + _marked(marker):
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  for p in started:
    try:
      p.wait(timeout=5)
    except subprocess.TimeoutExpired:
      pass
  return pids


def bring_loopback_up() -> None:
  """Sets `lo` up in this (new) network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack("16sH", b"lo", 0)
    flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, request)[:18])[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 0x1))


def namespace_command() -> tuple[list[str] | None, str | None]:
  """`(prefix, None)`: the command prefix that runs a process in a new network
  namespace with only loopback (`unshare -n` as root, `unshare -rn` in a user namespace
  otherwise), or `(None, why not)`."""
  if shutil.which("unshare") is None:
    return None, "the unshare command (util-linux) is not installed"
  errors = []
  for prefix in (["unshare", "-n"], ["unshare", "-r", "-n"]):
    try:
      out = subprocess.run(prefix + ["true"], capture_output=True, timeout=30,
                           check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
      errors.append(f"{' '.join(prefix)}: {e}")
      continue
    if out.returncode == 0:
      return prefix, None
    errors.append(f"{' '.join(prefix)}: "
                  + (out.stderr.decode(errors="replace").strip() or "failed"))
  return None, ("no network namespace can be made here (needs root or unprivileged user "
                "namespaces): " + "; ".join(errors))


def namespace_available() -> str | None:
  """None if a loopback-only network namespace can be made here, else why not."""
  return namespace_command()[1]


class _Follow:
  """Passes the server's progress lines ("deploy ...", "round r/R: ...") from the
  `flwr run --stream` log to `log` as they arrive."""

  def __init__(self, path: str, log: Callable[[str], Any]):
    self.path, self.log, self.offset, self.partial = path, log, 0, ""

  def __call__(self) -> None:
    try:
      with open(self.path, errors="replace") as f:
        f.seek(self.offset)
        text = f.read()
        self.offset = f.tell()
    except OSError:
      return
    lines = (self.partial + text).split("\n")
    self.partial = lines.pop()
    for line in lines:
      line = line.strip()
      if line.startswith("deploy ") or _ROUND_LINE.match(line):
        self.log(line)


_ROUND_LINE = re.compile(r"round \d+/\d+: ")


def _launch(spec: dict[str, Any], log: Callable[[str], Any] = lambda line: None
            ) -> float:
  """Starts the SuperLink and the SuperNodes, submits the run with `flwr run`, waits
  for it (passing the server's progress lines to `log`), and ends every process.
  Returns the wall time in seconds."""
  workdir, logs = spec["workdir"], spec["logs"]
  os.makedirs(logs, exist_ok=True)
  flwr_home = spec["flwr_home"]
  bin_dir = os.path.dirname(sys.executable)
  env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": flwr_home,
         "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
  tool = lambda name: os.path.join(bin_dir, name) if os.path.exists(
      os.path.join(bin_dir, name)) else name
  link_port = free_port()
  with open(os.path.join(flwr_home, "config.toml"), "w") as f:
    f.write(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
  started: list[subprocess.Popen] = []
  begin = time.time()

  def start(command, name):
    log_path = os.path.join(logs, f"{name}.log")
    log_file = open(log_path, "w")  # pylint: disable=consider-using-with
    started.append(subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=env, cwd=workdir))
    return started[-1], log_path

  try:
    link, link_log = start([tool("flower-superlink"), "--insecure",
                            "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(link_port)], "superlink")
    _wait_for_port(link_port, link, "the SuperLink", link_log)
    for k, path in enumerate(spec["hospital_paths"]):
      node_config = f"data-path={json.dumps(path)}"
      node, node_log = start([tool("flower-supernode"), "--insecure",
                              "--superlink", f"127.0.0.1:{link_port}",
                              "--host", "127.0.0.1", "--port", str(free_port()),
                              "--node-config", node_config], f"supernode_{k}")
    run_log = os.path.join(logs, "flwr_run.log")
    with open(run_log, "w") as out:
      runner = subprocess.Popen(
          [tool("flwr"), "run", spec["app_dir"], "loopback", "--stream"], stdout=out,
          stderr=subprocess.STDOUT, env=env, cwd=workdir)
      started.append(runner)
      deadline = time.time() + spec["timeout_s"]
      done = os.path.join(workdir, "deployment.json")
      follow = _Follow(run_log, log)
      while time.time() < deadline:
        follow()
        if runner.poll() is not None or os.path.exists(done):
          break
        for p, name in zip(started[1:-1], range(len(started) - 2)):
          if p.poll() is not None:
            raise DeployError(f"SuperNode {name} exited with status {p.returncode}; see "
                              f"{os.path.join(logs, f'supernode_{name}.log')}:\n"
                              + _tail(os.path.join(logs, f"supernode_{name}.log")))
        time.sleep(0.5)
      else:
        raise DeployError(f"the deployed run did not finish within {spec['timeout_s']} s;"
                          f" see {logs}")
      follow()
      # deployment.json is written last; give the run a moment to end by itself.
      try:
        runner.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass
    if not os.path.exists(done):
      raise DeployError(f"the deployed run ended without results; its log ({run_log}):\n"
                        + _tail(run_log, 40))
    return time.time() - begin
  finally:
    end_processes(started, flwr_home)


def _write_app(app_dir: str, run_config: dict[str, Any]) -> None:
  os.makedirs(app_dir, exist_ok=True)
  lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in run_config.items())
  with open(os.path.join(app_dir, "pyproject.toml"), "w") as f:
    f.write(_APP_PYPROJECT.format(config=lines))
  with open(os.path.join(app_dir, "README.md"), "w") as f:
    f.write("A fedjax_dx study method deployed with Flower (written by "
            "fedjax_dx.deploy; the code is the installed fedjax_dx package).\n")


def run_loopback(config, method: str, workdir: str, *, seed: int = 0, rounds: int = 0,
                 hospitals: int = 0, network_namespace: str = "auto",
                 compilation_cache: str = _apps.DEFAULT_CACHE,
                 timeout_s: float = 900.0, evaluate: bool = True,
                 log: Callable[[str], Any] = print
                 ) -> LoopbackResult:
  """Runs a study's method deployed on this machine: a Flower SuperLink and one
  SuperNode per hospital, each a separate process on 127.0.0.1 (`--insecure`), each
  hospital reading only its own data file; then ends every process it started.

  Args:
    config: the study config (ConfigDict, name or path).
    method: one of `METHODS`.
    workdir: a new or empty directory: hospital files, the Flower App, logs, results.
    seed: the run's seed (the simulation's seed).
    rounds: rounds (0: the config's).
    hospitals: the first this many hospitals of the data set (0: all).
    network_namespace: "auto" (a loopback-only namespace where `unshare -n` works),
      "on" (required), "off".
    compilation_cache: JAX's persistent compilation cache of every process ("": off).
    timeout_s: the longest the run may take.
    evaluate: at the end, each hospital scores the final model on its test rows.
    log: where progress lines go.

  Returns:
    A `LoopbackResult`.
  """
  if network_namespace not in ("auto", "on", "off"):
    raise DeployError(f"network_namespace must be auto, on or off, got "
                      f"{network_namespace!r}")
  if shutil.which("flower-superlink", path=os.path.dirname(sys.executable)) is None \
      and shutil.which("flower-superlink") is None:
    raise DeployError("Flower is not installed: pip install 'fedjax_dx[deploy]' (Flower "
                      "1.42 needs Python >= 3.11)")
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise DeployError(f"workdir {workdir!r} is not empty; choose a new directory")
  from fedjax_dx.study import _build  # pylint: disable=g-import-not-at-top
  config = _plan.study_config(config)
  loaded = _build.load_data(config)
  data, names = loaded.data, loaded.names
  if hospitals:
    if not 1 <= hospitals <= data.train.num_clients:
      raise DeployError(f"hospitals must lie in [1, {data.train.num_clients}], got "
                        f"{hospitals}")
    import jax  # pylint: disable=g-import-not-at-top
    data = jax.tree.map(lambda x: x[:hospitals], data)
    names = names[:hospitals]
  # Checked here, before any file or process: the method and the config's settings.
  _plan.make_plan(config, method, seed, np.asarray(data.train.num_examples),
                  data.train.feature_shape, data.num_classes)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  paths = _plan.export_hospitals(data, os.path.join(workdir, "hospitals"), names)
  config_path = os.path.join(workdir, "study_config.json")
  with open(config_path, "w") as f:
    f.write(config.to_json(sort_keys=True, indent=1))
  app_dir = os.path.join(workdir, "flower_app")
  _write_app(app_dir, {"study-config": config_path, "method": method, "seed": int(seed),
                       "rounds": int(rounds), "hospitals": len(paths),
                       "workdir": os.path.join(workdir, "results"),
                       "timeout": float(timeout_s), "evaluate": bool(evaluate),
                       "compilation-cache": compilation_cache})
  flwr_home = os.path.join(workdir, "flwr_home")
  os.makedirs(flwr_home, exist_ok=True)
  spec = {"workdir": os.path.join(workdir, "results"), "logs": os.path.join(workdir, "logs"),
          "flwr_home": flwr_home, "app_dir": app_dir, "hospital_paths": paths,
          "timeout_s": float(timeout_s)}
  os.makedirs(spec["workdir"], exist_ok=True)
  prefix, why_not = (namespace_command() if network_namespace != "off"
                     else (None, "off"))
  if network_namespace == "on" and why_not:
    raise DeployError(f"network_namespace='on' but {why_not}")
  log(f"deploying {method} on loopback: 1 SuperLink, {len(paths)} SuperNodes"
      + ("" if why_not else ", in a loopback-only network namespace"))
  if why_not:
    wall_s = _launch(spec, log)
  else:
    spec_path = os.path.join(workdir, "launch.json")
    with open(spec_path, "w") as f:
      json.dump(spec, f)
    begin = time.time()
    with tempfile.TemporaryFile("w+") as errors:
      inner = subprocess.Popen(prefix + [sys.executable, "-m",
                                         "fedjax_dx.deploy._loopback", spec_path],
                               stdout=subprocess.PIPE, stderr=errors, text=True)
      for line in inner.stdout:  # the server's progress, as it comes
        log(line.rstrip("\n"))
      try:
        inner.wait(timeout=timeout_s + 120)
      except subprocess.TimeoutExpired:
        inner.kill()
        inner.wait()
      wall_s = time.time() - begin
      if inner.returncode != 0:
        errors.seek(0)
        raise DeployError(f"the deployment failed (status {inner.returncode}):\n"
                          + errors.read()[-4000:])
  results = spec["workdir"]
  with np.load(os.path.join(results, "global_model.npz")) as f:
    params = {k: f[k] for k in f.files}
  with open(os.path.join(results, "rounds.jsonl")) as f:
    rounds_rows = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(results, "deployment.json")) as f:
    evaluation = json.load(f)["evaluation"]
  return LoopbackResult(results, params, rounds_rows, evaluation, wall_s, spec["logs"],
                        data)


def _main(spec_path: str) -> int:
  with open(spec_path) as f:
    spec = json.load(f)
  bring_loopback_up()
  try:
    _launch(spec, lambda line: print(line, flush=True))
  except DeployError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1]))
