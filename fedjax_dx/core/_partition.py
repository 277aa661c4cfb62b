"""Partitioners: split one pooled data set into clients, seeded and checked.

Each returns one index array per client; together they hold every example exactly once.
A partition that cannot give each client `min_examples` raises a ValueError that says
why. All use NumPy's `Generator` seeded with `seed` (host-side data preparation).
"""

from __future__ import annotations

import os

from typing import Sequence

import numpy as np

from fedjax_dx.core._data import ClientData, stack_clients


def _check_common(num_examples: int, num_clients: int, min_examples: int) -> None:
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if min_examples < 0:
    raise ValueError(f"min_examples must be >= 0, got {min_examples}")
  if num_clients * min_examples > num_examples:
    raise ValueError(
        f"cannot give each of num_clients={num_clients} clients min_examples="
        f"{min_examples} examples: only {num_examples} examples in all (at most "
        f"{num_examples // max(min_examples, 1)} clients)")


def iid(num_examples: int, num_clients: int, seed: int, min_examples: int = 1
        ) -> list[np.ndarray]:
  """A uniformly random split into clients of (nearly) equal size."""
  _check_common(num_examples, num_clients, min_examples)
  order = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(part) for part in np.array_split(order, num_clients)]


def quantity_skew(num_examples: int, num_clients: int, seed: int, *, sigma: float = 1.0,
                  power: float | None = None, min_examples: int = 1) -> list[np.ndarray]:
  """Random examples, but client sizes drawn lognormal(0, sigma) (or power law).

  Args:
    num_examples: examples to split.
    num_clients: clients.
    seed: seed.
    sigma: lognormal spread of the client sizes (larger = more skewed).
    power: if given, sizes follow a power law: size_k ∝ (k+1)^(-power), clients shuffled.
    min_examples: each client gets at least this many.
  """
  _check_common(num_examples, num_clients, min_examples)
  if sigma < 0 or (power is not None and power < 0):
    raise ValueError(f"sigma and power must be >= 0, got sigma={sigma}, power={power}")
  rng = np.random.default_rng(seed)
  if power is None:
    shares = rng.lognormal(0.0, sigma, num_clients)
  else:
    shares = rng.permutation((np.arange(num_clients) + 1.0) ** (-power))
  spare = num_examples - num_clients * min_examples
  sizes = min_examples + np.floor(spare * shares / shares.sum()).astype(int)
  leftover = num_examples - sizes.sum()
  sizes[np.argsort(-shares, kind="stable")[:leftover]] += 1
  order = rng.permutation(num_examples)
  return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, *,
              min_examples: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
  """Label skew: each class is spread over clients with proportions ~ Dirichlet(alpha).

  Smaller `alpha` gives more skew (alpha -> inf approaches IID). Draws are repeated (at
  most `max_tries`) until every client holds `min_examples`, as in NIID-Bench.
  """
  labels = np.asarray(labels)
  _check_common(len(labels), num_clients, min_examples)
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    for c in classes:
      members = rng.permutation(np.flatnonzero(labels == c))
      proportions = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(proportions) * len(members)).astype(int)[:-1]
      for k, chunk in enumerate(np.split(members, cuts)):
        parts[k].append(chunk)
    sizes = [sum(len(c) for c in p) for p in parts]
    if min(sizes) >= min_examples:
      return [np.sort(np.concatenate(p)) for p in parts]
  raise ValueError(
      f"Dirichlet(alpha={alpha}) over {num_clients} clients left some client with fewer "
      f"than min_examples={min_examples} examples in {max_tries} draws; use fewer "
      "clients, a larger alpha or a smaller min_examples")


