"""Own data in a study (tables, TFDS by name, a loader), the notebook path (`Study`,
figures without global state, reprs, progress), saved models and typed results."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import fedjax_dx as fdx
from fedjax_dx import datasets as ds
from fedjax_dx import study
from fedjax_dx.study import _execute

from tests.conftest import ROOT
from tests.conftest import TEST_CACHE


def _frame():
  """Two hospitals, 8 patients each: a numeric feature with a gap, a categorical one,
  text labels and a split column (2 test rows per hospital)."""
  return pd.DataFrame({
      "site": ["north"] * 8 + ["south"] * 8,
      "age": [50.0, 60, 70, np.nan, 40, 45, 55, 65,
              30.0, 35, 40, 45, 50, 55, 60, 65],
      "smoker": ["yes", "no", "no", "yes", None, "no", "yes", "no",
                 "no", "no", "yes", "yes", "no", "yes", "no", "no"],
      "outcome": ["sick", "well", "sick", "well", "sick", "well", "sick", "well",
                  "well", "sick", "well", "sick", "well", "sick", "well", "sick"],
      "part": ["train"] * 6 + ["test"] * 2 + ["train"] * 6 + ["test"] * 2,
  })


def test_a_table_becomes_federated_data_exactly():
  """Imputation with the hospital's train mean, z-scores with the hospital's train
  statistics, one-hot levels over all hospitals (a missing category is its own
  level), classes in the given order, the split column: every number by hand."""
  table = ds.from_dataframe(_frame(), client_column="site", label_column="outcome",
                            classes="well,sick", categorical_columns="smoker",
                            missing="impute", split_column="part")
  assert table.client_names == ["north", "south"]
  assert table.class_names == ["well", "sick"]
  assert table.feature_names == ["age", "smoker=(missing)", "smoker=no", "smoker=yes"]
  train, test = table.data.train, table.data.test
  assert train.num_examples.tolist() == [6, 6] and test.num_examples.tolist() == [2, 2]
  north_age = np.array([50.0, 60, 70, 53, 40, 45, 55, 65])  # gap -> train mean 53
  mean, std = north_age[:6].mean(), north_age[:6].std(ddof=1)
  np.testing.assert_allclose(train.features[0, :, 0], (north_age[:6] - mean) / std,
                             rtol=1e-6)
  np.testing.assert_allclose(test.features[0, :2, 0], (north_age[6:] - mean) / std,
                             rtol=1e-6)
  np.testing.assert_array_equal(train.features[0, :, 1:], [
      [0, 0, 1], [0, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]])
  np.testing.assert_array_equal(train.labels[0], [1, 0, 1, 0, 1, 0])
  assert any("imputed" in note for note in table.notes)
  # The same table with rows missing a number dropped instead.
  dropped = ds.from_dataframe(_frame(), client_column="site", label_column="outcome",
                              categorical_columns="smoker", split_column="part",
                              normalization="none")
  assert dropped.data.train.num_examples.tolist() == [5, 6]
  assert dropped.class_names == ["sick", "well"]  # sorted when not given


def test_a_seeded_stratified_split_per_hospital():
  frame = _frame().drop(columns="part")
  one = ds.from_dataframe(frame, client_column="site", label_column="outcome",
                          categorical_columns="smoker", missing="impute",
                          test_fraction=0.25, seed=3)
  again = ds.from_dataframe(frame, client_column="site", label_column="outcome",
                            categorical_columns="smoker", missing="impute",
                            test_fraction=0.25, seed=3)
  np.testing.assert_array_equal(one.data.test.features, again.data.test.features)
  assert one.data.test.num_examples.tolist() == [2, 2]
  for k in range(2):  # stratified: one of each class in every hospital's test rows
    assert sorted(np.asarray(one.data.test.labels[k, :2]).tolist()) == [0, 1]


@pytest.mark.parametrize("change,message", [
    (dict(file="missing.csv"), "missing.csv: no such file"),
    (dict(client_column="hospital"), "no column 'hospital' (the hospital column)"),
    (dict(label_column="outcom"), "no column 'outcom' (a label column); did you mean "
     "'outcome'?"),
    (dict(categorical_columns=""), "column 'smoker' holds non-numeric values ('yes' at "
     "row 0)"),
    (dict(classes="well,ill"), "column 'outcome' holds 'sick' at row 0, which is not one "
     "of the classes ['well', 'ill']"),
    (dict(rows=lambda f: f.assign(outcome=np.where(f.site == "south", "well",
                                                   f.outcome))),
     "hospital 'south' (column 'site') has label 'well' in every row"),
    (dict(rows=lambda f: f.assign(part=f.part.replace("test", "tst"))),
     "column 'part' holds 'tst' at row 6; expected train or test"),
])
def test_bad_tables_name_the_file_column_and_value(tmp_path, change, message):
  frame = change.pop("rows", lambda f: f)(_frame())
  path = tmp_path / "hospitals.csv"
  frame.to_csv(path, index=False)
  kwargs = dict(client_column="site", label_column="outcome", categorical_columns="smoker",
                split_column="part", missing="impute")
  file = str(tmp_path / change.pop("file")) if "file" in change else str(path)
  kwargs.update(change)
  with pytest.raises(ds.TableError) as error:
    ds.from_file(file, **kwargs)
  assert message in str(error.value)
  assert str(tmp_path) in str(error.value)  # names the file


def _csv_config(path, **dataset):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.methods = "fedavg,local"
  config.num_seeds = 1
  config.rounds = 2
  config.eval_every = 2
  config.local_steps = 2
  config.batch_size = 2
  config.membership_audit = False
  config.dataset.name = "csv"
  config.dataset.file = str(path)
  config.dataset.client_column = "site"
  config.dataset.label_column = "outcome"
  config.dataset.categorical_columns = "smoker"
  config.dataset.missing = "impute"
  config.dataset.split_column = "part"
  config.dataset.update(dataset)
  return config


def test_a_study_refuses_bad_own_data_before_writing(tmp_path):
  """Errors of the study's own checks: one line naming the file and the hospital or
  field, and no workdir left behind."""
  path = tmp_path / "hospitals.csv"
  _frame().to_csv(path, index=False)
  workdir = tmp_path / "study"
  config = _csv_config(path)
  config.batch_size = 7
  with pytest.raises(study.StudyError, match=r"hospitals.csv\): hospital 'north' "
                     r"\(column 'site'\) has 6 training rows, fewer than "
                     r"config.batch_size = 7 \(fedavg\)"):
    study.run(config, str(workdir), quiet=True)
  assert not workdir.exists()
  config = _csv_config(path, label_column="result")
  with pytest.raises(study.StudyError, match="config.dataset \\(csv\\): .*hospitals.csv: "
                     "no column 'result'"):
    study.run(config, str(workdir), quiet=True)
  assert not workdir.exists()
  config = _csv_config(tmp_path / "gone.csv")
  with pytest.raises(study.StudyError, match="config.dataset.file = .*gone.csv'?: "
                     "expected an existing file"):
    study.check_config(config)


def test_study_on_a_csv_typed_results_saved_models_and_figures(tmp_path):
  """A study on a CSV through the notebook API: `Study`'s DataFrames (client a string
  column everywhere; the Parquet copy equals the JSON lines), saved final models that
  reproduce the study's metrics when loaded, and figures drawn without touching
  global matplotlib or seaborn state."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  path = tmp_path / "hospitals.csv"
  _frame().to_csv(path, index=False)
  result = study.run(_csv_config(path), str(tmp_path / "study"), quiet=True)
  metrics = result.metrics
  assert metrics["client"].map(type).eq(str).all()
  assert set(metrics["client"]) == {"0", "1", "pooled"}
  from_json = pd.read_json(tmp_path / "study" / "metrics.jsonl", lines=True,
                           dtype={"client": str})
  pd.testing.assert_frame_equal(from_json[["method", "client", "round", "auc"]],
                                metrics[["method", "client", "round", "auc"]])
  assert "north" in repr(result) or "fedavg" in repr(result)
  assert list(result.table().columns) == ["north", "south", "pooled"]

  records = result.models
  assert sorted(records["method"]) == ["fedavg", "local_0", "local_1"]
  data = ds.from_file(str(path), client_column="site", label_column="outcome",
                      categorical_columns="smoker", split_column="part",
                      missing="impute")
  for method in ("fedavg", "local_1"):
    model, params = result.load_model(method, seed=0)
    table = fdx.metrics_table(fdx.evaluate(model, params, data.data.test),
                              data.client_names)
    final = metrics[(metrics["method"] == method) & (metrics["split"] == "test")
                    & (metrics["round"] == 2)].set_index("client")
    np.testing.assert_allclose(table.loc["pooled", "loss"], final.loc["pooled", "loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(table.loc["south", "loss"], final.loc["1", "loss"],
                               rtol=1e-5)
  with pytest.raises(study.StudyError, match="no saved model of method 'scaffold'"):
    result.load_model("scaffold")
  saved = json.loads((tmp_path / "study" / "models" / "0000_seed-0" /
                      "fedavg.json").read_text())
  assert saved["model"]["name"] == "logistic_regression"
  assert saved["client_names"] == ["north", "south"]

  matplotlib.use("svg")  # a user's backend and style, which the figures must not change
  matplotlib.rcParams["axes.facecolor"] = "#123456"
  before = dict(matplotlib.rcParams)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figures = result.figures()
  assert {"convergence", "comparison", "clinical", "labels"} <= set(figures)
  assert all(isinstance(f, matplotlib.figure.Figure) for f in figures.values())
  assert matplotlib.get_backend() == "svg" and dict(matplotlib.rcParams) == before
  assert plt.get_fignums() == []  # no figure registered with pyplot
  # Seaborn's whitegrid style inside the figures, not the user's face colour.
  assert figures["convergence"].axes[0].get_facecolor()[:3] == (1.0, 1.0, 1.0)
  assert not list((tmp_path / "study").glob("*.png"))  # figures() writes nothing


def tiny_loader(dataset_config):
  """A `module:function` data set: 3 synthetic hospitals and their names."""
  del dataset_config
  data = fdx.synthetic_binary(seed=1, num_clients=3, examples_per_client=30)
  return data, ["a", "b", "c"]


def test_a_loader_function_feeds_a_study(tmp_path):
  config = _csv_config("", loader=f"{__name__}:tiny_loader")
  config.dataset.name = "loader"
  config.bucket_clients = True  # 3 hospitals padded to 4: the padding is no hospital
  result = study.run(config, str(tmp_path / "study"), quiet=True)
  assert list(result.table().columns) == ["a", "b", "c", "pooled"]
  config.dataset.loader = f"{__name__}:no_such_function"
  with pytest.raises(study.StudyError, match="has no function 'no_such_function'"):
    study.run(config, str(tmp_path / "other"), quiet=True)


def test_tfds_by_name_equals_the_built_in_data_set(tmp_path):
  """Any TFDS data set with a feature naming the hospital: Fed-Heart-Disease's raw
  builder through `from_tfds`, z-scored per hospital, equals the built-in loader."""
  table = ds.from_tfds("fed_heart_disease/raw", client_feature="center",
                       label_feature="label", feature_keys="features",
                       data_dir=str(tmp_path))
  built_in = ds.heart_disease(data_dir=str(tmp_path))
  assert table.client_names == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
  assert table.class_names == ["no disease", "disease"]
  np.testing.assert_allclose(table.data.train.features, built_in.train.features,
                             atol=1e-5)
  np.testing.assert_array_equal(table.data.test.labels, built_in.test.labels)
  with pytest.raises(ds.TableError, match="no feature 'centre' .*did you mean 'center'"):
    ds.from_tfds("fed_heart_disease/raw", client_feature="centre", label_feature="label",
                 data_dir=str(tmp_path))


def test_reprs_are_short_and_say_what_matters():
  data = fdx.synthetic_binary(seed=0, num_clients=4, examples_per_client=50)
  text = repr(data)
  assert len(text) < 600 and text.count("\n") == 2
  assert "4 clients" in text and "2 classes" in text and "per client" in text
  assert "classes 0:" in text
  assert repr(data.train).startswith("ClientData(4 clients, ")


def test_progress_in_a_log_has_a_number_or_no_eta(caplog):
  progress = _execute.Progress(total_rounds=20, quiet=False)
  assert progress.bar is None  # no terminal here: log lines
  with caplog.at_level(logging.INFO):
    progress.advance(0, "fedavg compiling")
    for _ in range(4):
      progress.advance(5, "fedavg")
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 4 and "20/20" in lines[-1]
  assert not any("nan" in line.lower() for line in lines)


def _fedjax_dx(venv_bin: str, *args, cwd, env=None):
  return subprocess.run([os.path.join(venv_bin, "fedjax-dx"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, **(env or {})})


def test_console_command_lists_and_resolves_configs_by_name(tmp_path):
  """`fedjax-dx` of this environment, from another directory: the ready-made configs
  by name; a name that is none of them is one line listing them (the wheel test below
  runs a study through the command)."""
  bin_dir = os.path.dirname(sys.executable)
  listing = _fedjax_dx(bin_dir, "configs", cwd=tmp_path)
  assert listing.returncode == 0 and "own_data" in listing.stdout
  assert "heart_disease" in listing.stdout
  wrong = _fedjax_dx(bin_dir, "run", "--config=heart_diseas", "--workdir=x", cwd=tmp_path)
  assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
  assert ("--config=heart_diseas: no such file, nor a ready-made config's name"
          in wrong.stderr) and "heart_disease" in wrong.stderr
  usage = _fedjax_dx(bin_dir, "frobnicate", cwd=tmp_path)
  assert usage.returncode == 2 and "unknown command 'frobnicate'" in usage.stderr


def test_the_wheel_installs_and_runs_without_the_clone(tmp_path):
  """The built wheel holds fedjax_dx (with its configs) and no top-level `configs` or
  `benchmarks`; installed into a scratch environment whose other packages come from
  this one, its console command runs a ready-made config from another directory."""
  import sysconfig  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  dist = tmp_path / "dist"
  build = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
       "--disable-pip-version-check", "-q", "-w", str(dist), str(ROOT)],
      capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert build.returncode == 0, build.stderr
  (wheel,) = dist.glob("fedjax_dx-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert {n.split("/")[0] for n in names} == {"fedjax_dx", wheel.name.split("-py")[0]
                                              + ".dist-info"}
  assert "fedjax_dx/configs/heart_disease.py" in names
  assert "fedjax_dx/cli/_run.py" in names

  env_dir = tmp_path / "env"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)],
                 check=True, timeout=120)
  python = env_dir / "bin" / "python"
  site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                         "get_paths()['purelib'])"], capture_output=True, text=True,
                        check=True).stdout.strip()
  # This environment's packages (jax, ...) but not its editable fedjax_dx: a path
  # listed in a .pth file is added without running the .pth files inside it.
  with open(os.path.join(site, "dependencies.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  install = subprocess.run(
      [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
       "--disable-pip-version-check", "-q", str(wheel)],
      capture_output=True, text=True, timeout=600)
  assert install.returncode == 0, install.stderr
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {"PYTHONPATH": ""}
  probe = subprocess.run(
      [str(python), "-c", "import fedjax_dx, importlib.util as u; print(fedjax_dx.__file__);"
       "print(u.find_spec('configs'), u.find_spec('benchmarks'))"],
      capture_output=True, text=True, cwd=elsewhere, env={**os.environ, **env})
  assert probe.stdout.splitlines() == [
      os.path.join(site, "fedjax_dx", "__init__.py"), "None None"], probe.stderr
  # The suite's cache and program store: the installed package's source is the clone's,
  # so a rerun of the suite loads this study's programs as the clone's studies do.
  result = _fedjax_dx(str(env_dir / "bin"), "run", "--config=test", "--workdir=out",
                      "--quiet", "--config.num_seeds=1", "--config.rounds=2",
                      f"--compilation_cache={TEST_CACHE}", cwd=elsewhere, env=env)
  assert result.returncode == 0, result.stderr
  assert (elsewhere / "out" / "report.html").is_file()
  assert (elsewhere / "out" / "models" / "0000_seed-0" / "fedavg.npz").is_file()


def test_the_example_notebook_runs(tmp_path):
  """examples/own_data.ipynb, executed in a fresh kernel (nbclient): no error, the
  figures shown, the saved model's table printed."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(ROOT / "examples" / "own_data.ipynb", as_version=4)
  assert not any(cell.get("outputs") for cell in notebook.cells
                 if cell.cell_type == "code")  # committed without outputs
  # The kernel's studies use the suite's program store, as the in-process ones do
  # (conftest): a rerun loads their programs (the notebook itself is unchanged).
  store = (f"--IPKernelApp.exec_lines=import fedjax_dx.study; "
           f"fedjax_dx.study.enable_compilation_cache({TEST_CACHE!r})")
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          extra_arguments=[store] if TEST_CACHE else [],
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
  assert any("fedavg" in o.get("data", {}).get("text/html", "") for o in outputs)
  assert (tmp_path / "results" / "own_data" / "models").is_dir()
