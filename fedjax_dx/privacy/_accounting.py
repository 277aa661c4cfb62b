"""The privacy budget, from Google's `dp-accounting` (RDP or PLD accountant).

`epsilon` of a run from its noise multiplier, sampling rate and number of noised
releases, `noise_for_epsilon` for the noise multiplier that reaches a target epsilon,
and their example-level (DP-SGD) forms.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np


ACCOUNTANTS = ("rdp", "pld")
MAX_NOISE_MULTIPLIER = 1000.0


def check_budget_args(*, delta: float, sampling_rate: float, steps: int,
                      accountant: str) -> None:
  """Range checks shared by `epsilon` and `noise_for_epsilon` (clear ValueErrors)."""
  if not 0 < delta < 1:
    raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
  if not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate must lie in (0, 1], got {sampling_rate!r}")
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps (noised releases) must be an integer >= 1, got {steps!r}")
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


class _SkipNonConvergedOrders(logging.Filter):
  """dp-accounting's RDP accountant warns for every Renyi order whose series does not
  converge at small noise, and then leaves that order out (its result stays a valid
  bound); one line per order and call would flood a study's log."""

  def filter(self, record):
    return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkipNonConvergedOrders())


SAMPLINGS = ("poisson", "without_replacement")


def _remembered(compute: Callable[..., float]) -> Callable[..., float]:
  """`compute` (a pure function of scalar arguments: dp-accounting's arithmetic)
  answered from memory when called again with the same arguments, of the same types,
  in this process. A study asks for the same calibration more than once (its checks
  before any write, then each method's start), and one calibration of a subsampled
  mechanism takes seconds."""
  cached = functools.lru_cache(maxsize=4096, typed=True)(compute)

  @functools.wraps(compute)
  def call(*args: Any) -> float:
    try:
      hash(args)
    except TypeError:  # e.g. a 0-d array: computed, not remembered
      return compute(*args)
    return cached(*args)

  call.cache_info = cached.cache_info  # type: ignore[attr-defined]
  call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
  return call


