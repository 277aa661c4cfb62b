"""Pytrees on the wire: Flower `ArrayRecord`s keyed by tree path, checked on arrival."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


class WireError(ValueError):
  """A record that does not match what the receiver expects (keys, dtype, shape)."""


def leaf_paths(tree) -> list[tuple[str, Any]]:
  """`[(path, leaf)]` of a pytree, the path as `jax.tree_util.keystr` writes it
  (e.g. `"['Dense_0']['kernel']"`); `None` subtrees have no leaves."""
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def to_record(tree):
  """A pytree of arrays as a Flower `ArrayRecord`, one `Array` per leaf keyed by its
  tree path (host copies; dtype and shape travel with each array).

  Example:
    >>> record = to_record({"w": jnp.zeros((2, 3))})   # keys: "['w']"
  """
  from flwr.app import Array, ArrayRecord  # pylint: disable=g-import-not-at-top
  # (np.ascontiguousarray would make a 0-d array 1-d)
  return ArrayRecord({path: Array(np.array(leaf, order="C", copy=True))
                      for path, leaf in leaf_paths(tree)})


def from_record(record, template, what: str = "record"):
  """The pytree `template` describes, read from `record` (`to_record`'s output).

  Args:
    record: a Flower `ArrayRecord`.
    template: a pytree with the expected structure; its leaves give each array's dtype
      and shape (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`).
    what: how errors name the record (e.g. "hospital 2's update").

  Returns:
    The pytree, leaves as NumPy arrays.

  Raises:
    WireError: a missing or unexpected key, or an array whose dtype or shape differs
      from the template's, naming the key and both values.
  """
  expected = leaf_paths(template)
  keys = set(record.keys())
  missing = [p for p, _ in expected if p not in keys]
  extra = sorted(keys - {p for p, _ in expected})
  if missing or extra:
    raise WireError(f"{what}: keys do not match the model's tree (missing "
                    f"{missing[:5]}, unexpected {extra[:5]})")
  leaves = []
  for path, leaf in expected:
    array = record[path]
    want_dtype, want_shape = np.dtype(leaf.dtype), tuple(leaf.shape)
    if np.dtype(array.dtype) != want_dtype or tuple(array.shape) != want_shape:
      raise WireError(f"{what}: {path} is {array.dtype}{list(array.shape)}, expected "
                      f"{want_dtype}{list(want_shape)}")
    value = array.numpy()
    if value.dtype != want_dtype or value.shape != want_shape:  # the header lied
      raise WireError(f"{what}: {path} holds {value.dtype}{list(value.shape)}, "
                      f"expected {want_dtype}{list(want_shape)}")
    leaves.append(value)
  return jax.tree.unflatten(jax.tree.structure(template), leaves)
