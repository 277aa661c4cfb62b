"""Storage: atomic writes, the run's environment record, workdir resume checks, finalize.

Every file is written to a temporary name, then renamed: a crash never leaves half a file.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import tempfile
from typing import Any

import jax

from fedjax_dx.study._schema import StudyError
from fedjax_dx.study._summary import fairness, methods_order, summarize, summary_table
from fedjax_dx.study._summary import swept_columns


def umask() -> int:
  """The process's file-creation mask (read without changing it)."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_atomic(path: str, text: str | bytes | None = None, *, write=None) -> None:
  """Writes `text` (or what `write(tmp_path)` writes) to `path` through a temporary
  file and a rename, with the permissions a plain `open` would give (mkstemp's are
  0600).

  A failed write (a full disk, no permission) leaves `path` as it was and raises a
  StudyError naming it."""
  tmp = None
  try:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=os.path.splitext(path)[1])
    if write is None:
      with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
    else:
      os.close(fd)
      write(tmp)
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)
  except BaseException as e:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
    if not isinstance(e, OSError):
      raise
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    raise StudyError(
        f"cannot write {path}: {e.strerror or e}; what was written before is intact"
        + ("; free disk space and run the same command again (the study resumes)"
           if full else "")) from e


def environment() -> dict[str, Any]:
  """Package versions and the device a study ran on."""
  import importlib.metadata as md
  versions = {}
  for package in ("fedjax_dx", "jax", "jaxlib", "flax", "optax", "numpy", "pandas",
                  "ml_collections", "tensorflow_datasets", "scikit-learn", "flwr"):
    try:
      versions[package] = md.version(package)
    except md.PackageNotFoundError:
      pass
  device = jax.devices()[0]
  return {"versions": versions, "python": platform.python_version(),
          "device": {"platform": device.platform, "kind": device.device_kind,
                     "count": len(jax.devices()), "processes": jax.process_count()},
          "host": platform.node()}


def to_plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else value


def prepare_workdir(workdir: str, config_json: dict) -> bool:
  """Creates or checks the workdir; True when resuming the same study."""
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      stored = json.load(f)["config"]
    if stored != config_json:
      differing = sorted(_diff(stored, config_json))
      raise StudyError(
          f"workdir {workdir!r} holds another study (its config.json differs in "
          f"{', '.join(differing[:8])}); choose a new --workdir or remove that one")
    return True
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise StudyError(f"workdir {workdir!r} is not empty and holds no study (no "
                     "config.json); choose a new or empty --workdir")
  return False


def _diff(a, b, prefix=""):
  keys = set(a) | set(b)
  for k in keys:
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      yield from _diff(a[k], b[k], f"{prefix}{k}.")
    elif a.get(k) != b.get(k):
      yield f"{prefix}{k}"


def finalize(workdir: str, config, ids: list[str],
             on_metrics_written=None) -> dict[str, str]:
  """Assembles metrics.jsonl (canonical order) and summary.csv from the point files
  (`on_metrics_written(workdir)`, if given, is called once metrics.jsonl and
  predictions.jsonl are written, before the summaries)."""
  import pandas as pd

  lines = []
  for pid in ids:
    path = os.path.join(workdir, "points", pid + ".jsonl")
    with open(path) as f:
      point_lines = f.readlines()
    for number, line in enumerate(point_lines, 1):
      try:
        json.loads(line)
      except ValueError as e:
        raise StudyError(f"{path}, line {number}: not a JSON record ({e}); the file is "
                         "damaged: remove it and rerun to compute that point again")
    lines.extend(point_lines)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  write_atomic(metrics_path, "".join(lines))
  # The final models' per-patient test outputs (written with each point), together.
  predictions_path = os.path.join(workdir, "predictions.jsonl")

  def write_predictions(tmp):
    with open(tmp, "w") as out:
      for pid in ids:
        path = os.path.join(workdir, "predictions", pid + ".jsonl")
        if os.path.isfile(path):  # absent for points recorded before predictions were
          with open(path) as f:
            out.write(f.read())

  write_atomic(predictions_path, write=write_predictions)
  if on_metrics_written is not None:
    on_metrics_written(workdir)
  frame = pd.read_json(metrics_path, lines=True, dtype={"client": str},
                       precise_float=True)  # the numbers as written, to the last bit
  parquet_path = os.path.join(workdir, "metrics.parquet")
  write_atomic(parquet_path, write=lambda tmp: parquet_ready(frame).to_parquet(
      tmp, index=False))
  summary = summarize(frame, config)
  summary_path = os.path.join(workdir, "summary.csv")
  write_atomic(summary_path, summary.to_csv(index=False))
  fairness_path = os.path.join(workdir, "fairness.csv")
  write_atomic(fairness_path, fairness(summary).to_csv(index=False))
  table_path = os.path.join(workdir, "summary_table.md")
  notes = {**form_notes(config), **budget_notes(frame),
           **dict(config.get("method_notes") or {})}
  write_atomic(table_path, summary_table(summary, config.target_metric,
                                         methods_order(config, summary), notes))
  return {"metrics": metrics_path, "metrics_parquet": parquet_path,
          "summary": summary_path, "table": table_path,
          "predictions": predictions_path, "fairness": fairness_path,
          "diverged": diverged_runs(frame)}


