"""Shared test setup: strict dtype promotion, one thread for PyTorch, seeded keys."""

import os

# Eight CPU devices, so sharded (data-parallel) code is tested on one machine. Must be set
# before JAX starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import numpy as np
import pytest
import torch

jax.config.update("jax_numpy_dtype_promotion", "strict")
# JAX and PyTorch in one process fight over the two cores; tests only compare numbers.
torch.set_num_threads(1)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
