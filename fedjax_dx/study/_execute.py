"""Execution: every method x point x seed, with progress, resume and multi-host runs."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dx import agg
from fedjax_dx.core import _data
from fedjax_dx.core import _distributed
from fedjax_dx.core import _sampling
from fedjax_dx.core import _sharding
from fedjax_dx.privacy import _accounting
from fedjax_dx.privacy import _audit
from fedjax_dx.privacy import _secagg
from fedjax_dx.strategies import _baselines
from fedjax_dx.study._build import (POOLED_CENTER_NAME, POOLED_PN, POOLED_PN_NAME,
                                    aggregator_chain, client_optimizer,
                                    client_sampling, dp_sampling)
from fedjax_dx.study._build import TABLE_DATASETS
from fedjax_dx.study._build import example_noise
from fedjax_dx.study._build import privacy_noise
from fedjax_dx.study._checks import (check_config, method_config, method_field,
                                    methods_of)
from fedjax_dx.study._programs import UNSET_OPTIONS, ProgramCache, compiler_options
from fedjax_dx.study._schema import (CHUNKABLE, GUARDED, METRICS, PRIVATE, SHARDED,
                                     STRATEGIES, StudyError)
from fedjax_dx.study._saved import save_models
from fedjax_dx.study._storage import (environment, finalize, prepare_workdir,
                                      to_plain, write_atomic)
from fedjax_dx.study._sweep import apply_point, column_name, point_id, sweep_points


BOOTSTRAP_KEY = 0xB0075  # PRNGKey of the patient bootstrap (folded with the seed)


def _tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _pooled_row(result, *, prefix: dict, client: str, name: str,
                model_index=None) -> dict:
  pooled = {k: np.asarray(v) for k, v in result["pooled"].items()}
  if model_index is not None:
    pooled = {k: v[model_index] for k, v in pooled.items()}
  row = dict(prefix, client=client, client_name=name)
  row.update({m: _clean(pooled[m]) for m in METRICS})
  row["num_examples"] = int(pooled["num_examples"])
  return row


def _metric_rows(result, names, *, prefix: dict, model_index=None,
                 pooled_name: str = "pooled") -> list[dict]:
  rows = []
  clients = {k: np.asarray(v) for k, v in result["clients"].items()}
  if model_index is not None:
    clients = {k: v[model_index] for k, v in clients.items()}
  for k in range(len(names)):
    row = dict(prefix, client=str(k), client_name=names[k])
    row.update({m: _clean(clients[m][k]) for m in METRICS})
    row["num_examples"] = int(clients["num_examples"][k])
    rows.append(row)
  rows.append(_pooled_row(result, prefix=prefix, client="pooled", name=pooled_name,
                          model_index=model_index))
  return rows


def _clean(x) -> float | None:
  x = float(x)
  return None if math.isnan(x) else x


def _seed_slice(tree, index: int):
  return jax.tree.map(lambda x: x[index], tree)


class MethodRun:
  """One method for several seeds at once (one vmapped program), in two phases:
  `__init__` builds the states and lowers the programs (Python, serial) and hands
  them to worker threads to compile (XLA); `execute` waits for them, trains, evaluates
  every `eval_every` rounds and returns the result rows of each seed."""

  def __init__(self, config, method, data, names, cache, seeds, swept):
    # Several processes (multi-host): federated methods train and evaluate on global
    # arrays whose clients axis spans every device of every process; the baselines
    # and cyclic run on each process's own copy (the same result everywhere).
    self.sharded = _distributed.is_multiprocess() and method in SHARDED
    self.host_test = data.test  # this process's copy (labels for the predictions)
    # The models' init reads an example's shape only (`initial_params` is keyed so):
    # a host array, not a slice of the device's (an eager compile on this thread).
    example = np.zeros((1, *data.train.features.shape[2:]), data.train.features.dtype)
    if self.sharded:
      data = cache.global_data(data)
    self.data, self.names = data, names
    self.seeds, self.swept, self.cache = list(seeds), swept, cache
    self.model = model = cache.model(config, data.num_classes)
    # FLamby's pooled sets (dataset.pooled_normalization = "pooled"): the centralized
    # model trains on the pooled-normalized pooled train set, and every model is also
    # scored on the pooled-normalized pooled test set (client "pooled_pn").
    self.pooled_sets = cache.pooled_sets(config)
    if method != "centralized":
      train = data.train
    elif self.pooled_sets is not None:
      train = self.pooled_sets.train
    else:
      train = _data.pool_clients(data.train)
    self.train = train
    sizes = np.asarray(data.train.num_examples)
    init_keys, state_keys = cache.seed_keys(seeds)
    params = cache.initial_params(model, init_keys, example)
    if method in CHUNKABLE and config.client_chunk != 0:
      config = cache.fit_client_chunk(config, method, model, params, train,
                                      state_keys[0])
    self.private = config.dp != "none" and method in PRIVATE
    self.sizes, self._epsilons = sizes, {}
    self.compile_s = None  # claim_compile_time
    participation = self._participation(config, method, seeds, train.num_clients)
    self.planned_rounds, self.budget_rounds = config.rounds, None
    if self.private:
      self.sampling = dp_sampling(config, method, int(np.sum(sizes > 0)))
      if config.dp_target_epsilon > 0:
        config = copy.deepcopy(config)
        if config.dp == "example":
          config.dp_noise = example_noise(config, sizes, self._local_steps(
              config, participation.max(0).sum(0)))
        else:
          config.dp_noise = privacy_noise(config, self.sampling)
      if config.dp_budget > 0:  # stop at the last round within the budget
        self.budget_rounds = self._rounds_within_budget(config, method, participation)
        if self.budget_rounds < config.rounds:
          config = copy.deepcopy(config)
          config.rounds = self.budget_rounds
          participation = participation[:, :self.budget_rounds]
    # The privacy audit: canary clients after the real ones, each in with probability
    # 1/2 per seed, sampled as real clients are; the chain's first stage crafts their
    # updates. Evaluation and the membership audit see the real clients only.
    self.audit_from = None
    if self.private and config.privacy_audit and config.dp == "example":
      # Canary examples that are in join the hospitals' rows (the same for every seed
      # of this program); DP-SGD crafts their gradients.
      self.audit_from = train.num_clients
      train, self.example_inclusion = _audit.with_canary_examples(
          train, config.audit_canaries, seeds[0])
      self.train = train
    elif self.private and config.privacy_audit:
      self.audit_from = train.num_clients
      train = self.train = _audit.with_canaries(train, config.audit_canaries)
      rate = self.sampling.rate if self.sampling.sampling == "poisson" else 1.0
      participation = np.stack([
          _audit.canary_participation(seed, p, config.audit_canaries, rate)
          for seed, p in zip(seeds, participation)])
    self.config, self.method = config, method
    # The mechanism that spends privacy gives the epsilon: the chain's noise stage
    # (client level) or the client optimizer's DP-SGD (example level).
    # The FedAvg family's aggregator chain: its upload bytes and, private, its epsilon.
    self.chain = aggregator_chain(config, method) if method in PRIVATE else None
    self.spender = None
    if self.private:
      self.spender = (client_optimizer(config, method) if config.dp == "example"
                      else self.chain)
    self.algo = algo = cache.algorithm(config, method, model, self.audit_from)
    if self.sharded:  # global data cannot be closed over: one init per seed, stacked
      mesh = _sharding.client_mesh()
      params = _sharding.replicate(params, mesh)
      self.states = _baselines.stack_states([
          algo.init(_seed_slice(params, s), train, state_keys[s])
          for s in range(len(seeds))])
    else:  # one batched init for all seeds (data not batched: init's host checks run)
      self.states = cache.initial_states(algo, params, train, state_keys)
    positions = self.states.positions  # [S, C]: the checks see one seed's shape
    one_seed = self.states.replace(positions=jax.ShapeDtypeStruct(positions.shape[1:],
                                                                  positions.dtype))
    for rounds_participation in participation:
      algo.run.check(one_seed, train, rounds_participation)
    self.participation = participation  # [S, R, C]
    self.initial_params = params  # [S, ...]: the calibrated attack's reference models
    self.param_bytes = _tree_bytes(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params))
    self.num_params = int(sum(np.prod(x.shape[1:]) for x in jax.tree.leaves(params)))
    self.data_bytes = int(sizes.sum()) * (
        int(np.prod(data.train.feature_shape)) * 4 + 4)  # float32 features + int32 label
    self.kind = {"local": "stacked", "fedavg_ft": "personalized"}.get(method, "global")
    chunks = {min(config.eval_every, config.rounds), config.rounds % config.eval_every}
    self.programs = {c: cache.program(algo, self.states, train,
                                      jax.device_put(self.participation[:, :c]))
                     for c in sorted(chunks) if c}
    self.fast_metrics = fast_metrics = bool(config.get("fast_compile_metrics", False))
    self.evaluator = cache.evaluator(model, self.kind, algo, self._evaluated_models(),
                                     data, fast_metrics)
    self.pooled_evaluator = None  # per-client models have no pooled-set model
    if self.pooled_sets is not None and self.kind != "personalized":
      self.pooled_evaluator = cache.evaluator(model, self.kind, algo,
                                              self._evaluated_models(), self.pooled_sets,
                                              fast_metrics, pooled_only=True)
    # The programs that run once training is done (the membership audit, the
    # bootstrap) compile on worker threads too, meanwhile, not on this thread then.
    if config.rounds > 0 and config.membership_audit and self.kind == "global":
      cache.attack(model, self._fast_attack()).prepare(
          self._evaluated_models(), self.initial_params, data.train, data.test)
    if config.get("bootstrap_resamples", 0):
      num_models = (jax.tree.leaves(self._evaluated_models())[0].shape[1]
                    if self.kind == "stacked" else 0)
      self._bootstrapper().prepare(
          self._bootstrap_keys(),
          cache.test_outputs_like(model, self.initial_params, data.test.features,
                                  num_models),
          self.host_test.labels, self.host_test.mask)

  def prediction_rows(self, seed_index: int) -> list[dict]:
    """The final models' output on every real test example of every site: method,
    seed, client, example index, label and score (binary: P(class 1); multi-class:
    `probs`; survival: the risk score with `event` and `time`)."""
    outputs = np.asarray(self.test_outputs[seed_index])
    labels, sizes = np.asarray(self.host_test.labels), np.asarray(
        self.host_test.num_examples)
    seed = self.seeds[seed_index]
    swept = {k: v for k, v in self.swept.items() if k != "num_clients"}
    if self.kind == "stacked":  # local_m on every site
      models = [(f"local_{m}", outputs[m]) for m in range(len(self.names))]
    else:
      models = [(self.method, outputs)]
    survival = labels.ndim == 3
    rows = []
    for name, per_client in models:
      for k, client_name in enumerate(self.names):
        for i in range(int(sizes[k])):
          row = dict(method=name, seed=seed, client=str(k), client_name=client_name,
                     example=i, **swept)
          if survival:
            row.update(score=_clean(per_client[k, i, 0]), event=int(labels[k, i, 0]),
                       time=float(labels[k, i, 1]))
          elif per_client.shape[-1] == 2:
            row.update(label=int(labels[k, i]), score=_clean(per_client[k, i, 1]))
          else:
            row.update(label=int(labels[k, i]),
                       probs=[_clean(p) for p in per_client[k, i]])
          rows.append(row)
    return rows

  def final_models(self, seed_index: int) -> dict[str, Any]:
    """The final model(s) of one seed, by name: `{method: params}`, or one per
    hospital for local training (`local_k`); fedavg_ft: its global model."""
    params = _seed_slice(self.final_params, seed_index)
    if self.kind == "stacked":
      return {f"local_{m}": _seed_slice(params, m) for m in range(len(self.names))}
    return {self.method: params}

  def _evaluated_models(self):
    if self.kind == "personalized":
      return self.states
    if self.method == "centralized":  # the pooled model: its LocalState's only "client"
      # Through the host: a device slice compiles op by op on this thread, where it
      # waits for the worker threads' compiles.
      return jax.tree.map(lambda x: jax.device_put(np.asarray(x)[:, 0]),
                          self.states.params)
    return self.states.params

  def _epsilon_after(self, config, method, rounds: int, participation) -> float:
    """The epsilon (the worst seed's, at dp_delta) after `rounds` rounds."""
    if config.dp == "example":
      return max(_accounting.example_level_epsilon(
          config.dp_noise, config.batch_size, self.sizes,
          self._local_steps(config, p[:rounds].astype(bool).sum(0)), config.dp_delta,
          config.dp_accountant) for p in participation)
    return aggregator_chain(config, method).epsilon(
        rounds=rounds, sampling_rate=self.sampling.rate, delta=config.dp_delta,
        accountant=config.dp_accountant, sampling=self.sampling.sampling,
        population=self.sampling.population)

  def _rounds_within_budget(self, config, method, participation) -> int:
    """The most rounds (<= config.rounds) whose epsilon stays within config.dp_budget:
    the accountant's epsilon grows with the rounds, so a bisection finds the last."""
    spend = lambda r: self._epsilon_after(config, method, r, participation)
    if spend(config.rounds) <= config.dp_budget:
      return config.rounds
    low, high = 0, config.rounds  # spend(low) <= budget < spend(high)
    while high - low > 1:
      middle = (low + high) // 2
      low, high = (middle, high) if spend(middle) <= config.dp_budget else (low, middle)
    if low == 0:
      raise StudyError(
          f"config.dp_budget = {config.dp_budget}: {method} spends epsilon "
          f"{spend(1):.4g} (delta {config.dp_delta:g}) in its first round already; "
          "raise the budget or the noise (dp_noise, dp_target_epsilon)")
    return low

  def _participation(self, config, method, seeds, num_clients) -> np.ndarray:
    """Each seed's participation schedule `[S, R, C]` (sampled clients per round)."""
    schedules = []
    for seed in seeds:
      rounds_participation = np.ones((config.rounds, num_clients), np.float32)
      if method in STRATEGIES and method != "cyclic" and config.clients_per_round:
        rounds_participation = _sampling.sample_participation(
            seed, config.rounds, self.sizes, config.clients_per_round,
            by=client_sampling(config, method))
      schedules.append(rounds_participation)
    return np.stack(schedules)

  def _local_steps(self, config, rounds_taken_part) -> np.ndarray:
    """Noised local steps each client has taken after `rounds_taken_part` ([C])
    rounds (the full budget: stragglers' shorter rounds only spend less)."""
    if config.local_steps:
      return config.local_steps * np.asarray(rounds_taken_part, np.int64)
    per_round = np.ceil(self.sizes * config.local_epochs / config.batch_size)
    return (per_round * np.asarray(rounds_taken_part)).astype(np.int64)

  def _privacy_columns(self, round_index: int, seed_index: int) -> dict[str, Any]:
    """epsilon spent after `round_index` rounds (dp-accounting), for private methods:
    client level from the rounds, example level from each hospital's DP-SGD steps."""
    if not self.private:
      return {}
    config = self.config
    clean = lambda eps: None if eps is None or math.isinf(eps) else round(eps, 6)
    per_hospital = {}
    if config.dp == "example":
      # Each hospital's own epsilon from its own DP-SGD steps (its patients' guarantee);
      # the row's epsilon is the worst hospital's.
      taken = self.participation[seed_index, :round_index].astype(bool).sum(0)
      steps = self._local_steps(config, taken)
      key = tuple(steps.tolist())
      if round_index == 0:
        hospitals = [0.0] * len(self.sizes)
      else:
        if key not in self._epsilons:
          self._epsilons[key] = _accounting.example_level_epsilons(
              config.dp_noise, config.batch_size, self.sizes, steps, config.dp_delta,
              config.dp_accountant)
        hospitals = self._epsilons[key]
      eps = max((e for e in hospitals if e is not None), default=0.0)
      per_hospital = {"epsilon_by_hospital": [clean(e) for e in hospitals]}
      sampling = ("poisson batches" if config.dp_batches == "poisson" else
                  "shuffled batches accounted as poisson (not a guarantee)")
    else:
      if round_index == 0:
        eps = 0.0
      else:
        if round_index not in self._epsilons:
          self._epsilons[round_index] = self.spender.epsilon(
              rounds=round_index, sampling_rate=self.sampling.rate,
              delta=config.dp_delta, accountant=config.dp_accountant,
              sampling=self.sampling.sampling, population=self.sampling.population)
        eps = self._epsilons[round_index]
      sampling = self.sampling.label
    budget = {"dp_budget": config.dp_budget} if config.dp_budget > 0 else {}
    if config.rounds < self.planned_rounds:  # the budget stopped it: its last round
      budget["dp_budget_rounds"] = config.rounds
    return {"epsilon": clean(eps), "dp_delta": config.dp_delta,
            "dp_noise": round(config.dp_noise, 6), "dp_clip": config.dp_clip,
            "dp_mode": config.dp, "dp_sampling": sampling,
            "epsilon_guarantee": config.dp != "example" or config.dp_batches == "poisson",
            **budget, **per_hospital}

  def _round_bytes(self, metrics) -> tuple[np.ndarray, np.ndarray]:
    """Bytes up and down per seed of the rounds behind `metrics` ([S, R] counts):
    the model down to each participant; up, each upload's exact size (compressed, or
    the masked vector plus the secure-aggregation protocol's messages)."""
    num_seeds = len(self.seeds)
    per_round = lambda name: np.asarray(metrics[name]).reshape(num_seeds, -1)
    participants, uploads = per_round("num_participants"), per_round("num_uploads")
    copies = 2 if self.method == "scaffold" else 1  # SCAFFOLD adds its control variates
    down = copies * self.param_bytes * participants.sum(1)
    secure = self.chain and self.chain.find(agg.SecureSum)
    if secure:
      dropped = per_round("secagg_dropped")
      up = np.zeros(num_seeds, np.int64)
      for s in range(num_seeds):
        for sent, lost in zip(uploads[s] + dropped[s], dropped[s]):
          protocol_up, protocol_down = secure.protocol_bytes(self.num_params, int(sent),
                                                             int(lost))
          up[s] += protocol_up
          down[s] += protocol_down
      return up, down
    if self.chain is not None:  # exact upload size after the chain (compression)
      each = self.chain.upload_bytes(self.num_params)
    else:
      each = copies * self.param_bytes
    return each * uploads.sum(1), down

  def claim_compile_time(self) -> None:
    """Waits until every program of this method is loaded or compiled; `compile_s`:
    the wall time of this method's own compiles, 0 for a program an earlier method
    (in method order) or an earlier point claimed."""
    for program in self.programs.values():
      program.compile()  # waits for the worker thread
    self.compile_s = sum(p.compile_s for p in self.programs.values()
                         if p not in self.cache.reported)
    self.cache.reported.update(self.programs.values())

  def execute(self, progress) -> dict[int, list[dict]]:
    """Trains and evaluates every seed; returns each seed's result rows.
    `claim_compile_time` first, unless the caller did (`_execute_runs`)."""
    if self.compile_s is None:
      self.claim_compile_time()
    config, method, data, seeds = self.config, self.method, self.data, self.seeds
    rows = {seed: [] for seed in seeds}
    done, wall = 0, 0.0
    cumulative = np.zeros(len(seeds), np.int64)
    zeros = np.zeros(len(seeds), np.int64)

    host = _distributed.fetch if self.sharded else jax.device_get
    # (seed, result method) -> the round its model stopped being finite.
    self.diverged: dict[tuple[int, str], int] = {}
    self.secagg_failed: dict[int, int] = {}  # seed -> failed secure rounds

    def note_divergence(test_result, round_index, round_losses):
      """A model whose pooled test loss is NaN (with test examples) has diverged:
      metrics of non-finite outputs are NaN. Its round: the first of the last chunk
      whose training loss was not finite, else this evaluation's."""
      # [S, M] for M models per seed (local-only: one per client), else [S, 1].
      stacked = self.kind == "stacked"
      shape = (len(seeds), -1)
      loss = np.asarray(test_result["pooled"]["loss"]).reshape(shape)
      count = np.asarray(test_result["pooled"]["num_examples"]).reshape(shape)
      losses = None if round_losses is None else np.asarray(round_losses)
      names = ([f"local_{m}" for m in range(len(self.names))] if stacked else [method])
      for s, seed in enumerate(seeds):
        for m, name in enumerate(names):
          fine = not (np.isnan(loss[s, m]) and count[s, m] > 0)
          if fine or (seed, name) in self.diverged:
            continue
          first = round_index
          if losses is not None:  # [S, R], or [S, R, C] per client (local-only)
            per_round = losses[s][:, m] if stacked and losses.ndim == 3 else losses[s]
            bad = np.flatnonzero(~np.isfinite(per_round)) if per_round.ndim == 1 else []
            if len(bad):
              first = round_index - len(per_round) + 1 + int(bad[0])
          self.diverged[(seed, name)] = first

    pooled_name = "pooled" if self.pooled_sets is None else POOLED_CENTER_NAME
    final_outputs = [None]  # the last evaluation's test outputs (predictions, bootstrap)

    def evaluate(evaluator, round_index, train, test):
      if round_index == 0 and not self.sharded:  # the methods' initial models: once
        return self.cache.initial_evaluation(evaluator, self._evaluated_models(), train,
                                             test)
      return evaluator(self._evaluated_models(), train, test)

    def evaluate_now(round_index, bytes_up, bytes_down, round_losses=None):
      *results, outputs = evaluate(self.evaluator, round_index, data.train, data.test)
      results = host(results)
      final_outputs[0] = outputs  # on the device: only the final ones are fetched
      pooled_results = [None, None]
      if self.pooled_evaluator is not None:
        pooled_results = host(evaluate(self.pooled_evaluator, round_index,
                                       self.pooled_sets.train, self.pooled_sets.test))
      note_divergence(results[1], round_index, round_losses)
      privacy = [self._privacy_columns(round_index, s) for s in range(len(seeds))]
      diverged_columns = lambda seed, name: (
          {"diverged_round": self.diverged[(seed, name)]}
          if (seed, name) in self.diverged else {})
      for split, result, pooled_result in zip(("train", "test"), results,
                                              pooled_results):
        for s, seed in enumerate(seeds):
          one = _seed_slice(result, s)
          pooled_one = (None if pooled_result is None
                        else _seed_slice(pooled_result, s))
          seed_privacy = dict(privacy[s])
          by_hospital = seed_privacy.pop("epsilon_by_hospital", None)
          base = dict(seed=seed, round=round_index, num_clients=len(self.names),
                      split=split, bytes_up=int(bytes_up[s]),
                      bytes_down=int(bytes_down[s]), cumulative_bytes=int(cumulative[s]),
                      wall_s=round(wall, 4), compile_s=round(self.compile_s, 4),
                      batched_seeds=len(seeds), **seed_privacy, **guard_columns(s),
                      **secure_columns(s),
                      # (a swept dp_noise is the privacy columns' own: not twice)
                      **{k: v for k, v in self.swept.items()
                         if k != "num_clients" and k not in seed_privacy})
          if self.kind == "stacked":
            for m in range(len(self.names)):  # real clients (not bucket padding)
              name = f"local_{m}"
              prefix = dict(base, method=name, **diverged_columns(seed, name))
              rows[seed].extend(_metric_rows(one, self.names, prefix=prefix,
                                             model_index=m, pooled_name=pooled_name))
              if pooled_one is not None:
                rows[seed].append(_pooled_row(pooled_one, prefix=prefix,
                                              client=POOLED_PN, name=POOLED_PN_NAME,
                                              model_index=m))
          else:
            prefix = dict(base, method=method, **diverged_columns(seed, method))
            site_rows = _metric_rows(one, self.names, prefix=prefix,
                                     pooled_name=pooled_name)
            if by_hospital is not None:  # each site's row: its own patients' epsilon
              for k, row in enumerate(site_rows[:len(self.names)]):
                row["epsilon_hospital"] = by_hospital[k]
            rows[seed].extend(site_rows)
            if split == "test" and attack is not None:  # on the pooled test row
              rows[seed][-1].update({f"mia_{k}": _clean(v[s]) for k, v in attack.items()})
            if pooled_one is not None:
              rows[seed].append(_pooled_row(pooled_one, prefix=prefix, client=POOLED_PN,
                                            name=POOLED_PN_NAME))

    # Client updates the guard dropped (not finite, or blown up), summed over rounds.
    guard_dropped = np.zeros(len(seeds), np.int64)
    guarded = method in GUARDED and (config.guard > 0 or config.drop_nonfinite)
    guard_columns = lambda s: {"guard_dropped": int(guard_dropped[s])} if guarded else {}
    # Secure rounds that failed (more dropouts than the tolerance): the model stayed.
    secure = self.chain is not None and self.chain.find(agg.SecureSum) is not None
    failed_rounds = np.zeros(len(seeds), np.int64)
    secure_columns = lambda s: ({"secagg_failed_rounds": int(failed_rounds[s])}
                                if secure else {})
    attack = None
    evaluate_now(0, zeros, zeros)
    while done < config.rounds:
      chunk = min(config.eval_every, config.rounds - done)
      final = done + chunk == config.rounds
      start = time.perf_counter()
      participation = jax.device_put(self.participation[:, done:done + chunk])
      self.states, metrics = self.programs[chunk](self.states, self.train, participation)
      jax.block_until_ready(self.states)
      wall += time.perf_counter() - start
      metrics = host(metrics)
      if method in STRATEGIES:  # models sent down to participants and back up
        bytes_up, bytes_down = self._round_bytes(metrics)
      elif method == "centralized":  # the raw data moves once
        bytes_up = np.full(len(seeds), self.data_bytes if done == 0 else 0)
        bytes_down = zeros
      else:
        bytes_up = bytes_down = zeros
      cumulative += bytes_up + bytes_down
      if guarded:
        dropped = np.asarray(metrics["guard_dropped"]).reshape(len(seeds), -1)
        guard_dropped += dropped.sum(1)
        # Every update of a round not finite: training diverged (the guard kept the
        # global model finite, frozen where it was).
        all_dropped = (dropped > 0) & (
            np.asarray(metrics["guard_kept"]).reshape(len(seeds), -1) == 0)
        for s, seed in enumerate(seeds):
          if all_dropped[s].any() and (seed, method) not in self.diverged:
            self.diverged[(seed, method)] = done + 1 + int(np.argmax(all_dropped[s]))
      if secure:
        failed_rounds += np.asarray(metrics["secagg_failed"]).reshape(len(seeds), -1).sum(1)
      done += chunk
      if final and config.membership_audit and self.kind == "global":
        attack = host(self.cache.attack(self.model, self._fast_attack())(
            self._evaluated_models(), self.initial_params, data.train, data.test))
      round_losses = (metrics.get("client_train_loss") if self.kind == "stacked"
                      else metrics.get("train_loss"))
      evaluate_now(done, bytes_up, bytes_down, round_losses)
      progress(done * len(seeds))
    progress(self.planned_rounds * len(seeds))  # a budget stop skips the rest
    self.secagg_failed = {seed: int(failed_rounds[s]) for s, seed in enumerate(seeds)
                          if failed_rounds[s]}
    self.test_outputs = host(final_outputs[0])
    params = (self.states.params if self.kind == "personalized"
              else self._evaluated_models())
    self.final_params = host(params)  # [S, ...] ([S, C, ...] local): models/ saves them
    if self.audit_from is not None:
      self._attach_audit(rows, done)
    if config.get("bootstrap_resamples", 0):
      self._attach_bootstrap(rows, done)
    return rows

  def _attach_audit(self, rows, final_round: int) -> None:
    """The final pooled test row of each seed gets the canary audit's epsilon lower
    bounds (`epsilon_lower`: one run, `epsilon_lower_cp`: Clopper-Pearson) at
    `epsilon_lower_confidence`, with the scores' AUROC."""
    config = self.config
    example = config.dp == "example"
    size = int(sum(np.prod(x.shape[1:]) for x in jax.tree.leaves(self.initial_params)))
    directions = agg.canary_directions(0, config.audit_canaries, size)
    for s, seed in enumerate(self.seeds):
      scores = _audit.canary_scores(_seed_slice(self.initial_params, s),
                                    _seed_slice(self.final_params, s), directions)
      included = (self.example_inclusion if example
                  else _audit.canary_inclusion(seed, config.audit_canaries))
      result = _audit.audit(scores, included, delta=config.dp_delta,
                            significance=config.audit_significance)
      for row in rows[seed]:
        if (row["round"] == final_round and row["split"] == "test"
            and row["client"] == "pooled" and row["method"] == self.method):
          row.update(epsilon_lower=round(result.epsilon_one_run, 6),
                     epsilon_lower_cp=round(result.epsilon_clopper_pearson, 6),
                     epsilon_lower_confidence=result.confidence,
                     audit_auroc=round(result.auroc, 6),
                     audit_canaries=result.num_canaries)

  def _fast_attack(self) -> bool:
    """`config.fast_compile_metrics` for the membership audit: not on global arrays
    (several processes), as the evaluators' split is not (`ProgramCache.evaluator`)."""
    return self.fast_metrics and not self.sharded

  def _bootstrapper(self):
    return self.cache.bootstrapper(self.host_test.labels.ndim == 3,
                                   self.kind == "stacked",
                                   self.config.bootstrap_resamples, self.fast_metrics)

  def _bootstrap_keys(self) -> jax.Array:
    """Each seed's resampling key `[S]` (`ProgramCache.bootstrap_keys`)."""
    return self.cache.bootstrap_keys(self.seeds, BOOTSTRAP_KEY)

  def _attach_bootstrap(self, rows, final_round: int) -> None:
    """Each final test row (sites and pooled) gets `bootstrap_<metric>`: the metric of
    `config.bootstrap_resamples` resamples of that test set's patients (the summary's
    `<metric>_ci_low/_ci_high` pool them over seeds)."""
    test = self.host_test
    samples = jax.device_get(self._bootstrapper()(
        self._bootstrap_keys(), jnp.asarray(self.test_outputs), test.labels, test.mask))
    columns = {str(k): k for k in range(len(self.names))}
    columns["pooled"] = len(self.names)
    for s, seed in enumerate(self.seeds):
      for row in rows[seed]:
        if (row["round"] != final_round or row["split"] != "test"
            or str(row["client"]) not in columns):
          continue
        column = columns[str(row["client"])]
        for metric, values in samples.items():
          per_model = values[s]
          if self.kind == "stacked":
            per_model = per_model[int(row["method"].split("_")[1])]
          # tolist(): Python floats at once (as float(v) of each), NaN -> None
          row[f"bootstrap_{metric}"] = [None if v != v else round(v, 6)
                                        for v in per_model[:, column].tolist()]


def _progress_bar_class():
  """tqdm's notebook widget where ipywidgets is there to draw it, else its text bar."""
  try:
    import ipywidgets  # pylint: disable=g-import-not-at-top,unused-import
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    from tqdm.std import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm


def _in_notebook() -> bool:
  if "IPython" not in sys.modules:  # a notebook's kernel has imported it (importing
    return False  # it here would cost a plain command 0.1 s)
  try:
    from IPython import get_ipython  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  shell = get_ipython()
  return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class Progress:
  """Rounds done of the whole study, with the current method and an ETA (tqdm's: a
  number once the first rounds have run, never NaN). A terminal or a notebook gets a
  live bar; elsewhere (a log file) one log line per tenth of the study."""

  def __init__(self, total_rounds: int, quiet: bool):
    self.total, self.done, self.quiet = total_rounds, 0, quiet
    self.label = ""
    self.live = not quiet and (sys.stderr.isatty() or _in_notebook())
    self.bar = None
    self.next_line = 0.1
    self.start = time.perf_counter()
    self._lock = threading.RLock()
    if self.live:
      self.bar = _progress_bar_class()(total=total_rounds, unit="round",
                                       dynamic_ncols=True, leave=True, file=sys.stderr)

  def advance(self, rounds: int, label: str | None = None):
    with self._lock:  # methods may train on several threads
      self._advance(rounds, label)

  def _advance(self, rounds: int, label: str | None):
    self.done += rounds
    if label is not None and label != self.label:
      self.label = label
      if self.bar is not None:
        self.bar.set_description_str(label, refresh=False)
    if self.quiet:
      return
    if self.bar is not None:
      self.bar.update(rounds)
    elif self.total and self.done / self.total >= self.next_line:
      from tqdm.std import tqdm  # pylint: disable=g-import-not-at-top
      logging.info(tqdm.format_meter(self.done, self.total,
                                     time.perf_counter() - self.start,
                                     prefix=self.label, unit="round", ncols=100,
                                     ascii=True))
      while self.next_line <= self.done / self.total:
        self.next_line += 0.1

  def log(self, message: str):
    if self.quiet:
      return
    with self._lock:
      self._log(message)

  def _log(self, message: str):
    if self.bar is not None:
      self.bar.write(message, file=sys.stderr)
    else:
      logging.info(message)

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def _check_secure_rounds(run: "MethodRun", swept: dict, progress: Progress) -> None:
  """Warns of failed secure-aggregation rounds (column `secagg_failed_rounds`); a run
  whose every round failed never trained, so the study stops."""
  rounds = run.config.rounds
  for seed, failed in sorted(run.secagg_failed.items()):
    where = f" {swept}" if swept else ""
    what = (f"{run.method} seed {seed}{where}: secure aggregation failed in "
            f"{failed} of {rounds} rounds (more senders dropped out than "
            f"secagg_tolerance = {run.config.secagg_tolerance} recovers from; the model "
            "stays where it is in a failed round)")
    if failed == rounds:
      raise StudyError(f"{what}: it never trained; raise config.secagg_tolerance or "
                       "lower config.secagg_dropout")
    progress.log(f"warning: {what}")


def _start_method(variant, method, data, names, cache, seeds, swept) -> "MethodRun":
  """A method's run, set up (init, host checks); the library's ValueErrors (the
  argument they name and what was expected) become one-line StudyErrors."""
  try:
    return MethodRun(method_config(variant, method), method, data, names, cache, seeds,
                     swept)
  except ValueError as e:
    raise StudyError(f"{method}: {e}") from None


def _remove_unstarted(workdir: str, created: bool) -> None:
  """Removes what a study that failed before writing any result wrote (config.json,
  an empty points/ folder, the workdir it created); keeps a study with results."""
  points = os.path.join(workdir, "points")
  if os.path.isdir(points) and os.listdir(points):
    return
  for name in ("config.json", "partition.json"):
    with contextlib.suppress(OSError):
      os.remove(os.path.join(workdir, name))
  with contextlib.suppress(OSError):
    os.rmdir(points)
  if created:
    with contextlib.suppress(OSError):
      os.rmdir(workdir)  # only when empty


def _prefix(config, method: str, field: str) -> str:
  """"per_method.<method>." where the method overrides `field`, else ""."""
  overridden = field in config.get("per_method", {}).get(method, {})
  return f"per_method.{method}." if overridden else ""


def _check_own_data(config, data, names, methods, where: str) -> None:
  """Own data (a table, TFDS, a loader): every hospital trains on whole batches, and a
  loader's labels fit the model (survival with cox, classes otherwise)."""
  d = config.dataset
  if d.name not in TABLE_DATASETS:
    return
  source = {"csv": d.file, "parquet": d.file, "tfds": f"tfds {d.tfds_name}",
            "loader": f"loader {d.loader}"}[d.name]
  sizes = np.asarray(data.train.num_examples)[:len(names)]  # not bucket padding
  for method in methods:
    batch = method_config(config, method).batch_size
    if method != "centralized" and sizes.min() < batch:
      k = int(np.argmin(sizes))
      raise StudyError(
          f"config.dataset ({source}): hospital {names[k]!r} (column "
          f"{d.client_column!r}) has {int(sizes[k])} training rows, fewer than "
          f"config.{_prefix(config, method, 'batch_size')}batch_size = {batch} "
          f"({method}){where}; lower batch_size or leave that hospital out")
  survival = _data.is_survival(data.train)
  if d.name == "loader" and survival != (config.model.name == "cox"):
    raise StudyError(
        f"config.model.name = {config.model.name!r}: {source} returned "
        f"{'survival' if survival else 'classification'} data{where}; use "
        f"{'cox' if survival else 'a classifier (logistic_regression, mlp or cnn)'}")


def _check_data_dependent(config, cache: ProgramCache) -> None:
  """Checks that need the data (client counts), before anything is written."""
  methods = methods_of(config)
  for point in sweep_points(config):
    variant = apply_point(config, point)
    where = f" in sweep point {point}" if point else ""
    data, names = cache.dataset(variant)[:2]
    with_data = int(np.sum(np.asarray(data.train.num_examples) > 0))
    _check_own_data(variant, data, names, methods, where)
    largest = int(np.max(np.asarray(data.train.num_examples)))
    feature_shape = tuple(data.train.feature_shape)
    if variant.model.name == "cnn" and len(feature_shape) != 3:
      raise StudyError(
          f"config.model.name = 'cnn': the CNN takes images (height, width, channels), "
          f"{variant.dataset.name} has features of shape {feature_shape}{where}; use "
          "logistic_regression or mlp")
    for method in methods:
      mc = method_config(variant, method)
      if mc.batch_size > largest:
        raise StudyError(
            f"config.{_prefix(variant, method, 'batch_size')}batch_size = "
            f"{mc.batch_size}: larger than every client's training set (the largest "
            f"has {largest} examples){where}; use batch_size <= {largest}")
      prefix = _prefix(variant, method, "clients_per_round")
      if mc.clients_per_round > with_data:
        raise StudyError(
            f"config.{prefix}clients_per_round = {mc.clients_per_round}: cannot sample "
            f"more clients than exist ({with_data} with data){where}")
      if mc.dp != "none" and method in PRIVATE and mc.dp_target_epsilon > 0:
        if mc.dp == "example":  # reachable with every client in every round?
          sizes = np.asarray(data.train.num_examples)
          steps = (mc.local_steps * mc.rounds if mc.local_steps else
                   np.ceil(sizes * mc.local_epochs / mc.batch_size) * mc.rounds)
          example_noise(mc, sizes, np.asarray(steps, np.int64))
        else:
          privacy_noise(mc, dp_sampling(mc, method, with_data))  # reachable?
      participants = mc.clients_per_round or with_data
      if mc.secure_aggregation and method in PRIVATE:
        try:
          field = f"config.{_prefix(variant, method, 'secagg_bits')}secagg_bits"
          _secagg.check_bits(mc.secagg_bits, participants, field)
        except ValueError as e:
          raise StudyError(f"{e} ({method}{where})") from None
      if (method in STRATEGIES and method not in ("scaffold", "cyclic")
          and mc.aggregator == "krum" and participants < 2 * mc.num_byzantine + 3):
        raise StudyError(
            f"config.num_byzantine = {mc.num_byzantine}: krum needs at least "
            f"{2 * mc.num_byzantine + 3} participating clients per round (2 f + 3), "
            f"{method} has {participants}{where}; lower num_byzantine or use more "
            "clients")


def run_study(config, workdir: str, *, quiet: bool = False,
              programs: ProgramCache | None = None,
              on_metrics_written: Callable[[str], None] | None = None,
              method_threads: int = 0) -> dict[str, str]:
  """Runs (or resumes) a study into `workdir`; returns the paths written.

  All seeds of a (point, method) train together in one vmapped program
  (`config.batch_seeds`, default on); each (point, seed) is written to its own resume
  record once every method has run.

  Args:
    config: the study's config (`configs/heart_disease.py`'s fields).
    workdir: where results go; a workdir holding the same study resumes it.
    quiet: no progress line and no log.
    programs: a `ProgramCache` to keep data sets and compiled programs in across
      studies of one process (a notebook, a script running related studies):
      points of a later study that agree with an earlier one in every compile
      field and shape reuse its programs instead of tracing and compiling them
      again. Results are the same either way. Default: one cache per study.
    on_metrics_written: called with `workdir` once metrics.jsonl and
      predictions.jsonl are written, before the summaries (a report can start
      drawing: `fedjax-dx run`'s `ReportProcess.metrics_written`).
    method_threads: methods of a point that train at once, each on a thread of its
      own (XLA:CPU runs one program on one core: a 2-core machine trains two
      methods in the time of one). 0: `auto_method_threads()`. Results are the same
      for any value; the timing columns (`wall_s`) of methods that trained at once
      were measured side by side (1 times each method alone).

  Returns:
    The paths written: metrics, summary, summary table, config.

  Example:
    >>> programs = study.ProgramCache()
    >>> study.run_study(config, "/tmp/a", programs=programs)
    >>> config.rounds = 40  # a new study; its 30-round programs are reused
  """
  check_config(config)
  if not isinstance(method_threads, int) or method_threads < 0:
    raise StudyError(f"method_threads = {method_threads!r}: expected an integer >= 0 "
                     "(0: one per core on CPU)")
  threads = method_threads or auto_method_threads()
  config_json = config.to_dict()
  # Multi-host: every process runs every program; process 0 alone reads and writes
  # the workdir and tells the others what is left to do.
  lead = jax.process_index() == 0
  resuming = bool(_on_lead(lead, lambda: [prepare_workdir(workdir, config_json)], 1)[0])
  options = compiler_options(config)
  if programs is not None and programs.options == UNSET_OPTIONS:
    programs.options = options
  if programs is not None and programs.options != options:
    raise StudyError(
        f"config.fast_compile = {config.fast_compile}: the programs cache given compiles "
        f"with XLA options {programs.options}, this study with {options}; pass a "
        "ProgramCache made with the same fast_compile setting")
  cache = programs if programs is not None else ProgramCache(options)
  fresh = lead and not resuming and not os.path.isdir(workdir)
  progress = None
  try:
    _check_data_dependent(config, cache)
    if not resuming:
      _on_lead(lead, lambda: write_atomic(os.path.join(workdir, "config.json"), json.dumps(
          {"config": config_json, "created": datetime.datetime.now().isoformat(),
           **environment(), "method_threads": threads}, indent=2, default=str)))
    points = sweep_points(config)
    fields = list(points[0])
    seeds = [config.seed + s for s in range(config.num_seeds)]
    methods = methods_of(config)

    # Rounds of all methods of one (point, seed), per point (`method_field`: a config
    # copy per method and seed took 66 ms of the FLamby TCGA study, this 8 ms).
    rounds_of = [sum(method_field(apply_point(config, p), m, "rounds") for m in methods)
                 for p in points]
    todo = [(i, p, s) for i, p in enumerate(points) for s in seeds]
    progress = Progress(sum(rounds_of[i] for i, _, _ in todo), quiet)
    partitions = {}
    points_dir = os.path.join(workdir, "points")
    path_of = lambda i, p, s: os.path.join(points_dir, point_id(i, p, s) + ".jsonl")

    def points_done() -> list[bool]:
      os.makedirs(points_dir, exist_ok=True)
      # An empty record (a disk that filled up) is not a finished seed: run it again.
      return [os.path.isfile(path_of(i, p, s)) and os.path.getsize(path_of(i, p, s)) > 0
              for i, p, s in todo]

    done_before = [bool(d) for d in _on_lead(lead, points_done, len(todo))]
    is_done = lambda i, p, s: done_before[todo.index((i, p, s))]
    if resuming:
      finished = sum(done_before)
      progress.log(f"resuming the study in {workdir}: {finished} of {len(todo)} "
                   "(point, seed) runs already done")
    for index, point in enumerate(points):
      variant = apply_point(config, point)
      swept = {column_name(f, fields): v for f, v in point.items()}
      data, names, counts, classes, notes = cache.dataset(variant)
      partitions[str(index)] = {"point": swept, "client_names": names,
                                "class_names": classes, "label_counts": counts.tolist(),
                                **({"data_notes": notes} if notes else {})}
      if notes and index == 0:
        progress.log("data: " + "; ".join(notes))
      missing = [s for s in seeds if not is_done(index, point, s)]
      progress.advance(rounds_of[index] * (len(seeds) - len(missing)),
                       f"point {index + 1}/{len(points)} (done)")
      groups = [missing] if config.batch_seeds else [[s] for s in missing]
      for group in filter(None, groups):
        rows = {seed: [] for seed in group}
        predictions = {seed: [] for seed in group}
        models = {seed: {} for seed in group}
        seeds_label = (f"seed{'s' if len(group) > 1 else ''} "
                       f"{','.join(map(str, group))}")
        progress.advance(0, f"point {index + 1}/{len(points)}: compiling {len(methods)} "
                         f"methods, {seeds_label}")
        # Trace and lower every method; XLA compiles meanwhile on worker threads.
        # Multi-host: every process runs every method, the baselines (and cyclic) on
        # its own copy too. Only process 0's results are written, but a process that
        # skipped them would wait meanwhile in the next method's collectives (or at
        # shutdown) for as long as they train, under the runtime's timeouts.
        runs = [_start_method(variant, m, data, names, cache, group, swept)
                for m in methods]
        results = _execute_runs(runs, threads, progress,
                                f"point {index + 1}/{len(points)}", seeds_label)
        for run, run_rows in zip(runs, results):
          for seed, seed_rows in run_rows.items():
            rows[seed] += seed_rows
          for s, seed in enumerate(run.seeds):
            predictions[seed] += run.prediction_rows(s)
            models[seed].update(run.final_models(s))
          for (seed, name), at in sorted(run.diverged.items()):
            progress.log(f"warning: {name} seed {seed} diverged at round {at} "
                         f"{swept or ''}(its model is not finite; its metrics are NaN)")
          _check_secure_rounds(run, swept, progress)

        model_info = {"point": swept, "point_index": index,
                      "model": dict(to_plain(variant.model),
                                    num_classes=data.num_classes),
                      "feature_shape": list(data.train.feature_shape),
                      "client_names": names, "class_names": classes}

        def write_points(index=index, point=point, group=group, rows=rows,
                         predictions=predictions, models=models, model_info=model_info):
          for seed in group:  # models and predictions first: a point file means all exist
            save_models(workdir, point_id(index, point, seed), models[seed],
                        dict(model_info, seed=seed))
            write_atomic(os.path.join(workdir, "predictions",
                                      point_id(index, point, seed) + ".jsonl"),
                         "".join(json.dumps(r) + "\n" for r in predictions[seed]))
            write_atomic(path_of(index, point, seed),
                         "".join(json.dumps(r) + "\n" for r in rows[seed]))

        _on_lead(lead, write_points)
        progress.log(f"finished point {index + 1}/{len(points)}: {swept or 'no sweep'}, "
                     f"seed(s) {group}")
    _on_lead(lead, lambda: write_atomic(os.path.join(workdir, "partition.json"),
                                        json.dumps(partitions)))
  except BaseException:
    if lead and not resuming:  # a study that never recorded a result leaves no trace,
      _remove_unstarted(workdir, fresh)  # so its corrected rerun is not "another study"
    raise
  finally:
    if progress is not None:
      progress.close()
    cache.close()  # its worker threads; a cache given by the caller keeps its programs
  if not lead:
    return {}
  return finalize(workdir, config, [point_id(i, p, s) for i, p, s in todo],
                  on_metrics_written)


def auto_method_threads() -> int:
  """Methods trained at once by default: one per available core on the CPU backend
  (XLA:CPU runs each of these small programs on one core), in a single process; else
  1 (an accelerator runs one program at a time; several processes must run their
  collectives in the same order)."""
  if jax.default_backend() != "cpu" or _distributed.is_multiprocess():
    return 1
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return max(1, cores)


def _execute_runs(runs: list["MethodRun"], threads: int, progress: "Progress",
                  where: str, seeds_label: str) -> list[dict[int, list[dict]]]:
  """Each run's `execute` result, in the order of `runs`: one after another, or up to
  `threads` at once, each on a thread of its own. Compile times are claimed in method
  order either way (the first method to use a shared program reports its compile), so
  the rows are the same; the first error (in method order) is raised once every
  started run has ended."""
  running: list[str] = []
  lock = threading.Lock()

  def one(k: int, claimed_before: threading.Event | None,
          claimed: threading.Event | None) -> dict[int, list[dict]]:
    run = runs[k]
    try:
      if claimed_before is not None:
        claimed_before.wait()
      run.claim_compile_time()
    finally:
      if claimed is not None:
        claimed.set()
    with lock:
      running.append(run.method)
      progress.advance(0, f"{where} {', '.join(running)} {seeds_label}")
    counter = [0]

    def advance(done):
      progress.advance(done - counter[0])
      counter[0] = done

    try:
      return run.execute(advance)
    finally:
      with lock:
        running.remove(run.method)

  threads = min(threads, len(runs))
  if threads <= 1:
    return [one(k, None, None) for k in range(len(runs))]
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  turns = [threading.Event() for _ in runs]
  with concurrent.futures.ThreadPoolExecutor(threads, "method") as pool:
    futures = [pool.submit(one, k, turns[k - 1] if k else None, turns[k])
               for k in range(len(runs))]
    # The summaries (`finalize`) need pandas: imported here while the methods train
    # (XLA runs them without the GIL), not after them (0.3 s of a warm FLamby
    # study's 5 s, before its report could start).
    import pandas  # pylint: disable=g-import-not-at-top,unused-import
    concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    if any(f.done() and f.exception() is not None for f in futures):
      for f in futures:
        f.cancel()  # runs not started yet
      for turn in turns:  # a cancelled run's successor would wait for its claim
        turn.set()
  return [f.result() for f in futures]


def _on_lead(lead: bool, action: Callable[[], Any], size: int = 0) -> list[int]:
  """Runs `action` on process 0 alone (it reads and writes the workdir) and gives every
  process its `size` integer results, or its error: a workdir refused, or one that
  cannot be written, on process 0 stops every process with that reason instead of
  leaving the others waiting for it in the next collective. One process: `action`'s
  result, or its error as a `StudyError`."""
  values, error = [0] * size, ""
  if lead:
    try:
      values = list(action() or [])
    except StudyError as e:
      error = str(e)
    except OSError as e:
      error = f"cannot write the study: {e}"
  if _distributed.is_multiprocess():
    from jax.experimental import multihost_utils
    message = np.frombuffer(error.encode()[:4096], np.uint8)
    encoded = np.zeros(1 + size + 4096, np.int32)
    encoded[0] = len(message)
    encoded[1:1 + size] = values
    encoded[1 + size:1 + size + len(message)] = message
    encoded = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
    values = encoded[1:1 + size].tolist()
    error = bytes(encoded[1 + size:1 + size + encoded[0]].astype(np.uint8)).decode(
        errors="replace")
    if error and not lead:
      error = f"process 0 stopped the study: {error}"
  if error:
    raise StudyError(error)
  return values
