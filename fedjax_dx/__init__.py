"""fedjax_dx: federated learning for disease diagnosis, every hospital in one jitted round.

Clients (hospitals) are stacked on a leading `clients` axis; a round trains all of them
at once with `jax.vmap` inside one `jax.jit`, and several rounds run in one `lax.scan`.

Example:
  >>> import jax, optax, fedjax_dx as fdx
  >>> data = fdx.synthetic_binary(seed=0, num_clients=4, examples_per_client=80)
  >>> model = fdx.logistic_regression()
  >>> params = model.init(jax.random.PRNGKey(0), data.train.features[0, :1])
  >>> algo = fdx.fedavg(model, optax.sgd(0.1), batch_size=16, local_epochs=1)
  >>> state = algo.init(params, data.train, jax.random.PRNGKey(1))
  >>> state, round_metrics = algo.run(state, data.train, num_rounds=20)
  >>> fdx.evaluate(model, state.params, data.test)["pooled"]["accuracy"]
"""

import time as _time

_IMPORT_STARTED = _time.time()  # a deployed hospital reports its import time


from fedjax_dx import agg
from fedjax_dx import client
from fedjax_dx.agg import adaptive_update_noise
from fedjax_dx.agg import choose_share
from fedjax_dx.agg._codecs import stochastic_quantize
from fedjax_dx.agg._codecs import top_k
from fedjax_dx.agg._codecs import upload_bytes
from fedjax_dx.agg._functional import coordinate_median
from fedjax_dx.agg._functional import krum
from fedjax_dx.agg._functional import make_aggregator
from fedjax_dx.agg._functional import trimmed_mean
from fedjax_dx.agg._functional import weighted_mean
from fedjax_dx.core._data import check_client_data
from fedjax_dx.core._data import ClientData
from fedjax_dx.core._data import FederatedData
from fedjax_dx.core._data import pad_clients
from fedjax_dx.core._data import pad_examples
from fedjax_dx.core._data import pool_clients
from fedjax_dx.core._data import stack_clients
from fedjax_dx.core._data import stack_survival
from fedjax_dx.core._data import unstack_clients
from fedjax_dx.core._engine import Algorithm
from fedjax_dx.core._engine import ServerState
from fedjax_dx.core._engine import straggler_work
from fedjax_dx.core._engine import Systems
from fedjax_dx.core._local import Batch
from fedjax_dx.core._local import BatchSlots
from fedjax_dx.core._local import ClientOutput
from fedjax_dx.core._local import ClientState
from fedjax_dx.core._local import epoch_order
from fedjax_dx.core._local import gather_batch
from fedjax_dx.core._local import local_trainer
from fedjax_dx.core._local import LocalBudget
from fedjax_dx.core._local import LocalTrainer
from fedjax_dx.core._local import poisson_bound
from fedjax_dx.core._local import train_client
from fedjax_dx.core._local import train_clients
from fedjax_dx.core._metrics import binary_auc
from fedjax_dx.core._metrics import classification_metrics
from fedjax_dx.core._metrics import evaluate
from fedjax_dx.core._metrics import evaluate_personalized
from fedjax_dx.core._metrics import evaluate_stacked
from fedjax_dx.core._metrics import METRIC_NAMES
from fedjax_dx.core._metrics import metrics_table
from fedjax_dx.core._models import cnn
from fedjax_dx.core._models import cox
from fedjax_dx.core._models import from_flax
from fedjax_dx.core._models import logistic_regression
from fedjax_dx.core._models import mlp
from fedjax_dx.core._models import Model
from fedjax_dx.core._models import per_example_loss
from fedjax_dx.core._models import probabilities
from fedjax_dx.core._sampling import sample_participation
from fedjax_dx.core._survival import concordance_index
from fedjax_dx.core._survival import cox_loss_terms
from fedjax_dx.core._scale import available_memory
from fedjax_dx.core._scale import choose_client_chunk
from fedjax_dx.core._scale import client_bucket
from fedjax_dx.core._scale import round_memory
from fedjax_dx.core._sharding import client_mesh
from fedjax_dx.core._sharding import padded_client_count
from fedjax_dx.core._sharding import replicate
from fedjax_dx.core._sharding import shard_clients
from fedjax_dx.core._synthetic import synthetic_binary
from fedjax_dx.core._synthetic import synthetic_fedprox
from fedjax_dx.privacy._accounting import epsilon as privacy_epsilon
from fedjax_dx.privacy._accounting import example_level_epsilon
from fedjax_dx.privacy._accounting import example_level_noise
from fedjax_dx.privacy._accounting import noise_for_epsilon
from fedjax_dx.privacy._mechanisms import clip_updates
from fedjax_dx.privacy._membership import membership_inference
from fedjax_dx.strategies._baselines import batched_runner
from fedjax_dx.strategies._baselines import centralized
from fedjax_dx.strategies._baselines import global_params
from fedjax_dx.strategies._baselines import local_only
from fedjax_dx.strategies._baselines import LocalState
from fedjax_dx.strategies._baselines import stack_states
from fedjax_dx.strategies._cyclic import cyclic
from fedjax_dx.strategies._cyclic import cyclic_order
from fedjax_dx.strategies._fedavg import fedavg
from fedjax_dx.strategies._fedavg import fedavgm
from fedjax_dx.strategies._fedavg import fedopt
from fedjax_dx.strategies._fedavg import fedprox
from fedjax_dx.strategies._fedopt import FedOptState
from fedjax_dx.strategies._fedopt import fedopt_server
from fedjax_dx.strategies._scaffold import scaffold

