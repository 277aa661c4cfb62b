"""Seaborn figures (PNG) and one self-contained report.html from a study's results."""

from __future__ import annotations

import base64
import functools
import html
import json
import os
import pickle
import sys
import textwrap
import threading
import warnings
from typing import Any, NamedTuple

import numpy as np

from fedjax_dx.study._schema import METRICS, StudyError
from fedjax_dx.study._storage import write_atomic
from fedjax_dx.study._summary import summary_swept_columns, swept_columns



class _Figures:
  """`plt.subplots` without pyplot: figures that belong to no global figure manager
  and no backend, so drawing a report never changes a user's matplotlib state (an
  inline notebook backend, open figures)."""

  @staticmethod
  def subplots(*args, figsize=None, **kwargs):
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _plt():
  import seaborn as sns  # pylint: disable=g-import-not-at-top
  return _Figures, sns


# What `import seaborn` imports only for kernel density estimates and cluster maps
# (no report draws either; seaborn falls back to its own copy of gaussian_kde):
# 0.65 of its 0.70 s import on a 2-core CPU, measured.
_SCIPY_FOR_SEABORN = ("scipy.stats", "scipy.cluster")


def import_seaborn_without_scipy() -> None:
  """Imports seaborn without `_SCIPY_FOR_SEABORN`: for a process of fedjax_dx's own
  that draws a report (the report's child, `fedjax-dx report`), never a user's
  process, where seaborn must stay as its user imports it. A plain import where
  seaborn or those modules are imported already; they import normally afterwards."""
  if any(name in sys.modules for name in ("seaborn",) + _SCIPY_FOR_SEABORN):
    import seaborn  # pylint: disable=g-import-not-at-top,unused-import,redefined-outer-name
    return
  for name in _SCIPY_FOR_SEABORN:
    sys.modules[name] = None  # an ImportError for seaborn's optional imports
  try:
    import seaborn  # pylint: disable=g-import-not-at-top,unused-import
  finally:
    for name in _SCIPY_FOR_SEABORN:
      if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]


def prepare() -> None:
  """Imports what drawing needs (seaborn, pandas, matplotlib's Agg canvas and PNG
  writer) and draws one small figure, so that a report drawn later starts at once
  (`_report_process`: done while a study runs, in a process of its own)."""
  import io  # pylint: disable=g-import-not-at-top
  __import__("pandas")
  import_seaborn_without_scipy()
  plt, sns = _plt()
  with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.set_title("warm-up")
    fig.savefig(io.BytesIO(), dpi=10, format="png")


def _path(study_or_dir, filename: str) -> str | None:
  """Where a figure goes: in the report's folder, or nowhere (figures() keeps them)."""
  folder = getattr(study_or_dir, "fig_dir", study_or_dir)
  return None if folder is None else os.path.join(folder, filename)


def _save(fig, path, rect=None):
  """Lays `fig` out and writes it to `path` (returns the path), or returns the figure
  itself when `path` is None."""
  fig.tight_layout(rect=rect)
  if path is None:
    return fig
  write_atomic(path, write=lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
  return path


CI_RESAMPLES = 200  # a few seeds per point; seaborn's default 1000 took half the time


def seeded_interval(values) -> tuple[float, float]:
  """The 95% bootstrap interval of the mean of `values` that seaborn draws for
  `errorbar=("ci", 95), n_boot=CI_RESAMPLES, seed=0`, the same numbers computed with
  one vectorised mean instead of one Python-level call per resample (seaborn's loop
  was 40% of a report's time).

  Its resamples are seaborn's: a generator seeded 0 for each group, drawing one
  resample's indices after another (so a redrawn report is the same picture); the
  mean skips NaN when there is one, and the interval is the 2.5 and 97.5 percentiles
  of the resampled means.

  Args:
    values: one group's values (a point of a curve, a bar).

  Returns:
    (low, high).
  """
  values = np.asarray(values, dtype=float)
  draws = _resample_indices(len(values))
  mean = np.nanmean if np.isnan(values.sum()) else np.mean
  with warnings.catch_warnings():  # a resample of only NaN: its mean is NaN
    warnings.simplefilter("ignore", RuntimeWarning)
    low, high = np.nanpercentile(mean(values[draws], axis=1), (2.5, 97.5))
  return float(low), float(high)


@functools.lru_cache(maxsize=64)
def _resample_indices(n: int) -> np.ndarray:
  """`[CI_RESAMPLES, n]`: seaborn's resamples of a group of n (the same for every
  group of n: each starts from seed 0)."""
  rng = np.random.default_rng(0)
  draws = np.stack([rng.integers(0, n, n, dtype=np.intp) for _ in range(CI_RESAMPLES)])
  draws.flags.writeable = False
  return draws


# Error bars and bands: 95% bootstrap intervals over the seeds.
_CI = dict(errorbar=seeded_interval)


def _tick_label(name) -> str:
  """A test set's name on a categorical axis, on lines of at most 16 characters
  ("pooled (center z-scores)" no longer runs into its neighbour's name)."""
  return textwrap.fill(str(name), 16, break_long_words=False)


def _barplot(ax, data, x: str, y: str, order, hue_order, palette) -> dict:
  """`sns.barplot(data=data, x=x, y=y, hue="method", order=order, hue_order=hue_order,
  palette=palette, errorbar=seeded_interval, ax=ax)`, pixel for pixel (the same PNG),
  drawn with one `ax.bar` per method and one collection of error bars instead of
  seaborn's aggregation and line per bar (the clinical figure's four panels: 1.0 s
  on a 2-core CPU with seaborn's, 0.6 s with this): the mean of each (method, x) group's values that are
  not NaN, its `seeded_interval` (none for one value), bars dodged in `hue_order`
  in `palette`'s colors at seaborn's saturation, seaborn's categorical x axis and
  its legend (title "method").

  Returns:
    {(method, x value): the bar's Rectangle}.
  """
  import matplotlib as mpl  # pylint: disable=g-import-not-at-top
  from matplotlib.collections import LineCollection  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top
  from seaborn.utils import desaturate  # pylint: disable=g-import-not-at-top
  positions = {name: float(i) for i, name in enumerate(order)}
  rows = data[data[x].isin(positions) & data["method"].isin(hue_order)].dropna(
      subset=[y])
  groups = {key: values.to_numpy(dtype=float)
            for key, values in rows.groupby(["method", x], sort=False)[y]}
  width = .8 / len(hue_order)  # seaborn's arithmetic, to the last bit
  full_width = width * len(hue_order)
  bars, segments = {}, []
  for k, method in enumerate(hue_order):
    color = desaturate(palette[method], .75)
    keys = [(method, name) for name in order if (method, name) in groups]
    centers = [positions[name] + (width * k + width / 2 - full_width / 2)
               for _, name in keys]
    edges = [center - width / 2 for center in centers]
    container = ax.bar(edges, [groups[key].mean() for key in keys],
                       width=[center + width / 2 - edge
                              for center, edge in zip(centers, edges)],
                       align="edge", color=color, facecolor=color)
    bars.update(zip(keys, container))
    for key, center in zip(keys, centers):
      low, high = seeded_interval(groups[key]) if len(groups[key]) > 1 else (np.nan,
                                                                             np.nan)
      segments.append([(center, low), (center, high)])
    ax.add_artist(Rectangle((0, 0), 0, 0, facecolor=color, label=method))
  ax.add_collection(LineCollection(
      segments, colors=".26", linewidths=1.5 * mpl.rcParams["lines.linewidth"],
      capstyle=mpl.rcParams["lines.solid_capstyle"], zorder=2))
  ax.autoscale_view()
  ax.set_xticks(range(len(order)), order)
  ax.xaxis.grid(False)
  ax.set_xlim(-.5, len(order) - .5)
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.legend(title="method")
  return bars


def _label(metric: str) -> str:
  return {"auc": "AUC-ROC", "f1": "F1", "balanced_accuracy": "balanced accuracy"}.get(
      metric, metric)


def _collapse_local(frame):
  """`local_k` evaluated on client k (its own hospital) -> method `local`;
  on the pooled test set, the mean over the hospitals' own models."""
  import pandas as pd
  local = frame[frame["method"].str.startswith("local_")]
  rest = frame[~frame["method"].str.startswith("local_")]
  if local.empty:
    return rest
  owner = local["method"].str.slice(6)
  own = local[(local["client"] == owner)]
  pooled = local[local["client"] == "pooled"]
  group = [c for c in pooled.columns if c not in METRICS and c not in (
      "method", "num_examples", "bytes_up", "bytes_down", "cumulative_bytes", "wall_s",
      "compile_s")]
  pooled = pooled.groupby(group, dropna=False, as_index=False)[list(METRICS)].mean()
  local_rows = pd.concat([own, pooled], ignore_index=True)
  local_rows["method"] = "local"
  return pd.concat([rest, local_rows], ignore_index=True)


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)


