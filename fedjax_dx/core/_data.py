"""Client data stacked on a leading `clients` axis, padded with explicit masks."""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class ClientData:
  """Every client's examples, stacked and padded to a common length.

  Real examples of client `k` occupy slots `0 .. num_examples[k] - 1`; the rest is
  padding, flagged False in `mask` (fedjax's `__mask__`). Padding never reaches a loss,
  a gradient or a metric. A client with `num_examples == 0` is a padding client: it
  gets weight 0 in every aggregation.
  """

  features: jax.Array  # [C, N_max, *feature_shape] float32
  labels: jax.Array  # [C, N_max] int32; survival: [C, N_max, 2] float32 (event, time)
  mask: jax.Array  # [C, N_max] bool, True on real examples
  num_examples: jax.Array  # [C] int32, real examples per client

  @property
  def num_clients(self) -> int:
    return self.labels.shape[0]

  @property
  def max_examples(self) -> int:
    return self.labels.shape[1]

  @property
  def feature_shape(self) -> tuple[int, ...]:
    return tuple(self.features.shape[2:])

  def describe(self) -> str:
    """Clients, examples per client and the class balance, in one line."""
    shape = f"features {list(self.features.shape)} {self.features.dtype}"
    if isinstance(self.num_examples, jax.core.Tracer):  # inside jit: shapes only
      return f"{self.num_clients} clients, {shape}"
    sizes = np.asarray(self.num_examples)
    if len(sizes) <= 8:
      per_client = "/".join(map(str, sizes.tolist()))
    else:
      per_client = (f"min {sizes.min()}, median {int(np.median(sizes))}, max "
                    f"{sizes.max()}")
    labels, mask = np.asarray(self.labels), np.asarray(self.mask)
    if labels.ndim == 3:  # survival
      events = labels[..., 0][mask]
      balance = f"events {events.mean():.0%}" if events.size else "no examples"
    else:
      counts = np.bincount(labels[mask], minlength=2) if mask.any() else np.zeros(2)
      shares = counts / max(counts.sum(), 1)
      balance = "classes " + " ".join(f"{c}: {v:.0%}" for c, v in enumerate(shares[:6]))
      balance += " ..." if len(shares) > 6 else ""
    return (f"{self.num_clients} clients, {int(sizes.sum())} examples (per client "
            f"{per_client}), {balance}, {shape}")

  def __repr__(self) -> str:
    return f"ClientData({self.describe()})"


@flax.struct.dataclass
class FederatedData:
  """Train and test parts of every client, plus the task's number of classes."""

  train: ClientData
  test: ClientData
  num_classes: int = flax.struct.field(pytree_node=False)

  @property
  def num_clients(self) -> int:
    return self.train.num_clients

  def __repr__(self) -> str:
    return (f"FederatedData({self.num_clients} clients, {self.num_classes} classes, "
            f"features {self.train.feature_shape}\n  train: {self.train.describe()}\n"
            f"  test:  {self.test.describe()})")


