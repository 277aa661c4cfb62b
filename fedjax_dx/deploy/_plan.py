"""What both sides of a deployment build from the same study config, without Flower.

The server and every hospital build the same `Plan` (model, algorithm, the hospitals'
sizes) from the study config the server sends; the round is the engine's own
`Algorithm.halves`: the server's `begin`, one hospital's `client` half on its own data,
the server's `end`. A hospital keeps its own per-client state (data-stream position,
SCAFFOLD's control variate `c_k`, error-feedback residuals) and sends only its encoded
update, the chain's per-client values (weight, sent, clipped) and its training metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_dx.core import _data
from fedjax_dx.core import _engine
from fedjax_dx.core import _models
from fedjax_dx.core import _sampling

# The methods a deployment runs: the FedAvg family (with its aggregator chain) and
# SCAFFOLD, whose rounds the engine cuts into client and server halves.
METHODS = ("fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi",
           "fedadagrad")
HOSPITAL_FILE = "hospital_{}.npz"


class DeployError(ValueError):
  """A deployment that cannot run as asked (named field, file or hospital)."""


def study_config(config) -> ml_collections.ConfigDict:
  """A study config from a ConfigDict, a ready-made config's name, a config file's
  path, or a JSON file or text (what the server sends the hospitals)."""
  if isinstance(config, ml_collections.ConfigDict):
    return config
  text = os.fspath(config)
  if text.lstrip().startswith("{"):
    return ml_collections.ConfigDict(json.loads(text))
  if text.endswith(".json"):
    with open(text) as f:
      return ml_collections.ConfigDict(json.load(f))
  from fedjax_dx import study  # pylint: disable=g-import-not-at-top
  return study.load_config(text)


@dataclasses.dataclass(frozen=True)
class Plan:
  """One method of a study, as a deployment runs it (the same on every side)."""

  config: ml_collections.ConfigDict  # the method's config (per-method overrides applied)
  method: str
  seed: int
  model: _models.Model
  algo: _engine.Algorithm
  sizes: np.ndarray  # [C] int32 training examples per hospital
  feature_shape: tuple[int, ...]
  num_classes: int

  @property
  def num_clients(self) -> int:
    return int(self.sizes.shape[0])

  @property
  def max_examples(self) -> int:
    return int(self.sizes.max())


def make_plan(config, method: str, seed: int, sizes, feature_shape, num_classes: int
              ) -> Plan:
  """The plan of `method` at `seed` for hospitals of `sizes` training examples.

  Raises:
    DeployError: a method or setting a deployment does not run, naming the field.
  """
  from fedjax_dx import study  # pylint: disable=g-import-not-at-top
  from fedjax_dx.study import _build  # pylint: disable=g-import-not-at-top
  config = study_config(config)
  if method not in METHODS:
    raise DeployError(f"method {method!r}: a deployment runs one of {', '.join(METHODS)}"
                      " (the baselines and cyclic need no network)")
  checked = copy.deepcopy(config)
  checked.methods = method  # the study's checks, for the one method deployed
  try:
    study.check_config(checked)  # every field's range, named, as a study checks it
  except study.StudyError as e:
    raise DeployError(str(e)) from None
  config = copy.deepcopy(study.method_config(config, method))
  if config.model.name == "cox":
    raise DeployError("config.model.name = 'cox': survival models are not deployed yet; "
                      "use a classification config")
  if config.aggregator != "mean":
    raise DeployError(f"config.aggregator = {config.aggregator!r}: a deployed round sums "
                      "the hospitals' updates as they arrive; use 'mean'")
  if config.guard:
    raise DeployError(f"config.guard = {config.guard}: the norm screen needs every update "
                      "of the round at once; use 0 (non-finite updates are still dropped)")
  if config.privacy_audit:
    raise DeployError("config.privacy_audit: canary clients are a simulation's audit; turn "
                      "it off to deploy")
  sizes = np.asarray(sizes, np.int32)
  if sizes.ndim != 1 or sizes.size < 1 or (sizes < 1).any():
    raise DeployError(f"hospital sizes must be positive counts, got {sizes.tolist()}")
  private = config.dp != "none"
  if private and config.dp_target_epsilon > 0:
    if config.dp == "example":
      raise DeployError("config.dp_target_epsilon with dp = 'example': give dp_noise "
                        "(the study's calibrated value) to deploy")
    sampling = _build.dp_sampling(config, method, int(sizes.size))
    config.dp_noise = _build.privacy_noise(config, sampling)
  build = config
  if config.clients_per_round and _build.client_sampling(config, method) != "poisson":
    # The server calls only the sampled hospitals; the round keeps the whole clients
    # axis (a hospital not called weighs 0), as the simulation without cohort_size.
    build = copy.deepcopy(config)
    build.clients_per_round = 0
  model = _build.build_model(config, int(num_classes))
  algo = _build.build_method(build, method, model)
  return Plan(config, method, int(seed), model, algo, sizes,
              tuple(int(d) for d in feature_shape), int(num_classes))


def template_data(plan: Plan) -> _data.ClientData:
  """Zero training data of the hospitals' sizes (the server holds none)."""
  c, n = plan.num_clients, plan.max_examples
  return _data.ClientData(
      features=jnp.zeros((c, n) + plan.feature_shape, jnp.float32),
      labels=jnp.zeros((c, n), jnp.int32),
      mask=jnp.asarray(np.arange(n)[None, :] < plan.sizes[:, None]),
      num_examples=jnp.asarray(plan.sizes))