def _centralized_line(ax, level: float) -> None:
  ax.axhline(level, color="black", linestyle="--", linewidth=1.2,
             label=f"centralized (final) {level:.3f}")


def _own_schedule(config: dict) -> dict[str, str]:
  """Baselines whose rounds are not communication rounds -> their schedule in words:
  centralized always; local-only when it has its own rounds, epochs or steps
  (`per_method.local`, as in FLamby's baselines)."""
  schedules = {"centralized": "pooled"}
  local = (config.get("per_method") or {}).get("local", {})
  if {"rounds", "local_epochs", "local_steps"} & set(local):
    own = {**config, **local}
    schedules["local"] = (
        f"{own['rounds']} x {own['local_steps']} steps" if own.get("local_steps")
        else f"{own['rounds'] * own.get('local_epochs', 1):g} epochs")
  return schedules


def _privacy_utility(final_pooled, metric, colors, plt, sns):
  """Utility and attack success versus epsilon (private runs), with the non-private
  runs of the study (e.g. FedAvg without DP, centralized) as reference lines."""
  if "epsilon" not in final_pooled or not final_pooled["epsilon"].notna().any():
    return None
  private = final_pooled[final_pooled["epsilon"].notna()]
  references = final_pooled[final_pooled["epsilon"].isna()
                            & (final_pooled["method"] != "local")]
  attacks = [c for c in ("mia_auc", "mia_class_balanced_auc", "mia_calibrated_auc")
             if c in final_pooled]
  fig, axes = plt.subplots(1, 2 if attacks else 1, figsize=(13 if attacks else 8, 4.4),
                           squeeze=False)
  utility = axes[0, 0]
  order = [m for m in colors if m in set(private["method"])]
  sns.lineplot(data=private, x="epsilon", y=metric, hue="method", hue_order=order,
               palette=colors, marker="o", **_CI, ax=utility)
  non_private = lambda method: ("" if method == "centralized" else " (no DP)")
  for method, rows in references.groupby("method", sort=False):
    level = rows[metric].mean()
    utility.axhline(level, color=colors.get(method, "black"), linestyle="--",
                    linewidth=1.2, label=f"{method}{non_private(method)} {level:.3f}")
  utility.set_xscale("log")
  _finish(utility, "epsilon spent by the end of training (log scale)",
          f"final pooled test {_label(metric)}", "Utility versus privacy")
  if attacks:
    attack = axes[0, 1]
    melted = private.melt(id_vars=["method", "epsilon"], value_vars=attacks,
                          var_name="attack", value_name="attack_auc").dropna()
    names = {"mia_auc": "loss threshold", "mia_class_balanced_auc": "within class",
             "mia_calibrated_auc": "calibrated"}
    # One dash pattern per attack, shared by its curve and the non-private references.
    dashes = {"mia_auc": (None, None), "mia_class_balanced_auc": (5, 2, 1, 2),
              "mia_calibrated_auc": (1, 1.5)}
    melted["attack"] = melted["attack"].map(names)
    sns.lineplot(data=melted, x="epsilon", y="attack_auc", hue="method",
                 hue_order=order, palette=colors, style="attack", marker="o",
                 style_order=[names[c] for c in attacks],
                 dashes={names[c]: dashes[c] if dashes[c][0] else "" for c in attacks},
                 **_CI, ax=attack)
    for method, rows in references.groupby("method", sort=False):
      for column in ("mia_auc", "mia_class_balanced_auc"):
        if column in rows and rows[column].notna().any():
          level = rows[column].mean()
          line = attack.axhline(level, color=colors.get(method, "black"), linewidth=1.0,
                                alpha=0.8, label=f"{method}{non_private(method)}, "
                                                 f"{names[column]} {level:.3f}")
          if dashes[column][0]:
            line.set_dashes(dashes[column])
    attack.axhline(0.5, color="grey", linestyle=":", linewidth=1.2,
                   label="chance (0.5)")
    attack.set_xscale("log")
    _finish(attack, "epsilon (log scale)", "membership-inference AUC",
            "Attack success versus privacy")
  return fig


