"""Many hosts: the clients axis over every device of every process.

One Python process per host (JAX's multi-controller runtime, `jax.distributed`): each
process runs the same program, holds the clients that live on its own devices, and the
jitted round's weighted mean crosses hosts as an all-reduce. No home-made transport.

Example (2 processes on one machine, 2 CPU devices each):
  >>> fdx.distributed.initialize("127.0.0.1:12355", num_processes=2, process_id=0,
  ...                            local_device_count=2)
  >>> mesh = fdx.client_mesh()          # all 4 devices of both processes
  >>> train = fdx.distributed.client_data(make_client, num_clients=6, mesh=mesh, ...)
  >>> state, _ = algo.run(algo.init(fdx.replicate(params, mesh), train, rng), train, 3)
"""

from __future__ import annotations

import os
import re
import sys
import threading
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_dx.core._data import ClientData
from fedjax_dx.core._sharding import (CLIENTS, client_mesh, global_client_data,
                                 padded_client_count, shard_clients)

_NUM_PROCESSES_KEY = "fedjax_dx/num_processes"


def initialize(coordinator_address: str, num_processes: int, process_id: int, *,
               local_device_count: int | None = None, timeout_s: int = 120) -> None:
  """Starts this process of a multi-host run and checks it agrees with the others.

  Call it first, before anything touches a JAX device. On CPU, collectives go through
  gloo and `local_device_count` simulated devices are made (tests, laptops); on GPUs
  each process sees its own GPUs.

  Args:
    coordinator_address: "host:port" of process 0 (the coordinator).
    num_processes: processes in the run.
    process_id: this process, in `[0, num_processes)`.
    local_device_count: CPU only: devices this process simulates (None: one).
    timeout_s: how long to wait for every process to join. When they have not joined
      by then, this process prints one line saying so and exits with status 2 (JAX's
      runtime would abort with a C++ stack trace a little later, untrappable).

  Raises:
    ValueError: a malformed address, a process id out of range, or a process count
      that differs from the coordinator's (named, with both values).
  """
  if not re.fullmatch(r"[^:\s]+:\d{1,5}", str(coordinator_address)):
    raise ValueError(f"coordinator_address must be 'host:port' (e.g. 10.0.0.1:12355), "
                     f"got {coordinator_address!r}")
  if not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
  if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must lie in [0, num_processes = {num_processes}), got "
                     f"{process_id!r}")
  if local_device_count is not None:
    if not isinstance(local_device_count, int) or local_device_count < 1:
      raise ValueError(f"local_device_count must be an integer >= 1, got "
                       f"{local_device_count!r}")
    jax.config.update("jax_num_cpu_devices", local_device_count)
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or local_device_count:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if not isinstance(timeout_s, int) or timeout_s < 1:
    raise ValueError(f"timeout_s must be an integer >= 1 (seconds), got {timeout_s!r}")
  joined = threading.Event()

  def give_up():
    if not joined.wait(timeout_s):
      role = ("the coordinator" if process_id == 0 else
              f"the coordinator at {coordinator_address}")
      sys.stderr.write(
          f"error: process {process_id} of {num_processes}: not every process joined "
          f"{role} within {timeout_s} s; start all {num_processes} processes (process "
          f"ids 0 .. {num_processes - 1}) with the same --coordinator_address="
          f"{coordinator_address} and --num_processes={num_processes}, or allow more "
          "time (--distributed_timeout)\n")
      sys.stderr.flush()
      os._exit(2)  # the runtime's own timeout is a C++ abort; do not wait for it

  threading.Thread(target=give_up, daemon=True, name="fedjax_dx-join-timeout").start()
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=timeout_s + 60)
  joined.set()
  check_process_count(num_processes, coordinator_address)


def check_process_count(num_processes: int, coordinator_address: str = "") -> None:
  """Refuses a run whose processes disagree on the process count, on every process at
  once: each process publishes its count in the runtime's key-value store and compares
  them all with the coordinator's. (Refusing on the odd process alone would leave the
  others to train until a collective with it times out.)"""
  from jax._src import distributed
  client = distributed.global_state.client
  if client is None:
    raise ValueError("the distributed runtime is not initialised (call initialize)")
  me = jax.process_index()
  client.key_value_set(f"{_NUM_PROCESSES_KEY}/{me}", str(num_processes))
  if me == 0:
    client.key_value_set(_NUM_PROCESSES_KEY, str(num_processes))
  theirs = int(client.blocking_key_value_get(_NUM_PROCESSES_KEY, 60_000))
  counts = {i: int(client.blocking_key_value_get(f"{_NUM_PROCESSES_KEY}/{i}", 60_000))
            for i in range(min(theirs, jax.process_count()))}
  odd = {i: n for i, n in counts.items() if n != theirs}
  if theirs != num_processes or jax.process_count() != num_processes:
    raise ValueError(
        f"num_processes={num_processes} on process {me}, but the "
        f"coordinator {coordinator_address or ''} runs {theirs} processes "
        f"({jax.process_count()} joined); start every process with "
        f"--num_processes={theirs}")
  if odd:
    raise ValueError(
        f"process(es) {sorted(odd)} started with num_processes="
        f"{sorted(set(odd.values()))}, but the coordinator {coordinator_address or ''} "
        f"runs {theirs} processes; start every process with --num_processes={theirs}")


