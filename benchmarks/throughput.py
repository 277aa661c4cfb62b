r"""Client-update throughput of one federated round: vmapped versus a per-client loop.

The common workload, so numbers compare across projects: synthetic binary data with 13
float32 features, C clients with 64 examples each; plain SGD lr 0.05, batch 16, one local
epoch (4 steps), every client participates, FedAvg weighted by sample count.

  W1: logistic regression 13 -> 1 (sigmoid, binary cross-entropy)
  W2: MLP 13 -> 64 -> 64 -> 2 (ReLU, softmax cross-entropy)

`vmap`: the library's round (`fedavg(...).run`), several rounds per compiled call, time
divided by the rounds. `loop`: one jitted function, called per client from Python, trains
the client and adds its weighted model to a running sum (the FedAvg mean). Timings use `jax.block_until_ready`; compile time
is measured separately. The same run measures the device's dense float32 matmul GFLOP/s,
to report W2's achieved fraction of it.

  python -m benchmarks.throughput --out=results/throughput.csv
"""

from __future__ import annotations

import csv
import math
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
from fedjax_dx.core import _local
from benchmarks.workloads import BATCH, LEARNING_RATE
from benchmarks.workloads import make_data, workload

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "CSV file to write (columns documented in the module).")
flags.DEFINE_list("clients", ["10", "100", "1000", "10000"], "Client counts C.")
flags.DEFINE_list("workloads", ["W1", "W2"], "Workloads to run (W1, W2).")
flags.DEFINE_list("forms", ["vmap", "loop"], "Forms to run (vmap, loop).")
flags.DEFINE_integer("loop_max_clients", 10000, "Largest C run in the per-client loop.")
flags.DEFINE_float("min_call_s", 0.2, "Rounds per vmapped call grow until a call takes this.")
flags.DEFINE_integer("repeats", 5, "Timed calls per point (median reported).")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul for peak GFLOP/s.")
flags.DEFINE_integer("cpu_devices", 0, "On the CPU backend, split the host into this many "
                     "devices and shard the clients over them (0: the backend's default). "
                     "XLA:CPU runs one device's round on one core, so the clients axis "
                     "sharded over one device per core uses them all.", lower_bound=0)
flags.DEFINE_bool("breakdown", False, "Also time the vmapped round's parts: the per-epoch "
                  "shuffle alone, and the round with the shuffle replaced by a fixed order.")

COLUMNS = ("workload", "form", "clients", "sec_per_round", "client_updates_per_s",
           "compile_s", "gflops", "peak_gflops")


def peak_matmul_gflops(size: int, repeats: int) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  times = []
  for _ in range(max(repeats, 3)):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - start)
  return 2 * size**3 / min(times) / 1e9


