r"""Draw the figures and report.html of a finished study: `fedjax-dx report`.

  python -m benchmarks.report --workdir=results/heart_disease
"""

from fedjax_dx.cli._exit import run_app
from fedjax_dx.cli._report import main

if __name__ == "__main__":
  run_app(main)
