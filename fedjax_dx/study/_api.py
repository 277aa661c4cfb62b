"""The notebook path: run a study or open a finished one, and read it as DataFrames."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from typing import Any

from fedjax_dx.study import _saved
from fedjax_dx.study._schema import StudyError


def load_config(config: Any):
  """A config as a ConfigDict: a ConfigDict as it is, or a ready-made config's name
  (`"heart_disease"`) or a config file's path (`"my_study.py"`, its `get_config()`)."""
  if not isinstance(config, (str, os.PathLike)):
    return config
  from fedjax_dx import cli  # pylint: disable=g-import-not-at-top
  path = cli.resolve_config(os.fspath(config))
  if not os.path.isfile(path):
    raise StudyError(f"config {os.fspath(config)!r}: no such file, nor a ready-made "
                     f"config's name ({', '.join(cli.config_names())})")
  spec = importlib.util.spec_from_file_location("_fedjax_dx_user_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise StudyError(f"config {path}: defines no get_config()")
  return module.get_config()


class Study:
  """A study's results in a workdir, read as pandas DataFrames (each read once).

  Attributes:
    workdir: the study's folder.
    config: the config it ran (a dict, as stored in config.json).
    environment: package versions, device and host it ran on.

  Example:
    >>> result = fdx.study.run("own_data", "results/own_data")
    >>> result.summary[["method", "client_name", "auc_mean", "auc_std"]]
    >>> result.figures()["convergence"]          # a matplotlib Figure
    >>> model, params = result.load_model("fedavg", seed=0)
  """

  def __init__(self, workdir: str):
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
      raise StudyError(f"{workdir}: not a study's workdir (no config.json)")
    with open(path) as f:
      stored = json.load(f)
    self.workdir = workdir
    self.config = stored["config"]
    self.environment = {k: v for k, v in stored.items() if k != "config"}

  def _read(self, name: str, reader):
    path = os.path.join(self.workdir, name)
    if not os.path.isfile(path):
      raise StudyError(f"{self.workdir}: no {name} (the study has not finished; run it "
                       "again into the same workdir to resume)")
    return reader(path)

  @functools.cached_property
  def metrics(self):
    """One row per evaluation: method, seed, round, client, split and the metrics."""
    import pandas as pd  # pylint: disable=g-import-not-at-top
    parquet = os.path.join(self.workdir, "metrics.parquet")
    if os.path.isfile(parquet):
      return pd.read_parquet(parquet)
    return self._read("metrics.jsonl", lambda p: pd.read_json(p, lines=True,
                                                                dtype={"client": str}))

  @functools.cached_property
  def summary(self):
    """Final metrics per method and test set: `<metric>_mean/_std` over seeds."""
    import pandas as pd  # pylint: disable=g-import-not-at-top
    return self._read("summary.csv", lambda p: pd.read_csv(p, dtype={"client": str}))

  @functools.cached_property
  def fairness(self):
    """Each method's worst site against its mean over sites."""
    import pandas as pd  # pylint: disable=g-import-not-at-top
    return self._read("fairness.csv", pd.read_csv)

  @functools.cached_property
  def predictions(self):
    """The final models' outputs on every test patient."""
    import pandas as pd  # pylint: disable=g-import-not-at-top
    return self._read("predictions.jsonl", lambda p: pd.read_json(
        p, lines=True, dtype={"client": str}))

  @property
  def models(self):
    """The saved final models: method, seed, point, note (load one: `load_model`)."""
    import pandas as pd  # pylint: disable=g-import-not-at-top
    records = _saved.saved_models(self.workdir)
    return pd.DataFrame([{"method": r["method"], "seed": r["seed"],
                          "point": r["point_index"], "note": r["note"],
                          "path": r["path"]} for r in records])

  def load_model(self, method: str, seed: int | None = None, point: int = 0):
    """`(Model, params)` of a saved final model (see `fdx.study.load_model`)."""
    return _saved.load_model(self.workdir, method, seed, point)

  def figures(self) -> dict[str, Any]:
    """The report's figures as matplotlib Figures ({name: figure}); writes nothing
    and leaves global matplotlib and seaborn state as it was."""
    from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
    return _report.figures(self.workdir)

  def report(self) -> str:
    """Writes the figures (PNG) and report.html into the workdir; returns its path."""
    from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
    return _report.make_report(self.workdir)["report"]

  def table(self, metric: str | None = None):
    """Final test `metric` (default: the config's target), mean over seeds, one row
    per method and one column per test set."""
    metric = metric or self.config.get("target_metric", "auc")
    column = f"{metric}_mean"
    if column not in self.summary:
      raise StudyError(f"no metric {metric!r} in {self.workdir}/summary.csv")
    summary = self.summary
    table = summary.pivot_table(index="method", columns="client_name", values=column,
                                sort=False)
    return table[list(dict.fromkeys(summary["client_name"]))]

  def __repr__(self) -> str:
    config = self.config
    rounds = config.get("rounds")
    head = (f"Study({self.workdir!r}): {config.get('name')}, methods "
            f"{config.get('methods')}, {config.get('num_seeds')} seed(s), {rounds} "
            f"rounds, data {config.get('dataset', {}).get('name')}")
    try:
      metric = config.get("target_metric", "auc")
      pooled = self.summary[self.summary["client"] == "pooled"]
      finals = ", ".join(f"{m} {v:.3f}" for m, v in zip(pooled["method"],
                                                      pooled[f"{metric}_mean"]))
      return f"{head}\n  final pooled test {metric}: {finals}"
    except StudyError:
      return f"{head} (not finished)"

  def _repr_html_(self) -> str:
    try:
      return (f"<p><b>{self.config.get('name')}</b> in <code>{self.workdir}</code></p>"
              + self.table().to_html(float_format=lambda v: f"{v:.3f}"))
    except StudyError:
      return f"<pre>{repr(self)}</pre>"


def run(config, workdir: str, *, quiet: bool = False, report: bool = False,
        programs=None, method_threads: int = 0) -> Study:
  """Runs (or resumes) a study into `workdir` and returns it as a `Study`.

  Args:
    config: a ConfigDict, a ready-made config's name ("heart_disease", "own_data")
      or a config file's path.
    workdir: where results go; a workdir holding the same study resumes it.
    quiet: no progress bar and no log lines.
    report: also write the figures and report.html (`Study.report()` does it later).
    programs: a `ProgramCache` shared by several studies of one process.
    method_threads: methods trained at once (0: one per core on CPU; 1: one after
      another, each method's `wall_s` timed alone). The results are the same.

  Returns:
    The finished `Study`.

  Example:
    >>> config = fdx.study.load_config("own_data")
    >>> config.rounds = 10
    >>> result = fdx.study.run(config, "/tmp/own_data")
  """
  from fedjax_dx.study import _execute  # pylint: disable=g-import-not-at-top
  _execute.run_study(load_config(config), workdir, quiet=quiet, programs=programs,
                     method_threads=method_threads)
  result = Study(workdir)
  if report:
    result.report()
  return result


def load_results(workdir: str) -> Study:
  """A finished (or resumable) study's results, read from its workdir."""
  return Study(workdir)
