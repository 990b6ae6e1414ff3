"""Shared test setup: eight CPU devices, strict dtype promotion, one thread for PyTorch
(where PyTorch is installed: the newest-JAX leg runs without it, see ../conftest.py)."""

import os

# Eight CPU devices, so sharded (data-parallel) code is tested on one machine. Must be set
# before JAX starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import importlib.util

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
if importlib.util.find_spec("torch") is not None:
    import torch

    # JAX and PyTorch in one process fight over the two cores; tests only compare numbers.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cnn():
    """The small PyTorch CNN of models_torch_flax, seeded, in eval mode (tests read its
    weights and may backpropagate through it; none changes them)."""
    from models_torch_flax import make_torch_cnn

    return make_torch_cnn()
