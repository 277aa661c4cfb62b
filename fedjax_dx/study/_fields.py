"""The study's method fields in one table: type, range, per-method, compile key.

Every field a method reads is declared once here, with what it must hold and whether it
may be overridden per method (`config.per_method.<method>.<field>`) and whether it
changes a compiled program (then it is part of the compile key, so two runs that differ
in it never share a program). `METHOD_FIELDS`, `COMPILE_FIELDS` and the range checks
are derived from the table; checks that relate several fields are the rules in
`check_method_fields`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from fedjax_dx.agg import _codecs
from fedjax_dx.core import _sampling


class Field(NamedTuple):
  """One config field a method reads."""

  name: str  # attribute of the (per-method) config
  kind: type  # int, float, str or bool (int is accepted where float is declared)
  valid: Callable[[Any], bool] | None  # the range check, None for none
  expected: str  # what the error says the field must be
  per_method: bool = True  # may be overridden in config.per_method.<method>
  compiled: bool = True  # part of the compile key (changes the compiled program)
  default: Any = None  # its value in the default study (configs/heart_disease.py)


def _in(*choices):
  return lambda v: v in choices


def _between(low, high, *, low_open=False, high_open=False):
  def check(v):
    return ((v > low if low_open else v >= low) and (v < high if high_open else v <= high))
  return check


_positive = lambda v: v > 0
_non_negative = lambda v: v >= 0
_unit = _between(0, 1, high_open=True)

FIELDS: tuple[Field, ...] = (
    Field("model", object, None, "", per_method=False),
    Field("optimizer", str, _in("sgd", "adam"), "sgd or adam", default="sgd"),
    Field("learning_rate", float, _positive, "a number > 0", default=0.05),
    Field("momentum", float, _unit, "a number in [0, 1)", default=0.0),
    Field("server_learning_rate", float, _positive, "a number > 0", default=1.0),
    Field("server_momentum", float, _unit, "a number in [0, 1)", default=0.9),
    Field("mu", float, _non_negative, "a number >= 0 (FedProx)", default=0.01),
    Field("fedopt_learning_rate", float, _positive, "a number > 0", default=0.01),
    Field("fedopt_b1", float, _unit, "a number in [0, 1)", default=0.9),
    Field("fedopt_b2", float, _unit, "a number in [0, 1)", default=0.999),
    Field("fedopt_tau", float, _positive, "a number > 0", default=1e-08),
    Field("fedopt_form", str, _in("paper", "flamby", "bias_corrected"),
          "paper, flamby or bias_corrected", default="paper"),
    Field("scaffold_form", str, _in("paper", "flamby"), "paper or flamby",
          default="paper"),
    Field("aggregator", str, _in("mean", "median", "trimmed_mean", "krum"),
          "mean, median, trimmed_mean or krum", default="mean"),
    Field("trim_fraction", float, _between(0, 0.5, high_open=True), "a number in [0, 0.5)",
          default=0.1),
    Field("num_byzantine", int, _non_negative, "an integer >= 0", default=1),
    Field("clients_per_round", int, _non_negative, "an integer >= 0 (0 = all)",
          default=0),
    Field("sampling", str, _in("auto", *_sampling.SAMPLINGS),
          "auto, uniform, size or poisson", default="auto"),
    Field("batch_size", int, lambda v: v >= 1, "an integer >= 1", default=4),
    Field("local_steps", int, None, "", default=20),
    Field("local_epochs", int, None, "", default=0),
    Field("rounds", int, lambda v: v >= 1, "an integer >= 1", compiled=False, default=30),
    Field("eval_every", int, lambda v: v >= 1, "an integer >= 1", compiled=False,
          default=5),
    Field("stragglers", float, _between(0, 1), "a share of participants in [0, 1]",
          default=0.0),
    Field("straggler_policy", str, _in("paper", "drop", "keep"),
          "paper (fedprox keeps stragglers' partial work, other strategies drop it), "
          "drop or keep", default="paper"),
    Field("fine_tune_steps", int, None, "", default=10),
    Field("client_chunk", int, lambda v: v >= -1,
          "0 (all clients at once), -1 (chosen from device memory) or a group size >= 1",
          default=0),
    Field("dp", str, _in("none", "central", "local", "example"),
          "none, central, local (client level) or example (DP-SGD)", default="none"),
    Field("dp_clip", float, None, "", default=1.0),
    Field("dp_noise", float, None, "", default=1.0),
    Field("dp_target_epsilon", float, None, "", compiled=False, default=0.0),
    Field("dp_batches", str, _in("poisson", "shuffle"), "poisson or shuffle",
          default="poisson"),
    Field("dp_budget", float, _non_negative, "an epsilon >= 0 (0: no budget)",
          compiled=False, default=0.0),
    Field("privacy_audit", bool, None, "", default=False),
    Field("audit_canaries", int, lambda v: v >= 2, "an integer >= 2", default=100),
    Field("audit_significance", float, _between(0, 0.5, low_open=True, high_open=True),
          "a number in (0, 0.5)", compiled=False, default=0.05),
    Field("dp_delta", float, None, "", compiled=False, default=1e-05),
    Field("dp_accountant", str, None, "", compiled=False, default="rdp"),
    Field("dp_adaptive_quantile", float, None, "", default=0.0),
    Field("dp_clip_learning_rate", float, None, "", default=0.2),
    Field("dp_count_noise", float, None, "", default=0.0),
    Field("compression", str, _in(*_codecs.COMPRESSIONS), "none, quantize or topk",
          default="none"),
    Field("compression_bits", int, _in(*_codecs.QUANTIZE_BITS),
          f"one of {_codecs.QUANTIZE_BITS}", default=8),
    Field("topk_fraction", float, _between(0, 1, low_open=True), "a share in (0, 1]",
          default=0.01),
    Field("error_feedback", bool, None, "", default=True),
    Field("secure_aggregation", bool, None, "", default=False),
    Field("secagg_bits", int, _between(8, 32), "an integer in [8, 32]", default=32),
    Field("secagg_bound", float, _non_negative,
          "a coordinate bound > 0 (or 0: dp_clip with client-level DP, else 1)",
          default=0.0),
    Field("secagg_dropout", float, None, "", default=0.0),
    Field("secagg_tolerance", float, _unit, "a share in [0, 1)", default=0.3),
    Field("guard", float, lambda v: v == 0 or v >= 1,
          "0 (off) or a multiple >= 1 of the round's median update norm (updates that "
          "are not finite or above it are dropped)", default=0.0),
    Field("drop_nonfinite", bool, None, "", default=True),
)

METHOD_FIELDS = tuple(f.name for f in FIELDS if f.per_method)
DEFAULTS = {f.name: f.default for f in FIELDS if f.kind is not object}
COMPILE_FIELDS = tuple(f.name for f in FIELDS if f.compiled)
_BY_NAME = {f.name: f for f in FIELDS}


def _type_ok(field: Field, value) -> bool:
  if field.kind is object:
    return True
  if field.kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if field.kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, field.kind)


def check_table(config, need: Callable[[bool, str, str], None]) -> None:
  """The per-field checks of the table (type, then range), in table order."""
  for field in FIELDS:
    if field.kind is object:
      continue
    value = config[field.name]
    kind = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}
    need(_type_ok(field, value), field.name, kind[field.kind])
    if field.kind is float and isinstance(value, float) and not math.isfinite(value):
      # nan and inf pass range checks like `v > 0` and would train a NaN model.
      expected = field.expected or "a number"
      need(False, field.name, expected.replace("a number", "a finite number", 1)
           if expected.startswith("a number") else f"a finite number: {expected}")
    if field.valid is not None:
      need(field.valid(value), field.name, field.expected)