def stack_clients(
    features: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    num_classes: int,
    max_examples: int | None = None,
    name: str = "data",
) -> ClientData:
  """Stacks ragged per-client arrays into one padded `ClientData`.

  Args:
    features: one array `[n_k, *feature_shape]` per client.
    labels: one integer array `[n_k]` per client, values in `[0, num_classes)`.
    num_classes: number of classes of the task (2 for a binary diagnosis).
    max_examples: pad every client to this many slots (default: the largest client).
    name: how the data is called in error messages (e.g. "train", "test").

  Returns:
    The stacked `ClientData`.

  Raises:
    ValueError: naming the argument and client, for mismatched lengths or feature
      shapes, an empty client, non-finite features or labels out of range.

  Example:
    >>> data = stack_clients([np.zeros((3, 2)), np.ones((1, 2))],
    ...                      [np.array([0, 1, 0]), np.array([1])], num_classes=2)
    >>> data.features.shape, data.num_examples.tolist()
    ((2, 3, 2), [3, 1])
  """
  if isinstance(features, np.ndarray) or isinstance(labels, np.ndarray):
    raise ValueError(
        f"{name}: features and labels must be sequences with one array per client, "
        "not a single array")
  if len(features) != len(labels):
    raise ValueError(
        f"{name}: got features for {len(features)} clients but labels for "
        f"{len(labels)} clients; they must match")
  if not features:
    raise ValueError(f"{name}: features must hold at least one client, got none")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")

  features = [np.asarray(f) for f in features]
  labels = [np.asarray(y) for y in labels]
  feature_shape = features[0].shape[1:]
  for k, (x, y) in enumerate(zip(features, labels)):
    if x.ndim < 1 or y.ndim != 1:
      raise ValueError(
          f"{name}: client {k} has features of shape {x.shape} and labels of shape "
          f"{y.shape}; expected features [n, ...] and labels [n]")
    if x.shape[0] != y.shape[0]:
      raise ValueError(
          f"{name}: client {k} has {x.shape[0]} feature rows but {y.shape[0]} labels; "
          "each example needs exactly one label")
    if x.shape[1:] != feature_shape:
      raise ValueError(
          f"{name}: client {k} has feature shape {x.shape[1:]} but client 0 has "
          f"{feature_shape}; all clients must share one feature shape")
    if x.shape[0] == 0:
      raise ValueError(
          f"{name}: client {k} has no examples; every client needs at least one "
          "(drop the client, or let a partitioner guarantee a minimum)")
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
      raise ValueError(f"{name}: client {k} features have non-numeric dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
      bad = np.argwhere(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))[:, 0]
      raise ValueError(
          f"{name}: client {k} features hold NaN or infinite values in rows "
          f"{bad[:5].tolist()}{' ...' if len(bad) > 5 else ''}; impute or drop them first")
    if not np.issubdtype(y.dtype, np.integer) and not (
        np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))):
      raise ValueError(f"{name}: client {k} labels must be integers, got dtype {y.dtype}")
    outside = np.unique(y[(y < 0) | (y >= num_classes)])
    if outside.size:
      raise ValueError(
          f"{name}: client {k} has labels {outside[:5].tolist()} outside the expected "
          f"range [0, {num_classes - 1}] for num_classes={num_classes}")

  sizes = np.array([x.shape[0] for x in features], dtype=np.int32)
  width = int(sizes.max()) if max_examples is None else int(max_examples)
  if width < sizes.max():
    raise ValueError(
        f"max_examples={max_examples} is smaller than the largest client "
        f"({int(sizes.max())} examples)")
  num_clients = len(features)
  x_out = np.zeros((num_clients, width) + feature_shape, dtype=np.float32)
  y_out = np.zeros((num_clients, width), dtype=np.int32)
  for k, (x, y) in enumerate(zip(features, labels)):
    x_out[k, :len(y)] = x
    y_out[k, :len(y)] = y
  mask = np.arange(width)[None, :] < sizes[:, None]
  # device_put, not jnp.asarray: JAX compiles an identity program per new shape to
  # stage a NumPy array through jnp.asarray.
  return ClientData(
      features=jax.device_put(x_out), labels=jax.device_put(y_out),
      mask=jax.device_put(mask), num_examples=jax.device_put(sizes))


def stack_survival(features: Sequence[np.ndarray], events: Sequence[np.ndarray],
                   times: Sequence[np.ndarray], *, max_examples: int | None = None,
                   name: str = "data") -> ClientData:
  """`stack_clients` for survival data: `labels` become `[C, N_max, 2]` float32
  `(event, time)` (event 1 = observed, 0 = censored at `time`).

  Args:
    features: one array `[n_k, num_features]` per client.
    events: one array `[n_k]` of 0/1 per client.
    times: one array `[n_k]` of finite times >= 0 per client.
    max_examples: pad every client to this many slots (default: the largest client).
    name: how the data is called in error messages.

  Example:
    >>> data = stack_survival([np.zeros((2, 3))], [np.array([1, 0])],
    ...                       [np.array([5.0, 9.0])])
    >>> data.labels.shape
    (1, 2, 2)
  """
  if len(events) != len(features) or len(times) != len(features):
    raise ValueError(f"{name}: got features for {len(features)} clients, events for "
                     f"{len(events)} and times for {len(times)}; they must match")
  targets = []
  for k, (e, t) in enumerate(zip(events, times)):
    e, t = np.asarray(e, np.float64), np.asarray(t, np.float64)
    if e.shape != t.shape or e.ndim != 1:
      raise ValueError(f"{name}: client {k} has events of shape {e.shape} and times "
                       f"of shape {t.shape}; expected two arrays [n]")
    if not np.all((e == 0) | (e == 1)):
      raise ValueError(f"{name}: client {k} events must be 0 (censored) or 1 (observed)")
    if not np.all(np.isfinite(t) & (t >= 0)):
      raise ValueError(f"{name}: client {k} times must be finite and >= 0")
    targets.append(np.stack([e, t], axis=1).astype(np.float32))
  # Features and padding as for classification (its checks name the client).
  data = stack_clients(features, [np.zeros(len(y), np.int32) for y in targets],
                       num_classes=2, max_examples=max_examples, name=name)
  labels = np.zeros(data.labels.shape + (2,), np.float32)
  for k, y in enumerate(targets):
    labels[k, :len(y)] = y
  return data.replace(labels=jax.device_put(labels))


def is_survival(data: ClientData) -> bool:
  """Whether `data.labels` hold survival targets `(event, time)` (`stack_survival`)."""
  return data.labels.ndim == 3


