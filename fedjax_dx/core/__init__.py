"""The core: client data on a `clients` axis, local training, the round engine, models,
metrics, sampling and sharding. Public names are re-exported by `fedjax_dx`."""