def _privacy_bounds(final_pooled, colors, plt):
  """Both sides of the privacy claim against the noise multiplier: the accountant's
  epsilon (an upper bound) and the canary audit's (a lower bound, at its confidence),
  mean over seeds with each seed's bound as a dot."""
  if "epsilon_lower" not in final_pooled or not final_pooled["epsilon_lower"].notna().any():
    return None
  audited = final_pooled[final_pooled["epsilon_lower"].notna()].sort_values("dp_noise")
  fig, ax = plt.subplots(figsize=(8.5, 4.6))
  for method, rows in audited.groupby("method", sort=False):
    color = colors.get(method, "black")
    per_noise = rows.groupby("dp_noise", as_index=False).agg(
        upper=("epsilon", "max"), lower=("epsilon_lower", "mean"))
    finite = per_noise[per_noise["upper"].notna()]
    ax.plot(finite["dp_noise"], finite["upper"], color=color, marker="o",
            label=f"{method}: accountant epsilon (upper bound)")
    ax.plot(per_noise["dp_noise"], per_noise["lower"], color=color, marker="s",
            linestyle="--", label=f"{method}: audit epsilon (lower bound, mean of seeds)")
    ax.scatter(rows["dp_noise"], rows["epsilon_lower"], color=color, s=12, alpha=0.5)
  confidence = audited["epsilon_lower_confidence"].iloc[0]
  ax.set_yscale("symlog", linthresh=0.1)
  _finish(ax, "noise multiplier z (noise std / clipping norm)",
          "epsilon (symlog scale)",
          f"Privacy claimed and measured ({confidence:.0%} confidence for the audit)")
  return fig


class _Study(NamedTuple):
  """What every figure of a report reads."""

  plt: Any
  sns: Any
  config: dict
  metric: str  # the target metric, drawn on the y axes
  swept: list  # swept columns
  test: Any  # test-split rows (local-only collapsed)
  pooled: Any  # their pooled-test-set rows
  colors: dict  # method -> colour
  order: list  # methods in config order
  fig_dir: str | None  # where figures are written (None: kept as Figures)

  def hue(self, methods) -> dict:
    return dict(hue="method", palette=self.colors,
                hue_order=[m for m in self.order if m in set(methods)])


def make_report(workdir: str, processes: int | None = None,
                results_written=None) -> dict[str, str]:
  """Draws every figure that the results support into `workdir` (PNG) and writes
  report.html; returns {name: path}. Global matplotlib and seaborn state is left as
  it was.

  Args:
    workdir: a study's results (config.json, metrics.jsonl, summary.csv, ...).
    processes: how many processes draw the figures (each takes the next figure
      when it is done with one). None: two where this process can fork safely
      (`can_fork`: Linux, one thread, no JAX backend started), else one. The
      figures are the same either way.
    results_written: None when every result file is written; else a call that
      returns once summary.csv and fairness.csv are (True), or never will be
      (False: nothing more is drawn, `StudyError`). The figures that read only
      metrics.jsonl, predictions.jsonl and partition.json are drawn first
      (`ReportProcess`: while the study writes its summaries); each drawing process
      (the forked ones too) calls it once, when the next figure it takes reads the
      summaries.
  """
  meta = _read_meta(workdir)
  figures = _draw(workdir, workdir, processes, results_written, meta)
  summary = _read_summary(workdir)
  report = _html(workdir, meta, summary, figures, meta["config"].get("target_metric",
                                                                     "accuracy"))
  return {**figures, "report": report}


def _read_summary(workdir: str):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  return pd.read_csv(os.path.join(workdir, "summary.csv"), dtype={"client": str})


def figures(workdir: str) -> dict[str, Any]:
  """The report's figures as matplotlib `Figure`s, {name: figure}; nothing is written
  and no global matplotlib or seaborn state changes."""
  return _draw(workdir, None, 1)


def can_fork() -> bool:
  """Whether this process can fork workers safely: Linux, no thread but this one
  (a forked child gets only the forking thread: a lock another thread held would
  stay held) and no JAX backend started (its runtime threads and devices)."""
  if not sys.platform.startswith("linux") or threading.active_count() != 1:
    return False
  bridge = sys.modules.get("jax._src.xla_bridge")
  return not getattr(bridge, "_backends", None)


def _draw(workdir: str, fig_dir: str | None, processes: int | None,
          results_written=None, meta: dict | None = None):
  """{name: path, or Figure when fig_dir is None} of every figure the results
  support, drawn in seaborn's whitegrid style for this call only (`make_report`'s
  `results_written`: a figure that needs the summaries is drawn once it says so)."""
  _, sns = _plt()
  if processes is None:
    processes = min(2, os.cpu_count() or 1) if can_fork() else 1
  if fig_dir is None:
    processes = 1
  with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
    tasks = _figure_tasks(workdir, fig_dir, meta or _read_meta(workdir))
    late = {i for i, (name, _) in enumerate(tasks) if name in _READ_SUMMARIES}
    drawn = _run_tasks(tasks, processes, late, results_written)
    if drawn is None:
      raise StudyError(f"{workdir}: the study's summaries were not written; no report")
    figures = {}
    for result in drawn:
      figures.update(result)
    return figures


