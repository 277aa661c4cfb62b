r"""Draw the figures and report.html of a finished study: `fedjax-dx report`.

  python -m benchmarks.report --workdir=results/heart_disease
"""

from absl import app

from fedjax_dx.cli._report import main

if __name__ == "__main__":
  app.run(main)
