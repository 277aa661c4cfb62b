"""Your own hospitals' data: a table (CSV, Parquet, a DataFrame, a TFDS data set) with a
column naming each row's hospital, turned into `FederatedData`.

Every check runs before anything is built, and an error names the file, the column and
the offending value (`TableError`).
"""

from __future__ import annotations

import difflib
import os
from typing import NamedTuple, Sequence

import numpy as np

from fedjax_dx.core import _data

MISSING_POLICIES = ("drop", "impute")
NORMALIZATIONS = ("center", "pooled", "none")
MISSING_LEVEL = "(missing)"  # the one-hot level of a missing categorical value


class TableError(ValueError):
  """A table, column or value that cannot become federated data; names which."""


class TableData(NamedTuple):
  """A table's federated data and what its rows and columns became."""
  data: _data.FederatedData  # train and test, one client per hospital (sorted names)
  client_names: list[str]  # hospital of client k (the client column's values, as text)
  class_names: list[str]  # label value of class c (survival: censored, event)
  feature_names: list[str]  # one per feature (a one-hot column: "column=level")
  notes: list[str]  # what was dropped, imputed or split, in words (the study logs them)


def _names(text: str | Sequence[str] | None) -> list[str]:
  if text is None:
    return []
  if isinstance(text, str):
    return [t.strip() for t in text.split(",") if t.strip()]
  return [str(t) for t in text]


def read_table(path: str):
  """A CSV or Parquet file as a pandas DataFrame (TableError naming the file)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  if not path:
    raise TableError("no file given (config.dataset.file: a .csv or .parquet table, one "
                     "row per patient)")
  if not os.path.isfile(path):
    raise TableError(f"{path}: no such file")
  extension = os.path.splitext(path)[1].lower()
  try:
    if extension in (".csv", ".txt", ".gz"):
      return pd.read_csv(path)
    if extension in (".parquet", ".pq"):
      return pd.read_parquet(path)
  except Exception as e:  # pylint: disable=broad-except  (parser errors of any kind)
    raise TableError(f"{path}: cannot read it as a table ({type(e).__name__}: {e})") from e
  got = extension or "no extension"
  raise TableError(f"{path}: expected a .csv or .parquet file, got {got}")


def _need_column(frame, column: str, role: str, where: str) -> None:
  if column not in frame.columns:
    close = difflib.get_close_matches(column, [str(c) for c in frame.columns], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else (
        f" (it has {', '.join(map(str, frame.columns[:12]))}"
        f"{' ...' if len(frame.columns) > 12 else ''})")
    raise TableError(f"{where}: no column {column!r} ({role}){hint}")


def _value(v) -> str:
  return repr(v.item() if hasattr(v, "item") else v)


def split_rows(labels: np.ndarray, test_fraction: float, seed: int,
               stratify: bool) -> tuple[np.ndarray, np.ndarray]:
  """Row indices (train, test) of one hospital: a seeded split, stratified by label
  when every class has two rows or more (else a plain shuffled split)."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  rows = np.arange(len(labels))
  counts = np.unique(labels, return_counts=True)[1]
  by_label = labels if stratify and counts.min() >= 2 and len(counts) > 1 else None
  train, test = model_selection.train_test_split(
      rows, test_size=test_fraction, random_state=seed, stratify=by_label)
  return np.sort(train), np.sort(test)


