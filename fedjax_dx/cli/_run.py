r"""`fedjax-dx run`: every method x sweep point x seed, results and a report in --workdir.

  fedjax-dx run --config=heart_disease --workdir=results/heart_disease
  python -m benchmarks.run --config=configs/test.py --workdir=/tmp/t --config.rounds=8

`--config` is a config file's path or a ready-made config's name (`fedjax-dx configs`).

Any config field can be overridden (`--config.dataset.alpha=0.1`). Rerunning into the same
workdir resumes: finished (point, seed) pairs are skipped.

Several hosts: start one process per host with the same flags plus
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (and, on CPU,
`--local_device_count`); the federated methods' clients are sharded over every device of
every process, and process 0 writes the results (see WORKSPACE.md).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from fedjax_dx import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Study config file (get_config()).")
flags.DEFINE_string("workdir", None, "Where results go (created; resumed if it holds the "
                    "same study).")
flags.DEFINE_bool("quiet", False, "No progress display or log lines.")
flags.DEFINE_bool("report", True, "Write the figures and report.html at the end.")
flags.DEFINE_string(
    "compilation_cache", os.path.join("~", ".cache", "fedjax_dx", "jax_cache"),
    "JAX's persistent compilation cache directory, with the program store in its "
    "programs/ folder: a repeated study loads its compiled programs instead of tracing "
    "and compiling them again ('' turns both off).")
flags.DEFINE_integer(
    "method_threads", 0, "Methods trained at once, each on a thread of its own (0: one "
    "per core on CPU, else 1). Results are the same for any value; 1 times each "
    "method alone (the wall_s column).", lower_bound=0)
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 "
                    "(JAX's multi-controller runtime).")
flags.DEFINE_integer("num_processes", 1, "Multi-host: processes in the run.", lower_bound=1)
flags.DEFINE_integer("process_id", 0, "Multi-host: this process, 0 .. num_processes-1.",
                     lower_bound=0)
flags.DEFINE_integer("distributed_timeout", 120, "Multi-host: seconds to wait for every "
                     "process to join before stopping with an error.", lower_bound=1)
flags.DEFINE_integer("local_device_count", None, "Multi-host on CPU: devices this process "
                     "simulates (gloo collectives).", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


_PER_METHOD = re.compile(r"--config\.per_method\.(\w+)\.(\w+)=(.*)", re.DOTALL)


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_file(argv: list[str]) -> str | None:
  """`--config`'s value, a ready-made config's name replaced in `argv` by its path."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      argv[i] = "--config=" + cli.resolve_config(arg[len("--config="):])
      return argv[i][len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = cli.resolve_config(argv[i + 1])
      return argv[i + 1]
  return None


def _load_config(spec: str):
  """The ConfigDict of `--config=FILE[:ARG]`, or exit 2 with what is wrong with FILE."""
  path, _, argument = spec.partition(":")
  where = f"--config={spec}"
  if not os.path.isfile(path):
    _fail(f"{where}: no such file, nor a ready-made config's name (a Python file "
          f"with get_config(), or one of {', '.join(cli.config_names())})")
  module_spec = importlib.util.spec_from_file_location("_fedjax_dx_config_check", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    _fail(f"{where}, line {e.lineno}: {e.msg} (the file is not valid Python)")
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"{where}: importing it raised {type(e).__name__}: {e}")
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    _fail(f"{where}: defines no get_config() (a config file returns its ConfigDict "
          "from get_config(); see configs/test.py)")
  try:
    return get_config(*([argument] if argument else []))
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"{where}: get_config() raised {type(e).__name__}: {e}")


def _check_overrides(argv: list[str], config, spec: str) -> None:
  """Each `--config.a.b=...` must name a field of the config file (exit 2 naming it)."""
  for arg in argv:
    name = arg.split("=", 1)[0]
    for prefix in ("--config.", "--noconfig."):
      if name.startswith(prefix):
        path = name[len(prefix):]
        break
    else:
      continue
    node, walked = config, []
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, keys, n=3)
        hint = "; did you mean " + " or ".join(
            f"'{'.'.join(walked + [c])}'" for c in close) + "?" if close else (
                f" ({'.'.join(walked)} is not a group of fields)" if not keys else
                "; every field is listed in the heart_disease config")
        _fail(f"{arg}: no field '{'.'.join(walked + [part])}' in "
              f"{os.path.basename(spec.partition(':')[0])}{hint}")
      node, walked = node[part], walked + [part]


