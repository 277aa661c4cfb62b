r"""Run a study: `fedjax-dx run` from the repository (see fedjax_dx/cli/_run.py).

  python -m benchmarks.run --config=configs/heart_disease.py --workdir=results/heart_disease
  python -m benchmarks.run --config=configs/test.py --workdir=/tmp/t --config.rounds=8
"""

from fedjax_dx.cli._exit import run_app
from fedjax_dx.cli._run import main, parse_flags

if __name__ == "__main__":
  run_app(main, flags_parser=parse_flags)
