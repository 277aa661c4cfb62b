"""Client-side transformations of local training (optax style).

Example:
  >>> from fedjax_dx import client
  >>> opt = optax.chain(client.proximal(0.01), optax.sgd(0.05))   # FedProx
  >>> opt = optax.chain(client.scaffold_correction(), optax.sgd(0.05))  # SCAFFOLD
  >>> opt = client.dp_sgd(optax.sgd(0.05), clip_norm=1.0, noise_multiplier=1.1)
"""

from fedjax_dx.client._dp_sgd import DpSgd
from fedjax_dx.client._dp_sgd import dp_sgd
from fedjax_dx.client._proximal import ProximalState
from fedjax_dx.client._proximal import proximal
from fedjax_dx.client._scaffold import CorrectionState
from fedjax_dx.client._scaffold import scaffold_correction

__all__ = ["CorrectionState", "DpSgd", "ProximalState", "dp_sgd", "proximal",
           "scaffold_correction"]
