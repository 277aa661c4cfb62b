"""The hospital's handlers and the server's loop behind `fedjax_dx.deploy.app`."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from fedjax_dx.deploy import _plan
from fedjax_dx.deploy import _wire
from fedjax_dx.deploy._plan import DeployError

DEFAULT_CACHE = os.path.join("~", ".cache", "fedjax_dx", "jax_cache")


def process_age() -> float | None:
  """Seconds since this process started (Linux), or None."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return None


def _enable_cache(directory: str) -> None:
  if directory:
    from fedjax_dx.study import _programs  # pylint: disable=g-import-not-at-top
    _programs.enable_compilation_cache(os.path.expanduser(directory))


def _record_bytes(record) -> int:
  return sum(len(array.data) for array in record.values())


# ---------------------------------------------------------------------------------
# A hospital (ClientApp)


def _hospital_data(context) -> dict[str, Any]:
  return _plan.load_hospital(str(context.node_config.get("data-path", "")))


def describe(message, context):
  """Answers the server's first question: which hospital this is and its data's shape
  (no patient data: counts and shapes only)."""
  from flwr.app import ConfigRecord, Message, RecordDict  # pylint: disable=g-import-not-at-top
  data = _hospital_data(context)
  return Message(RecordDict({"config": ConfigRecord({
      "hospital": data["hospital"], "name": data["name"],
      "num-examples": int(len(data["labels"])),
      "feature-shape": [int(d) for d in data["features"].shape[1:]],
      "num-classes": data["num_classes"]})}), reply_to=message)


# A process that serves several rounds (in-process runs, tests) builds each plan and
# compiles its half once: {plan key: (plan, initial state, context shapes, {compiled})}.
_PLANS: dict[tuple, tuple] = {}


def _planned(run):
  key = (str(run["config"]), str(run["method"]), int(run["seed"]),
         tuple(int(s) for s in run["sizes"]), tuple(int(d) for d in run["feature-shape"]),
         int(run["num-classes"]))
  if key not in _PLANS:
    if len(_PLANS) >= 8:
      _PLANS.clear()
    plan = _plan.make_plan(key[0], key[1], key[2], list(key[3]), list(key[4]), key[5])
    template = _plan.initial_state(plan)
    _PLANS[key] = (plan, template, _plan.context_template(plan, template), {})
  return _PLANS[key]


def _plan_of(run, data) -> tuple[_plan.Plan, int]:
  plan = _planned(run)[0]
  sizes = plan.sizes.tolist()
  k = data["hospital"]
  if not 0 <= k < len(sizes) or sizes[k] != len(data["labels"]):
    raise DeployError(f"hospital {k}: the server plans {sizes} training examples per "
                      f"hospital, this hospital holds {len(data['labels'])}")
  return plan, k


def train(message, context, import_s: float | None = None):
  """One round of this hospital: its half of the study's round on its own data."""
  from flwr.app import Message, MetricRecord, RecordDict  # pylint: disable=g-import-not-at-top
  begin = time.time()
  age = process_age()
  run = message.content["run"]
  _enable_cache(str(context.node_config.get("compilation-cache",
                                            run.get("compilation-cache", ""))))
  data = _hospital_data(context)
  plan, k = _plan_of(run, data)
  _, template, ctx_shapes, compiled_halves = _planned(run)
  shared = _wire.from_record(message.content["state"], _plan.shared(template),
                             "the server's state")
  ctx = _wire.from_record(message.content["ctx"], ctx_shapes, "the round's context")
  own = _plan.own_rows(template, k)
  mine = (_wire.from_record(context.state["mine"], own, f"hospital {k}'s own state")
          if "mine" in context.state else own)
  view = _plan.hospital_view(template, shared, mine, k)
  one = _plan.one_hospital(plan, data["features"], data["labels"])
  prepared = time.time()
  half = compiled_halves.get("client")  # the hospital index is an argument: one compile
  if half is None:  # the persistent compilation cache serves later processes
    half = compiled_halves["client"] = plan.algo.halves.client.lower(
        view, ctx, one, k).compile()
  compiled = time.time()
  reply, mine = _plan.client_round(plan, view, ctx, one, k, client_half=half)
  reply = jax.block_until_ready(reply)
  trained = time.time()
  context.state["mine"] = _wire.to_record(mine)
  update = _wire.to_record(reply)
  timing = {"hospital": k, "train-loss": float(np.asarray(reply["train_loss"])[0]),
            "prepare-s": prepared - begin, "compile-s": compiled - prepared,
            "train-s": trained - compiled, "upload-bytes": _record_bytes(update)}
  if age is not None:
    timing["start-s"] = age  # process start to this handler: Python, Flower, imports
  if import_s is not None:
    timing["import-s"] = import_s  # JAX, Flax, optax and fedjax_dx, part of start-s
  return Message(RecordDict({"update": update, "metrics": MetricRecord(timing)}),
                 reply_to=message)