def pathological(labels: np.ndarray, num_clients: int, classes_per_client: int,
                 seed: int, *, min_examples: int = 1) -> list[np.ndarray]:
  """Each client holds examples of exactly `classes_per_client` classes.

  Classes are dealt to clients in a shuffled round-robin so every class has a holder,
  and each class's examples are split evenly among the clients that hold it.
  """
  labels = np.asarray(labels)
  _check_common(len(labels), num_clients, min_examples)
  classes = np.unique(labels)
  if not 1 <= classes_per_client <= len(classes):
    raise ValueError(
        f"classes_per_client must lie in [1, {len(classes)}] (the classes present), got "
        f"{classes_per_client}")
  if num_clients * classes_per_client < len(classes):
    raise ValueError(
        f"{num_clients} clients x {classes_per_client} classes each cannot cover all "
        f"{len(classes)} classes, so some examples would have no client; use more clients "
        "or classes_per_client")
  rng = np.random.default_rng(seed)
  deck = np.concatenate([rng.permutation(classes) for _ in range(
      -(-num_clients * classes_per_client // len(classes)))])
  holders: dict = {c: [] for c in classes}
  client_classes = []
  position = 0
  for k in range(num_clients):
    mine = []
    while len(mine) < classes_per_client:
      c = deck[position % len(deck)]
      position += 1
      if c not in mine:
        mine.append(c)
    client_classes.append(mine)
    for c in mine:
      holders[c].append(k)
  parts = [[] for _ in range(num_clients)]
  for c in classes:
    members = rng.permutation(np.flatnonzero(labels == c))
    for k, chunk in zip(holders[c], np.array_split(members, len(holders[c]))):
      parts[k].append(chunk)
  result = [np.sort(np.concatenate(p)) for p in parts]
  too_small = [k for k, p in enumerate(result) if len(p) < min_examples]
  if too_small:
    raise ValueError(
        f"pathological partition gives clients {too_small[:5]} fewer than min_examples="
        f"{min_examples} examples (their classes are too rare); use fewer clients")
  return result


def natural(groups: Sequence[int] | np.ndarray, num_clients: int | None = None,
            min_examples: int = 1) -> list[np.ndarray]:
  """One client per natural group (e.g. hospital id `0 .. num_clients-1`)."""
  groups = np.asarray(groups)
  if groups.size and (groups.min() < 0 or not np.issubdtype(groups.dtype, np.integer)):
    raise ValueError("groups must be non-negative integer ids")
  num_clients = int(groups.max()) + 1 if num_clients is None else num_clients
  parts = [np.flatnonzero(groups == k) for k in range(num_clients)]
  too_small = [k for k, p in enumerate(parts) if len(p) < min_examples]
  if too_small:
    raise ValueError(
        f"natural partition: groups {too_small[:5]} hold fewer than min_examples="
        f"{min_examples} examples")
  return parts


def to_client_data(features: np.ndarray, labels: np.ndarray, parts: list[np.ndarray], *,
                   num_classes: int, name: str = "data") -> ClientData:
  """Stacks a partition of pooled arrays into `ClientData`."""
  return stack_clients([features[p] for p in parts], [labels[p] for p in parts],
                       num_classes=num_classes, name=name)


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int
                 ) -> np.ndarray:
  """`[num_clients, num_classes]` examples of each class held by each client."""
  labels = np.asarray(labels)
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def plot_label_counts(counts: np.ndarray, path: str | None, title: str = "",
                      class_names: Sequence[str] | None = None,
                      client_names: Sequence[str] | None = None):
  """Draws label counts per client as stacked bars (seaborn) and saves a PNG at `path`
  (returned), or returns the matplotlib Figure when `path` is None; bars are labelled
  with `client_names` (e.g. the hospitals) when given, else client indices. Global
  matplotlib state (backend, open figures) is left alone."""
  from matplotlib.figure import Figure
  import pandas as pd
  import seaborn as sns

  num_clients, num_classes = counts.shape
  names = list(class_names or [str(c) for c in range(num_classes)])
  frame = pd.DataFrame(counts, columns=names)
  frame.index.name = "client"
  fig = Figure(figsize=(max(5.0, 0.35 * num_clients + 2), 3.6))
  ax = fig.subplots()
  bottom = np.zeros(num_clients)
  palette = sns.color_palette("colorblind", num_classes)
  for c, name in enumerate(names):
    ax.bar(np.arange(num_clients), frame[name], bottom=bottom, color=palette[c],
           label=name, width=0.8)
    bottom += frame[name].to_numpy()
  ax.set_xlabel("client")
  ax.set_ylabel("examples (count)")
  ax.set_xticks(np.arange(num_clients))
  if client_names is not None and num_clients <= 20:
    wide = sum(len(n) for n in client_names) > 6 * num_clients
    ax.set_xticklabels(client_names, rotation=25 if wide else 0,
                       ha="right" if wide else "center", fontsize=8)
  if num_clients > 20:
    ax.set_xticks(np.arange(0, num_clients, max(1, num_clients // 10)))
  ax.set_title(title or "label counts per client")
  ax.legend(title="label", bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
  sns.despine(fig)
  fig.tight_layout()
  if path is None:
    return fig
  import tempfile  # pylint: disable=g-import-not-at-top
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".png")
  os.close(fd)
  try:  # a temporary file, then a rename: an earlier figure stays whole on failure
    fig.savefig(tmp, dpi=120, format="png")
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # a plain file's permissions (mkstemp's are 0600)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