# The figures that read summary.csv or fairness.csv (the others read only
# metrics.jsonl, predictions.jsonl and partition.json).
_READ_SUMMARIES = ("fairness",)
# The figures that take longest first, so that parallel processes finish together.
_SLOWEST_FIRST = ("clinical", "comparison", "privacy_utility", "fairness", "calibration",
                  "convergence", "communication", "sweeps", "privacy_bounds", "labels")


def _read_meta(workdir: str) -> dict:
  """The workdir's config.json (the config, versions, device)."""
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def flush_before_fork() -> None:
  """Flushes stdout and stderr, so that a forked child does not write what this
  process buffered a second time."""
  for stream in (sys.stdout, sys.stderr):
    stream.flush()


def _figure_tasks(workdir: str, fig_dir: str | None, meta: dict):
  """[(name, () -> {figure: path or Figure})]: the report's figures in report order,
  each drawn by a call that needs nothing from the others."""
  import pandas as pd

  plt, sns = _plt()
  config = meta["config"]
  frame = pd.read_json(os.path.join(workdir, "metrics.jsonl"), lines=True,
                       dtype={"client": str})
  # The bootstrap resamples (lists) are summarized in summary.csv's intervals.
  frame = frame.drop(columns=[c for c in frame if c.startswith("bootstrap_")])
  metric = config.get("target_metric", "accuracy")
  test = _collapse_local(frame[frame["split"] == "test"])
  order = [m for m in config["methods"].split(",") if m in set(test["method"])]
  study = _Study(plt, sns, config, metric, swept_columns(frame, config.get("sweep", "")),
                 test,
                 test[test["client"] == "pooled"], dict(zip(order, sns.color_palette(
                     "deep", len(order)))), order, fig_dir)
  last = _final_rows(study)
  final_pooled = last[last["client"] == "pooled"]

  def privacy_utility():
    fig = _privacy_utility(final_pooled, metric, study.colors, plt, sns)
    return {} if fig is None else {
        "privacy_utility": _save(fig, _path(study, "privacy_utility.png"))}

  def privacy_bounds():
    fig = _privacy_bounds(final_pooled, study.colors, plt)
    return {} if fig is None else {
        "privacy_bounds": _save(fig, _path(study, "privacy_bounds.png"))}

  return [
      ("convergence", lambda: _convergence(study)),
      ("communication", lambda: _communication(study)),
      ("comparison", lambda: _comparison(study, last)),
      ("sweeps", lambda: _sweeps(study, final_pooled)),
      ("privacy_utility", privacy_utility),
      ("privacy_bounds", privacy_bounds),
      ("clinical", lambda: _clinical(study, last)),
      ("calibration", lambda: _calibration(study, workdir)),
      ("fairness", lambda: _fairness_view(study, workdir)),
      ("labels", lambda: _labels(workdir, fig_dir)),
  ]


def _run_tasks(tasks, processes: int, late=frozenset(), results_written=None
               ) -> list[dict] | None:
  """Each task's result, in the order of `tasks`, or None when `results_written`
  says the summaries never will be (the `late` tasks, which read them, not drawn).

  With `processes` > 1, this process and `processes - 1` forked ones take the tasks
  one at a time from a pipe, slowest first and the late ones last (the children send
  their results back pickled); the first to take a late task asks `results_written`
  (once in each process: it may block until the study has written its summaries),
  so that no process waits for another one's figures before drawing those. A task
  that fails in a child runs again here, so its error is raised as it would be
  without children."""
  asked = []  # this process's answer of results_written, once asked

  def summaries_written() -> bool:
    if results_written is None:
      return True
    if not asked:
      asked.append(bool(results_written()))
    return asked[0]

  if processes <= 1 or len(tasks) < 2:
    done = {}
    for i in sorted(range(len(tasks)), key=lambda i: i in late):
      if i in late and not summaries_written():
        return None
      done[i] = tasks[i][1]()
    return [done[i] for i in range(len(tasks))]
  slowest_first = sorted(range(len(tasks)), key=lambda i: (i in late, (
      _SLOWEST_FIRST.index(tasks[i][0]) if tasks[i][0] in _SLOWEST_FIRST
      else len(_SLOWEST_FIRST))))
  queue_out, queue_in = os.pipe()
  os.write(queue_in, bytes(slowest_first))  # < 256 tasks, far below a pipe's buffer
  os.close(queue_in)
  flush_before_fork()
  children, done = [], {}
  try:
    for _ in range(processes - 1):
      result_out, result_in = os.pipe()
      pid = os.fork()
      if pid == 0:  # a child: draws, sends its results, ends without cleanup
        try:
          os.close(result_out)
          payload = pickle.dumps(_take_tasks(tasks, queue_out, late, summaries_written))
          with os.fdopen(result_in, "wb") as out:
            out.write(payload)
        finally:
          os._exit(0)  # pylint: disable=protected-access
      os.close(result_in)
      children.append((pid, result_out))
    done = _take_tasks(tasks, queue_out, late, summaries_written)
  finally:
    os.close(queue_out)
    for pid, result_out in children:
      with os.fdopen(result_out, "rb") as result:
        payload = result.read()
      os.waitpid(pid, 0)
      child_done = pickle.loads(payload) if payload else {}
      done.update(child_done)
  if late and not summaries_written():
    return None
  for i in sorted(set(range(len(tasks))) - set(done)):  # failed, or lost with a child
    done[i] = tasks[i][1]()
  return [done[i] for i in range(len(tasks))]


def _take_tasks(tasks, queue, late, summaries_written) -> dict:
  """Runs the tasks whose indices this process reads from `queue` (one byte each)
  until it is empty: {index: result} of those that did not fail (a failed one runs
  again in the first process, which raises its error). A `late` task is drawn only
  once `summaries_written()`."""
  done = {}
  while taken := os.read(queue, 1):
    if taken[0] in late and not summaries_written():
      continue
    try:
      done[taken[0]] = tasks[taken[0]][1]()
    except Exception:  # pylint: disable=broad-except
      pass
  return done


