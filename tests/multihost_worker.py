"""One process of the 2-process test (tests/test_multihost.py): FedAvg rounds with the
clients sharded over both processes' CPU devices; writes the final model to --out."""

import sys

from absl import app
from absl import flags

flags.DEFINE_string("coordinator", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", 2, "Processes.")
flags.DEFINE_integer("process_id", 0, "This process.")
flags.DEFINE_string("out", None, "npz with the final parameters (process 0).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from tests.multihost_study import write_cache_from_every_process
  write_cache_from_every_process()  # a rerun loads process 1's programs too
  import fedjax_dx as fdx
  try:
    fdx.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                               local_device_count=2, timeout_s=60)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  import jax
  import numpy as np
  from tests import multihost_case as case

  mesh = fdx.client_mesh()
  assert len(mesh.devices.ravel()) == 2 * FLAGS.num_processes
  loaded = []
  train = fdx.distributed.client_data(
      lambda k: loaded.append(k) or case.client(k), num_clients=case.NUM_CLIENTS,
      max_examples=case.MAX_EXAMPLES, feature_shape=(case.NUM_FEATURES,),
      num_classes=2, mesh=mesh)
  mine = fdx.distributed.local_clients(case.NUM_CLIENTS, mesh)
  assert sorted(loaded) == [k for k in mine if k < case.NUM_CLIENTS], (loaded, mine)
  algo, params = case.algorithm()
  state = algo.init(fdx.replicate(params, mesh), train, jax.random.PRNGKey(case.SEED))
  state, metrics = algo.run(state, train, num_rounds=case.ROUNDS)
  params = fdx.distributed.fetch(state.params)
  losses = fdx.distributed.fetch(metrics["train_loss"])
  print(f"process {jax.process_index()} of {jax.process_count()}: loaded clients "
        f"{sorted(loaded)}")
  if FLAGS.out and jax.process_index() == 0:
    leaves = jax.tree.leaves(params)
    np.savez(FLAGS.out, losses=losses, **{f"leaf{i}": x for i, x in enumerate(leaves)})


if __name__ == "__main__":
  app.run(main)
