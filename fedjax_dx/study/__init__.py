"""The study harness: a config (+ sweep) -> every method x point x seed -> tidy results.

One job per module:
  _fields    the field table (type, range, per-method, compile key), from which the
             checks, the per-method list and the compile key are derived
  _schema    the vocabulary (methods, data sets, metrics), `StudyError`, config access
  _checks    `check_config`: every field checked before any data, compile or write
  _sweep     `config.sweep` -> points, point ids, column names
  _build     data set, model and each method's algorithm from a config
  _programs  compiled programs, one per compile key, lowered lazily
  _execute   `run_study`: methods x points x seeds, progress, resume, multi-host
  _storage   atomic writes, environment record, workdir resume checks, finalize
  _summary   summary tables over seeds
  _report    the HTML report and its charts (imports matplotlib/seaborn when drawing;
             two figures at a time in forked processes where that is safe)
  _report_process  the report drawn beside a study by a process forked before it
  _saved     the final models in DIR/models/, and loading one back
  _api       the notebook path: `run` -> `Study` (DataFrames, figures, report)

Example:
  >>> from fedjax_dx import study
  >>> result = study.run("test", "/tmp/fdx_test", quiet=True)
  >>> result.summary.head()
"""

from fedjax_dx.study._api import Study
from fedjax_dx.study._api import load_config
from fedjax_dx.study._api import load_results
from fedjax_dx.study._api import run
from fedjax_dx.study._checks import check_config
from fedjax_dx.study._checks import method_config
from fedjax_dx.study._checks import methods_of
from fedjax_dx.study._execute import run_study
from fedjax_dx.study._fields import FIELDS
from fedjax_dx.study._programs import ProgramCache
from fedjax_dx.study._programs import enable_compilation_cache
from fedjax_dx.study._saved import load_model
from fedjax_dx.study._schema import DATASETS
from fedjax_dx.study._schema import METRICS
from fedjax_dx.study._schema import STRATEGIES
from fedjax_dx.study._schema import StudyError
from fedjax_dx.study._storage import write_atomic
from fedjax_dx.study._summary import summarize
from fedjax_dx.study._summary import swept_columns
from fedjax_dx.study._sweep import sweep_points


def make_report(workdir: str) -> dict[str, str]:
  """Draws the study's charts and HTML report (imports matplotlib and seaborn; global
  matplotlib and seaborn state is left as it was)."""
  from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
  return _report.make_report(workdir)


__all__ = (
    "DATASETS",
    "FIELDS",
    "METRICS",
    "ProgramCache",
    "STRATEGIES",
    "Study",
    "StudyError",
    "check_config",
    "enable_compilation_cache",
    "load_config",
    "load_model",
    "load_results",
    "make_report",
    "method_config",
    "methods_of",
    "run",
    "run_study",
    "summarize",
    "sweep_points",
    "swept_columns",
    "write_atomic",
)