def evaluate(message, context):
  """Scores the global model on this hospital's own test set; only the metrics leave."""
  from flwr.app import Message, MetricRecord, RecordDict  # pylint: disable=g-import-not-at-top
  import fedjax_dx as fdx  # pylint: disable=g-import-not-at-top
  run = message.content["run"]
  _enable_cache(str(context.node_config.get("compilation-cache",
                                            run.get("compilation-cache", ""))))
  data = _hospital_data(context)
  plan, k = _plan_of(run, data)
  template = _planned(run)[1]
  params = _wire.from_record(message.content["global"], template.params, "global model")
  out = {"hospital": k}
  if "test_labels" in data and len(data["test_labels"]):
    test = fdx.stack_clients([np.asarray(data["test_features"], np.float32)],
                             [np.asarray(data["test_labels"])],
                             num_classes=plan.num_classes, name="test data")
    scores = fdx.evaluate(plan.model, params, test)["clients"]
    values = {name: float(np.asarray(v)[0]) for name, v in scores.items()
              if np.ndim(v) == 1}
    out.update({name: v for name, v in values.items() if np.isfinite(v)})
    out["test-examples"] = int(len(data["test_labels"]))
  return Message(RecordDict({"metrics": MetricRecord(out)}), reply_to=message)


# ---------------------------------------------------------------------------------
# The server (ServerApp)


def _wait_for_nodes(grid, hospitals: int, timeout_s: float) -> list[int]:
  deadline = time.time() + timeout_s
  while True:
    nodes = sorted(int(n) for n in grid.get_node_ids())
    if len(nodes) >= hospitals:
      return nodes
    if time.time() > deadline:
      raise DeployError(f"only {len(nodes)} of {hospitals} hospitals (SuperNodes) "
                        f"connected within {timeout_s:.0f} s; start one SuperNode per "
                        "hospital with --superlink pointing at this SuperLink")
    time.sleep(0.5)


REPLY_POLL_S = 0.25  # how often the server asks the SuperLink for replies


def _send_and_receive(grid, messages, timeout_s: float) -> list:
  """The replies to `messages`, polled every `REPLY_POLL_S` (Flower's own
  `send_and_receive` polls every 3 s: up to 3 s idle per round on a quick round)."""
  if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
    return list(grid.send_and_receive(messages, timeout=timeout_s))
  waiting = set(grid.push_messages(messages))
  replies, deadline = [], time.time() + timeout_s
  while waiting:
    for reply in grid.pull_messages(waiting):
      replies.append(reply)
      waiting.discard(reply.metadata.reply_to_message_id)
    if not waiting or time.time() > deadline:
      break
    time.sleep(REPLY_POLL_S)
  return replies


def _ask(grid, messages, timeout_s: float, what: str) -> dict[int, Any]:
  """`{node_id: reply}` for every message, or a DeployError naming the node."""
  replies = {int(r.metadata.src_node_id): r
             for r in _send_and_receive(grid, messages, timeout_s)}
  for m in messages:
    node = int(m.metadata.dst_node_id)
    reply = replies.get(node)
    if reply is None:
      raise DeployError(f"{what}: node {node} sent no reply within {timeout_s:.0f} s")
    if reply.has_error():
      raise DeployError(f"{what}: node {node} failed: {reply.error.reason}")
  return replies


