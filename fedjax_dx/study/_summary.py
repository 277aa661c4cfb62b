"""Summaries: final metrics mean/std over seeds and rounds/bytes to a target, as tables."""

from __future__ import annotations

import numpy as np

from fedjax_dx.study._checks import methods_of
from fedjax_dx.study._schema import METRICS, MIA_COLUMNS


def methods_order(config, summary) -> list[str]:
  """Result method names in config order (`local` expands to local_0, local_1, ...)."""
  order = []
  for method in methods_of(config):
    if method == "local":
      order += sorted((m for m in set(summary["method"]) if m.startswith("local_")),
                      key=lambda m: int(m.split("_")[1]))
    else:
      order.append(method)
  return [m for m in order if m in set(summary["method"])]


def summary_swept_columns(summary) -> list[str]:
  """The swept values among summary.csv's columns (the rest are results)."""
  return [c for c in summary.columns if c not in (
      "method", "client", "client_name", "num_seeds", "rounds", "cumulative_bytes",
      "rounds_to_target", "bytes_to_target", "seeds_reaching_target", "target",
      "epsilon", "diverged_seeds", "dp_sampling", "epsilon_guarantee",
      "dp_budget_rounds", "epsilon_hospital", "epsilon_lower",
      "epsilon_lower_confidence")
      and not c.endswith(("_mean", "_std", "_ci_low", "_ci_high"))]


def summary_table(summary, metric: str, methods: list[str],
                  notes: dict[str, str] | None = None) -> str:
  """A Markdown table: one row per method (and swept point), one column per test set,
  cells `mean ± std` over seeds of the final-round `metric`; `notes` (method -> text,
  `config.method_notes`) are numbered beside the method and printed under the table."""
  notes = {m: text for m, text in (notes or {}).items() if text}
  marks = {m: f" [{i}]" for i, m in enumerate(
      (m for m in methods if m in notes), start=1)}
  swept = summary_swept_columns(summary)
  clients = summary.drop_duplicates("client")
  clients = clients.assign(order=[int(c) if str(c).isdigit() else 10**9
                                  for c in clients["client"]]).sort_values("order")
  names = clients["client_name"].tolist()

  intervals = f"{metric}_ci_low" in summary

  def cell(mean, std, seeds, diverged, low=float("nan"), high=float("nan")):
    if diverged:
      return f"diverged ({diverged} of {seeds} seeds)"
    if mean != mean:  # NaN: undefined on this test set
      return "–"
    text = f"{mean:.3f} ± {std:.3f}" if seeds > 1 and std == std else f"{mean:.3f}"
    return text + (f" [{low:.2f}, {high:.2f}]" if low == low else "")

  header = [*swept, "method", *names]
  lines = [f"Final test {metric}, mean ± std over seeds (n = "
           f"{int(summary['num_seeds'].max())})"
           + ("; [95% interval over the site's test patients (bootstrap) and the "
              "seeds]" if intervals else ""), "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  groups = summary.groupby(swept, sort=True, dropna=False) if swept else [((), summary)]
  for key, group in groups:
    key = key if isinstance(key, tuple) else (key,)
    for method in methods:
      rows = group[group["method"] == method].set_index("client_name")
      if rows.empty:
        continue
      cells = [cell(rows.at[n, f"{metric}_mean"], rows.at[n, f"{metric}_std"],
                    rows.at[n, "num_seeds"], rows.at[n, "diverged_seeds"],
                    *([rows.at[n, f"{metric}_ci_low"], rows.at[n, f"{metric}_ci_high"]]
                      if intervals else []))
               if n in rows.index else "–" for n in names]
      lines.append("| " + " | ".join([*(f"{v:g}" if isinstance(v, float) else str(v)
                                        for v in key), method + marks.get(method, ""),
                                      *cells]) + " |")
  if marks:
    lines.append("")
    lines.extend(f"{marks[m].strip()} {m}: {notes[m]}" for m in marks)
  return "\n".join(lines) + "\n"


def swept_fields(sweep: str) -> list[str]:
  """The column names of `config.sweep`'s fields ("a=1,2;b+c=..." -> a, b, c)."""
  from fedjax_dx.study._sweep import column_name  # pylint: disable=g-import-not-at-top
  fields = [name.strip() for part in str(sweep or "").split(";") if "=" in part
            for name in part.split("=", 1)[0].split("+")]
  return [column_name(f, fields) for f in fields]


def swept_columns(frame, sweep: str = "") -> list[str]:
  """Columns of swept values (num_clients counts when it varies); a field of
  `sweep` counts even where it is also a result column (a swept dp_noise)."""
  fixed = {"method", "seed", "round", "num_clients", "client", "client_name", "split",
           "num_examples", "bytes_up", "bytes_down", "cumulative_bytes", "wall_s",
           "compile_s", "batched_seeds", "epsilon", "dp_delta", "dp_noise", "dp_clip",
           "dp_mode", "dp_sampling", "epsilon_guarantee", "epsilon_hospital", "dp_budget",
           "dp_budget_rounds", "epsilon_lower", "epsilon_lower_cp",
           "epsilon_lower_confidence", "audit_auroc", "audit_canaries", "guard_dropped",
           "secagg_failed_rounds", "diverged_round",
           *MIA_COLUMNS, *METRICS}
  varying = ["num_clients"] if frame["num_clients"].nunique() > 1 else []
  fixed -= set(swept_fields(sweep)) - {"num_clients"}
  return varying + [c for c in frame.columns
                    if c not in fixed and not c.startswith("bootstrap_")]


def summarize(frame, config):
  """Final test metrics per method x client x swept point: mean/std over seeds."""
  test = frame[frame["split"] == "test"]
  keys = ["method", "client", "client_name", *swept_columns(frame, config.sweep)]
  last_round = test.groupby(keys + ["seed"], dropna=False)["round"].transform("max")
  final = test[test["round"] == last_round]
  grouped = final.groupby(keys, dropna=False, sort=False)
  summary = grouped[list(METRICS)].agg(["mean", "std"])
  summary.columns = [f"{m}_{s}" for m, s in summary.columns]
  summary["num_examples_mean"] = grouped["num_examples"].mean()
  summary["num_seeds"] = grouped["seed"].nunique()
  # A diverged seed's metrics are NaN; the mean of the others would hide it.
  diverged = (final["diverged_round"].notna() if "diverged_round" in final
              else final["seed"] != final["seed"])
  summary["diverged_seeds"] = diverged.groupby(
      [final[k] for k in keys], dropna=False, sort=False).sum().astype(int)
  for m in METRICS:
    summary.loc[summary["diverged_seeds"] > 0, [f"{m}_mean", f"{m}_std"]] = float("nan")
  # 95% interval over test patients (bootstrap) and training seeds, pooled.
  def interval(lists) -> tuple[float, float]:  # both ends from one pooled array
    values = np.array([v for one in lists if isinstance(one, list) for v in one
                       if v is not None], dtype=float)
    if not values.size:
      return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)

  for column in [c for c in final.columns if c.startswith("bootstrap_")]:
    metric = column[len("bootstrap_"):]
    ends = grouped[column].agg(interval)
    summary[f"{metric}_ci_low"] = ends.map(lambda e: e[0])
    summary[f"{metric}_ci_high"] = ends.map(lambda e: e[1])
    summary.loc[summary["diverged_seeds"] > 0,
                [f"{metric}_ci_low", f"{metric}_ci_high"]] = float("nan")
  summary["rounds"] = grouped["round"].max()
  summary["cumulative_bytes"] = grouped["cumulative_bytes"].mean()
  summary["wall_s_mean"] = grouped["wall_s"].mean()
  summary["compile_s_mean"] = grouped["compile_s"].mean()
  if "epsilon" in final:  # privacy spent by the end (private methods only)
    summary["epsilon"] = grouped["epsilon"].max()
    for column in ("dp_sampling", "epsilon_guarantee", "dp_budget_rounds"):
      if column in final:  # how it was accounted, and where a budget stopped it
        summary[column] = grouped[column].first()
  if "epsilon_lower" in final:  # the canary audit: the largest bound over seeds
    summary["epsilon_lower"] = grouped["epsilon_lower"].max()
    summary["epsilon_lower_mean"] = grouped["epsilon_lower"].mean()
    summary["epsilon_lower_confidence"] = grouped["epsilon_lower_confidence"].first()
  if "epsilon_hospital" in final:  # example-level DP: each site's own patients'
    summary["epsilon_hospital"] = grouped["epsilon_hospital"].max()
  for column in MIA_COLUMNS:  # the audit of the final model
    if column in final:
      summary[f"{column}_mean"] = grouped[column].mean()
  target, value = config.target_metric, config.target_value
  reached = test[test[target] >= value]
  first = reached.groupby(keys + ["seed"], dropna=False).agg(
      round_to_target=("round", "min"), bytes_to_target=("cumulative_bytes", "min"))
  per_key = first.groupby(keys, dropna=False).agg(
      rounds_to_target=("round_to_target", "mean"),
      bytes_to_target=("bytes_to_target", "mean"),
      seeds_reaching_target=("round_to_target", "count"))
  summary = summary.join(per_key, how="left")
  summary["seeds_reaching_target"] = summary["seeds_reaching_target"].fillna(0).astype(int)
  summary["target"] = f"{target}>={value}"
  return summary.reset_index()


