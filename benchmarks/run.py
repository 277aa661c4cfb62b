r"""Run a study: every method x sweep point x seed, results and a report in --workdir.

  python -m benchmarks.run --config=configs/heart_disease.py --workdir=results/heart_disease
  python -m benchmarks.run --config=configs/test.py --workdir=/tmp/t --config.rounds=8

Any config field can be overridden (`--config.dataset.alpha=0.1`). Rerunning into the same
workdir resumes: finished (point, seed) pairs are skipped.

Several hosts: start one process per host with the same flags plus
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (and, on CPU,
`--local_device_count`); the federated methods' clients are sharded over every device of
every process, and process 0 writes the results (see WORKSPACE.md).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Study config file (get_config()).")
flags.DEFINE_string("workdir", None, "Where results go (created; resumed if it holds the "
                    "same study).")
flags.DEFINE_bool("quiet", False, "No progress display or log lines.")
flags.DEFINE_bool("report", True, "Write the figures and report.html at the end.")
flags.DEFINE_string(
    "compilation_cache", os.path.join("~", ".cache", "fedjax_dx", "jax_cache"),
    "JAX's persistent compilation cache directory: a repeated study loads its compiled "
    "programs instead of compiling them again ('' turns it off).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                    "(JAX's multi-controller runtime).")
flags.DEFINE_integer("num_processes", 1, "Multi-host: processes in the run.", lower_bound=1)
flags.DEFINE_integer("process_id", 0, "Multi-host: this process, 0 .. num_processes-1.",
                     lower_bound=0)
flags.DEFINE_integer("local_device_count", None, "Multi-host on CPU: devices this process "
                     "simulates (gloo collectives).", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.num_processes > 1 or FLAGS.coordinator_address:
    from fedjax_dx.core import _distributed
    if not FLAGS.coordinator_address:
      raise app.UsageError("--num_processes > 1 needs --coordinator_address=HOST:PORT")
    try:
      _distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                              FLAGS.process_id,
                              local_device_count=FLAGS.local_device_count)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  from fedjax_dx import study
  import jax
  lead = jax.process_index() == 0

  if FLAGS.compilation_cache:
    study.enable_compilation_cache(os.path.expanduser(FLAGS.compilation_cache))
  quiet = FLAGS.quiet or not lead
  if quiet:
    logging.getLogger().setLevel(logging.WARNING)
  try:
    paths = study.run_study(FLAGS.config, FLAGS.workdir, quiet=quiet)
  except study.StudyError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not lead:
    return
  if FLAGS.report:
    paths.update(study.make_report(FLAGS.workdir))
  if not FLAGS.quiet:
    print(f"results: {os.path.abspath(paths['metrics'])}, "
          f"{os.path.abspath(paths['summary'])}")
  if FLAGS.report:
    print(f"report: {os.path.abspath(paths['report'])}")
  if paths.get("diverged"):  # results written, but not a result to report as one
    print(f"error: {paths['diverged']}: a model that is not finite has NaN metrics; "
          "lower the learning rate(s) or turn on config.guard", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  app.run(main)