def _event(noise_multiplier: float, sampling_rate: float, steps: int,
           sampling: str = "poisson", population: int = 0):
  """dp-accounting's event of `steps` sampled Gaussian releases.

  "poisson": each unit in a release independently with probability `sampling_rate`
  (add/remove-one neighbours). "without_replacement": a fixed-size sample of
  `round(sampling_rate * population)` of `population` units (replace-one neighbours:
  replacing one unit moves a sum of vectors clipped to C by up to 2C, so the noise
  multiplier relative to that sensitivity is half the one relative to C).
  """
  import dp_accounting
  if sampling == "without_replacement" and sampling_rate < 1:
    sample = int(round(sampling_rate * population))
    release = dp_accounting.SampledWithoutReplacementDpEvent(
        population, sample, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
    return dp_accounting.SelfComposedDpEvent(release, steps)
  release = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1:
    release = dp_accounting.PoissonSampledDpEvent(sampling_rate, release)
  return dp_accounting.SelfComposedDpEvent(release, steps)


def _check_sampling(sampling: str, population: int, sampling_rate: float,
                    accountant: str) -> None:
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
  if sampling == "without_replacement" and sampling_rate < 1:
    if not isinstance(population, (int, np.integer)) or population < 1:
      raise ValueError("sampling='without_replacement' needs population, the number of "
                       f"units a fixed-size sample is drawn from, got {population!r}")
    if accountant != "rdp":
      raise ValueError("fixed-size samples without replacement are accounted by the rdp "
                       f"accountant only (dp-accounting's {accountant} accountant takes "
                       "Poisson sampling); use accountant 'rdp' or Poisson sampling")


def _accountant(name: str, replace_one: bool = False):
  import dp_accounting
  if name == "rdp":
    if replace_one:
      return dp_accounting.rdp.RdpAccountant(
          neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return dp_accounting.rdp.RdpAccountant()
  return dp_accounting.pld.PLDAccountant()


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "rdp", *, sampling: str = "poisson",
            population: int = 0) -> float:
  """The epsilon at `delta` of `steps` sampled Gaussian releases.

  Args:
    noise_multiplier: noise standard deviation / sensitivity (clip norm); 0 = no noise.
    sampling_rate: probability that a unit (a client for client-level DP) takes part
      in a release; 1 for full participation.
    steps: noised releases (rounds for DP-FedAvg).
    delta: the delta of the (epsilon, delta) guarantee.
    accountant: "rdp" (Renyi DP) or "pld" (privacy loss distributions; tighter).
    sampling: how units are drawn: "poisson" (independently, add/remove-one
      neighbours) or "without_replacement" (a fixed-size sample of `sampling_rate *
      population`; replace-one neighbours, rdp only).
    population: units a fixed-size sample is drawn from ("without_replacement").

  Returns:
    epsilon (inf without noise).

  Example:
    >>> epsilon(1.0, 5 / 20, 30, 1e-5)                      # 5 of 20 clients, Poisson
    >>> epsilon(1.0, 5 / 20, 30, 1e-5, sampling="without_replacement", population=20)
  """
  check_budget_args(delta=delta, sampling_rate=sampling_rate, steps=steps,
                    accountant=accountant)
  _check_sampling(sampling, population, sampling_rate, accountant)
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
  if noise_multiplier == 0:
    return math.inf
  return _epsilon(noise_multiplier, sampling_rate, steps, delta, accountant, sampling,
                  population)


@_remembered
def _epsilon(noise_multiplier, sampling_rate, steps, delta, accountant, sampling,
             population) -> float:
  fixed = sampling == "without_replacement" and sampling_rate < 1
  ledger = _accountant(accountant, replace_one=fixed)
  ledger.compose(_event(noise_multiplier, sampling_rate, steps, sampling, population))
  return float(ledger.get_epsilon(delta))


class GaussianRelease(NamedTuple):
  """The privacy event of a Gaussian mechanism released `releases` times."""

  noise_multiplier: float  # noise std / sensitivity (the clipping norm)
  sampling_rate: float  # chance a unit takes part in a release (1: no amplification)
  releases: int  # how many times it is released (rounds)
  sampling: str = "poisson"  # poisson | without_replacement (a fixed-size cohort)
  population: int = 0  # units a fixed-size cohort is drawn from


def epsilon_of(events: Sequence[GaussianRelease], delta: float,
               accountant: str = "rdp") -> float:
  """The epsilon at `delta` of several Gaussian releases composed (one: `epsilon`).

  Args:
    events: the mechanisms' events (e.g. from `fedjax_dx.agg.Chain.privacy_events`).
    delta: the delta of the (epsilon, delta) guarantee.
    accountant: "rdp" or "pld".

  Returns:
    epsilon (inf if any release is unnoised).
  """
  if not events:
    raise ValueError("no privacy events: nothing in the pipeline adds noise")
  if len(events) == 1:
    (event,) = events
    return epsilon(event.noise_multiplier, event.sampling_rate, event.releases, delta,
                   accountant, sampling=event.sampling, population=event.population)
  for event in events:
    check_budget_args(delta=delta, sampling_rate=event.sampling_rate,
                      steps=event.releases, accountant=accountant)
    _check_sampling(event.sampling, event.population, event.sampling_rate, accountant)
    if event.noise_multiplier == 0:
      return math.inf
  replace_one = any(e.sampling == "without_replacement" and e.sampling_rate < 1
                    for e in events)
  ledger = _accountant(accountant, replace_one=replace_one)
  for event in events:
    ledger.compose(_event(*event))
  return float(ledger.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, delta: float, sampling_rate: float,
                      steps: int, accountant: str = "rdp", *, sampling: str = "poisson",
                      population: int = 0) -> float:
  """The smallest noise multiplier whose run reaches `target_epsilon` at `delta`
  (`sampling`, `population`: as in `epsilon`).

  Raises:
    ValueError: epsilon <= 0, or no multiplier up to `MAX_NOISE_MULTIPLIER` reaches it.
  """
  check_budget_args(delta=delta, sampling_rate=sampling_rate, steps=steps,
                    accountant=accountant)
  _check_sampling(sampling, population, sampling_rate, accountant)
  if not target_epsilon > 0:
    raise ValueError(f"target epsilon must be > 0, got {target_epsilon!r}")
  best = epsilon(MAX_NOISE_MULTIPLIER, sampling_rate, steps, delta, accountant,
                 sampling=sampling, population=population)
  if best > target_epsilon:
    raise ValueError(
        f"target epsilon {target_epsilon} is not reached by any noise multiplier up to "
        f"{MAX_NOISE_MULTIPLIER:g} (that gives epsilon {best:.4g} for {steps} releases at "
        f"sampling rate {sampling_rate:g}, delta {delta:g}); allow a larger epsilon, "
        "fewer rounds or a lower sampling rate")
  return _calibrated(target_epsilon, delta, sampling_rate, steps, accountant, sampling,
                     population)


@_remembered
def _calibrated(target_epsilon, delta, sampling_rate, steps, accountant, sampling,
                population) -> float:
  """`noise_for_epsilon` once its arguments are checked and the target is reachable."""
  import dp_accounting  # pylint: disable=g-import-not-at-top
  fixed = sampling == "without_replacement" and sampling_rate < 1

  def calibrate(name, low, high):
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(name, replace_one=fixed),
        lambda z: _event(z, sampling_rate, steps, sampling, population),
        target_epsilon, delta, dp_accounting.ExplicitBracketInterval(low, high),
        tol=1e-4))

  rdp_noise = calibrate("rdp", 1e-3, MAX_NOISE_MULTIPLIER)
  if accountant == "rdp":
    return rdp_noise
  # PLD is tighter, so it needs no more noise than RDP; tiny multipliers would make
  # its distributions huge, so the search starts near the RDP answer.
  return calibrate("pld", rdp_noise / 4, rdp_noise)


