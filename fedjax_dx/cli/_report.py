r"""`fedjax-dx report`: draw the figures and report.html of a finished study.

  fedjax-dx report --workdir=results/heart_disease
"""

from __future__ import annotations

import os
import sys

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A study's workdir (holds metrics.jsonl).")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  from fedjax_dx import study

  needed = [f for f in ("config.json", "metrics.jsonl", "summary.csv")
            if not os.path.isfile(os.path.join(FLAGS.workdir, f))]
  if needed:
    print(f"error: --workdir={FLAGS.workdir!r} lacks {', '.join(needed)}; run "
          "fedjax-dx run (python -m benchmarks.run) into it first", file=sys.stderr)
    sys.exit(2)
  from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
  _report.import_seaborn_without_scipy()  # this command's own process
  paths = study.make_report(FLAGS.workdir)
  for name, path in paths.items():
    print(f"{name}: {path}")


