"""Shared test setup: strict dtype promotion, one thread for PyTorch, seeded keys."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

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
