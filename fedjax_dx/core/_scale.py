"""Fitting rounds to the device: memory-bounded client chunks and client-count buckets."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_dx.core._data import ClientData


def available_memory(device: jax.Device | None = None) -> int:
  """Bytes a program may still use on `device` (default: the first device).

  Accelerators report their allocator's limit and use; the CPU backend reports nothing,
  so the host's available memory (`MemAvailable` of /proc/meminfo) stands in.
  """
  device = device or jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  raise RuntimeError(f"cannot tell how much memory {device} has; pass memory_bytes")


def round_memory(make_algorithm: Callable[..., object], params, data: ClientData, rng,
                 client_chunk: int | None) -> dict[str, int]:
  """Compiles one round with `client_chunk` and returns XLA's memory analysis (bytes of
  arguments, outputs and temporaries)."""
  algorithm = make_algorithm(client_chunk=client_chunk)
  state = algorithm.init(params, data, rng)
  compiled = jax.jit(algorithm.apply).lower(
      state, data, jnp.ones((data.num_clients,), jnp.float32)).compile()
  analysis = compiled.memory_analysis()
  return {"arguments": int(analysis.argument_size_in_bytes),
          "outputs": int(analysis.output_size_in_bytes),
          "temporaries": int(analysis.temp_size_in_bytes)}


def choose_client_chunk(make_algorithm: Callable[..., object], params, data: ClientData,
                        rng, *, memory_bytes: int | None = None, headroom: float = 0.8,
                        requested: int | None = None) -> int | None:
  """The largest group of clients whose round fits in memory (`client_chunk`).

  Compiles one round at `client_chunk` 1 and 2, reads XLA's memory analysis, and takes
  the temporaries as `base + per_client * chunk`; the chunk is the largest that keeps
  arguments + outputs + temporaries within `headroom * memory_bytes`.

  Args:
    make_algorithm: `(client_chunk=...) -> Algorithm`, e.g.
      `lambda client_chunk: fedavg(model, opt, ..., client_chunk=client_chunk)`.
    params, data, rng: as for `Algorithm.init`.
    memory_bytes: the memory to fit into; default `available_memory()`.
    headroom: share of it the round may use.
    requested: a chunk size the user asked for: checked instead of chosen.

  Returns:
    The chunk size, or None when all clients fit at once (no chunking needed).

  Raises:
    ValueError: `requested` does not fit, or not even one client per chunk fits; the
      message gives the bytes needed and the largest chunk that fits.
  """
  budget = headroom * (memory_bytes if memory_bytes is not None else available_memory())
  one = round_memory(make_algorithm, params, data, rng, 1)
  two = round_memory(make_algorithm, params, data, rng, 2)
  per_client = max(two["temporaries"] - one["temporaries"], 1)
  base = one["temporaries"] - per_client + one["arguments"] + one["outputs"]
  fits = math.floor((budget - base) / per_client)
  mb = lambda b: f"{b / 2**20:.1f} MiB"
  if requested is not None:
    need = base + per_client * requested
    if requested > fits:
      raise ValueError(
          f"client_chunk={requested} needs about {mb(need)} but {mb(budget)} is "
          f"available ({headroom:.0%} of {mb(budget / headroom)}); at most "
          f"{max(fits, 0)} clients per chunk fit")
    return requested
  if fits < 1:
    raise ValueError(
        f"even one client per chunk needs about {mb(base + per_client)} but "
        f"{mb(budget)} is available: the device cannot hold this round (a smaller "
        "model, batch or client data would)")
  return None if fits >= data.num_clients else fits


def client_bucket(num_clients: int) -> int:
  """The power of two at or above `num_clients`: sweeps over client counts pad to it
  (with zero-weight clients) and compile once per bucket."""
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  return 1 << (num_clients - 1).bit_length()