def _example_level_groups(batch_size: int, num_examples, steps):
  """The distinct (sampling rate, steps) pairs of the clients with data and steps."""
  sizes = np.asarray(num_examples)
  steps = np.broadcast_to(np.asarray(steps), sizes.shape)
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  pairs = {(min(1.0, batch_size / int(n)), int(k)) for n, k in zip(sizes, steps)
           if n > 0 and k > 0}
  if not pairs:
    raise ValueError("no client has both examples and local steps")
  return sorted(pairs)


def example_level_epsilon(noise_multiplier: float, batch_size: int, num_examples,
                          steps, delta: float, accountant: str = "rdp") -> float:
  """epsilon of example-level DP-SGD in federated training: the worst hospital's.

  Each hospital runs DP-SGD on its own patients: its `steps[k]` noised steps sample
  batches of `batch_size` of its `num_examples[k]` examples, accounted as Poisson
  sampling at rate `batch_size / n_k` (the usual approximation of shuffled batches).
  A patient belongs to one hospital, so the guarantee is the largest epsilon over
  hospitals (the smallest ones, with the highest sampling rate, spend most).

  Args:
    noise_multiplier: DP-SGD's noise std / per-example clipping norm.
    batch_size: examples per local step.
    num_examples: `[C]` training examples per hospital.
    steps: `[C]` (or one number) noised local steps each hospital has taken.
    delta: the delta of the guarantee.
    accountant: "rdp" or "pld".
  """
  return max(epsilon(noise_multiplier, rate, k, delta, accountant)
             for rate, k in _example_level_groups(batch_size, num_examples, steps))


def example_level_epsilons(noise_multiplier: float, batch_size: int, num_examples,
                           steps, delta: float, accountant: str = "rdp") -> list:
  """Each hospital's own epsilon of example-level DP-SGD (`[C]`; None for a hospital
  with no examples or no steps); `example_level_epsilon` is their largest.

  Each hospital's batches are accounted as Poisson sampling at rate batch / n_k: the
  usual approximation of the shuffled fixed-size batches that DP-SGD takes here, not a
  guarantee for them (Chua, Ghazi et al., ICML 2024)."""
  sizes = np.asarray(num_examples)
  steps = np.broadcast_to(np.asarray(steps), sizes.shape)
  _example_level_groups(batch_size, sizes, steps)  # argument checks
  cache = {}
  result = []
  for n, k in zip(sizes.tolist(), steps.tolist()):
    if n <= 0 or k <= 0:
      result.append(None)
      continue
    key = (min(1.0, batch_size / int(n)), int(k))
    if key not in cache:
      cache[key] = epsilon(noise_multiplier, key[0], key[1], delta, accountant)
    result.append(cache[key])
  return result


def example_level_noise(target_epsilon: float, batch_size: int, num_examples, steps,
                        delta: float, accountant: str = "rdp") -> float:
  """The noise multiplier at which every hospital's DP-SGD spends at most
  `target_epsilon` (the largest of the per-hospital calibrations)."""
  return max(noise_for_epsilon(target_epsilon, delta, rate, k, accountant)
             for rate, k in _example_level_groups(batch_size, num_examples, steps))