LOWER_IS_BETTER = ("loss", "brier", "ece")


def fairness(summary):
  """Across the sites (not the pooled sets), per method (and swept point) and metric,
  from the final metrics' means over seeds: the worst and best site, their spread
  (max - min) and the mean weighted by each site's test patients. For loss, Brier and
  ECE the worst site is the highest."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  sites = summary[summary["client"].astype(str).str.isdigit()]
  swept = summary_swept_columns(summary)
  rows = []
  for key, group in sites.groupby(["method", *swept], dropna=False, sort=False):
    key = key if isinstance(key, tuple) else (key,)
    names = group["client_name"].to_numpy()
    all_sizes = group["num_examples_mean"].to_numpy(dtype=np.float64)
    for metric in METRICS:  # NumPy, not pandas, per metric: 90 of them in FLamby's
      values = group[f"{metric}_mean"].to_numpy(dtype=np.float64)
      real = np.flatnonzero(~np.isnan(values))
      if not real.size:
        continue
      lower = metric in LOWER_IS_BETTER
      defined, sizes = values[real], all_sizes[real]
      worst = real[defined.argmax() if lower else defined.argmin()]  # first, as idxmax
      best = real[defined.argmin() if lower else defined.argmax()]
      rows.append({**dict(zip(["method", *swept], key)), "metric": metric,
                   "worst_site": names[worst], "worst": values[worst],
                   "best_site": names[best], "best": values[best],
                   "spread": defined.max() - defined.min(),
                   "weighted_mean": float((defined * sizes).sum() / sizes.sum()),
                   "sites": int(real.size)})
  return pd.DataFrame(rows)