def from_dataframe(frame, *, client_column: str, label_column: str = "",
                   feature_columns: str | Sequence[str] | None = None,
                   categorical_columns: str | Sequence[str] | None = None,
                   classes: str | Sequence[str] | None = None,
                   missing: str = "drop", normalization: str = "center",
                   split_column: str = "", test_fraction: float = 0.25, seed: int = 0,
                   event_column: str = "", time_column: str = "",
                   where: str = "table") -> TableData:
  """Federated data from a table with one row per patient.

  Args:
    frame: a pandas DataFrame.
    client_column: the column naming each row's hospital (any values; one client per
      distinct value, in sorted order).
    label_column: the diagnosis (binary or multi-class: any values, see `classes`);
      "" for a survival table (`event_column` and `time_column`).
    feature_columns: the model's inputs ("" or None: every other column).
    categorical_columns: feature columns to one-hot encode, with levels taken over
      all hospitals (a missing value is its own level, "(missing)").
    classes: the label values in class order ("" or None: the sorted values found);
      a label outside them is an error.
    missing: what to do with a row missing a numeric feature: "drop" the row, or
      "impute" the hospital's train mean (the pooled train mean where the hospital
      has no value). A row missing its hospital, label or split is always dropped.
    normalization: z-score numeric features with each hospital's train statistics
      ("center"), the pooled train statistics ("pooled"), or not at all ("none").
    split_column: a column of "train" / "test" values ("": a seeded split of each
      hospital's rows, stratified by label, `test_fraction` of them for testing).
    test_fraction: share of each hospital's rows held out for testing.
    seed: seed of that split.
    event_column: survival: 1 = event observed, 0 = censored.
    time_column: survival: time to the event or to censoring (>= 0).
    where: what the table is called in errors (its file).

  Returns:
    A `TableData`.

  Raises:
    TableError: naming `where`, the column and the value.

  Example:
    >>> frame = pd.DataFrame({"site": ["a", "a", "b", "b"] * 4, "age": range(16),
    ...                       "sick": [0, 1] * 8})
    >>> table = from_dataframe(frame, client_column="site", label_column="sick")
    >>> table.client_names, table.data.train.num_examples.tolist()
    (['a', 'b'], [6, 6])
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  survival = bool(event_column or time_column)
  if missing not in MISSING_POLICIES:
    raise TableError(f"missing = {missing!r}: expected one of {MISSING_POLICIES}")
  if normalization not in NORMALIZATIONS:
    raise TableError(f"normalization = {normalization!r}: expected one of "
                     f"{NORMALIZATIONS}")
  if not 0 < test_fraction < 1 and not split_column:
    raise TableError(f"test_fraction = {test_fraction}: expected a share in (0, 1)")
  if survival and (label_column or not (event_column and time_column)):
    raise TableError(f"{where}: a survival table takes event_column and time_column "
                     "(both), and no label_column")
  if not survival and not label_column:
    raise TableError(f"{where}: no label column given (label_column, or event_column "
                     "and time_column for survival)")
  targets = [event_column, time_column] if survival else [label_column]
  roles = {client_column: "the hospital column", split_column: "the split column",
           **{c: "a label column" for c in targets}}
  for column, role in roles.items():
    if column:
      _need_column(frame, column, role, where)
  categorical = _names(categorical_columns)
  features = _names(feature_columns) or [
      str(c) for c in frame.columns if c not in roles and str(c) not in roles]
  for column in features + categorical:
    _need_column(frame, column, "a feature column", where)
  outside = [c for c in categorical if c not in features]
  if outside:
    raise TableError(f"{where}: categorical column {outside[0]!r} is not among the "
                     "feature columns")
  if not features:
    raise TableError(f"{where}: no feature columns (every column is the hospital, label "
                     "or split)")
  numeric = [c for c in features if c not in categorical]
  for column in numeric:
    values = frame[column]
    if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
      bad = values[pd.to_numeric(values, errors="coerce").isna() & values.notna()]
      raise TableError(
          f"{where}: column {column!r} holds non-numeric values ({_value(bad.iloc[0])} "
          "at row " f"{bad.index[0]}); list it in categorical_columns to one-hot encode "
          "it, or leave it out of feature_columns")

  notes = []
  frame = frame.reset_index(drop=True)
  required = [c for c in (client_column, split_column, *targets) if c]
  incomplete = frame[required].isna().any(axis=1)
  if incomplete.any():
    notes.append(f"{int(incomplete.sum())} rows without a hospital, label or split "
                 "dropped")
    frame = frame[~incomplete].reset_index(drop=True)
  if missing == "drop" and frame[numeric].isna().any(axis=None):
    gaps = frame[numeric].isna().any(axis=1)
    notes.append(f"{int(gaps.sum())} rows missing a numeric feature dropped "
                 "(missing = drop)")
    frame = frame[~gaps].reset_index(drop=True)
  if not len(frame):
    raise TableError(f"{where}: no rows left once rows with missing values are dropped")

  # Labels: class indices (or survival targets).
  if survival:
    events = pd.to_numeric(frame[event_column], errors="coerce")
    bad = frame[event_column][~events.isin([0, 1])]
    if len(bad):
      raise TableError(f"{where}: column {event_column!r} holds {_value(bad.iloc[0])} at "
                       f"row {bad.index[0]}; expected 1 (event observed) or 0 (censored)")
    times = pd.to_numeric(frame[time_column], errors="coerce")
    bad = frame[time_column][~(times >= 0) | ~np.isfinite(times)]
    if len(bad):
      raise TableError(f"{where}: column {time_column!r} holds {_value(bad.iloc[0])} at "
                       f"row {bad.index[0]}; expected a time >= 0")
    labels = events.to_numpy(np.int64)
    class_names = ["censored", "event"]
  else:
    text = frame[label_column].map(_label_text)
    class_names = _names(classes) or sorted(set(text), key=_label_order)
    index = {name: c for c, name in enumerate(class_names)}
    unknown = text[~text.isin(list(index))]
    if len(unknown):
      raise TableError(
          f"{where}: column {label_column!r} holds {unknown.iloc[0]!r} at row "
          f"{unknown.index[0]}, which is not one of the classes {class_names}")
    if len(class_names) < 2:
      raise TableError(f"{where}: column {label_column!r} holds one class only "
                       f"({class_names}); a diagnosis needs two or more")
    labels = text.map(index).to_numpy(np.int64)

  hospitals = frame[client_column].map(_label_text)
  client_names = sorted(set(hospitals), key=_label_order)
  if split_column:
    split = frame[split_column].map(lambda v: str(v).strip().lower())
    bad = split[~split.isin(["train", "test"])]
    if len(bad):
      raise TableError(f"{where}: column {split_column!r} holds "
                       f"{frame[split_column][bad.index[0]]!r} at row {bad.index[0]}; "
                       "expected train or test")
    is_test = (split == "test").to_numpy()
  else:
    is_test = np.zeros(len(frame), bool)
    for name in client_names:
      rows = np.flatnonzero((hospitals == name).to_numpy())
      if len(rows) < 2:
        raise TableError(f"{where}: hospital {name!r} (column {client_column!r}) has "
                         f"{len(rows)} row; it needs at least 2 to split into train and "
                         "test")
      _, test = split_rows(labels[rows], test_fraction, seed, stratify=True)
      is_test[rows[test]] = True
    notes.append(f"each hospital's rows split {1 - test_fraction:.0%} train / "
                 f"{test_fraction:.0%} test (seed {seed}, stratified by label)")

  # Features: numeric (imputed, normalized) and one-hot columns.
  columns, names = [], []
  train_rows = ~is_test
  member = {name: (hospitals == name).to_numpy() for name in client_names}
  for column in numeric:
    values = frame[column].to_numpy(np.float64)
    gaps = np.isnan(values)
    if gaps.any():  # missing == "impute"
      pooled_mean = np.nanmean(values[train_rows]) if np.any(
          train_rows & ~gaps) else 0.0
      for name, rows in member.items():
        known = rows & train_rows & ~gaps
        fill = values[known].mean() if known.any() else pooled_mean
        values[rows & gaps] = fill
      notes.append(f"{int(gaps.sum())} missing values of {column!r} imputed with the "
                   "hospital's train mean (missing = impute)")
    if normalization == "pooled":
      values = _zscore(values, values[train_rows])
    elif normalization == "center":
      for name, rows in member.items():
        values[rows] = _zscore(values[rows], values[rows & train_rows])
    columns.append(values)
    names.append(column)
  for column in categorical:
    text = frame[column].map(lambda v: MISSING_LEVEL if _is_missing(v) else _label_text(v))
    for level in sorted(set(text), key=_label_order):
      columns.append((text == level).to_numpy(np.float64))
      names.append(f"{column}={level}")
  matrix = np.stack(columns, axis=1).astype(np.float32)

  def stack(rows_of):
    parts = [np.flatnonzero(member[name] & rows_of) for name in client_names]
    if survival:
      return _data.stack_survival([matrix[p] for p in parts], [labels[p] for p in parts],
                                  [times.to_numpy(np.float64)[p] for p in parts],
                                  name=where)
    return _data.stack_clients([matrix[p] for p in parts], [labels[p] for p in parts],
                               num_classes=len(class_names), name=where)

  for name in client_names:
    for split_name, rows_of in (("train", train_rows), ("test", is_test)):
      count = int(np.sum(member[name] & rows_of))
      if count == 0:
        raise TableError(f"{where}: hospital {name!r} (column {client_column!r}) has no "
                         f"{split_name} rows")
    seen = np.unique(labels[member[name]])
    if len(seen) < 2:  # (a train split of one class happens: FLamby's Switzerland)
      what = (f"only {class_names[seen[0]]!r} rows" if survival
              else f"label {class_names[seen[0]]!r} in every row")
      raise TableError(
          f"{where}: hospital {name!r} (column {client_column!r}) has {what} (column "
          f"{targets[0]!r}); a hospital of one class cannot be scored (AUC, "
          "sensitivity): merge it with another or leave it out")
  data = _data.FederatedData(train=stack(train_rows), test=stack(is_test),
                             num_classes=len(class_names))
  return TableData(data, client_names, class_names, names, notes)


def _is_missing(v) -> bool:
  try:
    return bool(v != v) or v is None  # NaN and None
  except (TypeError, ValueError):
    return False


def _label_text(v) -> str:
  """A cell as text, with a float that holds an integer written as one (1.0 -> "1")."""
  if isinstance(v, (float, np.floating)) and float(v).is_integer():
    return str(int(v))
  if isinstance(v, (np.integer, np.bool_)):
    return str(v.item())
  return str(v)


def _label_order(text: str):
  """Numbers in numeric order, then texts in alphabetical order."""
  try:
    return (0, float(text), "")
  except ValueError:
    return (1, 0.0, text)


def _zscore(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
  if not len(reference):
    return values
  std = reference.std(ddof=1) if len(reference) > 1 else 0.0
  return (values - reference.mean()) / (std if std > 0 else 1.0)


def from_file(path: str, **kwargs) -> TableData:
  """`from_dataframe` of a CSV or Parquet file (errors name the file)."""
  return from_dataframe(read_table(path), where=path, **kwargs)


_SPLIT = "__split__"


def _class_label_names(builder, key: str) -> list[str] | None:
  feature = builder.info.features[key]
  return list(feature.names) if hasattr(feature, "names") else None


def from_tfds(name: str, *, client_feature: str, label_feature: str,
              feature_keys: str | Sequence[str] | None = None,
              data_dir: str | None = None, raw_dir: str | None = None,
              normalization: str = "center", test_fraction: float = 0.25,
              seed: int = 0, train_split: str = "train",
              test_split: str = "test") -> TableData:
  """Federated data from a tensorflow-datasets data set whose examples name their
  hospital (`client_feature`), read through `as_data_source` (no TensorFlow).

  Scalar and vector features become table columns (a vector `x` of width d: `x[0]` ..
  `x[d-1]`) and go through `from_dataframe` (normalization, checks); one image feature
  (rank >= 2) is kept in its shape, scaled to [0, 1] when stored as integers. The
  data set's `test_split` is the test set when it has one, else a seeded stratified
  split of each hospital's training rows.

  Args:
    name: the TFDS name (`fed_heart_disease/raw`, `medmnist/pneumoniamnist`, ...).
    client_feature: the feature naming each example's hospital.
    label_feature: the class label feature.
    feature_keys: the features the model reads ("" or None: every other feature).
    data_dir: where TFDS keeps prepared data sets (None: fedjax_dx's cache).
    raw_dir: the project's own builders: their raw files (manual_dir).
    normalization, test_fraction, seed: as in `from_dataframe`.
    train_split, test_split: the splits to read.

  Returns:
    A `TableData`.
  """
  import pandas as pd  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from fedjax_dx.datasets import _builders  # pylint: disable=g-import-not-at-top,unused-import
  from fedjax_dx.datasets import _loaders  # pylint: disable=g-import-not-at-top
  where = f"tfds {name}"
  own = name.split("/")[0] in ("fed_heart_disease", "fed_tcga_brca", "medmnist")
  try:
    if own:
      builder = _loaders._prepare(name, data_dir, raw_dir)  # pylint: disable=protected-access
    else:
      builder = tfds.builder(name, data_dir=data_dir or _loaders.default_data_dir())
      builder.download_and_prepare(file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except  (unknown name, no network, ...)
    raise TableError(f"{where}: cannot prepare it ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from e
  known = list(builder.info.features.keys())
  for key, role in ((client_feature, "the hospital feature"),
                    (label_feature, "the label feature")):
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      raise TableError(f"{where}: no feature {key!r} ({role}); it has {', '.join(known)}"
                       + (f"; did you mean {close[0]!r}?" if close else ""))
  keys = _names(feature_keys) or [k for k in known if k not in (client_feature,
                                                                  label_feature)]
  for key in keys:
    if key not in known:
      raise TableError(f"{where}: no feature {key!r} (a feature column); it has "
                       f"{', '.join(known)}")
  splits = [train_split] + ([test_split] if test_split in builder.info.splits else [])
  wanted = (client_feature, label_feature, *keys)
  parts = {s: _loaders._read_split(builder, s, wanted) for s in splits}  # pylint: disable=protected-access
  client_names = _class_label_names(builder, client_feature)
  class_names = _class_label_names(builder, label_feature)

  def column(values, names):
    return [names[int(v)] if names else v for v in values]

  images = [k for k in keys if parts[train_split][k].ndim >= 3]
  if images:
    if len(keys) != 1:
      raise TableError(f"{where}: an image feature ({images[0]!r}) must be the only "
                       f"feature, got {keys}")
    return _image_data(parts, splits, images[0], client_feature, label_feature,
                       client_names, class_names, test_fraction, seed, where)
  columns = {}
  for key in keys:
    values = parts[train_split][key]
    columns.update({f"{key}[{i}]" if values.ndim == 2 else key: None
                    for i in range(values.shape[1] if values.ndim == 2 else 1)})
  frames = []
  for split in splits:
    arrays = parts[split]
    table = {_SPLIT: "train" if split == train_split else "test",
             client_feature: column(arrays[client_feature], client_names),
             label_feature: column(arrays[label_feature], class_names)}
    for key in keys:
      values = np.asarray(arrays[key], np.float64)
      if values.ndim == 2:
        table.update({f"{key}[{i}]": values[:, i] for i in range(values.shape[1])})
      else:
        table[key] = values
    frames.append(pd.DataFrame(table))
  frame = pd.concat(frames, ignore_index=True)
  return from_dataframe(
      frame, client_column=client_feature, label_column=label_feature,
      feature_columns=list(columns), classes=class_names, normalization=normalization,
      split_column=_SPLIT if len(splits) == 2 else "", test_fraction=test_fraction,
      seed=seed, where=where)


def _image_data(parts, splits, key, client_feature, label_feature, client_names,
                class_names, test_fraction, seed, where) -> TableData:
  """An image data set's federated data: the images in their shape, per hospital."""
  train_split = splits[0]
  clients = sorted({int(v) for v in parts[train_split][client_feature]})
  num_classes = len(class_names) if class_names else int(
      max(int(parts[s][label_feature].max()) for s in splits) + 1)

  def scaled(x):
    x = np.asarray(x)
    return (x / 255.0 if np.issubdtype(x.dtype, np.integer) else x).astype(np.float32)

  per_split = {"train": ([], []), "test": ([], [])}
  notes = []
  for client in clients:
    rows = {s: np.flatnonzero(parts[s][client_feature] == client) for s in splits}
    train_rows, labels = rows[train_split], parts[train_split][label_feature]
    if len(splits) == 2:
      chosen = {"train": (train_split, train_rows), "test": (splits[1], rows[splits[1]])}
    else:
      train, test = split_rows(labels[train_rows], test_fraction, seed, stratify=True)
      chosen = {"train": (train_split, train_rows[train]),
                "test": (train_split, train_rows[test])}
    for part, (split, index) in chosen.items():
      name = client_names[client] if client_names else str(client)
      if not len(index):
        raise TableError(f"{where}: hospital {name!r} (feature {client_feature!r}) has "
                         f"no {part} examples")
      per_split[part][0].append(scaled(parts[split][key][index]))
      per_split[part][1].append(parts[split][label_feature][index].astype(np.int64))
  if len(splits) == 1:
    notes.append(f"each hospital's examples split {1 - test_fraction:.0%} train / "
                 f"{test_fraction:.0%} test (seed {seed}, stratified by label)")
  data = _data.FederatedData(
      train=_data.stack_clients(*per_split["train"], num_classes=num_classes, name=where),
      test=_data.stack_clients(*per_split["test"], num_classes=num_classes, name=where),
      num_classes=num_classes)
  names = [client_names[c] if client_names else str(c) for c in clients]
  return TableData(data, names, class_names or [f"class {c}" for c in range(num_classes)],
                   [key], notes)


def from_loader(spec: str, dataset_config) -> TableData:
  """`module:function` called with the study's `config.dataset`; it returns
  `FederatedData`, or `(FederatedData, client_names)`, or a `TableData`."""
  import importlib  # pylint: disable=g-import-not-at-top
  module_name, _, function_name = spec.partition(":")
  where = f"config.dataset.loader = {spec!r}"
  if not module_name or not function_name:
    raise TableError(f"{where}: expected 'module:function' (e.g. "
                     "'my_project.data:load_hospitals')")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise TableError(f"{where}: cannot import {module_name!r} ({e}); is it on "
                     "PYTHONPATH?") from e
  function = getattr(module, function_name, None)
  if not callable(function):
    raise TableError(f"{where}: {module_name} has no function {function_name!r}")
  result = function(dataset_config)
  if isinstance(result, TableData):
    return result
  names = None
  if isinstance(result, tuple) and len(result) == 2:
    result, names = result
  if not isinstance(result, _data.FederatedData):
    raise TableError(f"{where}: returned {type(result).__name__}; expected "
                     "FederatedData (or (FederatedData, client_names))")
  num_clients = result.num_clients
  names = [str(n) for n in names] if names is not None else [
      f"client {k}" for k in range(num_clients)]
  if len(names) != num_clients:
    raise TableError(f"{where}: returned {len(names)} client names for {num_clients} "
                     "clients")
  classes = ["censored", "event"] if _data.is_survival(result.train) else [
      f"class {c}" for c in range(result.num_classes)]
  return TableData(result, names, classes, [], [])