def time_vmap(model, data, repeats, min_call_s):
  algo = fdx.fedavg(model, optax.sgd(LEARNING_RATE), batch_size=BATCH, local_epochs=1)
  params = model.init(jax.random.PRNGKey(0), data.features[0, :1])
  if len(jax.devices()) > 1:
    data = fdx.shard_clients(data)
  state = algo.init(params, data, jax.random.PRNGKey(1))
  rounds = 1
  while True:
    participation = jnp.ones((rounds, data.num_clients), jnp.float32)
    if len(jax.devices()) > 1:
      participation = jax.device_put(participation, jax.sharding.NamedSharding(
          fdx.client_mesh(), jax.sharding.PartitionSpec(None, "clients")))
    start = time.perf_counter()
    compiled = algo.run.compiled.lower(state, data, participation).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, data, participation))  # warm-up
    elapsed = time.perf_counter() - start
    if elapsed >= min_call_s or rounds >= 64:
      break
    rounds = min(64, max(rounds * 2, math.ceil(rounds * min_call_s / max(elapsed, 1e-6))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, _ = jax.block_until_ready(compiled(state, data, participation))
    times.append((time.perf_counter() - start) / rounds)
  return statistics.median(times), compile_s


def time_shuffle(data, repeats):
  """Seconds per round spent drawing every client's epoch order (one epoch)."""
  keys = _local.client_keys(jax.random.PRNGKey(0), data.num_clients)
  orders = jax.jit(jax.vmap(lambda k, n: _local.epoch_order(k, 0, n, data.max_examples)))
  jax.block_until_ready(orders(keys, data.num_examples))
  times = []
  for _ in range(max(repeats, 3)):
    start = time.perf_counter()
    jax.block_until_ready(orders(keys, data.num_examples))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_vmap_fixed_order(model, data, repeats, min_call_s):
  """The vmapped round with the shuffle replaced by the identity order (profiling)."""
  original = _local.epoch_order
  _local.epoch_order = lambda key, epoch, n, max_examples: jnp.arange(
      max_examples, dtype=jnp.int32)
  try:
    return time_vmap(model, data, repeats, min_call_s)[0]
  finally:
    _local.epoch_order = original


def time_loop(model, data, repeats):
  optimizer = optax.sgd(LEARNING_RATE)
  budget = fdx.LocalBudget(epochs=1)
  trainer = fdx.local_trainer(model, optimizer, batch_size=BATCH, budget=budget)
  window = _local.epochs_window(budget, BATCH, data.num_examples)

  @jax.jit
  def train_and_add(total, params, features, labels, num_examples, key, weight):
    """Trains one client and adds its weighted model to the running sum."""
    client = _local.Client(features, labels, num_examples)
    trained = _local.train_client(trainer, params, optimizer.init(params), client, key,
                                  jnp.zeros((), jnp.int32), epochs_window=window).params
    return jax.tree.map(lambda t, p: t + weight * p, total, trained)

  params = model.init(jax.random.PRNGKey(0), data.features[0, :1])
  # Per-client slices are prepared once, outside the timed rounds.
  weights = np.asarray(data.num_examples, np.float32)
  weights = jnp.asarray(weights / weights.sum())
  clients = [(data.features[k], data.labels[k], data.num_examples[k], weights[k])
             for k in range(data.num_clients)]
  zeros = jax.tree.map(jnp.zeros_like, params)
  start = time.perf_counter()
  features, labels, num_examples, weight = clients[0]
  train_and_add.lower(zeros, params, features, labels, num_examples,
                      jax.random.PRNGKey(0), weight).compile()
  compile_s = time.perf_counter() - start

  def one_round(params, round_index):
    keys = list(_local.client_keys(jax.random.PRNGKey(round_index), data.num_clients))
    total = zeros
    for (features, labels, num_examples, weight), key in zip(clients, keys):
      total = train_and_add(total, params, features, labels, num_examples, key, weight)
    return total

  jax.block_until_ready(one_round(params, 0))  # warm-up
  times = []
  for r in range(repeats):
    start = time.perf_counter()
    params = jax.block_until_ready(one_round(params, r + 1))
    times.append(time.perf_counter() - start)
  return statistics.median(times), compile_s


def write_csv(path: str, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def main(argv):
  del argv
  if FLAGS.cpu_devices:
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  try:
    client_counts = [int(c) for c in FLAGS.clients]
  except ValueError:
    raise app.UsageError(f"--clients must be integers, got {FLAGS.clients}")
  if any(c < 1 for c in client_counts):
    raise app.UsageError(f"--clients must be positive, got {client_counts}")
  bad_forms = set(FLAGS.forms) - {"vmap", "loop"}
  if bad_forms:
    raise app.UsageError(f"--forms: unknown {sorted(bad_forms)}, expected vmap and/or loop")
  models = {}
  for name in FLAGS.workloads:
    try:
      models[name] = workload(name)
    except ValueError as e:
      raise app.UsageError(str(e))

  device = jax.devices()[0]
  peak = peak_matmul_gflops(FLAGS.matmul_size, FLAGS.repeats)
  print(f"device: {device.device_kind} ({jax.default_backend()}), "
        f"{len(jax.devices())} device(s); float32 matmul "
        f"{FLAGS.matmul_size}x{FLAGS.matmul_size}: {peak:.1f} GFLOP/s; "
        f"jax {jax.__version__}; default matmul precision "
        f"{jax.config.jax_default_matmul_precision or 'default (TF32 on NVIDIA GPUs)'}",
        flush=True)
  rows = []
  header = (f"{'workload':8} {'form':5} {'clients':>8} {'ms/round':>10} "
            f"{'updates/s':>12} {'compile s':>9} {'GFLOP/s':>8} {'% peak':>7}")
  print(header, flush=True)
  for name, (model, flops_per_update) in models.items():
    for clients in client_counts:
      data = make_data(clients)
      for form in FLAGS.forms:
        if form == "loop" and clients > FLAGS.loop_max_clients:
          continue
        if form == "vmap":
          sec, compile_s = time_vmap(model, data, FLAGS.repeats, FLAGS.min_call_s)
        else:
          sec, compile_s = time_loop(model, data, max(1, min(FLAGS.repeats, 3)))
        updates = clients / sec
        gflops = updates * flops_per_update / 1e9
        rows.append(dict(workload=name, form=form, clients=clients, sec_per_round=sec,
                         client_updates_per_s=updates, compile_s=compile_s,
                         gflops=gflops, peak_gflops=peak))
        print(f"{name:8} {form:5} {clients:>8} {sec * 1e3:>10.3f} {updates:>12,.0f} "
              f"{compile_s:>9.2f} {gflops:>8.2f} {100 * gflops / peak:>6.1f}%", flush=True)
        if FLAGS.breakdown and form == "vmap":
          shuffle = time_shuffle(data, FLAGS.repeats)
          fixed = time_vmap_fixed_order(model, data, FLAGS.repeats, FLAGS.min_call_s)
          print(f"{'':14} breakdown: shuffle alone {shuffle * 1e3:.3f} ms; round with a "
                f"fixed order {fixed * 1e3:.3f} ms", flush=True)
  speedups = {}
  for row in rows:
    speedups.setdefault((row["workload"], row["clients"]), {})[row["form"]] = row
  for (name, clients), forms in speedups.items():
    if "vmap" in forms and "loop" in forms:
      ratio = forms["loop"]["sec_per_round"] / forms["vmap"]["sec_per_round"]
      print(f"{name} C={clients}: vmap is {ratio:.1f}x the per-client loop")
  if FLAGS.out:
    write_csv(FLAGS.out, rows)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