CLINICAL_METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity")


def _clinical(study: _Study, last) -> dict[str, str]:
  """Per-site panel of AUC, balanced accuracy, sensitivity and specificity (final
  round), n per site in the labels; a hatched bar is a model that calls every patient
  of that site the same class (sensitivity or specificity 0 with the other 1)."""
  plt, hue = study.plt, study.hue
  if last["auc"].isna().all():
    return {}
  sites = last.drop_duplicates("client")
  sizes = dict(zip(sites["client"], sites["num_examples"]))
  names = dict(zip(sites["client"], sites["client_name"]))
  order = (sorted((c for c in names if str(c).isdigit()), key=int)
           + [c for c in ("pooled",) if c in names])
  label = {c: f"{_tick_label(names[c])}\n(n = {int(sizes[c])})" for c in order}
  client_of = {site: c for c, site in label.items()}
  data = last[last["client"].isin(order)].assign(site=lambda d: d["client"].map(label))
  fig, axes = plt.subplots(2, 2, figsize=(max(9, 1.3 * len(order) + 5), 7), sharex=True)
  means = data.groupby(["method", "client"])[["sensitivity", "specificity"]].mean()
  constant = ((means["sensitivity"] >= 0.999) & (means["specificity"] <= 0.001)) | (
      (means["specificity"] >= 0.999) & (means["sensitivity"] <= 0.001))
  methods = hue(data["method"])["hue_order"]
  for ax, metric in zip(axes.ravel(), CLINICAL_METRICS):
    bars = _barplot(ax, data, "site", metric, [label[c] for c in order], methods,
                    study.colors)
    for (method, site), bar in bars.items():
      if constant.get((method, client_of[site]), False):
        bar.set_hatch("///")
        bar.set_edgecolor("black")
    ax.set_ylim(0, 1.05)
    ax.set_title(_label(metric))
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.tick_params(axis="x", labelsize=8)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  for ax in axes.ravel():
    if ax.get_legend() is not None:
      ax.get_legend().remove()
  fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
  return {"clinical": _save(fig, _path(study, "clinical.png"),
                            rect=(0, 0, 0.86, 1))}


def _calibration(study: _Study, workdir: str) -> dict[str, str]:
  """Reliability diagram of each method's final models (binary tasks): the observed
  share of diseased patients against the mean predicted probability, in 10 bins,
  every site and seed pooled (predictions.jsonl)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "predictions.jsonl")
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    return {}
  predictions = pd.read_json(path, lines=True, dtype={"client": str})
  if "score" not in predictions or "label" not in predictions:
    return {}  # multi-class (probs) or survival: no binary reliability diagram
  predictions["method"] = predictions["method"].where(
      ~predictions["method"].str.startswith("local_"), "local")
  predictions["bin"] = np.minimum((predictions["score"] * 10).astype(int), 9)
  curve = predictions.groupby(["method", "bin"], as_index=False).agg(
      predicted=("score", "mean"), observed=("label", "mean"), n=("label", "size"))
  plt, sns = study.plt, study.sns
  fig, ax = plt.subplots(figsize=(6.5, 5))
  ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1,
          label="perfectly calibrated")
  sns.lineplot(data=curve, x="predicted", y="observed", **study.hue(curve["method"]),
               style="method", markers=True, dashes=True, ax=ax)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  _finish(ax, "mean predicted probability of disease (bin of 0.1)",
          "observed share with disease", "Calibration of the final models")
  return {"calibration": _save(fig, _path(study, "calibration.png"))}


def _fairness_view(study: _Study, workdir: str) -> dict[str, str]:
  """Each method's worst site against its test-size-weighted mean (fairness.csv)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "fairness.csv")
  if not os.path.isfile(path) or os.path.getsize(path) <= 1:
    return {}
  table = pd.read_csv(path)
  table = table[table["metric"] == study.metric]
  if table.empty or table["method"].duplicated().any():  # sweeps: one point per method
    return {}
  plt = study.plt
  fig, ax = plt.subplots(figsize=(8.5, 5))
  markers = "osD^vP*Xh<>p"
  for i, (_, row) in enumerate(table.iterrows()):
    ax.scatter(row["weighted_mean"], row["worst"], s=45, marker=markers[i % len(markers)],
               color=study.colors.get(row["method"].split("_")[0], "grey"),
               label=f"{row['method']} (worst: {row['worst_site']})", alpha=0.85)
  low = min(table["worst"].min(), table["weighted_mean"].min())
  high = max(table["worst"].max(), table["weighted_mean"].max())
  ax.plot([low, high], [low, high], color="grey", linestyle=":", linewidth=1)
  ax.set_xlabel(f"{_label(study.metric)}, mean over sites weighted by test patients")
  ax.set_ylabel(f"{_label(study.metric)} at the worst site")
  ax.set_title("Fairness across sites (on the diagonal: every site alike)")
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
  return {"fairness": _save(fig, _path(study, "fairness.png"))}


def _centralized_level(study: _Study):
  central = study.pooled[study.pooled["method"] == "centralized"]
  if central.empty:
    return central, None
  return central, central[central["round"] == central["round"].max()][study.metric].mean()


