"""Plain sequential references: a Python loop over clients, no padding, no vmap."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_dx as fdx


def client_key(rng, round_index, client, budget):
  """The key derivation the engine documents: a client's data order key."""
  stream_key, round_base = jax.random.split(rng)
  if budget.steps is not None:
    return jax.random.fold_in(stream_key, client)
  return jax.random.fold_in(jax.random.fold_in(round_base, round_index), client)


_GRADIENTS = {}


def _batch_gradient(model):
  """The gradient of one batch's mean loss, compiled once per model (the loop around it
  stays plain Python: one client, one step at a time)."""
  if id(model) not in _GRADIENTS:
    def loss_fn(p, xb, yb):
      if model.output == "cox":  # the batch's partial likelihood, per real example
        scores = model.apply(p, xb)[:, 0]
        ones = jnp.ones(scores.shape)
        return fdx.cox_loss_terms(scores, yb[:, 0], yb[:, 1], ones).sum() / len(yb)
      return jnp.mean(fdx.per_example_loss(model, model.apply(p, xb), yb))
    _GRADIENTS[id(model)] = (model, jax.jit(jax.grad(loss_fn)))
  return _GRADIENTS[id(model)][1]


def train_one_client(model, optimizer, params, x, y, key, start, budget, batch_size,
                     opt_state=None, prox_mu=0.0, correction=None, steps_out=None):
  """Trains one client on its unpadded examples, one Python step at a time."""
  anchor = params
  n = len(y)
  if budget.epochs is not None:
    start = 0  # the epochs budget restarts the stream every round
  limit = start + (budget.steps * batch_size if budget.steps is not None
                   else n * budget.epochs)
  orders = {}

  def order(epoch):
    if epoch not in orders:
      orders[epoch] = np.asarray(fdx.epoch_order(key, epoch, n, n))[:n]
    return orders[epoch]

  opt_state = optimizer.init(params) if opt_state is None else opt_state
  position = start
  while position < limit:
    batch_positions = range(position, min(position + batch_size, limit))
    idx = np.array([order(p // n)[p % n] for p in batch_positions])
    grads = _batch_gradient(model)(params, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    if prox_mu:
      grads = jax.tree.map(lambda g, w, a: g + prox_mu * (w - a), grads, params, anchor)
    if correction is not None:
      grads = jax.tree.map(lambda g, c: g + c, grads, correction)
    if steps_out is not None:
      steps_out.append(1)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    position += batch_size
  return params, opt_state, limit


def fedavg_rounds(model, optimizer, params, xs, ys, *, rng, num_rounds, budget,
                  batch_size, participation=None, weighting="num_examples"):
  """FedAvg as a loop over rounds and clients, averaging with NumPy."""
  num_clients = len(ys)
  positions = [0] * num_clients
  for r in range(num_rounds):
    finals, weights = [], []
    for k in range(num_clients):
      takes_part = participation is None or participation[r][k] > 0
      if not takes_part:
        continue
      key = client_key(rng, r, k, budget)
      p_k, _, positions[k] = train_one_client(
          model, optimizer, params, xs[k], ys[k], key, positions[k], budget, batch_size)
      finals.append(p_k)
      weights.append(len(ys[k]) if weighting == "num_examples" else 1.0)
    w = np.asarray(weights, np.float64) / np.sum(weights)
    params = jax.tree.map(
        lambda *leaves: np.tensordot(w, np.stack([np.asarray(l, np.float64) for l in leaves]),
                                     axes=1).astype(np.float32),
        *finals)
  return params


def local_rounds(model, optimizer, params, xs, ys, *, rng, num_rounds, budget,
                 batch_size):
  """Local-only training: each client alone, optimizer state kept across rounds."""
  results = []
  for k in range(len(ys)):
    p, opt_state, position = params, None, 0
    for r in range(num_rounds):
      key = client_key(rng, r, k, budget)
      p, opt_state, position = train_one_client(
          model, optimizer, p, xs[k], ys[k], key, position, budget, batch_size, opt_state)
    results.append(p)
  return results


def num_steps_reference(n, budget, batch_size):
  return budget.steps if budget.steps is not None else math.ceil(n * budget.epochs / batch_size)


def _weighted(trees, weights):
  w = np.asarray(weights, np.float64) / np.sum(weights)
  return jax.tree.map(
      lambda *leaves: np.tensordot(w, np.stack([np.asarray(l, np.float64) for l in leaves]),
                                   axes=1), *trees)


def fedopt_rounds(model, optimizer, server_optimizer, params, xs, ys, *, rng, num_rounds,
                  budget, batch_size, prox_mu=0.0):
  """FedAvg/FedProx/FedOpt: loop over clients, then a server optax step on -mean(delta)."""
  server_state = server_optimizer.init(params)
  positions = [0] * len(ys)
  for r in range(num_rounds):
    deltas, weights = [], []
    for k in range(len(ys)):
      key = client_key(rng, r, k, budget)
      p_k, _, positions[k] = train_one_client(
          model, optimizer, params, xs[k], ys[k], key, positions[k], budget, batch_size,
          prox_mu=prox_mu)
      deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p_k, params))
      weights.append(len(ys[k]))
    mean = _weighted(deltas, weights)
    pseudo = jax.tree.map(lambda d: -np.asarray(d, np.float32), mean)
    updates, server_state = server_optimizer.update(pseudo, server_state, params)
    params = optax.apply_updates(params, updates)
  return params


def scaffold_rounds(model, learning_rate, params, xs, ys, *, rng, num_rounds, budget,
                    batch_size, participation, server_learning_rate=1.0):
  """SCAFFOLD option II, one client at a time, with NumPy control variates."""
  num_clients = len(ys)
  zeros = jax.tree.map(lambda p: np.zeros_like(np.asarray(p)), params)
  control = zeros
  client_controls = [zeros] * num_clients
  positions = [0] * num_clients
  optimizer = optax.sgd(learning_rate)
  for r in range(num_rounds):
    deltas, weights, control_deltas = [], [], []
    for k in range(num_clients):
      if participation[r][k] <= 0:
        continue
      key = client_key(rng, r, k, budget)
      correction = jax.tree.map(lambda c, ck: c - ck, control, client_controls[k])
      steps = []
      y_k, _, positions[k] = train_one_client(
          model, optimizer, params, xs[k], ys[k], key, positions[k], budget, batch_size,
          correction=correction, steps_out=steps)
      delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), y_k, params)
      new_ck = jax.tree.map(lambda ck, c, d: ck - c - d / (len(steps) * learning_rate),
                            client_controls[k], control, delta)
      control_deltas.append(jax.tree.map(lambda a, b: a - b, new_ck, client_controls[k]))
      client_controls[k] = new_ck
      deltas.append(delta)
      weights.append(len(ys[k]))
    mean = _weighted(deltas, weights)
    params = jax.tree.map(lambda p, d: np.asarray(p) + server_learning_rate * d, params,
                          mean)
    params = jax.tree.map(lambda p: np.asarray(p, np.float32), params)
    control = jax.tree.map(lambda c, *ds: c + sum(ds) / num_clients, control,
                           *control_deltas)
  return params, client_controls


