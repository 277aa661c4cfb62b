r"""Client updates/s of the 28x28 CNN vmapped over clients: XLA convolutions (grouped
under vmap) versus the batched-GEMM convolutions of `fdx.cnn` (conv="gemm"), in one run.

The workload of issue 7: conv 3x3x32, 2x2 pool, conv 3x3x64, 2x2 pool, dense 128, dense
2; 64 examples per client, batch 16, one local epoch (4 SGD steps), FedAvg; 1.63 GFLOP
per client update (forward + backward). One round per compiled call, compile timed
apart, `jax.block_until_ready` around each timed call, median of `--repeats`.

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
from benchmarks import workloads

FLAGS = flags.FLAGS
flags.DEFINE_list("clients", ["10", "100"], "Client counts.")
flags.DEFINE_list("convs", ["xla", "gemm"], "Convolution implementations to compare.")
flags.DEFINE_integer("repeats", 3, "Timed rounds per point (median).", lower_bound=1)
flags.DEFINE_enum("matmul_precision", "default", ["default", "highest", "tensorfloat32",
                                                  "bfloat16"],
                  "jax_default_matmul_precision (GPU: default = TF32).")
flags.DEFINE_string("out", None, "CSV file to write.")

# Multiply-adds per example of the forward pass; x 2 FLOPs x 3 (forward + backward).
_MACS = (28 * 28 * 32 * 9 * 1 + 14 * 14 * 64 * 9 * 32 + 7 * 7 * 64 * 128 + 128 * 2)
FLOP_PER_UPDATE = 6 * _MACS * workloads.EXAMPLES_PER_CLIENT


def measure(conv: str, num_clients: int, repeats: int) -> dict:
  model = fdx.cnn(num_classes=2, channels=(32, 64), dense=128, conv=conv)
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
  return {"conv": conv, "clients": num_clients, "sec_per_round": seconds,
          "client_updates_per_s": num_clients / seconds,
          "gflop_per_s": FLOP_PER_UPDATE * num_clients / seconds / 1e9,
          "compile_s": compile_s, "device": jax.devices()[0].device_kind,
          "matmul_precision": FLAGS.matmul_precision}


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
  print(f"{'conv':>5} {'clients':>8} {'ms/round':>10} {'updates/s':>10} {'GFLOP/s':>8} "
        f"{'compile s':>9}")
  for num_clients in clients:
    for conv in FLAGS.convs:
      row = measure(conv, num_clients, FLAGS.repeats)
      rows.append(row)
      print(f"{conv:>5} {num_clients:>8} {1e3 * row['sec_per_round']:>10.1f} "
            f"{row['client_updates_per_s']:>10.1f} {row['gflop_per_s']:>8.1f} "
            f"{row['compile_s']:>9.1f}", flush=True)
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
