"""JAX's Threefry hash lowered straight-line on CPU (jax's own unrolled rule), for the
programs a study compiles at full optimisation.

jax 0.10 lowers `threefry2x32` on CPU as a 5-trip `fori_loop` of 4 rounds each (on
the other platforms: its 20 rounds unrolled). Every PRNG call of a program then
becomes a small while loop whose kernels XLA:CPU compiles at full optimisation: the
hash was more than half of the compile time of each rounds program of the default
study (fedavg: 1.07 s; 0.45 s with the hash replaced by a trivial one, 0.55 s
unrolled). Unrolled it computes the same uint32 values (the same additions,
rotations and XORs: tested against the rolled lowering and Random123's known
answers). Upstream jax made the same change (jax-ml/jax#37872, "threefry2x32: use
unrolled loops in CPU lowering").

Only at full optimisation: at XLA level 0 (`config.fast_compile`) the unrolled hash
compiles no faster, and the FLamby heart study's centralized and local models moved
by an ulp with it (the hash's values did not; XLA compiled their float arithmetic
differently). The override goes through the lowering's own parameters, so JAX's
global rules, and every program not compiled by the study, stay as JAX has them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir


def _unrolled_rule():
  """JAX's straight-line lowering rule of `threefry2x32`, where this jax lowers it on
  CPU with a separate (rolled) rule; else None."""
  try:
    # pylint: disable-next=g-import-not-at-top
    from jax._src.random import threefry2x32 as module
  except ImportError:
    return None
  if not hasattr(module, "_threefry2x32_cpu_lowering_rule"):
    return None  # a jax that lowers it as it will (upstream: unrolled on CPU)
  return getattr(module, "_threefry2x32_lowering_rule", None)


UNROLLED_RULE = _unrolled_rule()


def below_full_optimisation(options: dict[str, Any] | None) -> bool:
  """Whether XLA `options` (else `XLA_FLAGS`) set backend optimisation level 0 or 1."""
  level = (options or {}).get("xla_backend_optimization_level")
  if level is not None:
    return int(level) < 2
  return any(flag.startswith("--xla_backend_optimization_level=")
             and flag.split("=", 1)[1] in ("0", "1")
             for flag in os.environ.get("XLA_FLAGS", "").split())


def lowering_parameters(options: dict[str, Any] | None):
  """The lowering parameters of a study program compiled with XLA `options`: on CPU
  at full optimisation, JAX's unrolled Threefry (`UNROLLED_RULE`); else None (JAX's
  defaults)."""
  if (UNROLLED_RULE is None or jax.default_backend() != "cpu"
      or below_full_optimisation(options)):
    return None
  return mlir.LoweringParameters(
      override_lowering_rules=((threefry2x32_p, UNROLLED_RULE),))


def lower(jitted, args, options: dict[str, Any] | None) -> jax.stages.Lowered:
  """`jitted.lower(*args)`, with `lowering_parameters(options)`."""
  parameters = lowering_parameters(options)
  if parameters is None:
    return jitted.lower(*args)
  return jitted.trace(*args).lower(_private_parameters=parameters)
