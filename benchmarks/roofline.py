r"""What bounds a measured round: achieved FLOP/s and memory traffic against the device's
roofs, and a profile of where the time went.

Roofs are measured in the same run (a large float32 matmul at the run's matmul
precision; a device-to-device copy counting bytes read + written), with the published
figures of known GPUs printed beside them.

Traffic model of one client update (float32, the least an XLA program moves when the
stacked per-client models do not stay on chip between local steps, as at 10^3-10^6
clients): the client's data read once; per local step its model read and written once;
every activation of every example written in the forward pass and read in the backward
pass once; the model sent down and the update added to the weighted sum once. A
round whose achieved traffic is the larger share of the copy bandwidth is called
memory-bound, one whose FLOP/s are the larger share of the matmul rate compute-bound;
one under 10% of both roofs is bound by neither ("neither"): by how its operations run
(kernel launches, loop iterations, small or poorly mapped kernels such as grouped
convolutions), which the profile then shows. Where the working set fits in the caches
(few clients, small models), the modelled traffic can exceed the memory roof: the
shares mean something at scale, not for a handful of clients.

XLA's own cost analysis (`compiled.cost_analysis()`) is no help here: it counts the
body of a loop (the local steps) once, whatever its trip count.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from benchmarks import workloads

# Published dense peaks: (float32 matmul TFLOP/s at TF32 on tensor cores, at full float32
# on CUDA cores, memory TB/s).
PUBLISHED = {
    "H100 80GB HBM3": (494.7, 66.9, 3.35),  # SXM5
    "H100 PCIe": (378.0, 51.2, 2.0),
    "H200": (494.7, 66.9, 4.8),
    "A100-SXM4-80GB": (156.0, 19.5, 2.04),
    "A100-SXM4-40GB": (156.0, 19.5, 1.56),
}

# Activations per example that the forward pass writes and the backward pass reads
# (CNN: the GEMM formulation's patches, conv outputs, pooled maps and dense layers).
ACTIVATIONS_PER_EXAMPLE = {
    "W1": 1,
    "W2": 64 + 64 + 2,
    "CNN": (28 * 28 * 9 + 28 * 28 * 32 + 14 * 14 * 32 + 14 * 14 * 288 + 14 * 14 * 64
            + 7 * 7 * 64 + 128 + 2),
}

# FLOPs of one client update (forward + backward = 3 x 2 x multiply-adds, 64 examples).
_CNN_MACS = 28 * 28 * 32 * 9 * 1 + 14 * 14 * 64 * 9 * 32 + 7 * 7 * 64 * 128 + 128 * 2
CNN_FLOP_PER_UPDATE = 6 * _CNN_MACS * workloads.EXAMPLES_PER_CLIENT


def flop_per_update(workload: str) -> float:
  if workload == "CNN":
    return float(CNN_FLOP_PER_UPDATE)
  return workloads.workload(workload)[1]


def bytes_per_update(workload: str, num_params: int, feature_size: int,
                     local_steps: int, activation_bytes: int = 4) -> float:
  """The traffic model above, in bytes, for one client update (`activation_bytes`: 2
  for a model computing in bfloat16)."""
  examples = workloads.EXAMPLES_PER_CLIENT
  data = examples * (4 * feature_size + 4 + 1)  # float32 features, int32 label, mask
  model = 4 * num_params * (2 * local_steps + 2)
  activations = 2 * activation_bytes * ACTIVATIONS_PER_EXAMPLE[workload] * examples
  return float(data + model + activations)


def _best_seconds(function: Callable[[], Any], repeats: int = 5) -> float:
  jax.block_until_ready(function())
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(function())
    best = min(best, time.perf_counter() - start)
  return best


def measured_peaks(matmul_size: int | None = None, copy_mib: int | None = None,
                   matmul_dtype: str = "float32") -> dict[str, float]:
  """The device's reachable matmul GFLOP/s (`matmul_dtype` operands, at the current
  matmul precision) and copy GB/s, measured now."""
  on_cpu = jax.default_backend() == "cpu"
  size = matmul_size or (2048 if on_cpu else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), matmul_dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), matmul_dtype)
  matmul = jax.jit(jnp.matmul)
  gflops = 2 * size**3 / _best_seconds(lambda: matmul(a, b)) / 1e9
  elements = (copy_mib or (256 if on_cpu else 2048)) * 2**20 // 4
  # One read and one write per element, into the donated input's buffer: a fresh
  # output buffer per call would time the operating system's first-touch page faults
  # (on this CPU 5.8 GB/s instead of 28).
  copy = jax.jit(lambda v: v * 1.5 + 1.0, donate_argnums=0)
  buffer = [jnp.ones((elements,), jnp.float32)]

  def step():
    buffer[0] = copy(buffer[0])
    return buffer[0]

  gbps = 2 * 4 * elements / _best_seconds(step) / 1e9
  return {"peak_gflops": gflops, "peak_gbps": gbps}


def published_peaks(device_kind: str) -> tuple[float, float, float] | None:
  for name, peaks in PUBLISHED.items():
    if name in device_kind:
      return peaks
  return None


def describe_roofs(peaks: dict[str, float], device_kind: str) -> str:
  """The measured roofs, with the published ones of a known GPU, in one line."""
  published = published_peaks(device_kind)
  return (f"measured roofs: matmul {peaks['peak_gflops']:,.0f} GFLOP/s, copy "
          f"{peaks['peak_gbps']:,.0f} GB/s" + (
              f" (published: {published[0]:g} TFLOP/s TF32, {published[1]:g} TFLOP/s "
              f"float32, {published[2]:g} TB/s)" if published else ""))


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def fractions(flop: float, traffic: float, seconds: float, peaks: dict[str, float]
              ) -> dict[str, Any]:
  """Achieved rates, their shares of the measured roofs, and what bounds the round."""
  gflops, gbps = flop / seconds / 1e9, traffic / seconds / 1e9
  of_flops, of_bandwidth = gflops / peaks["peak_gflops"], gbps / peaks["peak_gbps"]
  if max(of_flops, of_bandwidth) < 0.1:
    bound = "neither"
  else:
    bound = "memory" if of_bandwidth >= of_flops else "compute"
  return {"gflop_per_s": gflops, "model_gb_per_s": gbps, "of_peak_flops": of_flops,
          "of_peak_bandwidth": of_bandwidth, "intensity": flop / traffic,
          "bound": bound}


def profile(function: Callable[[], Any], directory: str, top: int = 8
            ) -> list[tuple[str, float, float]]:
  """Runs `function` under the JAX profiler (a Perfetto trace in `directory`) and
  returns the `top` operations by total time: (name, milliseconds, share).

  Device streams are read where the trace has them (GPU); otherwise the XLA runtime's
  threads (CPU). Python frames and the runtime's bookkeeping are left out.
  """
  jax.block_until_ready(function())
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    jax.block_until_ready(function())
  paths = sorted(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    return []
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  process_names = {e["pid"]: e["args"]["name"] for e in events
                   if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread_names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
                  if e.get("ph") == "M" and e.get("name") == "thread_name"}
  devices = {pid for pid, name in process_names.items() if "/device:" in name}

  def counted(event):
    if event.get("ph") != "X" or event["name"].startswith("$"):
      return False
    if devices:
      return event["pid"] in devices
    thread = thread_names.get((event["pid"], event.get("tid")), "")
    return "python" not in thread and not any(
        word in event["name"] for word in ("PjRt", "Await", "Execute", "Pjit"))

  # Self time: an operation that contains others (a while loop) is charged only for
  # the time none of its children ran.
  totals = collections.Counter()
  by_thread = collections.defaultdict(list)
  for event in filter(counted, events):
    by_thread[(event["pid"], event.get("tid"))].append(event)
  for thread_events in by_thread.values():
    thread_events.sort(key=lambda e: (e["ts"], -e.get("dur", 0.0)))
    stack = []  # enclosing events: [name, end, duration, children's time]

    def close_until(time_us):
      while stack and stack[-1][1] <= time_us:
        name, _, duration, children = stack.pop()
        totals[name] += max(duration - children, 0.0)
        if stack:
          stack[-1][3] += duration

    for event in thread_events:
      close_until(event["ts"])
      duration = event.get("dur", 0.0)
      stack.append([event["name"], event["ts"] + duration, duration, 0.0])
    close_until(float("inf"))
  whole = sum(totals.values()) or 1.0
  return [(name, us / 1e3, us / whole) for name, us in totals.most_common(top)]


def print_profile(title: str, rows: list[tuple[str, float, float]]) -> None:
  if not rows:
    print(f"  profile of {title}: no operations in the trace")
    return
  print(f"  profile of {title} (top operations by time):")
  for name, ms, share in rows:
    print(f"    {100 * share:5.1f}%  {ms:9.3f} ms  {name[:90]}")
