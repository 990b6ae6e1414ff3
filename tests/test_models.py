"""The seed network: pure function, linen and nnx give PyTorch's numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fgrad
from fgrad.models import SeedNet, SeedNetNNX, seed_linen_variables, seed_net, seed_params
from helpers import assert_tree_allclose, from_torch, torch_seed_net

XS = np.array([[4.0], [-1.5], [0.25]], np.float32)


def test_params_match_torch_state_dict():
    sd = torch_seed_net().state_dict()
    assert_tree_allclose(seed_params(), {k: from_torch(v) for k, v in sd.items()})


def test_three_forms_equal_torch():
    l_t, y_t = torch_seed_net()(torch.from_numpy(XS))
    x = jnp.asarray(XS)
    pure = jax.jit(seed_net)(seed_params(), x)
    linen = jax.jit(SeedNet().apply)(seed_linen_variables(), x)
    nnx_out = SeedNetNNX()(x)
    for out in (pure, linen, nnx_out):
        assert_tree_allclose(out, (l_t, y_t))


def test_custom_weights_and_grads_agree_across_forms():
    p = {k: v * 1.5 for k, v in seed_params().items()}
    x = jnp.asarray(XS)
    g_pure = jax.grad(lambda p: jnp.sum(seed_net(p, x)[1]))(p)
    g_linen = jax.grad(lambda v: jnp.sum(SeedNet().apply(v, x)[1]))(seed_linen_variables(p))
    assert_tree_allclose(g_linen, seed_linen_variables(g_pure))
    taps = [
        fgrad.intermediates(seed_net)(p, x)[1],
        fgrad.intermediates(SeedNet().apply)(seed_linen_variables(p), x)[1],
        fgrad.intermediates(SeedNetNNX(p))(x)[1],
    ]
    for t in taps[1:]:
        assert_tree_allclose(t, taps[0])


def test_errors():
    with pytest.raises(ValueError, match="last axis of size 1"):
        seed_net(seed_params(), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="params must be a dict with keys"):
        seed_net({"w": jnp.ones((1, 1))}, jnp.ones((1, 1)))
    bad = {**seed_params(), "linear1.weight": jnp.ones((1,))}
    with pytest.raises(ValueError, match=r"params\['linear1.weight'\] must have shape \(1, 1\)"):
        seed_net(bad, jnp.ones((1, 1)))
    with pytest.raises(ValueError, match="last axis of size 1"):
        SeedNet().apply(seed_linen_variables(), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="last axis of size 1"):
        SeedNetNNX()(jnp.ones(()))
