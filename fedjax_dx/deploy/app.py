"""The Flower apps of a deployment: `client` (each hospital's SuperNode) and `server`
(the SuperLink's ServerApp). A Flower App's pyproject names them:

  [tool.flwr.app.components]
  serverapp = "fedjax_dx.deploy.app:server"
  clientapp = "fedjax_dx.deploy.app:client"

Run config (`[tool.flwr.app.config]`, or `flwr run --run-config`): `study-config` (a
ready-made config's name, a config file, or a JSON file), `method`, `seed`, `rounds`
(0: the config's), `hospitals` (how many SuperNodes to wait for), `workdir` (where the
server writes the global model and one JSON line per round), `compilation-cache`.
Node config of each hospital: `data-path` (its `hospital_<k>.npz`), optionally
`compilation-cache`.
"""

from __future__ import annotations

import time

import fedjax_dx

# How long importing fedjax_dx (JAX, Flax, optax) took in this process.
_IMPORT_S = time.time() - fedjax_dx._IMPORT_STARTED  # pylint: disable=protected-access

from flwr.clientapp import ClientApp  # pylint: disable=g-import-not-at-top,wrong-import-position
from flwr.serverapp import ServerApp  # pylint: disable=g-import-not-at-top,wrong-import-position

from fedjax_dx.deploy import _apps  # pylint: disable=g-import-not-at-top,wrong-import-position

client = ClientApp()
server = ServerApp()


@client.query()
def describe(message, context):
  return _apps.describe(message, context)


@client.train()
def train(message, context):
  return _apps.train(message, context, import_s=_IMPORT_S)


@client.evaluate()
def evaluate(message, context):
  return _apps.evaluate(message, context)


@server.main()
def main(grid, context):
  _apps.serve_from_context(grid, context)