def flamby_scaffold_rounds(model, learning_rate, params, xs, ys, *, rng, num_rounds,
                           steps, batch_size, server_learning_rate=1.0):
  """FLamby's `Scaffold.perform_round` (flamby/strategies/scaffold.py), transcribed:
  no server control variate; each client keeps its correction and its previous local
  model (scaled by the server learning rate), adds `(x - previous) / (server_lr * lr *
  steps)` to the correction at the start of a round, trains with gradient -
  correction, and the server adds the n_k-weighted mean of the scaled updates."""
  tree = lambda t: jax.tree.map(lambda p: np.asarray(p, np.float64), t)
  x = tree(params)
  num_clients = len(ys)
  previous = [x] * num_clients
  corrections = [jax.tree.map(np.zeros_like, x)] * num_clients
  positions = [0] * num_clients
  budget = fdx.LocalBudget(steps=steps)
  scale = server_learning_rate * learning_rate * steps
  for r in range(num_rounds):
    updates, new_previous = [], []
    for k in range(num_clients):
      corrections[k] = jax.tree.map(lambda c, s, q: c + (s - q) / scale, corrections[k],
                                    x, previous[k])
      start = jax.tree.map(lambda p: np.asarray(p, np.float32), x)
      local, _, positions[k] = train_one_client(
          model, optax.sgd(learning_rate), start, xs[k], ys[k],
          client_key(rng, r, k, budget), positions[k], budget, batch_size,
          correction=jax.tree.map(lambda c: -np.asarray(c, np.float32), corrections[k]))
      scaled = jax.tree.map(lambda new, old: server_learning_rate * np.asarray(new)
                            + (1 - server_learning_rate) * old, local, x)
      new_previous.append(scaled)
      updates.append(jax.tree.map(lambda a, b: a - b, scaled, x))
    previous = new_previous
    mean = _weighted(updates, [len(y) for y in ys])
    x = jax.tree.map(lambda p, d: p + d, x, mean)
  return jax.tree.map(lambda p: np.asarray(p, np.float32), x)


