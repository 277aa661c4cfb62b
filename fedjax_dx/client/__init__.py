"""Client-side transformations of local training (optax style).

Example:
  >>> from fedjax_dx import client
  >>> opt = optax.chain(client.proximal(0.01), optax.sgd(0.05))   # FedProx
"""

from fedjax_dx.client._proximal import ProximalState, proximal

__all__ = ["ProximalState", "proximal"]