# Namespaces: fdx.agg (aggregator stages), fdx.client (client transformations),
# fdx.distributed, fdx.partition, fdx.secagg.
from fedjax_dx.core import _distributed as distributed
from fedjax_dx.core import _partition as partition
from fedjax_dx.privacy import _secagg as secagg

__version__ = "0.1.0"

# Loaded on first use (`fdx.study.run(...)`, `fdx.datasets.from_file(...)`): the study
# harness and the data sets import pandas and tensorflow-datasets.
_LAZY = {"study": ("fedjax_dx.study", None), "datasets": ("fedjax_dx.datasets", None),
         "load_results": ("fedjax_dx.study", "load_results"),
         "load_model": ("fedjax_dx.study", "load_model")}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'fedjax_dx' has no attribute {name!r}")
  import importlib  # pylint: disable=g-import-not-at-top
  module_name, attribute = _LAZY[name]
  module = importlib.import_module(module_name)
  return module if attribute is None else getattr(module, attribute)

__all__ = (
    "datasets",
    "load_model",
    "load_results",
    "study",
    "metrics_table",
    "poisson_bound",
    "adaptive_update_noise",
    "Algorithm",
    "Systems",
    "available_memory",
    "Batch",
    "BatchSlots",
    "batched_runner",
    "binary_auc",
    "centralized",
    "choose_share",
    "check_client_data",
    "classification_metrics",
    "choose_client_chunk",
    "client_bucket",
    "clip_updates",
    "client_mesh",
    "cnn",
    "concordance_index",
    "cox",
    "cox_loss_terms",
    "cyclic",
    "cyclic_order",
    "agg",
    "client",
    "distributed",
    "ClientData",
    "ClientOutput",
    "ClientState",
    "epoch_order",
    "evaluate",
    "evaluate_personalized",
    "evaluate_stacked",
    "example_level_epsilon",
    "example_level_noise",
    "coordinate_median",
    "fedavg",
    "fedavgm",
    "fedopt",
    "fedopt_server",
    "fedprox",
    "krum",
    "make_aggregator",
    "scaffold",
    "trimmed_mean",
    "weighted_mean",
    "FederatedData",
    "FedOptState",
    "gather_batch",
    "from_flax",
    "global_params",
    "local_only",
    "local_trainer",
    "LocalBudget",
    "LocalState",
    "LocalTrainer",
    "logistic_regression",
    "membership_inference",
    "METRIC_NAMES",
    "mlp",
    "Model",
    "noise_for_epsilon",
    "pad_clients",
    "pad_examples",
    "padded_client_count",
    "per_example_loss",
    "pool_clients",
    "privacy_epsilon",
    "probabilities",
    "replicate",
    "round_memory",
    "sample_participation",
    "secagg",
    "ServerState",
    "shard_clients",
    "stack_clients",
    "stack_survival",
    "stack_states",
    "stochastic_quantize",
    "straggler_work",
    "synthetic_binary",
    "synthetic_fedprox",
    "top_k",
    "partition",
    "train_client",
    "train_clients",
    "unstack_clients",
    "upload_bytes",
)
