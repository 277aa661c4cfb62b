"""Sweep expansion: `config.sweep` -> the list of points, their ids and column names."""

from __future__ import annotations

import copy
import itertools
from typing import Any

from fedjax_dx.study._schema import StudyError, caster, set_field


def parse_sweep(config) -> list[tuple[tuple[str, ...], list[tuple]]]:
  """Parses `config.sweep` into [(fields, [value tuples]), ...], typed.

  `"dataset.alpha=0.1,0.5;rounds=10,20"` sweeps the cartesian product; fields joined
  by `+` move together, their values joined by `/`:
  `"dataset.fedprox_alpha+dataset.fedprox_beta=0/0,0.5/0.5,1/1"` is three points.
  """
  sweep = []
  for item in filter(None, (s.strip() for s in str(config.sweep).split(";"))):
    if "=" not in item:
      raise StudyError(
          f"config.sweep: {item!r} is not 'field=value1,value2' (items are separated by ';')")
    left, values = (s.strip() for s in item.split("=", 1))
    fields = tuple(f.strip() for f in left.split("+"))
    casts = [caster(config, f) for f in fields]
    points = []
    for text in filter(None, (v.strip() for v in values.split(","))):
      parts = [p.strip() for p in text.split("/")] if len(fields) > 1 else [text]
      if len(parts) != len(fields):
        raise StudyError(
            f"config.sweep: {text!r} gives {len(parts)} value(s) for the {len(fields)} "
            f"fields {'+'.join(fields)} (join them with '/')")
      try:
        points.append(tuple(cast(p) for cast, p in zip(casts, parts)))
      except ValueError as e:
        raise StudyError(f"config.sweep: cannot read {text!r} for {left}: {e}") from e
    if not points:
      raise StudyError(f"config.sweep: {left} has no values")
    sweep.append((fields, points))
  fields = [f for group, _ in sweep for f in group]
  if len(set(fields)) != len(fields):
    raise StudyError(f"config.sweep: a field is swept twice: {fields}")
  return sweep


def sweep_points(config) -> list[dict[str, Any]]:
  sweep = parse_sweep(config)
  points = []
  for combo in itertools.product(*(values for _, values in sweep)):
    point = {}
    for (fields, _), values in zip(sweep, combo):
      point.update(zip(fields, values))
    points.append(point)
  return points


def column_name(field: str, fields: list[str]) -> str:
  short = field.split(".")[-1]
  clashes = [f for f in fields if f.split(".")[-1] == short]
  return short if len(clashes) == 1 else field.replace(".", "_")


def apply_point(config, point: dict[str, Any]):
  variant = copy.deepcopy(config)
  for field, value in point.items():
    set_field(variant, field, value)
  return variant


def point_id(index: int, point: dict, seed: int) -> str:
  slug = "_".join(f"{f.split('.')[-1]}-{v}" for f, v in point.items())
  return f"{index:04d}_{slug + '_' if slug else ''}seed-{seed}"