def serve(grid, config, method: str, *, seed: int = 0, rounds: int = 0,
          hospitals: int = 0, workdir: str = "", timeout_s: float = 600.0,
          compilation_cache: str = DEFAULT_CACHE, evaluate: bool = True,
          log: Callable[[str], Any] = print):
  """The server's side of a deployed study method: asks each connected hospital who it
  is, plans the run, then for every round sends the sampled hospitals the global model
  and the round's context, sums their replies with the project's code and applies the
  server optimizer; finally each hospital scores the global model on its test set.

  Args:
    grid: Flower's `Grid` (or anything with `get_node_ids` and `send_and_receive`,
      or `push_messages` and `pull_messages`).
    config: the study config (a ConfigDict, name, path or JSON).
    method: one of `fedjax_dx.deploy.METHODS`.
    seed: the run's seed (the simulation's seed).
    rounds: rounds to run (0: the config's).
    hospitals: SuperNodes to wait for (0: those connected now, at least 1).
    workdir: where to write `global_model.npz`, `rounds.jsonl` and `deployment.json`
      ("" writes nothing).
    timeout_s: how long to wait for hospitals to connect and for each round's replies.
    compilation_cache: JAX's persistent compilation cache for every process ("": off).
    evaluate: at the end, each hospital scores the global model on its test rows.
    log: where progress lines go.

  Returns:
    `(state, evaluation)`: the final `ServerState` and `{hospital: test metrics}` (empty
    without `evaluate`).
  """
  from flwr.app import ConfigRecord, Message, RecordDict  # pylint: disable=g-import-not-at-top
  started = time.time()
  config = _plan.study_config(config)
  config_text = config.to_json(sort_keys=True)
  rounds = int(rounds or config.rounds)
  if rounds < 1:
    raise DeployError(f"rounds must be >= 1, got {rounds}")
  _enable_cache(compilation_cache)
  nodes = _wait_for_nodes(grid, max(int(hospitals), 1), timeout_s)
  if hospitals and len(nodes) > hospitals:
    nodes = nodes[:hospitals]
  described = _ask(grid, [Message(RecordDict({"run": ConfigRecord({"step": "describe"})}),
                                  dst_node_id=n, message_type="query") for n in nodes],
                   timeout_s, "describing the hospitals")
  info = {n: described[n].content["config"] for n in nodes}
  by_index = {}
  for n in nodes:
    k = int(info[n]["hospital"])
    if k in by_index:
      raise DeployError(f"nodes {by_index[k]} and {n} both hold hospital {k}; give each "
                        "SuperNode its own hospital's data-path")
    by_index[k] = n
  if sorted(by_index) != list(range(len(nodes))):
    raise DeployError(f"hospital indices {sorted(by_index)}: expected 0 .. "
                      f"{len(nodes) - 1}, one per SuperNode")
  node_of = [by_index[k] for k in range(len(nodes))]
  first = info[node_of[0]]
  for k, n in enumerate(node_of):
    for field in ("feature-shape", "num-classes"):
      if list(np.ravel(info[n][field])) != list(np.ravel(first[field])):
        raise DeployError(f"hospital {k}: {field} {info[n][field]} differs from "
                          f"hospital 0's {first[field]}")
  sizes = [int(info[n]["num-examples"]) for n in node_of]
  names = [str(info[n]["name"]) for n in node_of]
  feature_shape = [int(d) for d in np.ravel(first["feature-shape"])]
  num_classes = int(first["num-classes"])
  plan = _plan.make_plan(config, method, seed, sizes, feature_shape, num_classes)
  state = _plan.initial_state(plan)
  schedule = _plan.participation(plan, rounds)
  ctx_shapes = _plan.context_template(plan, state)
  reply_shapes = _plan.reply_template(plan, state, ctx_shapes)
  log(f"deploy {method} seed {seed}: {len(nodes)} hospitals {sizes}, {rounds} rounds")

  def run_record(round_index):
    return ConfigRecord({
        "config": config_text, "method": method, "seed": int(seed), "sizes": sizes,
        "feature-shape": feature_shape, "num-classes": num_classes,
        "round": int(round_index), "compilation-cache": compilation_cache or ""})

  lines = []
  for r in range(rounds):
    round_start = time.time()
    ctx = plan.algo.halves.begin(state, plan.sizes, schedule[r])
    called = [int(k) for k in np.flatnonzero(schedule[r] > 0)]
    shared, ctx_record = _wire.to_record(_plan.shared(state)), _wire.to_record(ctx)
    messages = [Message(RecordDict({"run": run_record(r), "state": shared,
                                    "ctx": ctx_record}),
                        dst_node_id=node_of[k], message_type="train") for k in called]
    answers = _ask(grid, messages, timeout_s, f"round {r + 1}")
    replies, timings, up = {}, [], 0
    for k in called:
      answer = answers[node_of[k]]
      update = answer.content["update"]
      up += _record_bytes(update)
      replies[k] = _wire.from_record(update, reply_shapes, f"hospital {k}'s update")
      timings.append(dict(answer.content["metrics"]))
    state, metrics = _plan.server_end(plan, state, ctx, replies)
    line = {"round": r + 1, "hospitals": called,
            "train_loss": float(np.asarray(metrics["train_loss"])),
            "num_uploads": int(np.asarray(metrics["num_uploads"])),
            "wall_s": round(time.time() - round_start, 3),
            "download_bytes": len(called) * (_record_bytes(shared)
                                             + _record_bytes(ctx_record)),
            "upload_bytes": up}
    for key in ("start-s", "import-s", "prepare-s", "compile-s", "train-s"):
      values = [t[key] for t in timings if key in t]
      if values:
        line[f"hospital_{key.replace('-', '_')}_mean"] = round(float(np.mean(values)), 3)
    lines.append(line)
    log(f"round {r + 1}/{rounds}: train loss {line['train_loss']:.4f}, "
        f"{line['num_uploads']} uploads, {line['wall_s']:.1f} s")
  evaluation = {}
  if evaluate:
    global_record = _wire.to_record(state.params)
    answers = _ask(grid, [Message(RecordDict({"run": run_record(rounds),
                                              "global": global_record}),
                                  dst_node_id=n, message_type="evaluate")
                          for n in node_of], timeout_s, "evaluating the global model")
    for k, n in enumerate(node_of):
      scores = dict(answers[n].content["metrics"])
      scores.pop("hospital", None)
      evaluation[k] = scores
  if workdir:
    _write_results(workdir, plan, state, lines, evaluation, names, rounds,
                   time.time() - started)
  return state, evaluation