def seed_keys(seed: int):
  """`(init_key, run_key)` of a seed, as the study splits `PRNGKey(seed)`."""
  keys = jax.random.split(jax.random.PRNGKey(seed))
  return keys[0], keys[1]


def initial_state(plan: Plan, train: _data.ClientData | None = None):
  """The run's state at round 0: the model from the seed's init key, the algorithm's
  state from its run key (`train`: the simulation's data; None: zero data of the
  hospitals' sizes, which is all the state depends on)."""
  init_key, run_key = seed_keys(plan.seed)
  params = plan.model.init(init_key, jnp.zeros((1,) + plan.feature_shape, jnp.float32))
  return plan.algo.init(params, template_data(plan) if train is None else train, run_key)


def participation(plan: Plan, rounds: int) -> np.ndarray:
  """`[rounds, C]`: who takes part in each round, from the project's sampler (the
  study's schedule for this seed)."""
  from fedjax_dx.study import _build  # pylint: disable=g-import-not-at-top
  config = plan.config
  if not config.clients_per_round:
    return np.ones((rounds, plan.num_clients), np.float32)
  return _sampling.sample_participation(plan.seed, rounds, plan.sizes,
                                        config.clients_per_round,
                                        by=_build.client_sampling(config, plan.method))


def shared(state):
  """What the server sends every hospital of the state: all but the per-client rows."""
  return state.replace(positions=None, client_controls=None, client_rows=None)


def own_rows(state, client: int) -> dict:
  """Hospital `client`'s own part of a state: position, control variate, stage rows."""
  row = lambda x: x[client]
  return {"position": row(state.positions),
          "control": jax.tree.map(row, state.client_controls),
          "rows": jax.tree.map(row, state.client_rows)}


def hospital_view(template, shared_state, mine: dict, client: int):
  """The state a hospital trains from: the server's shared state with its own rows at
  index `client` (the client half reads no other row)."""
  put = lambda full, row: jnp.asarray(full).at[client].set(row)
  return shared_state.replace(
      positions=put(template.positions, mine["position"]),
      client_controls=jax.tree.map(put, template.client_controls, mine["control"]),
      client_rows=jax.tree.map(put, template.client_rows, mine["rows"]))


def context_template(plan: Plan, state):
  """Shapes and dtypes of the round context `begin` makes (what a hospital expects)."""
  return jax.eval_shape(
      lambda s, p: plan.algo.halves.begin(s, plan.sizes, p), state,
      jax.ShapeDtypeStruct((plan.num_clients,), jnp.float32))


def one_hospital(plan: Plan, features, labels) -> _data.ClientData:
  """A hospital's training rows as the client half takes them: leading axis 1, padded
  to the largest hospital (the simulation's width, so batches are the same)."""
  return _data.stack_clients([np.asarray(features, np.float32)], [np.asarray(labels)],
                             num_classes=plan.num_classes,
                             max_examples=plan.max_examples, name="hospital data")


def client_round(plan: Plan, view, ctx, data: _data.ClientData, client: int,
                 client_half=None):
  """One hospital's half of a round. Returns `(reply, mine)`: what it sends (encoded
  update, the chain's per-client values, SCAFFOLD's `c_k` change, loss and steps) and
  its own rows after the round. `client_half`: the compiled `halves.client` (default:
  the jitted one)."""
  upload = (client_half or plan.algo.halves.client)(view, ctx, data, client)
  reply = {"message": upload.message, "values": upload.values,
           "control_change": upload.control_change, "train_loss": upload.train_loss,
           "steps_taken": upload.steps_taken}
  first = lambda x: x[0]
  mine = {"position": upload.position[0],
          "control": jax.tree.map(lambda c, d: c[client] + d[0], view.client_controls,
                                  upload.control_change),
          "rows": jax.tree.map(first, upload.rows)}
  return reply, mine


