"""The harness end to end: configs/test.py in a temp dir, bad input, resume after kill -9."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
import pytest

from configs import test as test_config
from tests.conftest import TEST_CACHE
import fedjax_dx as fdx
from fedjax_dx import study
from fedjax_dx.study import _storage
from fedjax_dx.study import _store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_COLUMNS = ["loss", "accuracy", "auc", "sensitivity", "specificity", "f1",
                  "balanced_accuracy"]


def run(*args, wait=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if not any(a.startswith("--compilation_cache") for a in args):
    # The suite's cache, with the program store: a rerun of the suite loads these
    # studies' programs (the processes run unpatched code, which the store's key sees).
    args = (f"--compilation_cache={TEST_CACHE}", *args)
  command = [sys.executable, "-m", "benchmarks.run", "--quiet", *args]
  if not wait:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def test_end_to_end_tiny_study(tmp_path):
  workdir = tmp_path / "study"
  result = run("--config=configs/test.py", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  assert "report:" in result.stdout
  meta = json.loads((workdir / "config.json").read_text())
  assert meta["config"]["name"] == "test"
  assert "jax" in meta["versions"] and meta["device"]["platform"] == "cpu"

  metrics = pd.read_json(workdir / "metrics.jsonl", lines=True, dtype={"client": str})
  for column in ["method", "seed", "round", "num_clients", "client", "split",
                 *METRIC_COLUMNS, "bytes_up", "bytes_down", "cumulative_bytes", "wall_s", "compile_s"]:
    assert column in metrics.columns, column
  assert set(metrics["method"]) == {"fedavg", "fedprox", "scaffold", "fedadam",
                                    "centralized", "local_0", "local_1", "local_2"}
  assert set(metrics["split"]) == {"train", "test"}
  assert set(metrics["seed"]) == {0, 1}
  assert sorted(set(metrics["round"])) == [0, 2, 4]
  assert set(metrics["client"]) == {"0", "1", "2", "pooled"}
  fed = metrics[(metrics["method"] == "fedavg") & (metrics["client"] == "pooled")
                & (metrics["split"] == "test") & (metrics["seed"] == 0)]
  # 3 clients, 2 rounds per evaluation, logistic regression 13 -> 1 = 14 float32.
  assert fed["bytes_up"].tolist() == [0, 14 * 4 * 3 * 2, 14 * 4 * 3 * 2]
  assert fed["cumulative_bytes"].tolist() == [0, 672, 1344]
  scaffold = metrics[(metrics["method"] == "scaffold") & (metrics["client"] == "pooled")
                     & (metrics["split"] == "test") & (metrics["seed"] == 0)]
  assert scaffold["cumulative_bytes"].tolist() == [0, 1344, 2688]  # + control variates
  central = metrics[(metrics["method"] == "centralized") & (metrics["round"] == 4)]
  assert central["cumulative_bytes"].iloc[0] > 0  # raw data moved once

  summary = pd.read_csv(workdir / "summary.csv", dtype={"client": str})
  for m in METRIC_COLUMNS:
    assert f"{m}_mean" in summary.columns and f"{m}_std" in summary.columns
  for column in ["rounds_to_target", "bytes_to_target", "num_seeds", "method", "client"]:
    assert column in summary.columns
  assert (summary["num_seeds"] == 2).all()
  pooled_fed = summary[(summary["method"] == "fedavg") & (summary["client"] == "pooled")]
  final = metrics[(metrics["method"] == "fedavg") & (metrics["client"] == "pooled")
                  & (metrics["split"] == "test") & (metrics["round"] == 4)]
  assert pooled_fed["accuracy_mean"].iloc[0] == pytest.approx(final["accuracy"].mean())
  table = (workdir / "summary_table.md").read_text().splitlines()
  assert table[2] == "| method | hospital 0 | hospital 1 | hospital 2 | pooled |"
  fed_row = next(line for line in table if line.startswith("| fedavg |"))
  mean, std = pooled_fed["accuracy_mean"].iloc[0], pooled_fed["accuracy_std"].iloc[0]
  assert fed_row.endswith(f"| {mean:.3f} ± {std:.3f} |")
  assert [line.split(" | ")[0] for line in table[4:]] == [
      "| fedavg", "| fedprox", "| scaffold", "| fedadam", "| centralized", "| local_0",
      "| local_1", "| local_2"]
  for name in ("convergence.png", "communication.png", "comparison.png", "clinical.png",
               "calibration.png", "fairness.png", "label_distribution.png", "report.html"):
    assert (workdir / name).stat().st_size > 1000, name
  partition = json.loads((workdir / "partition.json").read_text())["0"]
  assert partition["client_names"] == ["hospital 0", "hospital 1", "hospital 2"]
  assert partition["class_names"] == ["negative", "positive"]  # the label chart's names
  html = (workdir / "report.html").read_text()
  assert html.count("data:image/png;base64,") >= 7
  _check_report(html)
  # How many methods trained at once (their wall_s was measured side by side).
  threads = json.loads((workdir / "config.json").read_text())["method_threads"]
  assert threads >= 1
  assert f"<th>methods trained at once</th><td>{threads}</td>" in html
  # Written through temporary files (none left), all with a plain file's permissions.
  assert not [p.name for p in workdir.rglob(".*")]
  mode = 0o666 & ~_storage.umask()
  for path in [*workdir.glob("*.*"), *(workdir / "points").iterdir()]:
    assert path.stat().st_mode & 0o777 == mode, path


@pytest.mark.parametrize("flag,message", [
    ("--config.no_such_field=1",
     "error: --config.no_such_field=1: no field 'no_such_field' in test.py"),
    ("--config.round=50", "error: --config.round=50: no field 'round' in test.py; did "
     "you mean 'rounds'?"),
    ("--config.dataset.nam=x", "no field 'dataset.nam' in test.py; did you mean "
     "'dataset.name'?"),
    ("--config.rounds=abc", "error: flag --config.rounds=abc: invalid literal for int()"),
    ("--config.rounds=0", "config.rounds = 0: expected an integer >= 1"),
    # A per-method override from the command line reaches the config checks.
    ("--config.per_method.fedavg.learning_rate=-1",
     "config.per_method.fedavg.learning_rate = -1.0: expected a number > 0"),
    ("--config.per_method.fedavg.learning_rate=fast",
     "error: --config.per_method.fedavg.learning_rate=fast: expected a float"),
])
def test_bad_config_exits_nonzero_and_writes_nothing(tmp_path, flag, message):
  """Through the command line: flag parsing errors and a config check (the other
  config checks run in-process below, through the same `check_config`), each one
  line naming the flag, never a traceback."""
  workdir = tmp_path / "study"
  result = run("--config=configs/test.py", f"--workdir={workdir}", flag)
  assert result.returncode == 2
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_a_config_file_that_cannot_load_is_named_without_a_traceback(tmp_path):
  """A missing config file, one that is not Python and one without get_config: one
  line each naming the file (they used to end in tracebacks). A per-method override
  from the command line is applied (it used to raise KeyError: 'fedavg')."""
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "empty.py").write_text("NAME = 'no get_config here'\n")
  for config, message in [
      ("configs/no_such.py", "--config=configs/no_such.py: no such file"),
      (tmp_path / "syntax.py", "syntax.py, line 1: invalid syntax"),
      (tmp_path / "empty.py", "empty.py: defines no get_config()")]:
    result = run(f"--config={config}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
  workdir = tmp_path / "per_method"
  result = run("--config=configs/test.py", f"--workdir={workdir}", "--noreport",
               "--config.methods=fedavg", "--config.num_seeds=1", "--config.rounds=2",
               "--config.per_method.fedavg.learning_rate=0.5")
  assert result.returncode == 0, result.stderr
  saved = json.loads((workdir / "config.json").read_text())["config"]
  assert saved["per_method"] == {"fedavg": {"learning_rate": 0.5}}


def test_the_field_table_declares_every_method_field_with_the_default_config_value():
  """One declaration per field: the table's defaults are the default study's values, and
  every field the default study sets at method level is in the table (or is one of the
  study-level fields listed here)."""
  from configs import heart_disease  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _fields  # pylint: disable=g-import-not-at-top
  default = heart_disease.get_config()
  assert _fields.DEFAULTS == {name: default[name] for name in _fields.DEFAULTS}
  study_level = {"name", "methods", "dataset", "seed", "num_seeds", "batch_seeds",
                 "bucket_clients", "membership_audit", "fast_compile",
                 "fast_compile_metrics", "per_method",
                 "sweep", "target_metric", "target_value", "method_notes",
                 "bootstrap_resamples"}
  table = {f.name for f in _fields.FIELDS}
  assert set(default.keys()) - study_level == table
  assert set(_fields.METHOD_FIELDS) <= table and set(_fields.COMPILE_FIELDS) <= table


@pytest.mark.parametrize("overrides,message", [
    ("methods=fedavg,fedmagic", "config.methods: unknown ['fedmagic']"),
    ("sweep=dataset.nope=1,2", "config.dataset.nope: no such field"),
    ("sweep=learning_rate=0.1,-1",
     "config.learning_rate = -1.0: expected a number > 0 (in sweep point"),
    ("local_epochs=2", "exactly one of local_steps and local_epochs"),
    ("optimizer=adam", "config.optimizer = 'adam': expected sgd for scaffold"),
    ("stragglers=1.5", "config.stragglers = 1.5: expected a share"),
    ("stragglers=0.5 local_steps=1", "config.stragglers = 0.5: expected 0 with a budget of"),
    ("straggler_policy=wait", "config.straggler_policy = 'wait'"),
    ("methods=fedavg_ft fine_tune_steps=0",
     "config.fine_tune_steps = 0: expected an integer >= 1 for fedavg_ft"),
    ("aggregator=krum", "krum needs at least 5 participating clients"),
    ("trim_fraction=0.5", "config.trim_fraction = 0.5: expected a number in"),
    ("mu=-0.5", "config.mu = -0.5: expected a number >= 0 (FedProx)"),
    ("aggregator=mode", "config.aggregator = 'mode'"),
    ("fedopt_form=adamw", "config.fedopt_form = 'adamw': expected paper, flamby or "
     "bias_corrected"),
    ("methods=fedavg,local,fedavg", "config.methods: fedavg listed more than once"),
    ("learning_rate=inf", "config.learning_rate = inf: expected a finite number > 0"),
    ("fedopt_learning_rate=inf",
     "config.fedopt_learning_rate = inf: expected a finite number > 0"),
    ("server_learning_rate=inf",
     "config.server_learning_rate = inf: expected a finite number > 0"),
    ("dp_clip=inf", "config.dp_clip = inf: expected a finite number"),
    ("learning_rate=nan", "config.learning_rate = nan: expected a finite number > 0"),
])
def test_bad_config_is_refused_by_name_before_anything_is_written(tmp_path, overrides,
                                                                  message):
  config = test_config.get_config()
  for override in overrides.split():
    field, value = override.split("=", 1)
    current = config[field]
    config[field] = value if isinstance(current, str) else type(current)(value)
  workdir = tmp_path / "study"
  with pytest.raises(study.StudyError) as error:
    study.run_study(config, str(workdir), quiet=True)
  assert message in str(error.value)
  assert not workdir.exists()


# The in-process studies of this module share data sets and compiled programs, as
# studies in one notebook would (results are the same with or without; a test about
# compile times gives its study a cache of its own).
PROGRAMS = study.ProgramCache()


def _study_frame(tmp_path, name, programs=PROGRAMS, **changes):
  """configs/test.py with `changes`, run in this process into `tmp_path / name`."""
  config = test_config.get_config()
  per_method = changes.pop("per_method", None)
  for field, value in changes.items():
    config[field] = value
  if per_method is not None:
    config.per_method = ml_collections.ConfigDict(per_method)
  paths = study.run_study(config, str(tmp_path / name), quiet=True, programs=programs)
  return pd.read_json(paths["metrics"], lines=True, dtype={"client": str})


def test_client_sampling_counts_only_sampled_clients_bytes(tmp_path):
  metrics = _study_frame(tmp_path, "sampled", methods="fedavg", clients_per_round=2,
                         num_seeds=1)
  fed = metrics[(metrics["client"] == "pooled") & (metrics["split"] == "test")]
  # 2 of 3 clients per round, 2 rounds per evaluation, 14 float32 parameters.
  assert fed["bytes_up"].tolist() == [0, 14 * 4 * 2 * 2, 14 * 4 * 2 * 2]
  with pytest.raises(study.StudyError, match="cannot sample more clients than exist"):
    _study_frame(tmp_path, "x", clients_per_round=4)
  assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_workdir_of_another_study_is_refused_untouched(tmp_path):
  workdir = tmp_path / "study"
  _study_frame(tmp_path, "study", rounds=2)
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  with pytest.raises(study.StudyError, match="holds another study .*rounds"):
    _study_frame(tmp_path, "study", rounds=3)
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  with pytest.raises(study.StudyError, match="holds no study"):
    _study_frame(tmp_path, "other")
  assert sorted(os.listdir(other)) == ["notes.txt"]


# A point's results file; not the hidden temporary file of a write that SIGKILL cut short
# (write_atomic's ".<name>.XXXX.jsonl", which pathlib's glob would also match).
POINT_FILES = "[!.]*.jsonl"


def test_killed_sweep_resumes_to_the_same_results(tmp_path):
  """A sweep killed (SIGKILL) in a separate process after its first point, resumed,
  ends on exactly the results of an uninterrupted run. The uninterrupted run and the
  resume run in this process and share the module's program cache (the resume
  compiles nothing new; the killed process compiled for itself)."""
  # Points of different client counts compile separately: slow enough to kill mid-way.
  sweep = "dataset.num_clients=3,4,5"
  # A killed point is run again whole, whatever its methods: one per kind of program
  # (the FedAvg family, SCAFFOLD's controls, the stacked local models) is enough.
  methods = "fedavg,scaffold,local"
  resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
  config = test_config.get_config()
  config.sweep = sweep
  config.methods = methods
  programs = PROGRAMS
  study.run_study(config, str(fresh), quiet=True, programs=programs)

  # Compiled for real (no stored programs): slow enough to be killed mid-way.
  process = run("--config=configs/test.py", f"--workdir={resumed}",
                f"--config.sweep={sweep}", f"--config.methods={methods}", "--noreport",
                "--compilation_cache=",
                wait=False)
  deadline = time.time() + 300
  points = resumed / "points"
  while time.time() < deadline and process.poll() is None:
    if points.is_dir() and len(list(points.glob(POINT_FILES))) >= 1:
      break
    time.sleep(0.05)
  assert process.poll() is None, "the sweep finished before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  done_before = len(list(points.glob(POINT_FILES)))
  assert 1 <= done_before < 6
  assert not (resumed / "metrics.jsonl").exists()

  study.run_study(config, str(resumed), quiet=True, programs=programs)
  assert len(list(points.glob(POINT_FILES))) == 6
  timing = ["wall_s", "compile_s", "batched_seeds"]
  a = pd.read_json(resumed / "metrics.jsonl", lines=True).drop(columns=timing)
  b = pd.read_json(fresh / "metrics.jsonl", lines=True).drop(columns=timing)
  assert len(a) == len(b) and set(a["num_clients"]) == {3, 4, 5}
  pd.testing.assert_frame_equal(a, b)
  timing = ["wall_s_mean", "compile_s_mean"]
  sa = pd.read_csv(resumed / "summary.csv").drop(columns=timing)
  sb = pd.read_csv(fresh / "summary.csv").drop(columns=timing)
  # The killed process compiled its own programs: float32 results agree to rtol 1e-5 as
  # above, and a std over nearly equal seeds (Brier's, ~3e-4) needs an absolute floor.
  pd.testing.assert_frame_equal(sa, sb, rtol=1e-5, atol=1e-6)


# ----------------------------------------------- in-process: strategies in the harness



def _final(frame, method, column="accuracy"):
  rows = frame[(frame["method"] == method) & (frame["client"] == "pooled")
               & (frame["split"] == "test")]
  return rows[rows["round"] == rows["round"].max()].sort_values("seed")[column].tolist()


def test_a_method_field_is_the_field_of_the_method_config():
  from fedjax_dx.study import _checks
  config = study.load_config("flamby_tcga")
  config.per_method.fedavg.rounds = 7
  for method in _checks.methods_of(config) + ["fedavg_ft"]:
    variant = _checks.method_config(config, method)
    for field in ("rounds", "learning_rate", "optimizer", "local_steps", "mu"):
      assert _checks.method_field(config, method, field) == variant[field], (method, field)
  assert _checks.method_field(config, "fedavg", "rounds") == 7
  assert _checks.method_field(config, "centralized", "rounds") == 30
  assert _checks.method_field(config, "fedprox", "rounds") == 5


def test_per_method_overrides_change_only_their_method(tmp_path):
  base = _study_frame(tmp_path, "base", methods="fedavg,fedadam", num_seeds=1)
  tuned = _study_frame(tmp_path, "tuned", methods="fedavg,fedadam", num_seeds=1,
                       per_method={"fedadam": {"learning_rate": 0.2,
                                               "fedopt_learning_rate": 0.1}})
  assert _final(base, "fedavg", "loss") == _final(tuned, "fedavg", "loss")
  assert _final(base, "fedadam", "loss") != _final(tuned, "fedadam", "loss")
  config = json.loads((tmp_path / "tuned" / "config.json").read_text())["config"]
  assert config["per_method"]["fedadam"]["learning_rate"] == 0.2


@pytest.mark.parametrize("per_method,message", [
    ({"fedmagic": {"learning_rate": 0.1}}, "config.per_method.fedmagic: unknown method"),
    ({"fedadam": {"dataset": 1}}, "config.per_method.fedadam.dataset: not a per-method"),
    ({"fedadam": {"learning_rate": -1.0}},
     "config.per_method.fedadam.learning_rate = -1.0: expected a number > 0"),
    ({"fedadam": {"learning_rate": "fast"}},
     "config.per_method.fedadam.learning_rate = 'fast': expected the type"),
])
def test_bad_per_method_overrides_are_named(tmp_path, per_method, message):
  config = test_config.get_config()
  config.methods = "fedavg,fedadam"
  config.per_method = ml_collections.ConfigDict(per_method)
  with pytest.raises(study.StudyError, match=message.replace("[", r"\[")
                     .replace("(", r"\(").replace(".", r"\.")):
    study.run_study(config, str(tmp_path / "x"), quiet=True)
  assert not (tmp_path / "x").exists()


def test_batched_seeds_equal_one_seed_at_a_time(tmp_path):
  methods = "fedavg,scaffold,fedavg_ft,cyclic,centralized,local"
  batched = _study_frame(tmp_path, "batched", methods=methods)
  single = _study_frame(tmp_path, "single", methods=methods, batch_seeds=False)
  assert set(batched["batched_seeds"]) == {2} and set(single["batched_seeds"]) == {1}
  columns = ["method", "seed", "round", "client", "split", "loss", "accuracy", "auc",
             "cumulative_bytes"]
  pd.testing.assert_frame_equal(batched[columns], single[columns], rtol=1e-5)


@pytest.mark.parametrize("kind", ["global", "stacked", "personalized"])
def test_study_evaluator_counts_metrics_apart_with_the_one_programs_numbers(kind):
  """With `config.fast_compile_metrics` at full optimisation a study evaluates a
  classification model in two programs: class probabilities and per-example losses
  at the study's options, the metrics from them at backend level 0
  (`_MetricsApartEvaluator`). Its results are those of the one program of `evaluate`
  at the study's options, counts exactly and float sums to 2 ulps (XLA adds in
  another order at level 0): 3 classes, clients of different sizes, a model with
  NaN outputs (its metrics NaN), seeds, stacked models (by the global evaluator, one
  model at a time) and fine-tuned personal models; and the metrics program is one,
  whatever the model."""
  from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
  options = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": False}
  rng = np.random.default_rng(5)
  sizes = (17, 30, 9)
  xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 3, size=n).astype(np.int32) for n in sizes]
  train = fdx.stack_clients(xs, ys, num_classes=3)
  test = fdx.stack_clients([x[: n // 2 + 1] for x, n in zip(xs, sizes)],
                           [y[: n // 2 + 1] for y, n in zip(ys, sizes)], num_classes=3)
  data = fdx.FederatedData(train=train, test=test, num_classes=3)
  cache = _programs.ProgramCache(options)
  config = test_config.get_config()
  config.model.name, config.model.hidden = "mlp", "6"
  model = cache.model(config, 3)
  seeds, clients = 3, len(sizes)
  models = jax.vmap(model.init, in_axes=(0, None))(
      jax.random.split(jax.random.PRNGKey(2), seeds), jnp.zeros((1, 4)))
  leaf = np.asarray(models["Dense_0"]["kernel"]).copy()
  leaf.reshape(-1)[5] = np.nan  # seed 0's outputs NaN
  models["Dense_0"]["kernel"] = jnp.asarray(leaf)
  algorithm = None
  if kind == "stacked":  # a model per client, each seed's different
    models = jax.tree.map(lambda x: x[:, None] * jnp.linspace(0.5, 2.0, clients)[
        None, :, *([None] * (x.ndim - 1))], models)
  elif kind == "personalized":
    config.fine_tune_steps = 3
    algorithm = cache.algorithm(config, "fedavg_ft", model)
    models = jax.vmap(lambda p, k: algorithm.init(p, train, k))(
        models, jax.random.split(jax.random.PRNGKey(3), seeds))
  assert not isinstance(cache.evaluator(model, kind, algorithm, models, data),
                        _programs._MetricsApartEvaluator)  # without fast_metrics
  found = cache.evaluator(model, kind, algorithm, models, data, fast_metrics=True)
  if kind == "stacked":  # the global evaluator, one model of each seed at a time
    assert isinstance(found, _programs._OneModelAtATimeEvaluator)
    assert isinstance(found.one, _programs._MetricsApartEvaluator)
  else:
    assert isinstance(found, _programs._MetricsApartEvaluator)
  found = jax.device_get(found(models, data.train, data.test))

  apply_all = jax.vmap(model.apply, in_axes=(None, 0))
  if kind == "global":
    one_program = lambda params, tr, te: [
        *(fdx.evaluate(model, params, d) for d in (tr, te)),
        _programs._test_outputs(model, params, te.features)]
  elif kind == "stacked":
    one_program = lambda params, tr, te: [
        *(fdx.evaluate_stacked(model, params, d) for d in (tr, te)),
        fdx.probabilities(model, jax.vmap(apply_all, in_axes=(0, None))(
            params, te.features))]
  else:
    def one_program(state, tr, te):
      personal = algorithm.personalize(state, tr)
      return [*(fdx.evaluate_personalized(model, personal, d) for d in (tr, te)),
              fdx.probabilities(model, jax.vmap(model.apply)(personal, te.features))]
  expected = _one_program_reference(one_program, (models, data.train, data.test),
                                    options)
  assert jax.tree.structure(found) == jax.tree.structure(expected)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(found),
                               jax.tree.leaves(expected)):
    name = jax.tree_util.keystr(path)
    if "accuracy']" in name and "balanced" not in name or "num_examples" in name:
      np.testing.assert_array_equal(got, want, err_msg=name)  # counts
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
    real = ~np.isnan(want)
    np.testing.assert_array_max_ulp(got[real], want[real], maxulp=2)
  auc = np.asarray(found[1]["pooled"]["auc"])
  assert np.isnan(auc[0]).all() and not np.isnan(auc[1:]).any()  # seed 0's NaN
  if kind == "global":  # another model of the same shapes: the same metrics program
    config.model.hidden = "5"
    other = cache.model(config, 3)
    cache.evaluator(other, kind, None, jax.vmap(other.init, in_axes=(0, None))(
        jax.random.split(jax.random.PRNGKey(4), seeds), jnp.zeros((1, 4))), data,
                    fast_metrics=True)
    assert len(cache.counter.programs) == 1


@pytest.mark.parametrize("model_name", ["mlp", "cox"])
def test_stacked_models_are_evaluated_by_the_global_evaluator_one_at_a_time(model_name):
  """With `config.fast_compile_metrics` a study evaluates stacked models (local
  training's, `[S, M, ...]`) by its global evaluator, model m of every seed at a time
  (`_OneModelAtATimeEvaluator`): bit for bit the global evaluator's results of each
  model, stacked; against the one stacked program, the same counts (accuracy, AUC,
  C-index, example counts), NaN where it has NaN, float sums to 1e-5. A classification
  model at full optimisation (metrics apart) and a Cox model at level 0 (C-index
  apart); 3 and 4 clients of different sizes, a NaN model."""
  from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  sizes = (17, 30, 9, 25)
  xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]
  half = lambda arrays: [a[: len(a) // 2 + 1] for a in arrays]
  config = test_config.get_config()
  if model_name == "cox":
    options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    events = [(rng.random(n) < 0.5).astype(np.float32) for n in sizes]
    times = [rng.integers(1, 12, size=n).astype(np.float32) for n in sizes]  # ties
    train = fdx.stack_survival(xs, events, times)
    test = fdx.stack_survival(half(xs), half(events), half(times))
    data = fdx.FederatedData(train=train, test=test, num_classes=2)
    config.model.name, config.model.hidden = "cox", ""
    counts = ("c_index", "num_examples")
  else:
    options = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": False}
    ys = [rng.integers(0, 3, size=n).astype(np.int32) for n in sizes]
    train = fdx.stack_clients(xs, ys, num_classes=3)
    test = fdx.stack_clients(half(xs), half(ys), num_classes=3)
    data = fdx.FederatedData(train=train, test=test, num_classes=3)
    config.model.name, config.model.hidden = "mlp", "6"
    counts = ("accuracy", "auc", "num_examples")
  cache = _programs.ProgramCache(options)
  model = cache.model(config, data.num_classes)
  seeds, clients = 3, len(sizes)
  models = jax.vmap(model.init, in_axes=(0, None))(
      jax.random.split(jax.random.PRNGKey(2), seeds), jnp.zeros((1, 4)))
  models = jax.tree.map(lambda x: x[:, None] * jnp.linspace(0.5, 2.0, clients)[
      None, :, *([None] * (x.ndim - 1))], models)  # [S, M, ...]: each model different
  leaf = np.asarray(models["Dense_0"]["kernel"]).copy()
  leaf[1, 2].reshape(-1)[3] = np.nan  # seed 1's model 2: NaN outputs
  models["Dense_0"]["kernel"] = jnp.asarray(leaf)
  found = cache.evaluator(model, "stacked", None, models, data, fast_metrics=True)
  assert isinstance(found, _programs._OneModelAtATimeEvaluator)
  found = found(models, data.train, data.test)
  one = cache.evaluator(model, "global", None, jax.tree.map(lambda x: x[:, 0], models),
                        data, fast_metrics=True)
  assert one is cache.evaluator(model, "stacked", None, models, data, True).one
  each = [jax.device_get(one(jax.tree.map(lambda x, m=m: x[:, m], models), data.train,
                                 data.test)) for m in range(clients)]
  for got, *want in zip(jax.tree.leaves(found), *map(jax.tree.leaves, each)):
    np.testing.assert_array_equal(got, np.stack(want, axis=1))

  apply_all = jax.vmap(model.apply, in_axes=(None, 0))
  stacked = lambda params, tr, te: [
      *(fdx.evaluate_stacked(model, params, d) for d in (tr, te)),
      _metrics_outputs(model, jax.vmap(apply_all, in_axes=(0, None))(params,
                                                                      te.features))]
  expected = _one_program_reference(stacked, (models, data.train, data.test), options)
  assert jax.tree.structure(found) == jax.tree.structure(expected)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(found),
                               jax.tree.leaves(expected)):
    name = jax.tree_util.keystr(path)
    assert got.shape == want.shape, name
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
    if any(f"'{count}'" in name for count in counts):
      np.testing.assert_array_equal(got, want, err_msg=name)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
  nan_model = np.asarray(found[1]["pooled"]["loss"])
  assert np.isnan(nan_model[1, 2]) and np.isfinite(np.delete(nan_model, 1 * 4 + 2)).all()


def _one_program_reference(fn, args, options):
  """A test's oracle: `fn(models, train, test)` over a seeds axis of models, one
  program compiled with XLA `options`, its results on the host."""
  program = jax.jit(jax.vmap(fn, in_axes=(0, None, None))).lower(*args).compile(options)
  return jax.device_get(program(*args))


def _metrics_outputs(model, logits):
  """The study's test outputs of logits: class probabilities, a Cox model's scores."""
  from fedjax_dx.core import _metrics  # pylint: disable=g-import-not-at-top
  return _metrics.outputs(model, logits)


@pytest.mark.parametrize("level", [0, 3])
@pytest.mark.parametrize("kind", ["global", "stacked"])
def test_pooled_set_evaluator_gives_the_whole_evaluators_pooled_metrics(kind, level):
  """FLamby's pooled-normalized sets are scored by an evaluator of their pooled
  metrics alone (`pooled_only`: no per-client metrics, no outputs, which their rows do
  not read): the same numbers, bit for bit, as the pooled part of the whole
  evaluator, at backend level 0 (`fast_compile`, FLamby's) and at full optimisation:
  clients of different sizes, 3 classes, a seed whose model outputs NaN, and a binary
  model on the one-client sets the study gives it."""
  from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
  options = {"xla_backend_optimization_level": level,
             "xla_cpu_use_fusion_emitters": False}
  rng = np.random.default_rng(11)
  seeds = 3
  config = test_config.get_config()
  config.model.name, config.model.hidden = "mlp", "6"
  for num_classes, sizes in ((3, (17, 30, 9)), (2, (41,))):
    xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]
    ys = [rng.integers(0, num_classes, size=n).astype(np.int32) for n in sizes]
    train = fdx.stack_clients(xs, ys, num_classes=num_classes)
    test = fdx.stack_clients([x[: n // 2 + 1] for x, n in zip(xs, sizes)],
                             [y[: n // 2 + 1] for y, n in zip(ys, sizes)],
                             num_classes=num_classes)
    data = fdx.FederatedData(train=train, test=test, num_classes=num_classes)
    cache = _programs.ProgramCache(options)
    model = cache.model(config, num_classes)
    models = jax.vmap(model.init, in_axes=(0, None))(
        jax.random.split(jax.random.PRNGKey(2), seeds), jnp.zeros((1, 4)))
    leaf = np.asarray(models["Dense_0"]["kernel"]).copy()
    leaf.reshape(-1)[5] = np.nan  # seed 0's outputs NaN
    models["Dense_0"]["kernel"] = jnp.asarray(leaf)
    if kind == "stacked":
      models = jax.tree.map(lambda x: x[:, None] * jnp.linspace(0.5, 2.0, 4)[
          None, :, *([None] * (x.ndim - 1))], models)
    whole = jax.device_get(cache.evaluator(model, kind, None, models, data)(
        models, data.train, data.test))
    pooled = cache.evaluator(model, kind, None, models, data, pooled_only=True)
    assert pooled is not cache.evaluator(model, kind, None, models, data)
    pooled = jax.device_get(pooled(models, data.train, data.test))
    assert len(pooled) == 2 and all(set(split) == {"pooled"} for split in pooled)
    for split in range(2):
      assert set(pooled[split]["pooled"]) == set(whole[split]["pooled"])
      for name, got in pooled[split]["pooled"].items():
        np.testing.assert_array_equal(got, whole[split]["pooled"][name],
                                      err_msg=f"{num_classes} classes {split} {name}")
    assert np.isnan(pooled[1]["pooled"]["auc"][0]).all()
    assert not np.isnan(pooled[1]["pooled"]["auc"][1:]).any()


@pytest.mark.parametrize("method", [*study.STRATEGIES, "local", "centralized",
                                    "private_fedavg", "audited_fedavg"])
def test_strategy_inits_fill_on_host_as_their_compiled_program_does(method):
  """A study makes each method's initial state of every seed (`initial_states`) with
  NumPy where its init only passes values through and broadcasts fill values (every
  built-in strategy's): the same tree, dtypes and values as the compiled init. An
  init with arithmetic (the privacy audit's canary directions) compiles as before."""
  from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
  cache = _programs.ProgramCache()
  config = test_config.get_config()
  name = method
  if method == "private_fedavg":
    name, config.dp, config.dp_noise, config.dp_clip = "fedavg", "client", 0.5, 1.0
  if method == "audited_fedavg":
    name, config.dp, config.dp_noise, config.dp_clip = "fedavg", "client", 0.5, 1.0
    config.privacy_audit, config.audit_canaries = True, 4
  data = cache.dataset(config).data
  train = fdx.pool_clients(data.train) if name == "centralized" else data.train
  audit_from = None
  if method == "audited_fedavg":
    from fedjax_dx.privacy import _audit  # pylint: disable=g-import-not-at-top
    audit_from = train.num_clients
    train = _audit.with_canaries(train, config.audit_canaries)
  model = cache.model(config, data.num_classes)
  algorithm = cache.algorithm(config, name, model, audit_from)
  init_keys, state_keys = cache.seed_keys([0, 7, 3])
  params = cache.initial_params(model, init_keys, data.train.features[0, :1])
  found = cache.initial_states(algorithm, params, train, state_keys)
  fn = jax.jit(jax.vmap(lambda p, k: algorithm.init(p, train, k)))
  traced = fn.trace(params, state_keys)
  on_host = _programs._fill_on_host(traced.jaxpr, (params, state_keys))
  assert (on_host is None) == (method == "audited_fedavg")
  expected = fn(params, state_keys)
  assert jax.tree.structure(found) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(found), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_study_keys_are_the_eager_keys():
  """The seeds' model and state keys and the bootstrap's keys, each made in one
  program (`_integer_program`), are the keys JAX's eager calls give."""
  from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
  cache = _programs.ProgramCache()
  seeds = [42, 0, 2**31 - 1, 7]
  init_keys, state_keys = cache.seed_keys(seeds)
  for s, seed in enumerate(seeds):
    want = jax.random.split(jax.random.PRNGKey(seed))
    np.testing.assert_array_equal(init_keys[s], want[0])
    np.testing.assert_array_equal(state_keys[s], want[1])
  found = cache.bootstrap_keys(seeds, 1234)
  for s, seed in enumerate(seeds):
    np.testing.assert_array_equal(
        found[s], jax.random.fold_in(jax.random.PRNGKey(1234), seed))


def test_study_membership_audit_apart_gives_the_one_programs_scores(monkeypatch):
  """With `config.fast_compile_metrics` at full optimisation the membership audit is
  two programs (`_AttackApart`): per-example losses at full optimisation, the
  attack's scores from them at level 0. Its AUCs and true-positive rates (counts and
  ratios of counts) equal those of the one program, for 3 seeds of a 3-class model
  with its starting models, one seed's outputs NaN (its scores NaN)."""
  from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
  options = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": False}
  rng = np.random.default_rng(8)
  sizes = (21, 34, 12)
  xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in sizes]
  ys = [rng.integers(0, 3, size=n).astype(np.int32) for n in sizes]
  train = fdx.stack_clients([x[: n // 2 + 3] for x, n in zip(xs, sizes)],
                            [y[: n // 2 + 3] for y, n in zip(ys, sizes)], num_classes=3)
  test = fdx.stack_clients([x[n // 2 + 3:] for x, n in zip(xs, sizes)],
                           [y[n // 2 + 3:] for y, n in zip(ys, sizes)], num_classes=3)
  cache = _programs.ProgramCache(options)
  # The audit's full optimisation is XLA's default level, which the suite's XLA_FLAGS
  # lower to 0: level 3 here, as in a study.
  options_for = _programs.ProgramCache.options_for
  monkeypatch.setattr(
      _programs.ProgramCache, "options_for",
      lambda self, built, full_optimisation=False: (
          {**(options_for(self, built, True) or {}), **options} if full_optimisation
          else options_for(self, built)))
  config = test_config.get_config()
  config.model.name, config.model.hidden = "mlp", "6"
  model = cache.model(config, 3)
  init = lambda seed: jax.vmap(model.init, in_axes=(0, None))(
      jax.random.split(jax.random.PRNGKey(seed), 3), jnp.zeros((1, 4)))
  starts, models = init(1), jax.tree.map(lambda x: 3.0 * x, init(2))
  leaf = np.asarray(models["Dense_0"]["kernel"]).copy()
  leaf.reshape(-1)[2] = np.nan  # seed 0's outputs NaN
  models["Dense_0"]["kernel"] = jnp.asarray(leaf)
  apart = cache.attack(model, fast_metrics=True)
  assert isinstance(apart, _programs._AttackApart)
  one_program = cache.attack(model)
  assert not isinstance(one_program, _programs._AttackApart)
  apart.prepare(models, starts, train, test)
  found = jax.device_get(apart(models, starts, train, test))
  expected = jax.device_get(one_program(models, starts, train, test))
  assert set(found) == set(expected) and "calibrated_auc" in found
  for score in found:
    np.testing.assert_array_equal(found[score], expected[score], err_msg=score)
  assert np.isnan(found["auc"][0]) and not np.isnan(found["auc"][1:]).any()


def test_stacked_models_bootstrap_one_at_a_time_as_the_stacked_program_does():
  """`config.fast_compile_metrics`: stacked models' bootstrap (`local`) runs the one-
  model programs once per model (`_OneModelAtATimeBootstrap`), model m resampling
  with `fold_in(key, m)`: the resamples of the stacked program (every count-based
  metric equal) and its float sums to 2 ulps; two sites, one with one class."""
  from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  seeds, models, clients, n, resamples = 2, 3, 2, 12, 16
  p = rng.random((seeds, models, clients, n)).astype(np.float32)
  outputs = jnp.asarray(np.stack([1 - p, p], -1))
  labels = jnp.asarray(np.where(np.arange(clients)[:, None] == 1, 0,
                                rng.integers(0, 2, (clients, n))).astype(np.int32))
  mask = jnp.arange(n)[None, :] < jnp.asarray([[n], [9]])
  cache = _programs.ProgramCache()
  keys = cache.bootstrap_keys(range(seeds), 7)
  one_at_a_time = cache.bootstrapper(False, True, resamples, fast=True)
  assert isinstance(one_at_a_time, _programs._OneModelAtATimeBootstrap)
  found = one_at_a_time(keys, outputs, labels, mask)
  expected = jax.device_get(cache.bootstrapper(False, True, resamples)(
      keys, outputs, labels, mask))
  assert set(found) == set(expected)
  for metric in found:
    assert found[metric].shape == (seeds, models, resamples, clients + 1), metric
    np.testing.assert_array_equal(np.isnan(found[metric]), np.isnan(expected[metric]))
    if metric in ("accuracy", "balanced_accuracy", "auc", "sensitivity",
                  "specificity", "f1"):
      np.testing.assert_array_equal(found[metric], expected[metric], err_msg=metric)
    real = ~np.isnan(expected[metric])
    np.testing.assert_array_max_ulp(found[metric][real], expected[metric][real],
                                    maxulp=2)
  assert np.isnan(found["auc"][..., 1]).all()  # the one-class site
  assert len(cache.bootstraps) == 2  # the one-model programs and the stacked ones


def test_initial_models_of_equal_values_are_evaluated_once(tmp_path):
  """Methods start from the same initial models: their round-0 evaluation runs once
  per value of those models, evaluator and data (`ProgramCache.initial_evaluation`),
  and a study's global methods share it."""
  cache = study.ProgramCache()
  calls = []
  evaluator = lambda models, train, test: calls.append(1) or [models["w"].sum()]
  train, test = object(), object()
  first = cache.initial_evaluation(evaluator, {"w": jnp.arange(3.0)}, train, test)
  again = cache.initial_evaluation(evaluator, {"w": jnp.arange(3.0)}, train, test)
  assert len(calls) == 1 and again is first  # equal values, other arrays
  cache.initial_evaluation(evaluator, {"w": jnp.arange(3.0) + 1}, train, test)
  cache.initial_evaluation(evaluator, {"w": jnp.arange(3.0)}, train, object())
  cache.initial_evaluation(evaluator, {"w": jnp.arange(3, dtype=jnp.int32)}, train, test)
  assert len(calls) == 4  # other values, other data, other dtype
  programs = study.ProgramCache()
  frame = _study_frame(tmp_path, "shared", methods="fedavg,fedprox,centralized,local",
                       num_seeds=2, programs=programs)
  # One: the local models (`_OneModelAtATimeEvaluator`) start from the global ones.
  assert len(programs.initial_evaluations) == 1
  start = frame[(frame["round"] == 0) & (frame["split"] == "test")]
  metrics = ["loss", "accuracy", "auc", "brier"]
  locals_ = sorted(m for m in start["method"].unique() if m.startswith("local_"))
  assert len(locals_) == 3
  by_method = {m: start[start["method"] == m][metrics].to_numpy()
               for m in ("fedavg", "fedprox", "centralized", *locals_)}
  for method in ("fedprox", "centralized", *locals_):
    np.testing.assert_array_equal(by_method[method], by_method["fedavg"], method)


def test_methods_trained_at_once_give_the_rows_of_one_after_another(tmp_path):
  methods = "fedavg,scaffold,fedavg_ft,cyclic,centralized,local"
  frames = {}
  for threads in (1, 3):
    config = test_config.get_config()
    config.methods, config.bootstrap_resamples = methods, 20
    paths = study.run_study(config, str(tmp_path / str(threads)), quiet=True,
                            programs=PROGRAMS, method_threads=threads)
    frames[threads] = pd.read_json(paths["metrics"], lines=True, dtype={"client": str})
    with open(tmp_path / str(threads) / "config.json") as f:
      assert json.load(f)["method_threads"] == threads
  # Every row, in the same order (methods written in config order), to the bit; only
  # the timings differ (the second study finds its programs compiled: compile_s 0).
  assert list(frames[3]["method"].drop_duplicates())[:4] == methods.split(",")[:4]
  timing = ["wall_s", "compile_s"]
  pd.testing.assert_frame_equal(frames[1].drop(columns=timing),
                                frames[3].drop(columns=timing), check_exact=True)
  assert frames[3]["bootstrap_auc"].notna().any()


def test_a_method_that_fails_on_its_thread_stops_the_study_with_its_error(
    tmp_path, monkeypatch):
  from fedjax_dx.study import _execute
  execute = _execute.MethodRun.execute

  threads = {}

  def failing(self, progress):
    threads[self.method] = threading.current_thread().name
    if self.method == "scaffold":
      raise RuntimeError("scaffold failed on its thread")
    return execute(self, progress)

  monkeypatch.setattr(_execute.MethodRun, "execute", failing)
  config = test_config.get_config()
  config.methods = "fedavg,scaffold,centralized,local"
  with pytest.raises(RuntimeError, match="scaffold failed on its thread"):
    study.run_study(config, str(tmp_path / "x"), quiet=True, programs=PROGRAMS,
                    method_threads=2)
  assert not os.path.exists(tmp_path / "x" / "metrics.jsonl")
  assert threads["fedavg"].startswith("method") and threads["scaffold"].startswith("method")
  with pytest.raises(study.StudyError, match=r"method_threads = -1: expected an "):
    study.run_study(config, str(tmp_path / "y"), quiet=True, method_threads=-1)
  assert not os.path.exists(tmp_path / "y")


def test_new_methods_and_stragglers_in_the_harness(tmp_path):
  frame = _study_frame(tmp_path, "s", methods="fedavg,fedprox,fedavg_ft,cyclic",
                       num_seeds=1, local_steps=4, stragglers=0.5)
  test_rows = frame[(frame["client"] == "pooled") & (frame["split"] == "test")]
  param_bytes = 14 * 4  # logistic regression 13 -> 1, float32
  by_method = {m: g.sort_values("round") for m, g in test_rows.groupby("method")}
  # Cyclic: one client per round gets the model and sends it back.
  assert by_method["cyclic"]["bytes_up"].tolist() == [0, 2 * param_bytes, 2 * param_bytes]
  assert by_method["cyclic"]["bytes_down"].tolist() == [0, 2 * param_bytes,
                                                        2 * param_bytes]
  # round(0.5 * 3) = 2 of 3 clients straggle each round: FedAvg drops their uploads,
  # FedProx keeps their partial work; both send the model to all three.
  assert by_method["fedavg"]["bytes_up"].tolist() == [0, 2 * param_bytes, 2 * param_bytes]
  assert by_method["fedprox"]["bytes_up"].tolist() == [0, 6 * param_bytes,
                                                       6 * param_bytes]
  assert by_method["fedavg"]["bytes_down"].tolist() == [0, 6 * param_bytes,
                                                        6 * param_bytes]
  personal = frame[(frame["method"] == "fedavg_ft") & (frame["split"] == "test")]
  assert set(personal["client"]) == {"0", "1", "2", "pooled"}
  assert personal["accuracy"].notna().all()


def test_compilation_cache_is_filled_and_changes_no_result(tmp_path):
  cache = tmp_path / "jax_cache"
  for name in ("first", "second"):
    result = run("--config=configs/test.py", f"--workdir={tmp_path / name}",
                 "--noreport", "--config.methods=fedavg,local", "--config.num_seeds=1",
                 f"--compilation_cache={cache}")
    assert result.returncode == 0, result.stderr
    if name == "first":
      assert len(list(cache.rglob("*"))) >= 2  # the training and evaluation programs
      # The program store: training, evaluation, bootstrap and audit programs.
      assert len(list((cache / "programs").rglob("*.pkl"))) >= 4
  timing = ["wall_s", "compile_s"]
  a = pd.read_json(tmp_path / "first" / "metrics.jsonl", lines=True)
  b = pd.read_json(tmp_path / "second" / "metrics.jsonl", lines=True)
  assert (a["compile_s"] > 0).any()
  assert (b["compile_s"] == 0).all()  # every training program loaded from the store
  pd.testing.assert_frame_equal(a.drop(columns=timing), b.drop(columns=timing))


@contextlib.contextmanager
def _program_store_off():
  """The program store off inside (conftest turns it on for in-process studies): for a
  study whose compile times a test asserts."""
  kept = _store.directory()
  _store.enable(None)
  try:
    yield
  finally:
    _store.enable(kept)


def test_chunked_and_bucketed_studies_equal_the_plain_one(tmp_path):
  common = dict(methods="fedavg,scaffold,local", num_seeds=1,
                sweep="dataset.num_clients=3,4")
  plain = _study_frame(tmp_path, "plain", **common)
  chunked = _study_frame(tmp_path, "chunked", client_chunk=2, **common)
  with _program_store_off():  # its own compile times, compiled here
    auto = _study_frame(tmp_path, "auto", client_chunk=-1, bucket_clients=True,
                        programs=study.ProgramCache(), **common)
  columns = ["method", "seed", "round", "num_clients", "client", "split", "loss",
             "accuracy", "auc", "cumulative_bytes"]
  for other in (chunked, auto):
    pd.testing.assert_frame_equal(other[columns], plain[columns], rtol=1e-5)
  # Both points fall in the 4-client bucket: the second one compiles nothing new.
  second = auto[(auto["num_clients"] == 4) & (auto["method"] == "fedavg")]
  assert (second["compile_s"] == 0).all()
  first = auto[(auto["num_clients"] == 3) & (auto["method"] == "fedavg")]
  assert (first["compile_s"] > 0).all()


@pytest.mark.parametrize("changes,message", [
    (dict(client_chunk=-2), "config.client_chunk = -2: expected 0"),
    (dict(client_chunk=2, aggregator="median"), "config.client_chunk = 2: expected 0 with"),
    (dict(methods="cyclic", bucket_clients=True), "config.bucket_clients = True"),
])
def test_bad_scale_fields_are_named(tmp_path, changes, message):
  config = test_config.get_config()
  for field, value in changes.items():
    config[field] = value
  with pytest.raises(study.StudyError, match=message.replace("(", r"\(")):
    study.run_study(config, str(tmp_path / "x"), quiet=True)
  assert not (tmp_path / "x").exists()


def test_private_study_reaches_its_target_epsilon(tmp_path):
  frame = _study_frame(tmp_path, "dp", methods="fedavg,centralized", num_seeds=1,
                       dp="central", dp_target_epsilon=3.0, dp_clip=0.5,
                       clients_per_round=2)
  fed = frame[(frame["method"] == "fedavg") & (frame["client"] == "pooled")
              & (frame["split"] == "test")].sort_values("round")
  assert fed["epsilon"].iloc[0] == 0.0
  assert fed["epsilon"].is_monotonic_increasing
  assert fed["epsilon"].iloc[-1] == pytest.approx(3.0, rel=1e-2)
  z = fed["dp_noise"].iloc[-1]
  assert z > 0 and fed["epsilon"].iloc[-1] == pytest.approx(
      fdx_epsilon(z, 2 / 3, 4, 1e-5), rel=1e-4)
  central = frame[frame["method"] == "centralized"]
  assert central["epsilon"].isna().all()  # the non-private reference
  summary = pd.read_csv(tmp_path / "dp" / "summary.csv")
  assert summary[summary["method"] == "fedavg"]["epsilon"].iloc[0] == pytest.approx(
      3.0, rel=1e-2)


def fdx_epsilon(*args):
  import fedjax_dx as fdx
  return fdx.privacy_epsilon(*args)


@pytest.mark.parametrize("changes,message", [
    (dict(dp="central", dp_delta=1.5), "config.dp_delta = 1.5: expected a number in (0, 1)"),
    (dict(dp="central", dp_clip=0.0), "config.dp_clip = 0.0: expected a clipping norm > 0"),
    (dict(dp="maybe"), "config.dp = 'maybe': expected none, central, local (client level) "
     "or example"),
    (dict(dp="local", dp_adaptive_quantile=0.5),
     "config.dp_adaptive_quantile = 0.5: expected 0 unless dp = 'central'"),
    (dict(dp="example", dp_target_epsilon=1e-4),
     "config.dp_target_epsilon = 0.0001: target epsilon 0.0001 is not reached"),
    (dict(compression="gzip"), "config.compression = 'gzip': expected none, quantize"),
    (dict(compression="quantize", compression_bits=3),
     "config.compression_bits = 3: expected one of (1, 2, 4, 8, 16)"),
    (dict(secure_aggregation=True, compression="topk"),
     "config.compression = 'topk': expected none with secure_aggregation"),
    (dict(secure_aggregation=True, secagg_dropout=0.5),
     "config.secagg_dropout = 0.5: expected a share in [0, secagg_tolerance = 0.3]"),
    (dict(compression="topk", methods="scaffold"),
     "config.compression = 'topk': expected none and secure_aggregation false for "
     "scaffold"),
    (dict(dp="central", dp_target_epsilon=1e-4),
     "config.dp_target_epsilon = 0.0001: target epsilon 0.0001 is not reached"),
    (dict(dp="central", methods="scaffold"), "config.dp = 'central': expected none for "
     "scaffold"),
])
def test_bad_privacy_fields_are_named(tmp_path, changes, message):
  config = test_config.get_config()
  config.methods = "fedavg"
  for field, value in changes.items():
    config[field] = value
  with pytest.raises(study.StudyError, match=re.escape(message)):
    study.run_study(config, str(tmp_path / "x"), quiet=True)
  assert not (tmp_path / "x").exists()


def test_membership_audit_on_the_final_global_models(tmp_path):
  frame = _study_frame(tmp_path, "audit", methods="fedavg,centralized,local",
                       num_seeds=2)
  final = frame["round"] == frame["round"].max()
  audited = frame[final & (frame["client"] == "pooled") & (frame["split"] == "test")
                  & frame["method"].isin(["fedavg", "centralized"])]
  assert len(audited) == 4  # 2 methods x 2 seeds
  assert audited["mia_auc"].between(0, 1).all()
  assert audited["mia_tpr_at_1pct_fpr"].between(0, 1).all()
  others = frame[~(final & (frame["client"] == "pooled") & (frame["split"] == "test")
                   & frame["method"].isin(["fedavg", "centralized"]))]
  assert others["mia_auc"].isna().all()  # earlier rounds, other rows, local models
  summary = pd.read_csv(tmp_path / "audit" / "summary.csv", dtype={"client": str})
  row = summary[(summary["method"] == "fedavg") & (summary["client"] == "pooled")]
  assert row["mia_auc_mean"].iloc[0] == pytest.approx(
      audited[audited["method"] == "fedavg"]["mia_auc"].mean())


def test_audit_and_bootstrap_programs_compile_ahead_for_the_arguments_they_get(
    tmp_path):
  """The programs that run once training is done (the membership audit, the
  bootstraps of global and of local models: their draws and their metrics) are
  lowered with the methods and compiled on worker threads meanwhile: each ends with
  one program, the one prepared ahead (none compiled on demand for arguments the
  preparation did not foresee)."""
  cache = study.ProgramCache()
  frame = _study_frame(tmp_path, "ahead", programs=cache,
                       methods="fedavg,centralized,local", num_seeds=2,
                       bootstrap_resamples=10)
  stored = [program for _, program in cache.attacks.values()]
  stored += [program for bootstrap in cache.bootstraps.values()
             for program in (bootstrap.draws, bootstrap.metrics)]
  # global models'; local's (stacked) models go through it one at a time
  # (`config.fast_compile_metrics`: `_OneModelAtATimeBootstrap`)
  assert len(cache.attacks) == 1 and len(cache.bootstraps) == 1
  for program in stored:
    assert len(program.programs) == 1, program.identity
    (prepared,) = program.programs.values()
    assert prepared.future is not None and prepared.executable is not None
  final = frame[(frame["round"] == frame["round"].max()) & (frame["split"] == "test")]
  assert final["bootstrap_auc"].map(len).eq(10).all()
  assert set(final["method"]) == {"fedavg", "centralized", "local_0", "local_1",
                                  "local_2"}


def test_example_level_dp_compression_and_secagg_in_the_harness(tmp_path):
  import fedjax_dx as fdx
  frame = _study_frame(tmp_path, "dpsgd", methods="fedavg", num_seeds=1, dp="example",
                       dp_target_epsilon=8.0, dp_clip=1.0)
  fed = frame[(frame["client"] == "pooled") & (frame["split"] == "test")].sort_values(
      "round")
  sizes = [30] * 3  # synthetic: 40 examples per client, 30 of them for training
  # 4 rounds x 3 local steps of batch 4 for every hospital: the worst one spends 8.
  assert fed["epsilon"].iloc[-1] == pytest.approx(8.0, rel=1e-2)
  assert fed["epsilon"].iloc[-1] == pytest.approx(fdx.example_level_epsilon(
      fed["dp_noise"].iloc[-1], 4, sizes, [12] * 3, 1e-5), rel=1e-4)
  assert (fed["dp_mode"] == "example").all()
  # Compression: each of the 3 uploads per round is 14 levels of 4 bits + the scale.
  packed = _study_frame(tmp_path, "q4", methods="fedavg", num_seeds=1,
                        compression="quantize", compression_bits=4)
  row = packed[(packed["client"] == "pooled") & (packed["split"] == "test")
               & (packed["round"] == 2)]
  assert row["bytes_up"].iloc[0] == 2 * 3 * (7 + 4)
  assert row["bytes_down"].iloc[0] == 2 * 3 * 14 * 4
  # Secure aggregation: the protocol's messages on top of 32-bit masked vectors, and
  # the same model as plain FedAvg up to fixed-point rounding.
  secure = _study_frame(tmp_path, "secagg", methods="fedavg", num_seeds=1,
                        secure_aggregation=True, secagg_bound=5.0)
  plain = _study_frame(tmp_path, "plain", methods="fedavg", num_seeds=1)
  row = secure[(secure["client"] == "pooled") & (secure["split"] == "test")
               & (secure["round"] == 2)]
  up, down = fdx.secagg.round_bytes(14, 32, 3, 0)
  assert row["bytes_up"].iloc[0] == 2 * up
  assert row["bytes_down"].iloc[0] == 2 * (down + 3 * 14 * 4)
  pd.testing.assert_series_equal(secure["loss"], plain["loss"], atol=1e-5)
  assert secure["mia_calibrated_auc"].dropna().between(0, 1).all()
  assert secure["mia_class_balanced_auc"].dropna().between(0, 1).all()


def test_baselines_with_their_own_schedule_are_reference_lines():
  from fedjax_dx.study import _report
  from configs import flamby_heart, heart_disease
  # FLamby's local-only baseline trains 50 epochs, not the strategies' 15 rounds.
  assert _report._own_schedule(flamby_heart.get_config().to_dict()) == {
      "centralized": "pooled", "local": "50 epochs"}
  # The default study's local-only clients train the strategies' per-round budget.
  assert _report._own_schedule(heart_disease.get_config().to_dict()) == {
      "centralized": "pooled"}
  steps = {"rounds": 3, "local_steps": 20, "local_epochs": 0,
           "per_method": {"local": {"rounds": 40}}}
  assert _report._own_schedule(steps)["local"] == "40 x 20 steps"


def test_figure_intervals_are_seaborns_bootstrap_intervals():
  """The report's error bars and bands (`seeded_interval`, one vectorised mean) are
  the numbers seaborn's own `errorbar=("ci", 95), n_boot=200, seed=0` computes, resample
  by resample: groups of 1 .. 40 values, with ties and with NaN."""
  import warnings  # pylint: disable=g-import-not-at-top
  from seaborn._statistics import EstimateAggregator  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
  seaborn_ci = EstimateAggregator("mean", ("ci", 95), n_boot=_report.CI_RESAMPLES, seed=0)
  rng = np.random.default_rng(3)
  for n in [*range(2, 41), 97]:
    for case in range(4):
      values = rng.normal(size=n)
      if case == 1:
        values = np.round(values)  # ties
      if case >= 2:
        values[rng.choice(n, size=case - 1, replace=False)] = np.nan
      with warnings.catch_warnings():  # seaborn's mean of an all-NaN resample
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = seaborn_ci(pd.DataFrame({"y": values}), "y")
      found = _report.seeded_interval(pd.Series(values))
      np.testing.assert_array_equal(found, [expected["ymin"], expected["ymax"]],
                                    f"n = {n}, case {case}")


def test_report_bars_are_seaborns_barplot_pixel_for_pixel():
  """`_report._barplot` (one `ax.bar` per method) draws the PNG that seaborn's
  barplot with the report's error bars draws, byte for byte: groups of one value
  (no error bar) to six, NaN values, an all-NaN group, a method absent from a site,
  rows outside the order, and returns each bar by (method, x)."""
  import io  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _report  # pylint: disable=g-import-not-at-top
  figures, sns = _report._plt()
  rng = np.random.default_rng(5)
  rows = []
  for method in ("fedavg", "local", "cyclic", "unlisted"):
    for site in ("A\n(n = 3)", "B", "C", "D"):
      if (method, site) == ("cyclic", "C"):
        continue  # no bar
      size = 1 if (method, site) == ("fedavg", "B") else int(rng.integers(2, 7))
      for _ in range(size):
        rows.append({"method": method, "site": site, "y": rng.uniform()})
  rows += [{"method": "local", "site": "B", "y": np.nan},
           {"method": "fedavg", "site": "E", "y": 0.5}]  # E: not in the order
  data = pd.DataFrame(rows)
  data.loc[(data["method"] == "cyclic") & (data["site"] == "D"), "y"] = np.nan
  order, methods = ["D", "A\n(n = 3)", "B", "C"], ["local", "fedavg", "cyclic"]
  colors = dict(zip(methods, sns.color_palette("deep", 3)))
  pngs = []
  with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
    for draw in ("seaborn", "ours"):
      fig, ax = figures.subplots(figsize=(6, 3))
      if draw == "seaborn":
        sns.barplot(data=data, x="site", y="y", hue="method", palette=colors,
                    hue_order=methods, order=order, errorbar=_report.seeded_interval,
                    ax=ax)
      else:
        bars = _report._barplot(ax, data, "site", "y", order, methods, colors)
      fig.tight_layout()
      out = io.BytesIO()
      fig.savefig(out, dpi=60, format="png")
      pngs.append(out.getvalue())
  assert pngs[0] == pngs[1]
  assert ("cyclic", "C") not in bars and ("cyclic", "D") not in bars  # none, all NaN
  assert len(bars) == 3 * 4 - 2
  local_b = data[(data["method"] == "local") & (data["site"] == "B")]["y"]
  assert bars[("local", "B")].get_height() == pytest.approx(local_b.mean())


@pytest.mark.parametrize("model,message", [
    ({"compute_dtype": "float16"},
     "config.model.compute_dtype = 'float16': expected one of float32, bfloat16"),
    ({"compute_dtype": "bfloat16"},
     "config.model.compute_dtype = 'bfloat16': expected float32 unless model.name = cnn"),
])
def test_bad_compute_dtype_is_named(tmp_path, model, message):
  config = test_config.get_config()
  for field, value in model.items():
    config.model[field] = value
  with pytest.raises(study.StudyError, match=re.escape(message)):
    study.run_study(config, str(tmp_path / "x"), quiet=True)
  assert not (tmp_path / "x").exists()


def test_a_private_study_draws_privacy_against_utility(tmp_path):
  workdir = tmp_path / "private"
  _study_frame(tmp_path, "private", methods="fedavg,centralized", num_seeds=1,
               sweep="dp+dp_target_epsilon=none/0,central/8,central/64")
  drawn = study.make_report(str(workdir))
  summary = pd.read_csv(workdir / "summary.csv", dtype={"client": str})
  private = summary[summary["epsilon"].notna()]
  assert sorted(private["epsilon"].round().unique()) == [8, 64]
  audited = summary[(summary["client"] == "pooled") & (summary["method"] == "fedavg")]
  assert audited["mia_class_balanced_auc_mean"].between(0, 1).all()
  assert (workdir / "privacy_utility.png").stat().st_size > 1000
  assert "privacy_utility" in (workdir / "report.html").read_text()
  _check_drawn_in_processes(tmp_path, workdir, drawn)


# Draws the report of sys.argv[1]'s copies in a fresh process (it can fork): two
# figures at a time; again with the calibration figure failing in the forked child;
# by a ReportProcess forked before (a study would run); prints the forks made.
DRAW_IN_PROCESSES = """
import json, os, shutil, sys, time
from fedjax_dx.study import _report
from fedjax_dx.study._report_process import ReportProcess
_report.prepare()  # once here, not in each child
reporter, idle = ReportProcess.start(), ReportProcess.start()
idle.stop()  # ends without drawing
assert reporter.draw("/nonexistent") is None  # the caller draws and raises
reporter, failing = ReportProcess.start(), ReportProcess.start()
source, forks, parent = sys.argv[1], [], os.getpid()
real_fork = os.fork
def fork():
  forks.append(1)
  return real_fork()
os.fork = fork
results = shutil.ignore_patterns("*.png", "report.html")  # the results, not the report
for copy in ("two", "child_fails", "reporter"):
  shutil.copytree(source, copy, ignore=results)
# The first figure the forked child draws fails; the first process's first figure
# waits for that (so the child takes one) and draws it again at the end.
failed = os.path.abspath("failed_in_the_child")
def first_fails_in_the_child_or_waits(draw):
  def drawn(*args):
    if os.getpid() != parent and not failed_once:
      failed_once.append(1)
      open(failed, "w").close()
      raise RuntimeError("only in the child")
    if os.getpid() == parent and not waited:
      waited.append(1)
      for _ in range(6000):
        if os.path.exists(failed):
          break
        time.sleep(0.01)
    return draw(*args)
  return drawn
figures = ("_convergence", "_communication", "_comparison", "_sweeps", "_clinical",
           "_calibration", "_fairness_view", "_labels", "_privacy_utility",
           "_privacy_bounds")
plain = {name: getattr(_report, name) for name in figures}
_report.make_report("two", processes=2)
waited, failed_once = [], []
for name in figures:
  setattr(_report, name, first_fails_in_the_child_or_waits(plain[name]))
_report.make_report("child_fails", processes=2)
assert os.path.exists(failed)
# Told once metrics.jsonl is written, it draws before the summaries exist.
summaries = ("summary.csv", "fairness.csv")
for name in summaries:
  os.remove(os.path.join("reporter", name))
reporter.metrics_written("reporter")
for _ in range(12000):
  if os.path.exists(os.path.join("reporter", "clinical.png")):
    break
  time.sleep(0.01)
assert os.path.exists(os.path.join("reporter", "clinical.png"))
assert not os.path.exists(os.path.join("reporter", "report.html"))
for name in summaries:
  shutil.copy(os.path.join(source, name), "reporter")
paths = reporter.draw("reporter")
# A study that fails after its metrics: the child ends without a report.
shutil.copytree(source, "failed_study", ignore=results)
failing.metrics_written("failed_study")
failing.stop()
assert not os.path.exists(os.path.join("failed_study", "report.html"))
print(json.dumps({"forks": len(forks), "reporter": sorted(paths)}))
"""


SEABORN_WITHOUT_SCIPY = """
import sys
from fedjax_dx.study import _report
if sys.argv[1] == "scipy first":
  import scipy.stats
_report.import_seaborn_without_scipy()
from seaborn import _statistics
without = "scipy.stats" not in sys.modules and "scipy.cluster" not in sys.modules
import scipy.stats  # importable afterwards
print(without, _statistics._no_scipy, scipy.stats.norm.cdf(0.0))
"""


@pytest.mark.parametrize("order,expected", [
    ("seaborn first", "True True 0.5"), ("scipy first", "False False 0.5")])
def test_a_report_process_imports_seaborn_without_scipy_and_leaves_scipy_importable(
    order, expected):
  """The report's own processes import seaborn without scipy.stats and scipy.cluster
  (the figures are byte for byte the same: `_check_drawn_in_processes`, whose
  ReportProcess child draws that way); where scipy is imported already, seaborn is
  imported as usual."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", SEABORN_WITHOUT_SCIPY, order],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == expected.split()


def _check_drawn_in_processes(tmp_path, workdir, names):
  """The report drawn two figures at a time (a figure failing in the forked child
  drawn again by the first process), and by a `ReportProcess`, is byte for byte the
  one drawn in one process."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-c", DRAW_IN_PROCESSES, str(workdir)],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  drawn = json.loads(result.stdout.splitlines()[-1])
  assert drawn["forks"] == 2  # one child per make_report(processes=2)
  files = sorted(p.name for p in workdir.iterdir()
                 if p.suffix == ".png" or p.name == "report.html")
  assert "privacy_utility.png" in files and "report.html" in files
  assert drawn["reporter"] == sorted(names)
  for copy in ("two", "child_fails", "reporter"):
    for name in files:
      assert (tmp_path / copy / name).read_bytes() == (workdir / name).read_bytes(), (
          copy, name)


def test_a_program_cache_serves_only_studies_of_its_compile_options(tmp_path):
  config = test_config.get_config()
  config.fast_compile = False
  programs = study.ProgramCache({"xla_backend_optimization_level": 0})
  with pytest.raises(study.StudyError, match="config.fast_compile = False: the programs "
                     "cache given compiles with XLA options"):
    study.run_study(config, str(tmp_path / "x"), quiet=True, programs=programs)
  assert not (tmp_path / "x").exists()


def test_llvm_ir_emitters_only_where_they_keep_the_numbers():
  """Programs of dense and Cox models, and bootstraps, compile with XLA:CPU's LLVM IR
  emitters (measured to give the same numbers, faster); a CNN's keep XLA's default
  (its Adam training moved with them); the fast-compile settings stay on training and
  evaluation only."""
  from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
  llvm_ir = {"xla_cpu_use_fusion_emitters": False}
  for fast in (False, True):
    config = test_config.get_config()
    config.fast_compile = fast
    cache = study.ProgramCache(_programs.compiler_options(config))
    level = {"xla_backend_optimization_level": 0} if fast else {}
    for name, expected in (("logistic_regression", llvm_ir), ("mlp", llvm_ir),
                           ("cox", llvm_ir), ("cnn", llvm_ir if fast else {})):
      config.model.name = name
      model = cache.model(config, 2)
      algorithm = cache.algorithm(config, "fedavg", model)
      assert cache.options_for(model) == ({**level, **expected} or None), name
      assert cache.options_for(algorithm) == cache.options_for(model), name
      assert cache.options_for(model, full_optimisation=True) == (
          llvm_ir if name != "cnn" else None), name
    bootstrap = cache.bootstrapper(False, False, 10)
    assert bootstrap.metrics.options == llvm_ir
    assert bootstrap.draws.options == {"xla_backend_optimization_level": 1}


def test_a_diverged_model_is_reported_as_diverged_and_the_study_exits_nonzero(tmp_path):
  """Learning rate 10 on an MLP: models blow up to NaN. Their metrics are NaN (never
  the majority rate), their rows carry the round they diverged at, the summary counts
  the diverged seeds instead of averaging the others, the table says so, and the
  command line writes everything, then exits 3 naming method, seed and round. FedAvg's
  default guard drops the non-finite updates, so its global model stays finite but
  frozen from the round where every update was dropped: diverged too."""
  workdir = tmp_path / "nan"
  result = run("--config=configs/test.py", f"--workdir={workdir}", "--noreport",
               "--config.methods=fedavg,local", "--config.model.name=mlp",
               "--config.learning_rate=10")
  assert result.returncode == 3, result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert re.match(r"error: fedavg seed 0 diverged at round \d", message), message
  metrics = pd.read_json(workdir / "metrics.jsonl", lines=True, dtype={"client": str})
  diverged = metrics[metrics["diverged_round"].notna()]
  assert set(diverged["method"]) >= {"fedavg"}
  assert (diverged["round"] >= diverged["diverged_round"]).all()
  local = diverged[diverged["method"].str.startswith("local")]
  assert len(local) and local[["loss", "accuracy", "auc"]].isna().all().all()
  fed_rows = diverged[(diverged["method"] == "fedavg") & (diverged["client"] == "pooled")
                      & (diverged["split"] == "test")]
  assert (fed_rows["guard_dropped"] > 0).all()
  frozen = fed_rows[fed_rows["round"] > fed_rows["diverged_round"]]
  assert len(frozen) and (frozen.groupby("seed")["loss"].nunique() == 1).all()
  assert metrics["auc"].dropna().between(0, 1).all()
  summary = pd.read_csv(workdir / "summary.csv", dtype={"client": str})
  fed = summary[(summary["method"] == "fedavg") & (summary["client"] == "pooled")]
  assert fed["diverged_seeds"].iloc[0] >= 1 and fed["accuracy_mean"].isna().all()
  table = (workdir / "summary_table.md").read_text()
  assert "| fedavg | diverged (" in table


def test_an_empty_point_file_is_rerun_and_a_damaged_one_is_named(tmp_path):
  workdir = tmp_path / "study"
  _study_frame(tmp_path, "study", methods="fedavg", rounds=2)
  first, second = sorted((workdir / "points").iterdir())
  first.write_text("")  # e.g. a disk that filled up
  resumed = _study_frame(tmp_path, "study", methods="fedavg", rounds=2)
  assert set(resumed["seed"]) == {0, 1} and first.stat().st_size > 0
  text = second.read_text()
  second.write_text(text[:len(text) // 2])  # cut mid-record
  with pytest.raises(study.StudyError, match=re.escape(str(second)) + ", line \\d+: not "
                     "a JSON record"):
    _study_frame(tmp_path, "study", methods="fedavg", rounds=2)


def test_a_full_disk_is_one_error_and_leaves_the_results_intact(tmp_path, monkeypatch):
  """A write that fails for want of space is a StudyError naming the file, saying to
  free space and rerun (it was an OSError traceback); every file written before is
  unchanged, no temporary file is left, and the rerun finishes the study."""
  import errno  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "study"
  before = _study_frame(tmp_path, "study", methods="fedavg", rounds=2)
  metrics_text = (workdir / "metrics.jsonl").read_text()
  first = sorted((workdir / "points").iterdir())[0]
  first.unlink()  # one seed to run again
  replace = os.replace

  def full_disk(source, target):
    if str(target).endswith(".jsonl"):
      raise OSError(errno.ENOSPC, "No space left on device")
    replace(source, target)

  monkeypatch.setattr(_storage.os, "replace", full_disk)
  with pytest.raises(study.StudyError, match=re.escape(  # a point's predictions go first
      f"cannot write {workdir / 'predictions' / first.name}: No space left on device; "
      "what was written before is "
      "intact; free disk space and run the same command again (the study resumes)")):
    _study_frame(tmp_path, "study", methods="fedavg", rounds=2)
  assert (workdir / "metrics.jsonl").read_text() == metrics_text
  assert not [p.name for p in workdir.rglob(".*")]
  monkeypatch.setattr(_storage.os, "replace", replace)
  after = _study_frame(tmp_path, "study", methods="fedavg", rounds=2)
  timing = ["wall_s", "compile_s", "batched_seeds"]  # the rerun trains one seed
  pd.testing.assert_frame_equal(before.drop(columns=timing), after.drop(columns=timing))


def test_a_study_that_fails_to_start_leaves_no_workdir_so_its_fix_runs(tmp_path,
                                                                       monkeypatch):
  """A batch larger than every client and a CNN on tabular data are refused by name
  before anything is written; any other failure before the first result removes what
  the study wrote, so the corrected rerun is not refused as "another study" (it was),
  and the library's ValueError is one line naming the method."""
  from fedjax_dx.study import _execute  # pylint: disable=g-import-not-at-top
  for changes, message in [
      (dict(batch_size=500), "config.batch_size = 500: larger than every client's "
                             "training set (the largest has 30 examples)"),
      (dict(model=ml_collections.ConfigDict(dict(test_config.get_config().model,
                                                 name="cnn"))),
       "config.model.name = 'cnn': the CNN takes images")]:
    with pytest.raises(study.StudyError, match=re.escape(message)):
      _study_frame(tmp_path, "study", methods="fedavg", **changes)
    assert not (tmp_path / "study").exists()

  def broken_init(*args, **kwargs):
    raise ValueError("train_data: something the checks missed")

  monkeypatch.setattr(_execute, "MethodRun", broken_init)
  with pytest.raises(study.StudyError, match="fedavg: train_data: something the checks "
                                             "missed"):
    _study_frame(tmp_path, "study", methods="fedavg", rounds=2, num_seeds=1)
  assert not (tmp_path / "study").exists()
  monkeypatch.undo()
  frame = _study_frame(tmp_path, "study", methods="fedavg", rounds=2, num_seeds=1,
                       learning_rate=0.1)  # the "fix": another config, same workdir
  assert set(frame["method"]) == {"fedavg"}


def test_flamby_pooled_normalization_trains_the_pooled_model_and_adds_a_named_test_set(
    tmp_path):
  """`dataset.pooled_normalization = "pooled"` (FLamby): the centralized model trains on
  the pooled train set z-scored with pooled train statistics (its results move), the
  hospitals' models train as before (bit for bit; the federated ones read the same
  client data), and every model gets a second, named pooled test set: the pooled test
  set z-scored with the pooled train statistics."""
  import fedjax_dx.datasets as ds  # pylint: disable=g-import-not-at-top
  from configs import flamby_heart  # pylint: disable=g-import-not-at-top
  frames = {}
  for mode in ("center", "pooled"):
    config = flamby_heart.get_config()
    config.methods, config.num_seeds, config.rounds = "centralized,local", 1, 2
    config.fast_compile = False  # the module's shared program cache compiles so
    config.eval_every, config.local_steps = 2, 10
    for baseline in ("centralized", "local"):
      config.per_method[baseline].rounds = 2
      config.per_method[baseline].eval_every = 2
    config.dataset.data_dir = str(tmp_path / "data")
    config.dataset.pooled_normalization = mode
    paths = study.run_study(config, str(tmp_path / mode), quiet=True, programs=PROGRAMS)
    frames[mode] = pd.read_json(paths["metrics"], lines=True, dtype={"client": str})
  center, pooled = frames["center"], frames["pooled"]
  assert "pooled_pn" not in set(center["client"])
  named = pooled[pooled["client"] == "pooled_pn"]
  assert set(named["method"]) == {"centralized", "local_0", "local_1", "local_2",
                                  "local_3"}
  assert set(named["client_name"]) == {"Pooled Test (pooled z-scores)"}
  assert set(pooled[pooled["client"] == "pooled"]["client_name"]) == {
      "pooled (center z-scores)"}
  assert (named[named["split"] == "test"]["num_examples"] == 254).all()
  same = ["method", "seed", "round", "client", "split", "loss", "accuracy"]
  key = lambda f, method: f[(f["method"] == method) & (f["client"] != "pooled_pn")][
      same].reset_index(drop=True)
  for k in range(4):  # each hospital's own model trains on its own z-scores as before
    pd.testing.assert_frame_equal(key(center, f"local_{k}"), key(pooled, f"local_{k}"))
  assert not key(center, "centralized")["loss"].equals(key(pooled, "centralized")["loss"])
  # The second pooled test set is z-scored with the pooled train statistics.
  raw = ds.heart_disease(data_dir=str(tmp_path / "data"), normalization="none")
  train_x = np.concatenate(fdx.unstack_clients(raw.train)[0])
  test_x = np.concatenate(fdx.unstack_clients(raw.test)[0])
  sets = study.ProgramCache().pooled_sets(config)
  want = (test_x - train_x.mean(0)) / (train_x.std(0, ddof=1) + 1e-9)
  np.testing.assert_allclose(np.asarray(sets.test.features[0]), want, atol=1e-5)
  with pytest.raises(study.StudyError, match=re.escape(
      "config.dataset.pooled_normalization = 'pooled': expected center unless "
      "dataset.name = heart_disease")):
    synthetic = test_config.get_config()
    synthetic.dataset.pooled_normalization = "pooled"
    study.run_study(synthetic, str(tmp_path / "s"), quiet=True)


def test_method_notes_are_numbered_beside_their_rows_and_printed_under_the_table():
  from fedjax_dx.study import _summary  # pylint: disable=g-import-not-at-top
  summary = pd.DataFrame({
      "method": ["fedavg", "cyclic"], "client": ["pooled"] * 2,
      "client_name": ["pooled"] * 2, "accuracy_mean": [0.7, 0.6],
      "accuracy_std": [0.01, 0.02], "num_seeds": [5, 5], "diverged_seeds": [0, 0]})
  table = _summary.summary_table(summary, "accuracy", ["fedavg", "cyclic"],
                                 {"cyclic": "weight transfer as published", "x": ""})
  assert "| fedavg | 0.700 ± 0.010 |" in table
  assert "| cyclic [1] | 0.600 ± 0.020 |" in table
  assert table.rstrip().endswith("[1] cyclic: weight transfer as published")


def test_predictions_are_kept_and_recompute_the_reported_metrics(tmp_path):
  """predictions.jsonl holds each final model's output on every real test patient
  (method, seed, site, example, label, score): the reported AUC, Brier score and
  PR-AUC of each site follow from it (scikit-learn), for FedAvg and each local model."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  frame = _study_frame(tmp_path, "kept", methods="fedavg,local", num_seeds=1)
  predictions = pd.read_json(tmp_path / "kept" / "predictions.jsonl", lines=True,
                             dtype={"client": str})
  assert set(predictions["method"]) == {"fedavg", "local_0", "local_1", "local_2"}
  final = frame[(frame["split"] == "test") & (frame["round"] == frame["round"].max())]
  for (method, client), group in predictions.groupby(["method", "client"]):
    row = final[(final["method"] == method) & (final["client"] == client)].iloc[0]
    assert len(group) == row["num_examples"]
    assert list(group["example"]) == list(range(len(group)))
    assert skm.roc_auc_score(group["label"], group["score"]) == pytest.approx(
        row["auc"], abs=1e-6)
    assert skm.brier_score_loss(group["label"], group["score"]) == pytest.approx(
        row["brier"], abs=1e-6)
    assert skm.average_precision_score(group["label"], group["score"]) == pytest.approx(
        row["pr_auc"], abs=1e-6)


def test_fairness_names_the_worst_and_best_site_and_weights_by_test_patients():
  from fedjax_dx.study import _summary  # pylint: disable=g-import-not-at-top
  summary = pd.DataFrame({
      "method": ["fedavg"] * 4, "client": ["0", "1", "2", "pooled"],
      "client_name": ["Cleveland", "Hungary", "Switzerland", "pooled"],
      "num_examples_mean": [100.0, 50.0, 10.0, 160.0],
      **{f"{m}_mean": [float("nan")] * 4 for m in _summary.METRICS},
      **{f"{m}_std": [0.0] * 4 for m in _summary.METRICS}})
  summary["auc_mean"] = [0.8, 0.7, 0.5, 0.75]
  summary["loss_mean"] = [0.4, 0.5, 0.9, 0.45]
  table = _summary.fairness(summary).set_index("metric")
  assert set(table.index) == {"auc", "loss"}  # metrics defined at some site only
  auc, loss = table.loc["auc"], table.loc["loss"]
  assert (auc["worst_site"], auc["best_site"]) == ("Switzerland", "Cleveland")
  assert auc["spread"] == pytest.approx(0.3) and auc["sites"] == 3
  assert auc["weighted_mean"] == pytest.approx((80 + 35 + 5) / 160)
  assert (loss["worst_site"], loss["worst"]) == ("Switzerland", 0.9)  # higher is worse
  tied = summary.assign(method="local", auc_mean=[0.6, 0.9, 0.6, 0.7],
                        loss_mean=[0.5, float("nan"), 0.5, 0.5])
  table = _summary.fairness(pd.concat([summary, tied], ignore_index=True))
  auc, loss = (table[(table["method"] == "local") & (table["metric"] == m)].iloc[0]
               for m in ("auc", "loss"))
  assert (auc["worst_site"], auc["best_site"]) == ("Cleveland", "Hungary")  # the first
  assert (loss["worst_site"], loss["best_site"], loss["sites"]) == (
      "Cleveland", "Cleveland", 2)
  assert loss["weighted_mean"] == pytest.approx(0.5) and loss["spread"] == 0


def test_bootstrap_intervals_resample_each_sites_patients_and_pool_the_seeds(tmp_path):
  """bootstrap_resamples = 40: each final test row carries its metric on 40 resamples
  of that site's patients, exactly the AUCs of those resamples of the kept
  predictions (scikit-learn); the summary's interval pools seeds and resamples and
  the table prints it."""
  import jax  # pylint: disable=g-import-not-at-top
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _execute  # pylint: disable=g-import-not-at-top
  frame = _study_frame(tmp_path, "boot", methods="fedavg", bootstrap_resamples=40)
  final = frame[(frame["split"] == "test") & (frame["round"] == frame["round"].max())]
  assert final["bootstrap_auc"].map(len).eq(40).all()
  predictions = pd.read_json(tmp_path / "boot" / "predictions.jsonl", lines=True,
                             dtype={"client": str})
  width = int(final[final["client"] != "pooled"]["num_examples"].max())
  for seed in (0, 1):
    for client in ("0", "2"):
      site = predictions[(predictions["seed"] == seed) & (predictions["client"] == client)]
      key = jax.random.fold_in(jax.random.fold_in(
          jax.random.PRNGKey(_execute.BOOTSTRAP_KEY), seed), int(client))
      draws = np.asarray(jax.random.randint(key, (40, width), 0, len(site)))[:, :len(site)]
      want = [skm.roc_auc_score(site["label"].to_numpy()[d], site["score"].to_numpy()[d])
              if len(set(site["label"].to_numpy()[d])) == 2 else None for d in draws]
      got = final[(final["seed"] == seed) & (final["client"] == client)].iloc[0]
      np.testing.assert_allclose(
          [g for g, w in zip(got["bootstrap_auc"], want) if w is not None],
          [w for w in want if w is not None], atol=1e-5)
  summary = pd.read_csv(tmp_path / "boot" / "summary.csv", dtype={"client": str})
  pooled = summary[summary["client"] == "pooled"].iloc[0]
  samples = np.concatenate(final[final["client"] == "pooled"]["bootstrap_auc"].tolist())
  assert pooled["auc_ci_low"] == pytest.approx(np.percentile(samples, 2.5))
  assert pooled["auc_ci_high"] == pytest.approx(np.percentile(samples, 97.5))
  assert pooled["auc_ci_low"] <= pooled["auc_mean"] <= pooled["auc_ci_high"]
  table = (tmp_path / "boot" / "summary_table.md").read_text()
  assert "[95% interval over the site's test patients (bootstrap) and the seeds]" in table
  report = study.make_report(str(tmp_path / "boot"))["report"]  # reads the list columns
  _check_report(open(report).read())


def _check_report(text: str) -> None:
  """The report is valid, self-contained HTML: every image embedded in a figure with a
  caption, tables as HTML (not text in <pre>), the overview first, the environment as a
  table."""
  import html.parser  # pylint: disable=g-import-not-at-top

  class Parser(html.parser.HTMLParser):

    def __init__(self):
      super().__init__()
      self.stack, self.images, self.captions, self.tags = [], [], 0, []

    def handle_starttag(self, tag, attrs):
      self.tags.append(tag)
      if tag not in ("img", "meta", "br"):
        self.stack.append(tag)
      if tag == "img":
        self.images.append((dict(attrs)["src"], "figure" in self.stack))
      self.captions += tag == "figcaption"

    def handle_endtag(self, tag):
      assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
      self.stack.pop()

  parser = Parser()
  parser.feed(text)
  assert not parser.stack  # every element closed, in order
  assert parser.images and all(src.startswith("data:image/png;base64,") and in_figure
                               for src, in_figure in parser.images)
  assert parser.captions == len(parser.images)
  assert "pre" not in parser.tags and parser.tags.count("table") >= 3
  overview = text[text.index("<p>"):text.index("</p>")]
  assert "test patients per site: hospital 0 10" in overview and "95% interval" in overview
  assert "<th>jax</th>" in text and "{'platform'" not in text