def _convergence(study: _Study) -> dict[str, str]:
  plt, sns, config, metric = study.plt, study.sns, study.config, study.metric
  pooled, colors, swept, hue = study.pooled, study.colors, study.swept, study.hue
  # Convergence: pooled test metric vs round, mean and 95% band over seeds.
  # Local-only training with its own schedule (per_method rounds / epochs / steps, as in
  # FLamby's baselines) has no communication rounds to share the x axis with: its final
  # value is drawn as a reference line, like centralized training's.
  own_schedule = _own_schedule(config)
  fig, ax = plt.subplots(figsize=(8.5, 4.2))
  curves = pooled[~pooled["method"].isin(own_schedule)]
  style = swept[0] if swept else "method"  # overlapping methods stay distinguishable
  if not curves.empty:
    sns.lineplot(data=curves, x="round", y=metric, **hue(curves["method"]), style=style,
                 markers=True, dashes=True, **_CI, ax=ax)
  central, level = _centralized_level(study)
  if level is not None:
    _centralized_line(ax, level)
    finals = central[central["round"] == central["round"].max()][metric].dropna()
    if len(finals) > 1:  # its spread over seeds, as the curves' bands show theirs
      low, high = np.percentile(finals, [2.5, 97.5])
      ax.axhspan(low, high, color="black", alpha=0.08, linewidth=0)
  local = pooled[pooled["method"] == "local"]
  if "local" in own_schedule and not local.empty:
    finals = local[local["round"] == local["round"].max()][metric].dropna()
    final = finals.mean()
    ax.axhline(final, color=colors["local"], linestyle=":", linewidth=1.4,
               label=f"local-only, mean of hospitals (final, {own_schedule['local']}) "
                     f"{final:.3f}")
    if len(finals) > 1:  # its spread over seeds
      low, high = np.percentile(finals, [2.5, 97.5])
      ax.axhspan(low, high, color=colors["local"], alpha=0.12, linewidth=0)
  rounds = sorted(curves["round"].unique()) if not curves.empty else []
  if 1 < len(rounds) <= 16:  # ticks where the evaluations are
    ax.set_xticks(rounds)
  else:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  _finish(ax, "communication round", f"pooled test {_label(metric)}",
          f"Convergence ({config['name']}): mean and 95% CI over seeds")
  return {"convergence": _save(fig, _path(study, "convergence.png"))}


def _communication(study: _Study) -> dict[str, str]:
  plt, sns, metric, pooled, hue = study.plt, study.sns, study.metric, study.pooled, study.hue
  style = study.swept[0] if study.swept else "method"
  central, level = _centralized_level(study)
  figures = {}
  # Metric vs cumulative communication (MB, log scale), federated methods.
  comm = pooled[(pooled["method"] != "centralized") & (pooled["method"] != "local")
                & (pooled["cumulative_bytes"] > 0)]
  if not comm.empty:
    comm = comm.assign(megabytes=comm["cumulative_bytes"] / 1e6)
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    sns.lineplot(data=comm, x="megabytes", y=metric, **hue(comm["method"]), style=style,
                 **_CI, markers=True, dashes=True, ax=ax)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,)))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    if not central.empty:
      raw_mb = central["cumulative_bytes"].max() / 1e6
      ax.axvline(raw_mb, color="black", linestyle=":", linewidth=1.2,
                 label=f"centralized: raw training data moved once ({raw_mb:.3g} MB)")
      _centralized_line(ax, level)
    _finish(ax, "cumulative communication, up + down (MB, log scale)",
            f"pooled test {_label(metric)}",
            f"{_label(metric).capitalize()} versus communication")
    figures["communication"] = _save(fig, _path(study, "communication.png"))

  return figures


def _final_rows(study: _Study):
  """Each method's and seed's test rows of its last evaluation, with `test_set` names."""
  test = study.test
  last = test[test["round"] == test.groupby(["method", "seed"])["round"].transform("max")]
  names = last.drop_duplicates("client").set_index("client")["client_name"].to_dict()
  return last.assign(test_set=last["client"].map(names))


def _comparison(study: _Study, last) -> dict[str, str]:
  """Federated vs centralized vs local-only per test set (final round)."""
  plt, metric, hue = study.plt, study.metric, study.hue
  names = (last.drop_duplicates("client").set_index("client")["client_name"].to_dict())
  client_order = (sorted((c for c in names if str(c).isdigit()), key=int)
                  + [c for c in ("pooled", "pooled_pn") if c in names])
  fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(client_order) + 4), 4.2))
  _barplot(ax, last.assign(test_set=last["test_set"].map(_tick_label)), "test_set",
           metric, [_tick_label(names[c]) for c in client_order],
           hue(last["method"])["hue_order"], study.colors)
  _finish(ax, "test set (local = each hospital's own model; pooled: mean of them)",
          f"final test {_label(metric)}", "Federated vs centralized vs local-only")
  if len(client_order) > 6:
    ax.tick_params(axis="x", rotation=45)
  return {"comparison": _save(fig, _path(study, "comparison.png"))}


def _sweeps(study: _Study, final_pooled) -> dict[str, str]:
  plt, sns, metric, swept, hue = study.plt, study.sns, study.metric, study.swept, study.hue
  figures = {}
  # Sweeps: final metric vs each swept value; round time vs number of clients.
  for column in swept:
    others = [c for c in swept if c != column and final_pooled[c].nunique() > 1]
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    sns.lineplot(data=final_pooled, x=column, y=metric, **hue(final_pooled["method"]),
                 style=others[0] if others else None, **_CI, marker="o",
                 ax=ax)
    if column in ("alpha",):
      ax.set_xscale("log")
    elif np.issubdtype(final_pooled[column].dtype, np.integer):
      from matplotlib.ticker import MaxNLocator
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(ax, {"alpha": "Dirichlet alpha (label skew; log scale)",
                 "num_clients": "number of clients"}.get(column, column),
            f"final pooled test {_label(metric)}", f"Sweep over {column}")
    figures[f"sweep_{column}"] = _save(fig, _path(study, f"sweep_{column}.png"))
  if "num_clients" in swept:
    timing = final_pooled.assign(round_ms=1e3 * final_pooled["wall_s"] /
                                 final_pooled["round"].clip(lower=1))
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    sns.lineplot(data=timing, x="num_clients", y="round_ms", **hue(timing["method"]),
                 marker="o", errorbar=None, ax=ax)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(ax, "number of clients", "wall time per round (ms, compile excluded)",
            "Round time versus clients (mean over seeds)")
    figures["round_time"] = _save(fig, _path(study, "round_time.png"))

  return figures


