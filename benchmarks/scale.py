r"""Round time and memory versus the number of clients, all at once versus in chunks.

Workloads of `benchmarks/throughput.py` (64 examples per client, batch 16, one local
epoch of SGD, FedAvg): W1 logistic regression 13 -> 1, W2 MLP 13 -> 64 -> 64 -> 2, and
CNN, the 28x28 CNN (conv 3x3x32, pool, conv 3x3x64, pool, dense 128, dense 2). For each
client count the round runs unchunked (`client_chunk=None`) and memory-bounded
(`--chunk`, or chosen from the device's memory when 0), one round per compiled call.
Memory is XLA's own account of the compiled round (arguments + outputs + temporaries);
an unchunked point whose temporaries, extrapolated from the previous client count, would
exceed `--max_memory_gb` is skipped. Compile time is measured apart. With `--stream`, a
third form keeps the client data in host memory (NumPy) and streams it to the device
chunk by chunk (`Algorithm.stream`; the next chunk's transfer overlaps the current
chunk's training); its memory column is the client data it holds on the device (two
chunks) plus the model.

Each row also carries what bounds it (`benchmarks/roofline.py`): the achieved GFLOP/s and
modelled memory traffic per second as shares of the device's matmul rate and copy
bandwidth, both measured in the same run; `--profile_dir` adds a profiler trace of one
round per row and prints its top operations.

  python -m benchmarks.scale --out=results/scale.csv --figure=results/scale.png
"""

from __future__ import annotations

import csv
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_dx as fdx
from benchmarks import roofline
from benchmarks import workloads as throughput

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "CSV file to write.")
flags.DEFINE_string("figure", None, "PNG of round time and memory versus clients.")
flags.DEFINE_list("clients", ["10", "100", "1000", "10000", "100000"], "Client counts.")
flags.DEFINE_list("workloads", ["W1", "W2"], "W1, W2, CNN.")
flags.DEFINE_integer("chunk", 0, "Clients per chunk of the memory-bounded round (0: "
                     "chosen from the device's memory).", lower_bound=0)
flags.DEFINE_float("max_memory_gb", 4.0, "Skip unchunked rounds predicted above this.",
                   lower_bound=0.01)
flags.DEFINE_integer("repeats", 3, "Timed rounds per point (median reported).",
                     lower_bound=1)
flags.DEFINE_bool("stream", False, "Also time rounds whose client data stays in host "
                  "memory and streams to the device --chunk clients at a time.")
flags.DEFINE_string("profile_dir", None, "Write a profiler trace of one round per row "
                    "here (Perfetto / TensorBoard) and print its top operations.")
COLUMNS = ("workload", "form", "clients", "client_chunk", "sec_per_round",
           "client_updates_per_s", "compile_s", "memory_bytes", "temp_bytes",
           "gflop_per_s", "model_gb_per_s", "of_peak_flops", "of_peak_bandwidth",
           "intensity", "bound", "peak_gflops", "peak_gbps", "device")


def cnn_workload():
  model = fdx.cnn(num_classes=2, channels=(32, 64), dense=128)
  return model


def make_data(workload: str, num_clients: int) -> fdx.ClientData:
  if workload != "CNN":
    return throughput.make_data(num_clients)
  return throughput.make_image_data(num_clients)


def model_of(workload: str) -> fdx.Model:
  return cnn_workload() if workload == "CNN" else throughput.workload(workload)[0]


def measure(model, data, chunk, repeats):
  make = lambda client_chunk: fdx.fedavg(
      model, optax.sgd(throughput.LEARNING_RATE), batch_size=throughput.BATCH,
      local_epochs=1, client_chunk=client_chunk)
  params = model.init(jax.random.PRNGKey(0), data.features[0, :1])
  rng = jax.random.PRNGKey(1)
  if chunk == "auto":
    chunk = fdx.choose_client_chunk(make, params, data, rng)
  algo = make(chunk)
  state = algo.init(params, data, rng)
  participation = jnp.ones((1, data.num_clients), jnp.float32)
  start = time.perf_counter()
  compiled = algo.run.compiled.lower(state, data, participation).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  memory = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes)
  jax.block_until_ready(compiled(state, data, participation))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, data, participation))
    times.append(time.perf_counter() - start)
  one_round = lambda: compiled(state, data, participation)
  return statistics.median(times), compile_s, int(memory), int(
      analysis.temp_size_in_bytes), chunk, one_round