def unstack_clients(data: ClientData) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The inverse of `stack_clients`: per-client real examples as NumPy arrays."""
  features, labels, sizes = (
      np.asarray(data.features), np.asarray(data.labels), np.asarray(data.num_examples))
  return ([features[k, :n] for k, n in enumerate(sizes)],
          [labels[k, :n] for k, n in enumerate(sizes)])


def pad_clients(data: ClientData, num_clients: int) -> ClientData:
  """Appends empty (zero-weight) clients until there are `num_clients`."""
  extra = num_clients - data.num_clients
  if extra < 0:
    raise ValueError(
        f"num_clients={num_clients} is smaller than the {data.num_clients} clients held")
  if extra == 0:
    return data
  pad = lambda x: jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
  return jax.tree.map(pad, data)


def pad_examples(data: ClientData, max_examples: int) -> ClientData:
  """Widens every client to `max_examples` slots with masked padding."""
  extra = max_examples - data.max_examples
  if extra < 0:
    raise ValueError(
        f"max_examples={max_examples} is smaller than the current width "
        f"{data.max_examples}")

  def pad(x):
    widths = [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths)

  return data.replace(
      features=pad(data.features), labels=pad(data.labels), mask=pad(data.mask))


def pool_clients(data: ClientData) -> ClientData:
  """Pools every client's real examples into one client (centralized training).

  Examples keep client order (client 0's first), so pooling is deterministic.
  """
  features, labels = unstack_clients(data)
  keep = [k for k, y in enumerate(labels) if len(y)]
  pooled_x = np.concatenate([features[k] for k in keep])
  pooled_y = np.concatenate([labels[k] for k in keep])
  n = len(pooled_y)
  return ClientData(  # host arrays put on the device: nothing to compile
      features=jax.device_put(pooled_x[None]), labels=jax.device_put(pooled_y[None]),
      mask=jax.device_put(np.ones((1, n), bool)),
      num_examples=jax.device_put(np.asarray([n], np.int32)))


def _local_rows(x) -> tuple[np.ndarray, np.ndarray]:
  """`(client indices, rows)` of `x` held by this process: all of them, except for a
  global array of a multi-host run, whose other clients live on other hosts."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    array = np.asarray(x)
    return np.arange(array.shape[0]), array
  shards = {}
  for shard in x.addressable_shards:
    start, stop, _ = shard.index[0].indices(x.shape[0])
    shards.setdefault(start, (np.arange(start, stop), np.asarray(shard.data)))
  ordered = [shards[k] for k in sorted(shards)]
  return (np.concatenate([r for r, _ in ordered]),
          np.concatenate([d for _, d in ordered]))


def check_client_data(data: ClientData, num_classes: int, name: str = "data") -> None:
  """Checks a `ClientData` built by hand; raises ValueError naming what is wrong.

  Runs on the host on concrete arrays, before anything is compiled.
  """
  c, n = data.labels.shape[:2]
  expected = {"features": (c, n), "mask": (c, n), "num_examples": (c,)}
  for field, shape in expected.items():
    actual = getattr(data, field).shape
    if actual[:len(shape)] != shape or (field != "features" and actual != shape):
      raise ValueError(
          f"{name}.{field} has shape {actual}, expected leading shape {shape} to match "
          f"{name}.labels {data.labels.shape}")
  sizes = np.asarray(data.num_examples)
  rows, mask = _local_rows(data.mask)  # multi-host: each process checks its clients
  if np.any(sizes < 0) or np.any(sizes > n):
    raise ValueError(f"{name}.num_examples must lie in [0, {n}], got {sizes.tolist()}")
  if not np.array_equal(mask, np.arange(n)[None, :] < sizes[rows][:, None]):
    raise ValueError(
        f"{name}.mask must be True exactly on the first num_examples slots of each "
        "client (build data with stack_clients)")
  if not np.any(sizes > 0):
    raise ValueError(f"{name}: every client is empty; at least one needs examples")
  feats = _local_rows(data.features)[1]
  valid_feats = feats[mask]
  if not np.all(np.isfinite(valid_feats)):
    raise ValueError(f"{name}.features hold NaN or infinite values in real examples")
  valid_labels = _local_rows(data.labels)[1][mask]
  if is_survival(data):
    events, times = valid_labels[:, 0], valid_labels[:, 1]
    if not (np.all((events == 0) | (events == 1))
            and np.all(np.isfinite(times) & (times >= 0))):
      raise ValueError(f"{name}.labels must hold (event 0/1, finite time >= 0) pairs")
    return
  if valid_labels.size and (valid_labels.min() < 0 or valid_labels.max() >= num_classes):
    raise ValueError(
        f"{name}.labels must lie in [0, {num_classes - 1}], got values in "
        f"[{valid_labels.min()}, {valid_labels.max()}]")