def _labels(workdir: str, fig_dir: str | None) -> dict[str, str]:
  """The label distribution of the partition (first point), if the study wrote one."""
  figures = {}
  # Label distribution of the partition (first point).
  partition_path = os.path.join(workdir, "partition.json")
  if os.path.isfile(partition_path):
    from fedjax_dx.core import _partition
    with open(partition_path) as f:
      partitions = json.load(f)
    first = partitions[sorted(partitions, key=int)[0]]
    counts = np.asarray(first["label_counts"])
    names = first.get("client_names")
    figures["labels"] = _partition.plot_label_counts(
        counts, _path(fig_dir, "label_distribution.png"),
        title="training labels per client" + (f" ({first['point']})" if first["point"]
                                                else ""),
        class_names=first.get("class_names"),
        client_names=names[:len(counts)] if names else None)

  return figures


_CAPTIONS = {
    "convergence": "Convergence: the pooled test {metric} after each evaluation round, "
                   "mean over seeds with a 95% band (bootstrap over seeds). Centralized "
                   "training is the dashed level; each hospital's own model is averaged "
                   "into the local curve.",
    "communication": "Communication: the pooled test {metric} against the bytes every "
                     "hospital sent and received so far (uploads and downloads), mean "
                     "over seeds.",
    "comparison": "Final test {metric} per test set: bars are means over seeds, error "
                  "bars 95% bootstrap intervals over the seeds (not over patients: see "
                  "the table's intervals). Local = each hospital's own model on its own "
                  "site; on the pooled set, the mean of the hospitals' models.",
    "privacy_utility": "Utility against privacy: final pooled test {metric} against the "
                       "epsilon spent, with the non-private references.",
    "round_time": "Seconds per round of each method at each sweep point.",
    "privacy_bounds": "Privacy claimed against privacy measured, per noise multiplier: "
                      "the accountant's epsilon is an upper bound; the canary audit's "
                      "(one run, Steinke et al. 2023, jax-privacy's auditor) a lower "
                      "bound that holds at the stated confidence. A lower bound above "
                      "the upper one would mean the mechanism leaks more than it "
                      "claims. The audited runs carry the canary clients, so their "
                      "utility is not the utility without them.",
    "clinical": "Per site (n = test patients): AUC, balanced accuracy, sensitivity and "
                "specificity of the final models, means over seeds with 95% bootstrap "
                "intervals over the seeds. A hatched bar is a model that gives every "
                "patient of that site the same class (sensitivity or specificity 0): "
                "its accuracy is the site's prevalence, not skill.",
    "calibration": "Reliability diagram: for patients binned by the predicted "
                   "probability of disease (bins of 0.1; all sites and seeds), the "
                   "observed share with disease. On the dotted diagonal a probability "
                   "means what it says.",
    "fairness": "Fairness across sites: each method's {metric} at its worst site "
                "(named) against its mean over sites weighted by test patients; the "
                "further below the diagonal, the more unequal the sites.",
    "labels": "Training labels per client (the partition of the first sweep point).",
}


def _caption(name: str, metric: str) -> str:
  if name.startswith("sweep_"):
    return (f"Sweep over {name[len('sweep_'):]}: final pooled test {metric}, mean over "
            "seeds with a 95% band.")
  return _CAPTIONS.get(name, name.replace("_", " ")).format(metric=metric)


def _cell(row, metric: str) -> str:
  mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
  if row.get("diverged_seeds", 0):
    return f"diverged ({int(row['diverged_seeds'])} of {int(row['num_seeds'])} seeds)"
  if mean is None or mean != mean:
    return "–"
  text = f"{mean:.3f}" + (f" ± {std:.3f}" if std == std and row["num_seeds"] > 1 else "")
  low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
  return text + (f" [{low:.2f}, {high:.2f}]" if low is not None and low == low else "")