def reply_template(plan: Plan, state, ctx):
  """Shapes and dtypes of a hospital's reply (what the server expects)."""
  one = jax.ShapeDtypeStruct
  data = _data.ClientData(
      features=one((1, plan.max_examples) + plan.feature_shape, jnp.float32),
      labels=one((1, plan.max_examples), jnp.int32),
      mask=one((1, plan.max_examples), jnp.bool_), num_examples=one((1,), jnp.int32))
  return jax.eval_shape(lambda s, c, d: client_round(plan, s, c, d, 0)[0], state, ctx,
                        data)


def server_end(plan: Plan, state, ctx, replies: dict):
  """The server's end of a round from the hospitals' replies `{client: reply}`:
  `(state, round_metrics)`, bit-identical to the simulated round."""
  take = lambda k: (lambda x: x[k:k + 1])
  uploads = {
      k: _engine.Upload(
          message=r["message"], position=take(k)(state.positions),
          train_loss=r["train_loss"], steps_taken=r["steps_taken"], values=r["values"],
          control_change=r["control_change"],
          rows=jax.tree.map(take(k), state.client_rows))
      for k, r in replies.items()}
  return plan.algo.halves.end(state, ctx, plan.sizes, uploads)


def simulate(config, method: str, seed: int, data: _data.FederatedData, rounds: int):
  """The simulated run a deployment must end on: the same plan and seed, every
  hospital vmapped in one jitted `lax.scan` (`Algorithm.run`). Returns the final
  `ServerState`."""
  train = data.train
  plan = make_plan(config, method, seed, np.asarray(train.num_examples),
                   train.feature_shape, data.num_classes)
  state = initial_state(plan, train)
  state, _ = plan.algo.run(state, train, participation=participation(plan, rounds))
  return state


def export_hospitals(data: _data.FederatedData, directory: str,
                     names: list[str] | None = None) -> list[str]:
  """Writes each hospital's own data to `directory/hospital_<k>.npz` (what a hospital
  keeps on its own machine): `features`, `labels`, `test_features`, `test_labels`,
  `hospital` (its stable index k), `name`, `num_classes`. Returns the paths."""
  from fedjax_dx.study import _storage  # pylint: disable=g-import-not-at-top
  if _data.is_survival(data.train):
    raise DeployError("survival data is not deployed yet")
  os.makedirs(directory, exist_ok=True)
  train_x, train_y = _data.unstack_clients(data.train)
  test_x, test_y = _data.unstack_clients(data.test)
  paths = []
  for k, (x, y, tx, ty) in enumerate(zip(train_x, train_y, test_x, test_y)):
    path = os.path.join(directory, HOSPITAL_FILE.format(k))
    name = names[k] if names else f"hospital {k}"

    def write(tmp, x=x, y=y, tx=tx, ty=ty, k=k, name=name):
      with open(tmp, "wb") as f:
        np.savez(f, features=x, labels=y, test_features=tx, test_labels=ty,
                 hospital=np.int32(k), name=np.str_(name),
                 num_classes=np.int32(data.num_classes))

    _storage.write_atomic(path, write=write)
    paths.append(path)
  return paths


def load_hospital(path: str) -> dict[str, Any]:
  """A hospital's data file (`export_hospitals`), checked; DeployError names the file
  and what is wrong."""
  if not path:
    raise DeployError("node config data-path is empty: start the SuperNode with "
                      "--node-config \"data-path='/path/to/hospital_0.npz'\"")
  if not os.path.isfile(path):
    raise DeployError(f"data-path {path!r}: no such file")
  try:
    with np.load(path, allow_pickle=False) as f:
      out = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise DeployError(f"data-path {path!r}: not a hospital data file ({e})") from None
  need = ("features", "labels", "hospital", "num_classes")
  missing = [k for k in need if k not in out]
  if missing:
    raise DeployError(f"data-path {path!r}: missing arrays {missing} (write it with "
                      "fedjax_dx.deploy.export_hospitals)")
  x, y = out["features"], out["labels"]
  if x.ndim < 2 or len(x) != len(y) or len(y) == 0:
    raise DeployError(f"data-path {path!r}: features {list(x.shape)} and labels "
                      f"{list(y.shape)} must be [n, ...] and [n], n >= 1")
  out["hospital"] = int(out["hospital"])
  out["num_classes"] = int(out["num_classes"])
  out["name"] = str(out.get("name", f"hospital {out['hospital']}"))
  return out