def side_key(rng, purpose):
  """The engine's documented non-data keys: split(rng, 5)[purpose]."""
  return jax.random.split(rng, 5)[purpose]


def straggler_rounds(model, optimizer, params, xs, ys, *, rng, num_rounds, budget,
                     batch_size, fraction, policy, prox_mu=0.0):
  """FedAvg/FedProx with stragglers: each straggler trains a shorter budget, one client
  at a time; 'drop' leaves it out of the average, 'keep' averages its partial work."""
  num_clients = len(ys)
  full = budget.steps if budget.steps is not None else budget.epochs
  positions = [0] * num_clients
  for r in range(num_rounds):
    is_straggler, work = fdx.straggler_work(
        jax.random.fold_in(side_key(rng, 2), r), jnp.ones((num_clients,)), fraction,
        full)
    is_straggler, work = np.asarray(is_straggler), np.asarray(work)
    deltas, weights = [], []
    for k in range(num_clients):
      short = (fdx.LocalBudget(steps=int(work[k])) if budget.steps is not None
               else fdx.LocalBudget(epochs=int(work[k])))
      key = client_key(rng, r, k, budget)
      p_k, _, positions[k] = train_one_client(
          model, optimizer, params, xs[k], ys[k], key, positions[k], short, batch_size,
          prox_mu=prox_mu)
      if policy == "drop" and is_straggler[k]:
        continue
      deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p_k, params))
      weights.append(len(ys[k]))
    if deltas:
      mean = _weighted(deltas, weights)
      params = jax.tree.map(lambda p, d: (np.asarray(p) + d).astype(np.float32), params,
                            mean)
  return params


def cyclic_rounds(model, optimizer, params, xs, ys, *, rng, num_rounds, budget,
                  batch_size):
  """Cyclic weight transfer: one client per round, in the engine's documented order."""
  num_clients = len(ys)
  positions = [0] * num_clients
  visits = []
  for r in range(num_rounds):
    order = np.asarray(fdx.cyclic_order(side_key(rng, 4), r // num_clients, num_clients))
    k = int(order[r % num_clients])
    visits.append(k)
    params, _, positions[k] = train_one_client(
        model, optimizer, params, xs[k], ys[k], client_key(rng, r, k, budget),
        positions[k], budget, batch_size)
  return params, visits


def fine_tuned(model, optimizer, params, xs, ys, *, rng, round_index, steps, batch_size):
  """Each client's copy of the global model after `steps` local steps on its data."""
  base = jax.random.fold_in(side_key(rng, 3), round_index)
  return [train_one_client(model, optimizer, params, xs[k], ys[k],
                           jax.random.fold_in(base, k), 0, fdx.LocalBudget(steps=steps),
                           batch_size)[0]
          for k in range(len(ys))]


class Algorithm2Server:
  """The server step of Reddi et al. (2021), Algorithm 2, transcribed in NumPy
  (float64) with the `init`/`update` calls `fedopt_rounds` makes: on the averaged
  client change `delta = -pseudo_gradient`,

    m = b1 m + (1 - b1) delta
    v = v + delta^2 (adagrad) | v - (1 - b2) delta^2 sign(v - delta^2) (yogi)
      | b2 v + (1 - b2) delta^2 (adam)
    x = x + lr m / (sqrt(v) + tau),   from m = 0 and v = initial_v.
  """

  def __init__(self, server, lr, b1, b2, tau, initial_v):
    self.server, self.lr, self.b1, self.b2 = server, lr, b1, b2
    self.tau, self.initial_v = tau, initial_v

  def init(self, params):
    leaves = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
    return ([np.zeros_like(p) for p in leaves],
            [np.full_like(p, self.initial_v) for p in leaves])

  def update(self, pseudo_gradient, state, params=None):
    del params
    ms, vs = state
    steps, new_ms, new_vs = [], [], []
    for g, m, v in zip(jax.tree.leaves(pseudo_gradient), ms, vs):
      delta = -np.asarray(g, np.float64)
      m = self.b1 * m + (1 - self.b1) * delta
      if self.server == "adagrad":
        v = v + delta**2
      elif self.server == "yogi":
        v = v - (1 - self.b2) * delta**2 * np.sign(v - delta**2)
      else:
        v = self.b2 * v + (1 - self.b2) * delta**2
      steps.append((self.lr * m / (np.sqrt(v) + self.tau)).astype(np.float32))
      new_ms.append(m)
      new_vs.append(v)
    return (jax.tree.unflatten(jax.tree.structure(pseudo_gradient), steps),
            (new_ms, new_vs))