def measure_streamed(model, host_data, chunk, repeats):
  algo = fdx.fedavg(model, optax.sgd(throughput.LEARNING_RATE),
                    batch_size=throughput.BATCH, local_epochs=1)
  params = model.init(jax.random.PRNGKey(0), host_data.features[0, :1])
  state = algo.init(params, host_data, jax.random.PRNGKey(1))
  start = time.perf_counter()
  jax.block_until_ready(algo.stream(state, host_data, chunk=chunk))  # compiles
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(algo.stream(state, host_data, chunk=chunk))
    times.append(time.perf_counter() - start)
  per_client = sum(x[0].nbytes for x in jax.tree.leaves(host_data))
  resident = 2 * chunk * per_client + sum(x.nbytes for x in jax.tree.leaves(params))
  # The first call's time minus a steady round approximates the compiles.
  seconds = statistics.median(times)
  one_round = lambda: algo.stream(state, host_data, chunk=chunk)
  return seconds, max(compile_s - seconds, 0.0), int(resident), 0, chunk, one_round


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for w in FLAGS.workloads:
    if w not in ("W1", "W2", "CNN"):
      raise app.UsageError(f"--workloads: unknown workload {w!r}, expected W1, W2 or CNN")
  try:
    clients = sorted(int(c) for c in FLAGS.clients)
  except ValueError as e:
    raise app.UsageError(f"--clients: expected integers, got {FLAGS.clients}") from e
  if min(clients) < 1:
    raise app.UsageError(f"--clients: counts must be >= 1, got {clients}")
  rows = []
  device = jax.devices()[0].device_kind
  peaks = roofline.measured_peaks()
  print(f"device: {device} ({jax.default_backend()}), float32, matmul precision "
        f"{jax.config.jax_default_matmul_precision or 'default (TF32 on NVIDIA GPUs)'}")
  print(roofline.describe_roofs(peaks, device))
  print(f"{'workload':8} {'form':9} {'clients':>8} {'chunk':>7} {'ms/round':>10} "
        f"{'updates/s':>12} {'MiB':>9} {'compile s':>9} {'GFLOP/s':>9} {'GB/s':>8} "
        f"{'%flops':>6} {'%bw':>5} bound")
  for workload in FLAGS.workloads:
    model = model_of(workload)
    example = make_data(workload, 1)
    num_params = roofline.num_params(
        model.init(jax.random.PRNGKey(0), example.features[0, :1]))
    feature_size = int(np.prod(example.features.shape[2:]))
    flop = roofline.flop_per_update(workload)
    traffic = roofline.bytes_per_update(workload, num_params, feature_size,
                                        throughput.LOCAL_STEPS)
    last_temp = None
    for num_clients in clients:
      data = make_data(workload, num_clients)
      forms = ("unchunked", "chunked") + (("streamed",) if FLAGS.stream else ())
      for form in forms:
        if form == "unchunked" and last_temp is not None:
          predicted = last_temp[1] * num_clients / last_temp[0]
          if predicted > FLAGS.max_memory_gb * 2**30:
            print(f"{workload:8} {form:9} {num_clients:>8}  skipped: about "
                  f"{predicted / 2**30:.1f} GiB of temporaries predicted")
            continue
        chunk = None if form == "unchunked" else (FLAGS.chunk or "auto")
        if form == "chunked" and chunk != "auto" and chunk >= num_clients:
          continue
        if form == "streamed":
          stream_chunk = min(FLAGS.chunk or 1000, num_clients)
          host = jax.tree.map(np.asarray, data)
          sec, compile_s, memory, temp, used, one_round = measure_streamed(
              model, host, stream_chunk, FLAGS.repeats)
        else:
          sec, compile_s, memory, temp, used, one_round = measure(model, data, chunk,
                                                                  FLAGS.repeats)
        if form == "unchunked":
          last_temp = (num_clients, temp)
        if form == "chunked" and used is None:  # everything fits at once
          continue
        bounds = roofline.fractions(flop * num_clients, traffic * num_clients, sec, peaks)
        row = dict(workload=workload, form=form, clients=num_clients,
                   client_chunk=used or 0, sec_per_round=sec,
                   client_updates_per_s=num_clients / sec, compile_s=compile_s,
                   memory_bytes=memory, temp_bytes=temp, **bounds, **peaks,
                   device=device)
        rows.append(row)
        print(f"{workload:8} {form:9} {num_clients:>8} {used or '-':>7} "
              f"{1e3 * sec:>10.2f} {num_clients / sec:>12,.0f} {memory / 2**20:>9.1f} "
              f"{compile_s:>9.2f} {bounds['gflop_per_s']:>9.1f} "
              f"{bounds['model_gb_per_s']:>8.1f} {100 * bounds['of_peak_flops']:>6.1f} "
              f"{100 * bounds['of_peak_bandwidth']:>5.1f} {bounds['bound']}", flush=True)
        if FLAGS.profile_dir:
          name = f"{workload}_{form}_{num_clients}"
          roofline.print_profile(name, roofline.profile(
              one_round, os.path.join(FLAGS.profile_dir, name)))
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    tmp = FLAGS.out + ".tmp"
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, COLUMNS)
      writer.writeheader()
      writer.writerows(rows)
    os.replace(tmp, FLAGS.out)
    print(f"wrote {FLAGS.out}")
  if FLAGS.figure and rows:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns
    frame = pd.DataFrame(rows)
    frame["ms_per_round"] = 1e3 * frame["sec_per_round"]
    frame["memory_mib"] = frame["memory_bytes"] / 2**20
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, column, label in ((axes[0], "ms_per_round", "round time (ms)"),
                              (axes[1], "memory_mib", "memory of the round (MiB)")):
      sns.lineplot(data=frame, x="clients", y=column, hue="workload", style="form",
                   marker="o", ax=ax)
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("clients per round (log)")
      ax.set_ylabel(label + " (log)")
    fig.suptitle(f"Scale on {jax.devices()[0].device_kind}: unchunked vs memory-bounded")
    fig.tight_layout()
    tmp = FLAGS.figure + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, FLAGS.figure)
    print(f"wrote {FLAGS.figure}")


if __name__ == "__main__":
  app.run(main)
