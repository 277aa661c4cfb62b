"""Test set-up: CPU backend with 4 simulated devices (for the sharding tests)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(name: str) -> str:
  """Path of `../shared/data/<name>`: skipped on a user's clone, a failure in CI."""
  path = SHARED_DATA / name
  if not path.is_dir():
    message = (f"{path} not found: real-data tests read the copies in ../shared/data "
               "(present in the project's workspace and CI, not in a user's clone)")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message + "; CI=true requires them")
    pytest.skip(message)
  return str(path)


@pytest.fixture
def heart_dir():
  return shared_data("heart_disease")


@pytest.fixture
def medmnist_dir():
  return lambda subset: shared_data(subset)
