r"""Client updates/s of the 28x28 CNN vmapped over clients: XLA convolutions (grouped
under vmap) versus the batched-GEMM convolutions of `fdx.cnn` (conv="gemm"), in one run.

The workload of issue 7: conv 3x3x32, 2x2 pool, conv 3x3x64, 2x2 pool, dense 128, dense
2; 64 examples per client, batch 16, one local epoch (4 SGD steps), FedAvg; 1.63 GFLOP
per client update (forward + backward). One round per compiled call, compile timed
apart, `jax.block_until_ready` around each timed call, median of `--repeats`.

Each row carries its shares of the device's matmul rate and copy bandwidth (measured in
the same run) and what bounds it (`benchmarks/roofline.py`); `--profile_dir` adds a
profiler trace of one round per row and prints its top operations.

  python -m benchmarks.cnn --clients=10,100 --out=results/cnn.csv
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
import optax

import fedjax_dx as fdx
from benchmarks import roofline
from benchmarks import workloads

FLAGS = flags.FLAGS
flags.DEFINE_list("clients", ["10", "100"], "Client counts.")
flags.DEFINE_list("convs", ["xla", "gemm"], "Convolution implementations to compare.")
flags.DEFINE_integer("repeats", 3, "Timed rounds per point (median).", lower_bound=1)
flags.DEFINE_enum("matmul_precision", "default", ["default", "highest", "tensorfloat32",
                                                  "bfloat16"],
                  "jax_default_matmul_precision (GPU: default = TF32).")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "fdx.cnn's compute_dtype: bfloat16 = mixed precision (activations "
                  "and matrix products in bf16, parameters and loss in float32).")
flags.DEFINE_string("out", None, "CSV file to write.")
flags.DEFINE_string("profile_dir", None, "Write a profiler trace of one round per row "
                    "here (Perfetto / TensorBoard) and print its top operations.")

FLOP_PER_UPDATE = roofline.CNN_FLOP_PER_UPDATE


def measure(conv: str, num_clients: int, repeats: int, peaks: dict) -> dict:
  model = fdx.cnn(num_classes=2, channels=(32, 64), dense=128, conv=conv,
                  compute_dtype=FLAGS.compute_dtype)
  data = workloads.make_image_data(num_clients)
  params = model.init(jax.random.PRNGKey(0), data.features[0, :1])
  algo = fdx.fedavg(model, optax.sgd(workloads.LEARNING_RATE),
                    batch_size=workloads.BATCH, local_epochs=1)
  state = algo.init(params, data, jax.random.PRNGKey(1))
  participation = jnp.ones((1, num_clients), jnp.float32)
  start = time.perf_counter()
  compiled = algo.run.compiled.lower(state, data, participation).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(state, data, participation))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, data, participation))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  if FLAGS.profile_dir:
    name = f"cnn_{conv}_{num_clients}"
    roofline.print_profile(name, roofline.profile(
        lambda: compiled(state, data, participation),
        os.path.join(FLAGS.profile_dir, name)))
  traffic = roofline.bytes_per_update(
      "CNN", roofline.num_params(params), 28 * 28, workloads.LOCAL_STEPS,
      activation_bytes=2 if FLAGS.compute_dtype == "bfloat16" else 4)
  return {"conv": conv, "clients": num_clients, "sec_per_round": seconds,
          "client_updates_per_s": num_clients / seconds, "compile_s": compile_s,
          **roofline.fractions(FLOP_PER_UPDATE * num_clients, traffic * num_clients,
                               seconds, peaks),
          **peaks, "device": jax.devices()[0].device_kind,
          "matmul_precision": FLAGS.matmul_precision,
          "compute_dtype": FLAGS.compute_dtype}


def main(argv):
  del argv
  try:
    clients = [int(c) for c in FLAGS.clients]
  except ValueError:
    raise app.UsageError(f"--clients: expected integers, got {FLAGS.clients}") from None
  for conv in FLAGS.convs:
    if conv not in ("xla", "gemm"):
      raise app.UsageError(f"--convs: unknown {conv!r}, expected xla or gemm")
  if FLAGS.matmul_precision != "default":
    jax.config.update("jax_default_matmul_precision", FLAGS.matmul_precision)
  rows = []
  peaks = roofline.measured_peaks(matmul_dtype=FLAGS.compute_dtype)
  device = jax.devices()[0].device_kind
  print(f"device: {device}; matmul precision {FLAGS.matmul_precision}; compute dtype "
        f"{FLAGS.compute_dtype}; {roofline.describe_roofs(peaks, device)}")
  print(f"{'conv':>5} {'clients':>8} {'ms/round':>10} {'updates/s':>10} {'GFLOP/s':>8} "
        f"{'GB/s':>7} {'%flops':>6} {'%bw':>5} {'compile s':>9} bound")
  for num_clients in clients:
    for conv in FLAGS.convs:
      row = measure(conv, num_clients, FLAGS.repeats, peaks)
      rows.append(row)
      print(f"{conv:>5} {num_clients:>8} {1e3 * row['sec_per_round']:>10.1f} "
            f"{row['client_updates_per_s']:>10.1f} {row['gflop_per_s']:>8.1f} "
            f"{row['model_gb_per_s']:>7.1f} {100 * row['of_peak_flops']:>6.1f} "
            f"{100 * row['of_peak_bandwidth']:>5.1f} {row['compile_s']:>9.1f} "
            f"{row['bound']}", flush=True)
    by = {r["conv"]: r for r in rows if r["clients"] == num_clients}
    if {"xla", "gemm"} <= set(by):
      print(f"{'':>5} {num_clients:>8} gemm / xla = "
            f"{by['gemm']['client_updates_per_s'] / by['xla']['client_updates_per_s']:.1f}x")
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    tmp = FLAGS.out + ".tmp"
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
    os.replace(tmp, FLAGS.out)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