def local_clients(num_clients: int, mesh: jax.sharding.Mesh | None = None
                  ) -> np.ndarray:
  """The client indices (padding included) that live on this process's devices."""
  mesh = mesh or client_mesh()
  padded = padded_client_count(num_clients, mesh)
  sharding = NamedSharding(mesh, P(CLIENTS))
  rows = set()
  for index in sharding.addressable_devices_indices_map((padded,)).values():
    rows.update(range(*index[0].indices(padded)))
  return np.array(sorted(rows), np.int64)


def check_devices_hold(num_clients: int, mesh: jax.sharding.Mesh,
                       max_clients_per_device: int) -> None:
  """Refuses a mesh whose devices cannot hold the clients (e.g. the largest client
  group that fits one device, from `choose_client_chunk`)."""
  devices = mesh.shape[CLIENTS]
  if max_clients_per_device < 1:
    raise ValueError("not even one client fits on a device; use a smaller model or batch")
  needed = -(-num_clients // max_clients_per_device)
  if needed > devices:
    raise ValueError(
        f"{num_clients} clients need at least {needed} devices at "
        f"{max_clients_per_device} clients per device, but the mesh has {devices}; use "
        f"more devices or processes, or a client_chunk of at most "
        f"{max_clients_per_device} per round step")


def client_data(make_client: Callable[[int], tuple[np.ndarray, np.ndarray]], *,
                num_clients: int, max_examples: int, feature_shape: tuple[int, ...],
                num_classes: int, mesh: jax.sharding.Mesh | None = None) -> ClientData:
  """Training data sharded over every device of every process, each process loading
  only its own clients.

  Args:
    make_client: `k -> (features [n_k, *feature_shape], labels [n_k])`, called on each
      process only for the clients that live on its devices (`local_clients`).
    num_clients: clients in the run (padded with empty clients to the device count).
    max_examples: `N_max`, the padded length every process agrees on.
    feature_shape: shape of one example.
    num_classes: for the label range check.
    mesh: from `client_mesh` (default: every device of every process).

  Returns:
    A `ClientData` of global arrays with the clients axis sharded over the mesh.
  """
  mesh = mesh or client_mesh()
  padded = padded_client_count(num_clients, mesh)
  mine = local_clients(num_clients, mesh)
  position = {int(k): i for i, k in enumerate(mine)}
  features = np.zeros((len(mine), max_examples) + tuple(feature_shape), np.float32)
  labels = np.zeros((len(mine), max_examples), np.int32)
  sizes = np.zeros((padded,), np.int32)
  for i, k in enumerate(mine):
    if k >= num_clients:
      continue  # padding: an empty client
    x, y = make_client(int(k))
    x, y = np.asarray(x, np.float32), np.asarray(y)
    if x.shape[1:] != tuple(feature_shape) or len(y) != len(x) or len(x) > max_examples:
      raise ValueError(
          f"client {k}: features {x.shape} and labels {y.shape} must be [n <= "
          f"{max_examples}, {', '.join(map(str, feature_shape))}] and [n]")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f"client {k}: labels must lie in [0, {num_classes})")
    features[i, :len(x)], labels[i, :len(y)], sizes[k] = x, y, len(x)
  # Client sizes are tiny and every process needs them (budgets, weights): share them.
  sizes = np.asarray(fetch(jax.make_array_from_callback(
      (padded,), NamedSharding(mesh, P(CLIENTS)), lambda index: sizes[index])))
  mask = np.arange(max_examples)[None, :] < sizes[mine][:, None]

  def local_index(index):  # this process's arrays hold only its own clients' rows
    start, stop, _ = index[0].indices(padded)
    first = position[start]
    return (slice(first, first + stop - start),) + tuple(index[1:])

  return global_client_data(features, labels, mask, sizes, mesh, local_index)


# `fdx.distributed.shard` is `fdx.shard_clients`: one placement route for one process
# and for many.
shard = shard_clients


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def fetch(tree):
  """Host copies of (replicated or sharded) global arrays, on every process."""
  from jax.experimental import multihost_utils
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
