"""Final models of a study, saved in its workdir, and loaded back to evaluate new data.

Layout (one pair per point, seed and method; `local` gives one model per hospital):

  DIR/models/<point_id>/<method>.npz   the parameters, one array per tree path
                                       ("Dense_0/kernel"), float32 as trained
  DIR/models/<point_id>/<method>.json  {"method", "seed", "point", "model": the config's
                                       model fields + num_classes, "feature_shape",
                                       "tree": {path: [shape, dtype]}, "client_names",
                                       "class_names", "note"}

`point_id` is the resume record's name (`0000_seed-0`: sweep point 0, seed 0). The models
take features prepared as the study prepared them (own tables: z-scored with the
training statistics of `dataset.normalization`, categories one-hot).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

from fedjax_dx.study._schema import StudyError
from fedjax_dx.study._storage import write_atomic

MODEL_NOTES = {
    "fedavg_ft": "the global FedAvg model; each hospital's fine-tuned model is this one "
                 "after config.fine_tune_steps local steps on its own data",
    "local": "trained on hospital {k} alone",
}


def _flatten(params, prefix: str = "") -> dict[str, np.ndarray]:
  if isinstance(params, dict):
    flat = {}
    for key, value in params.items():
      if "/" in str(key):
        raise ValueError(f"parameter name {key!r} holds '/' (the path separator)")
      flat.update(_flatten(value, f"{prefix}{key}/"))
    return flat
  if isinstance(params, (list, tuple)):
    raise ValueError("saved models take nested dicts of arrays (Flax parameters), got a "
                     f"{type(params).__name__} at {prefix or 'the root'}")
  return {prefix[:-1]: np.asarray(params)}


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def save_models(workdir: str, point_id: str, models: dict[str, Any], info: dict) -> None:
  """Writes each `{name: params}` of one (point, seed) with its JSON description."""
  directory = os.path.join(workdir, "models", point_id)
  for name, params in models.items():
    flat = _flatten(params)
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    write_atomic(os.path.join(directory, f"{name}.npz"), buffer.getvalue())
    note = MODEL_NOTES.get(name.split("_")[0] if name.startswith("local_") else name, "")
    record = dict(info, method=name,
                  tree={p: [list(v.shape), str(v.dtype)] for p, v in flat.items()},
                  note=note.format(k=name.split("_")[-1]))
    write_atomic(os.path.join(directory, f"{name}.json"), json.dumps(record, indent=2))


def saved_models(workdir: str) -> list[dict]:
  """The JSON records of every saved model of a workdir (with `path` of its .npz)."""
  root = os.path.join(workdir, "models")
  records = []
  for point_id in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    for name in sorted(os.listdir(os.path.join(root, point_id))):
      if name.endswith(".json"):
        with open(os.path.join(root, point_id, name)) as f:
          record = json.load(f)
        record["path"] = os.path.join(root, point_id, name[:-5] + ".npz")
        records.append(record)
  return records


def load_model(workdir: str, method: str, seed: int | None = None, point: int = 0):
  """A saved final model of a study: `(Model, params)`.

  Args:
    workdir: the study's workdir.
    method: the method's name (`fedavg`, `centralized`, `local_2`, ...).
    seed: which seed's model (default: the study's first seed).
    point: the sweep point's index (0 without a sweep).

  Returns:
    The `fdx.Model` (its config rebuilt) and its parameters (NumPy arrays).

  Raises:
    StudyError: naming the workdir, method, seed or point that has no saved model.

  Example:
    >>> model, params = study.load_model("results/heart_disease", "fedavg", seed=0)
    >>> fdx.evaluate(model, params, new_data.test)["pooled"]["auc"]
  """
  from fedjax_dx.study import _build  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  records = saved_models(workdir)
  if not records:
    raise StudyError(f"{workdir}: no saved models (models/ is written by a study that "
                     "finished at least one seed)")
  matching = [r for r in records if r["method"] == method and r["point_index"] == point]
  if not matching:
    methods = sorted({r["method"] for r in records})
    raise StudyError(f"{workdir}: no saved model of method {method!r} at point {point}; "
                     f"saved: {', '.join(methods)}")
  seeds = sorted(r["seed"] for r in matching)
  seed = seeds[0] if seed is None else seed
  chosen = [r for r in matching if r["seed"] == seed]
  if not chosen:
    raise StudyError(f"{workdir}: {method} has no saved model of seed {seed}; saved "
                     f"seeds: {seeds}")
  record = chosen[0]
  with np.load(record["path"]) as arrays:
    params = _unflatten({path: arrays[path] for path in record["tree"]})
  model_config = ml_collections.ConfigDict({"model": record["model"]})
  model = _build.build_model(model_config, record["model"]["num_classes"])
  return model, params
