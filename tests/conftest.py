"""Test set-up: CPU backend with 4 simulated devices (for the sharding tests)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
