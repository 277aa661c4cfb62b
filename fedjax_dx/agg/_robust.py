"""Robust reducers: combine the round's updates without letting a few dominate."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fedjax_dx.agg import _functional
from fedjax_dx.agg._stage import Reducer


@dataclasses.dataclass(frozen=True)
class Median(Reducer):
  """Coordinate-wise median over the participants (Yin et al., 2018)."""

  name: ClassVar[str] = "median"

  def reduce(self, messages, weights):
    return _functional.coordinate_median(messages, weights)


@dataclasses.dataclass(frozen=True)
class TrimmedMean(Reducer):
  """Coordinate-wise mean without the `floor(f m)` extremes at each end."""

  trim_fraction: float = 0.1

  name: ClassVar[str] = "trimmed_mean"

  def __post_init__(self):
    _functional.trimmed_mean(self.trim_fraction)  # range check

  def reduce(self, messages, weights):
    return _functional.trimmed_mean(self.trim_fraction)(messages, weights)


@dataclasses.dataclass(frozen=True)
class Krum(Reducer):
  """(Multi-)Krum (Blanchard et al., 2017); needs `2 f + 3` participants a round."""

  num_byzantine: int = 1
  num_selected: int = 1

  name: ClassVar[str] = "krum"

  def __post_init__(self):
    _functional.krum(self.num_byzantine, self.num_selected)  # range check

  @property
  def min_participants(self) -> int:  # type: ignore[override]
    return 2 * self.num_byzantine + 3

  def reduce(self, messages, weights):
    return _functional.krum(self.num_byzantine, self.num_selected)(messages, weights)


def median() -> Median:
  """Coordinate-wise median of the updates (every participant alike)."""
  return Median()


def trimmed_mean(trim_fraction: float = 0.1) -> TrimmedMean:
  """Coordinate-wise trimmed mean, like `scipy.stats.trim_mean`."""
  return TrimmedMean(trim_fraction)


def krum(num_byzantine: int = 1, num_selected: int = 1) -> Krum:
  """(Multi-)Krum: the mean of the `num_selected` most central updates."""
  return Krum(num_byzantine, num_selected)


def by_name(name: str, **kwargs) -> Reducer | None:
  """The reducer of a config name ("mean" gives None: the plain weighted sum)."""
  if name == "mean":
    return None
  if name == "median":
    return median()
  if name == "trimmed_mean":
    return trimmed_mean(kwargs.get("trim_fraction", 0.1))
  if name == "krum":
    return krum(kwargs.get("num_byzantine", 1), kwargs.get("num_selected", 1))
  raise ValueError(f"aggregator must be one of {_functional.AGGREGATORS}, got {name!r}")