def _headline(summary, metric: str):
  """Methods x test sets of the headline metric, as text cells (no sweep)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  sites = summary.drop_duplicates("client")
  sites = sites.assign(order=[int(c) if str(c).isdigit() else 10**9
                              for c in sites["client"]]).sort_values("order")
  names = [f"{n} (n = {int(k)})" if k == k else n for n, k in
           zip(sites["client_name"], sites.get("num_examples_mean", sites["client"] * 0))]
  table = pd.DataFrame(index=pd.Index(list(dict.fromkeys(summary["method"])), name="method"),
                       columns=names)
  for _, row in summary.iterrows():
    column = names[list(sites["client"]).index(row["client"])]
    table.at[row["method"], column] = _cell(row, metric)
  return table.fillna("–")


def _overview(summary, config, metric: str) -> str:
  """The report's first paragraph: data, sites and sizes, methods, and the best
  federated method against centralized and the best hospital alone (pooled test)."""
  pooled = summary[summary["client"] == "pooled"]
  sites = summary[summary["client"].astype(str).str.isdigit()].drop_duplicates("client")
  sizes = ", ".join(f"{n} {int(k)}" for n, k in zip(sites["client_name"],
                                                     sites["num_examples_mean"]))
  label = _label(metric)
  lower = metric in ("loss", "brier", "ece")
  best = lambda rows: (rows.sort_values(f"{metric}_mean", ascending=lower).iloc[0]
                       if rows[f"{metric}_mean"].notna().any() else None)
  federated = best(pooled[~pooled["method"].isin(("centralized",))
                          & ~pooled["method"].str.startswith("local")])
  central = pooled[pooled["method"] == "centralized"]
  local = best(pooled[pooled["method"].str.startswith("local")])
  text = (f"Data set {html.escape(config['dataset']['name'])}: "
          f"{len(sites)} sites, test patients per site: {html.escape(sizes)}. Methods: "
          f"{html.escape(config['methods'])}; {config['num_seeds']} seeds. ")
  if federated is not None:
    text += (f"On the pooled test set, the best federated method is "
             f"<b>{html.escape(federated['method'])}</b> with {label} "
             f"{_cell(federated, metric)}")
    if len(central):
      text += f", against {_cell(central.iloc[0], metric)} for centralized training"
    if local is not None:
      text += (f" and {_cell(local, metric)} for the best hospital alone "
               f"({html.escape(local['method'])})")
    text += ". "
  text += ("Cells are mean ± std over training seeds; [low, high] is the 95% interval "
           "over resamples of the site's test patients pooled over the seeds.")
  return f"<p>{text}</p>"


def _privacy_table(pooled, config, swept) -> str:
  """The private methods' budget at every sweep point: epsilon at the end (and the
  canary audit's lower bound), how client sampling was accounted, whether it is a
  guarantee, and where a budget stopped training."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if "dp_sampling" not in pooled or not pooled["dp_sampling"].notna().any():
    return ""
  private = pooled[pooled["dp_sampling"].notna()].set_index(["method", *swept])
  budget = config.get("dp_budget", 0) or 0
  stopped = private.get("dp_budget_rounds", pd.Series(index=private.index, dtype=float))
  lower = private.get("epsilon_lower", pd.Series(index=private.index, dtype=float))
  table = pd.DataFrame({
      "epsilon (accountant, upper bound)": private["epsilon"].map(
          lambda v: "inf (no noise)" if pd.isna(v) else f"{v:.3g}"),
      "epsilon (canary audit, lower bound)": [
          "" if pd.isna(v) else f"{v:.3g}" for v in lower],
      "delta": config.get("dp_delta", ""),
      "sampling accounted": private.get("dp_sampling", ""),
      "a guarantee": private.get("epsilon_guarantee", True).map(
          lambda v: "yes" if v in (True, 1, "True") else "no (approximation)"),
      "rounds": [f"{int(r)} (stopped by dp_budget = {budget:g})" if pd.notna(s) else
                 f"{int(r)}" for r, s in zip(private["rounds"], stopped)]},
      index=private.index)
  return ("<h2>Privacy spent</h2><p>The epsilon of each private method at "
          "its last round, from dp-accounting's accountant (an upper bound), with the "
          "sampling it assumed. Example-level DP-SGD with shuffled fixed-size batches "
          "(dp_batches = shuffle) is accounted as Poisson sampling: its epsilon is an "
          "approximation, not a guarantee.</p><div class='wide'>" + table.to_html(escape=True) + "</div>")


def _html(workdir, meta, summary, figures, metric) -> str:
  """A self-contained report: overview, captioned figures, tables as HTML, environment."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  config = meta["config"]
  label = _label(metric)
  parts = [
      "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
      f"<title>fedjax_dx report: {html.escape(config['name'])}</title>",
      "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
      "table{border-collapse:collapse;font-size:12px;margin:0.5em 0}"
      "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
      "figure{margin:1.5em 0}figcaption{font-size:13px;color:#333}"
      "img{max-width:100%}.wide{overflow-x:auto}</style></head><body>",
      f"<h1>Study {html.escape(config['name'])}</h1>",
      _overview(summary, config, metric)]
  swept = summary_swept_columns(summary)
  parts.append(f"<h2>Final test {html.escape(label)} per test set</h2>")
  if swept:
    parts.append("<p>Sweep points are in summary.csv; the table below is the first "
                 "point.</p>")
    first = summary[(summary[swept] == summary[swept].iloc[0]).all(axis=1)]
  else:
    first = summary
  parts.append("<div class='wide'>" + _headline(first, metric).to_html(escape=True)
               + "</div>")
  for name, path in figures.items():
    with open(path, "rb") as f:
      encoded = base64.b64encode(f.read()).decode()
    parts.append(f"<figure><img alt='{html.escape(name)}' "
                 f"src='data:image/png;base64,{encoded}'><figcaption>"
                 f"{html.escape(_caption(name, label))}</figcaption></figure>")
  pooled = first[first["client"] == "pooled"].set_index("method")
  headline = [m for m in ("auc", "balanced_accuracy", "sensitivity", "specificity",
                          "accuracy", "pr_auc", "brier", "ece", "c_index", "loss")
              if f"{m}_mean" in pooled and pooled[f"{m}_mean"].notna().any()]
  metrics_table = pd.DataFrame({_label(m): [_cell(r, m) for _, r in pooled.iterrows()]
                                for m in headline}, index=pooled.index)
  parts.append("<h2>Every metric on the pooled test set</h2><div class='wide'>"
               + metrics_table.to_html(escape=True) + "</div>")
  parts.append(_privacy_table(summary[summary["client"] == "pooled"], config, swept))
  fairness_path = os.path.join(workdir, "fairness.csv")
  if os.path.isfile(fairness_path) and os.path.getsize(fairness_path) > 1:
    fairness = pd.read_csv(fairness_path)
    fairness = fairness[fairness["metric"] == metric]
    if len(fairness):
      parts.append(f"<h2>Across sites ({html.escape(label)}): worst and best site, "
                   "spread, mean weighted by test patients</h2><div class='wide'>"
                   + fairness.to_html(index=False, float_format=lambda v: f"{v:.3f}")
                   + "</div>")
  device = meta.get("device", {})
  environment = {"device": f"{device.get('kind', '?')} ({device.get('platform', '?')}), "
                           f"{device.get('count', '?')} device(s), "
                           f"{device.get('processes', 1)} process(es)",
                 "python": meta.get("python", "?"), "host": meta.get("host", "?"),
                 "created": meta.get("created", "?"),
                 # wall_s of methods trained side by side was measured side by side
                 **({"methods trained at once": meta["method_threads"]}
                    if "method_threads" in meta else {}),
                 **{k: v for k, v in meta.get("versions", {}).items()}}
  parts.append("<h2>Environment</h2><table>" + "".join(
      f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
      for k, v in environment.items()) + "</table>")
  parts.append("<p>Full results: metrics.jsonl (every evaluation), summary.csv, "
               "fairness.csv, predictions.jsonl (every test patient).</p></body></html>")
  path = os.path.join(workdir, "report.html")
  write_atomic(path, "\n".join(parts))
  return path
