"""The clients axis sharded over every device: a 1-D mesh named 'clients'."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from fedjax_dx.core._data import ClientData, FederatedData, pad_clients

CLIENTS = "clients"


def client_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with one axis, 'clients', over `devices` (default: all devices)."""
  devices = list(devices) if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), (CLIENTS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def padded_client_count(num_clients: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the mesh size that holds `num_clients`."""
  size = mesh.shape[CLIENTS]
  return -(-num_clients // size) * size


def shard_clients(data: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
  """Pads with zero-weight clients to a multiple of the device count and shards.

  One route for one process and for many (multi-host): when the mesh spans devices of
  other processes, every process holds `data` whole (e.g. NumPy), places only the rows
  of its own devices (`jax.make_array_from_callback`) and gets global arrays; the
  client sizes are then replicated so that host-side checks can read them. To load
  only this process's clients, use `fdx.distributed.client_data` instead.

  Args:
    data: a `ClientData` or `FederatedData` (train and test are padded alike).
    mesh: from `client_mesh` (default: all devices of all processes).

  Returns:
    The same structure, every leaf's leading (clients) axis split over the mesh.

  Example:
    >>> data = fdx.shard_clients(fdx.synthetic_binary(seed=0, num_clients=6))
  """
  mesh = mesh or client_mesh()
  if isinstance(data, FederatedData):
    return data.replace(train=shard_clients(data.train, mesh),
                        test=shard_clients(data.test, mesh))
  if not isinstance(data, ClientData):
    raise TypeError(f"shard_clients takes ClientData or FederatedData, got {type(data)}")
  sharding = NamedSharding(mesh, P(CLIENTS))
  data = pad_clients(data, padded_client_count(data.num_clients, mesh))
  if all(d.process_index == jax.process_index() for d in mesh.devices.flat):
    return jax.device_put(data, sharding)
  data = jax.tree.map(np.asarray, data)
  return global_client_data(data.features, data.labels, data.mask, data.num_examples,
                            mesh)


def global_client_data(features: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                       sizes: np.ndarray, mesh: jax.sharding.Mesh,
                       local_index: Any = None) -> ClientData:
  """A `ClientData` of global arrays over `mesh` (clients axis sharded, client sizes
  `[C]` replicated) from this process's host arrays, of which each process reads only
  the rows of its own devices.

  Args:
    features, labels, mask: host arrays whose rows are clients.
    sizes: `[C]` every client's size, the same on every process.
    mesh: from `client_mesh`.
    local_index: maps a global index (a tuple of slices) to the index of the given
      arrays; default: the same (the arrays hold every client).
  """
  sharding = NamedSharding(mesh, P(CLIENTS))
  local_index = local_index or (lambda index: index)
  place = lambda array: jax.make_array_from_callback(
      (sizes.shape[0],) + array.shape[1:], sharding,
      lambda index: array[local_index(index)])
  return ClientData(features=place(features), labels=place(labels), mask=place(mask),
                    num_examples=jax.device_put(sizes, NamedSharding(mesh, P())))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a pytree (e.g. the global model) whole on every device of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))
