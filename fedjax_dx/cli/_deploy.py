r"""`fedjax-dx deploy`: a study's method deployed with Flower on this machine.

  fedjax-dx deploy --config=heart_disease --method=fedavg --workdir=/tmp/deployed
  fedjax-dx deploy --config=test --method=scaffold --rounds=3 --hospitals=2 \
      --workdir=/tmp/d --config.learning_rate=0.1

One Flower SuperLink and one SuperNode per hospital start as separate processes on
127.0.0.1 (inside a loopback-only network namespace where `unshare -n` works); each
hospital reads only its own data file. At the end the command compares the deployed
global model with the simulation of the same method and seed (`--compare`) and prints
where a round's time went. Needs `pip install 'fedjax_dx[deploy]'`.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from fedjax_dx.cli import _run  # the --config flag, its overrides and their checks

FLAGS = flags.FLAGS
flags.DEFINE_string("method", "fedavg", "The study method to deploy (fedavg, fedavgm, "
                    "fedprox, scaffold, fedadam, fedyogi, fedadagrad).")
flags.DEFINE_integer("seed", 0, "The run's seed (the simulation's seed).")
flags.DEFINE_integer("rounds", 0, "Rounds (0: config.rounds).", lower_bound=0)
flags.DEFINE_integer("hospitals", 0, "Deploy the first N hospitals of the data set (0: "
                     "all).", lower_bound=0)
flags.DEFINE_enum("network_namespace", "auto", ["auto", "on", "off"],
                  "Run every process in a network namespace that has only loopback "
                  "(auto: where unshare -n works).")
flags.DEFINE_bool("compare", True, "Also run the simulation and compare the global "
                  "models (bit for bit on the same machine).")
flags.DEFINE_float("timeout", 900, "Seconds the deployed run may take.", lower_bound=1)

parse_flags = _run.parse_flags


def main(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # tensorflow-datasets' INFO lines
  from fedjax_dx import deploy  # pylint: disable=g-import-not-at-top
  from fedjax_dx import study  # pylint: disable=g-import-not-at-top
  try:
    result = deploy.run_loopback(
        FLAGS.config, FLAGS.method, FLAGS.workdir, seed=FLAGS.seed, rounds=FLAGS.rounds,
        hospitals=FLAGS.hospitals, network_namespace=FLAGS.network_namespace,
        compilation_cache=FLAGS.compilation_cache, timeout_s=FLAGS.timeout)
  except (deploy.DeployError, study.StudyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print("where each round's time went:")
  for row in result.rounds:
    print(f"  round {row['round']}: train loss {row['train_loss']:.4f}, "
          f"{row['num_uploads']} uploads, {row['wall_s']:.1f} s (a hospital's process: "
          f"start {row.get('hospital_start_s_mean', float('nan')):.1f} s, compile "
          f"{row.get('hospital_compile_s_mean', float('nan')):.2f} s, train "
          f"{row.get('hospital_train_s_mean', float('nan')):.3f} s); "
          f"{row['upload_bytes']} B up, {row['download_bytes']} B down")
  for hospital, scores in result.evaluation.items():
    shown = {k: round(v, 4) for k, v in scores.items() if k in ("accuracy", "auc", "loss")}
    print(f"hospital {hospital} test: {json.dumps(shown)}")
  print(f"deployed in {result.wall_s:.1f} s; results: {result.workdir}, logs: "
        f"{result.logs}")
  if FLAGS.compare:
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from fedjax_dx.deploy import _wire  # pylint: disable=g-import-not-at-top
    simulated = deploy.simulate(FLAGS.config, FLAGS.method, FLAGS.seed, result.data,
                                FLAGS.rounds or FLAGS.config.rounds)
    expected = dict(_wire.leaf_paths(jax.tree.map(np.asarray, simulated.params)))
    worst = max(float(np.max(np.abs(expected[k] - result.params[k]))) for k in expected)
    same = all(np.array_equal(expected[k], result.params[k]) for k in expected)
    print("simulation: the same global model, bit for bit" if same else
          f"simulation: global models differ by up to {worst:.3g}")
    if not same:
      sys.exit(1)