def budget_notes(frame) -> dict[str, str]:
  """A note for each method that `config.dp_budget` stopped before its rounds."""
  if "dp_budget_rounds" not in frame:
    return {}
  notes = {}
  budgeted = frame[frame["dp_budget_rounds"].notna()]
  for method, rows in budgeted.groupby("method", sort=False):
    stopped = int(rows["dp_budget_rounds"].min())
    notes[method] = (f"stopped by dp_budget = {rows['dp_budget'].iloc[0]:g} after round "
                     f"{stopped} (epsilon {rows['epsilon'].max():.3g} at delta "
                     f"{rows['dp_delta'].iloc[0]:g}); a further round would exceed it")
  return notes


def parquet_ready(frame):
  """`frame` with one type per column, as Parquet needs: list columns (the bootstrap
  resamples of final rows) hold None, not NaN, where a row has none."""
  frame = frame.copy()
  for column in frame.columns:
    values = frame[column]
    if values.dtype == object and values.map(lambda v: isinstance(v, list)).any():
      frame[column] = values.map(lambda v: v if isinstance(v, list) else None)
  return frame


def form_notes(config) -> dict[str, str]:
  """Notes for the table on methods run in a form other than the paper's."""
  from fedjax_dx.study import _checks  # pylint: disable=g-import-not-at-top
  notes = {}
  for method in _checks.methods_of(config):
    mc = _checks.method_config(config, method)
    if method == "scaffold" and mc.scaffold_form == "flamby":
      notes[method] = ("scaffold_form = flamby: FLamby's scaffold.py (c moves by the "
                       "n_k-weighted mean of the clients' changes; the paper's option II "
                       "by 1/N of their sum)")
    if method in ("fedadam", "fedyogi", "fedadagrad") and mc.fedopt_form != "paper":
      notes[method] = {
          "flamby": "fedopt_form = flamby: FLamby's fed_opt.py (Algorithm 2 of Reddi et "
                    "al. without bias correction, from v = 0)",
          "bias_corrected": "fedopt_form = bias_corrected: optax's bias-corrected "
                            "moments, not the published FedOpt"}[mc.fedopt_form]
  return notes


def diverged_runs(frame) -> str:
  """'fedavg seed 0 diverged at round 3; ...' for every run whose model stopped being
  finite (rows carry `diverged_round`), '' when none did."""
  if "diverged_round" not in frame:
    return ""
  rows = frame[frame["diverged_round"].notna()]
  swept = [c for c in swept_columns(frame) if c in rows]
  runs = rows.drop_duplicates(["method", "seed", *swept])
  return "; ".join(
      f"{r['method']} seed {r['seed']} diverged at round {int(r['diverged_round'])}"
      + "".join(f" ({c} = {r[c]})" for c in swept) for _, r in runs.iterrows())