def _write_results(workdir, plan, state, lines, evaluation, names, rounds, wall_s):
  from fedjax_dx.study import _storage  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  arrays = dict(_wire.leaf_paths(jax.tree.map(np.asarray, state.params)))

  def write_model(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)

  _storage.write_atomic(os.path.join(workdir, "global_model.npz"), write=write_model)
  _storage.write_atomic(os.path.join(workdir, "rounds.jsonl"),
                        "".join(json.dumps(line) + "\n" for line in lines))
  record = {"method": plan.method, "seed": plan.seed, "rounds": rounds,
            "hospitals": names, "sizes": plan.sizes.tolist(),
            "evaluation": {str(k): v for k, v in evaluation.items()},
            "wall_s": round(wall_s, 3), "config": json.loads(plan.config.to_json()),
            "environment": _storage.environment()}
  _storage.write_atomic(os.path.join(workdir, "deployment.json"),
                        json.dumps(record, indent=1, default=str))


def serve_from_context(grid, context) -> None:
  """The ServerApp's main: `serve` with the run config's values."""
  rc = context.run_config
  serve(grid, str(rc["study-config"]), str(rc["method"]), seed=int(rc.get("seed", 0)),
        rounds=int(rc.get("rounds", 0)), hospitals=int(rc.get("hospitals", 0)),
        workdir=str(rc.get("workdir", "")), timeout_s=float(rc.get("timeout", 600)),
        compilation_cache=str(rc.get("compilation-cache", DEFAULT_CACHE)),
        evaluate=bool(rc.get("evaluate", True)),
        log=lambda line: print(line, file=sys.stderr, flush=True))