def _parse_value(text: str, like, flag: str):
  """`text` as the type of the top-level value `like` (per-method overrides)."""
  try:
    if isinstance(like, bool):
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if isinstance(like, int):
      return int(text)
    if isinstance(like, float):
      return float(text)
  except ValueError:
    _fail(f"{flag}: expected a {type(like).__name__}, as the top-level field is, got "
          f"{text!r}")
  return text


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error naming the flag or file instead of a
  traceback for a config file that is missing, not Python or has no get_config, and
  for an override of a field the config does not have; `--config.per_method.M.F=V`
  overrides field F for method M (typed like `config.F`; checked with the config)."""
  per_method = [m.groups() for m in map(_PER_METHOD.fullmatch, argv[1:]) if m]
  argv = [a for a in argv if not _PER_METHOD.fullmatch(a)]
  spec = _config_file(argv)
  sys.argv[:] = argv  # config_flags reads its overrides from sys.argv too
  if spec is not None:
    _check_overrides(argv[1:], _load_config(spec), spec)
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}")
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"--config: {type(e).__name__}: {e}")
  config = FLAGS.config
  for method, field, text in per_method:
    value = _parse_value(text, config.get(field, text),
                         f"--config.per_method.{method}.{field}={text}")
    with config.unlocked():  # config_flags locks the config's keys
      if "per_method" not in config:
        config.per_method = ml_collections.ConfigDict()
      if method not in config.per_method:
        config.per_method[method] = ml_collections.ConfigDict()
      config.per_method[method][field] = value
  return rest


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
                              local_device_count=FLAGS.local_device_count,
                              timeout_s=FLAGS.distributed_timeout)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  # The study's modules live until the process ends: frozen as `_exit.run_app`
  # freezes the ones loaded before it (in this process and the report's).
  import gc  # pylint: disable=g-import-not-at-top
  from fedjax_dx import study  # pylint: disable=g-import-not-at-top,unused-import
  gc.freeze()
  # Started before JAX's backend and the study's threads (it forks): the report's
  # libraries load beside the study, and its figures are drawn two at a time.
  reporter = None
  if FLAGS.report and FLAGS.num_processes == 1 and not FLAGS.coordinator_address:
    from fedjax_dx.study._report_process import ReportProcess
    reporter = ReportProcess.start()
  try:
    _study_and_report(reporter)
  finally:
    if reporter is not None:
      reporter.stop()


# The study's programs and data sets, kept until the process ends (without teardown,
# `_exit.run_app`): freed as `run_study` returned, they took 0.15 s of a warm FLamby
# study's 5 s, before its report could be drawn.
_KEPT_UNTIL_EXIT: list = []


def _study_and_report(reporter) -> None:
  """The study, then its report (by `reporter` where there is one)."""
  from fedjax_dx import study
  import jax
  # jax logs each backend it could not start (tpu, cuda) at INFO: not the user's concern.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  lead = jax.process_index() == 0

  if FLAGS.compilation_cache:
    study.enable_compilation_cache(os.path.expanduser(FLAGS.compilation_cache))
  quiet = FLAGS.quiet or not lead
  if quiet:
    logging.getLogger().setLevel(logging.WARNING)
  try:
    programs = study.ProgramCache()
    _KEPT_UNTIL_EXIT.append(programs)
    paths = study.run_study(
        FLAGS.config, FLAGS.workdir, quiet=quiet, programs=programs,
        on_metrics_written=reporter.metrics_written if reporter is not None else None,
        method_threads=FLAGS.method_threads)
  except study.StudyError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not lead:
    return
  if FLAGS.report:
    try:
      drawn = reporter.draw(FLAGS.workdir) if reporter is not None else None
      if not drawn:  # drawn here, in this command's own process
        from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
        _report.import_seaborn_without_scipy()
        drawn = study.make_report(FLAGS.workdir)
      paths.update(drawn)
    except study.StudyError as e:  # the results are written; a figure could not be
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  if not FLAGS.quiet:
    print(f"results: {os.path.abspath(paths['metrics'])}, "
          f"{os.path.abspath(paths['summary'])}")
  if FLAGS.report:
    print(f"report: {os.path.abspath(paths['report'])}")
  if paths.get("diverged"):  # results written, but not a result to report as one
    print(f"error: {paths['diverged']}: a model that is not finite has NaN metrics, "
          "and one whose every update was dropped as non-finite stopped training; "
          "lower the learning rate(s)", file=sys.stderr)
    sys.exit(3)


