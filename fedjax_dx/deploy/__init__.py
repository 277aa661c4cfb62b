"""Deploying a study's method to real hospitals with Flower (`pip install 'fedjax_dx[deploy]'`).

Each hospital runs a Flower SuperNode whose `ClientApp` (`fedjax_dx.deploy.app:client`)
runs exactly the project's client half of a round on that hospital's own data (local
training and the per-client stages of the aggregator chain: clipping, local noise,
compression, example-level DP-SGD, secure-sum masking); the `ServerApp`
(`fedjax_dx.deploy.app:server`) runs the server half (client sampling with the project's
sampler, the sum in hospital order, the chain's decode, the server optimizer). The run
ends on the global model the simulation ends on, bit for bit on the same machine.

Example (in one process, no network):
  >>> from fedjax_dx import deploy, study
  >>> paths = deploy.export_hospitals(study.load_data("test").data, "/tmp/hospitals")
  >>> grid = deploy.InProcessGrid(deploy.app.client, [{"data-path": p} for p in paths])
  >>> state, scores = deploy.serve(grid, "test", "fedavg", rounds=2)

On loopback with real processes (a SuperLink and one SuperNode per hospital):
  $ fedjax-dx deploy --config=test --method=fedavg --workdir=/tmp/deployed
"""

from fedjax_dx.deploy._plan import DeployError
from fedjax_dx.deploy._plan import export_hospitals
from fedjax_dx.deploy._plan import load_hospital
from fedjax_dx.deploy._plan import make_plan
from fedjax_dx.deploy._plan import METHODS
from fedjax_dx.deploy._plan import Plan
from fedjax_dx.deploy._plan import simulate
from fedjax_dx.deploy._wire import from_record
from fedjax_dx.deploy._wire import to_record
from fedjax_dx.deploy._wire import WireError


def __getattr__(name):
  # Flower is an extra: the parts that import it load on first use.
  if name in ("serve", "describe", "train", "evaluate"):
    from fedjax_dx.deploy import _apps  # pylint: disable=g-import-not-at-top
    return getattr(_apps, name)
  if name == "InProcessGrid":
    from fedjax_dx.deploy._inprocess import InProcessGrid  # pylint: disable=g-import-not-at-top
    return InProcessGrid
  if name == "app":
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module("fedjax_dx.deploy.app")
  if name in ("run_loopback", "LoopbackResult"):
    from fedjax_dx.deploy import _loopback  # pylint: disable=g-import-not-at-top
    return getattr(_loopback, name)
  raise AttributeError(f"module 'fedjax_dx.deploy' has no attribute {name!r}")


__all__ = (
    "DeployError",
    "InProcessGrid",
    "LoopbackResult",
    "METHODS",
    "Plan",
    "WireError",
    "app",
    "export_hospitals",
    "from_record",
    "load_hospital",
    "make_plan",
    "run_loopback",
    "serve",
    "simulate",
    "to_record",
)
