"""fgrad.step: optax updates with torch.optim's rule for None grads, against PyTorch."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import fgrad
from fgrad.interop.torch import to_jax
from helpers import assert_tree_allclose

SIZES = (5, 16, 16, 3)
FROZEN = "0.weight"  # the first layer's weight: requires_grad=False


def torch_mlp(seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(SIZES):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def jax_mlp(p, x):
    h = x
    for i in range(len(SIZES) - 1):
        h = h @ p[f"{2 * i}.weight"].T + p[f"{2 * i}.bias"]
        if i < len(SIZES) - 2:
            h = jnp.tanh(h)
    return h


def loss_fn(p, x, y):
    return jnp.mean((jax_mlp(p, x) - y) ** 2)


DATA = [
    (
        np.random.default_rng(i).normal(size=(8, 5)).astype(np.float32),
        np.random.default_rng(100 + i).normal(size=(8, 3)).astype(np.float32),
    )
    for i in range(5)
]

OPTIMIZERS = {
    "sgd_momentum": (
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        optax.sgd(0.1, momentum=0.9),
    ),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2), optax.adam(1e-2)),
    "adamw": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        optax.adamw(1e-2, weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_n_steps_match_torch_optim_with_a_frozen_layer(name):
    make_torch, opt = OPTIMIZERS[name]
    net = torch_mlp()
    params = to_jax(net)
    net[0].weight.requires_grad_(False)
    topt = make_torch([p for p in net.parameters() if p.requires_grad])
    for x, y in DATA:
        topt.zero_grad()
        torch.mean((net(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).backward()
        topt.step()

    trainable = lambda path, _: FROZEN not in path

    @jax.jit
    def train_step(params, opt_state, x, y):
        grads = fgrad.zero_grad(params, trainable=trainable)
        loss, grads = fgrad.backward(loss_fn, params, x, y, grads=grads)
        params, opt_state = fgrad.step(opt, params, opt_state, grads)
        return params, opt_state, loss

    opt_state = opt.init(params)
    start = params[FROZEN]
    for x, y in DATA:
        params, opt_state, _ = train_step(params, opt_state, jnp.asarray(x), jnp.asarray(y))
    assert_tree_allclose(params, to_jax(net))
    assert np.array_equal(params[FROZEN], start)  # bit for bit


def test_frozen_state_slots_are_untouched():
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    opt = optax.chain(optax.add_decayed_weights(0.5), optax.adam(0.1))
    state = opt.init(params)
    g = {"a": jnp.ones(3), "b": jnp.ones(3)}
    params, state = fgrad.step(opt, params, state, g)  # both move once
    before = state
    new_params, state = fgrad.step(opt, params, state, {"a": None, "b": jnp.ones(3)})
    # a frozen leaf (None) only: optax's own state comes back, structure unchanged
    assert jax.tree.structure(state) == jax.tree.structure(before)
    adam, adam_before = state[1][0], before[1][0]
    assert np.array_equal(new_params["a"], params["a"])
    assert np.array_equal(adam.mu["a"], adam_before.mu["a"])
    assert np.array_equal(adam.nu["a"], adam_before.nu["a"])
    assert not np.array_equal(adam.mu["b"], adam_before.mu["b"])
    # a trainable leaf without a gradient yet (NoGrad): per-parameter step counts
    _, state = fgrad.step(opt, params, before, {"a": fgrad.NoGrad(), "b": jnp.ones(3)})
    assert int(state.per_param["a"][0]) == 1 and int(state.per_param["b"][0]) == 2
    assert np.array_equal(state.inner[1][0].mu["a"], adam_before.mu["a"])


def test_errors():
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    opt = optax.sgd(0.1)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"grads\['b'\] is missing"):
        fgrad.step(opt, params, state, {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"grads\['a'\] has shape \(3,\), expected \(2,\)"):
        fgrad.step(opt, params, state, {"a": jnp.ones(3), "b": None})
    with pytest.raises(ValueError, match=r"grads\['a'\] holds a gradient but the leaf is frozen"):
        fgrad.step(
            opt, params, state, {"a": jnp.ones(2), "b": None}, trainable={"a": False, "b": True}
        )


def test_donated_accumulator_is_reused():
    params = {"w": jnp.ones((64, 64))}
    x = jnp.ones((4, 64))
    loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]))
    bw = jax.jit(functools.partial(fgrad.backward, loss), donate_argnames="grads")
    _, g1 = bw(params, x, grads=fgrad.zero_grad(params))  # NoGrad: nothing to donate
    _, g2 = bw(params, x, grads=g1)
    assert g1["w"].is_deleted()  # the donated buffer was consumed, not copied
    g0 = fgrad.zero_grad(params, set_to_none=False)
    bw(params, x, grads=g0)
    assert g0["w"].is_deleted()
    assert_tree_allclose(g2, jax.tree.map(lambda g: 2 * g, jax.grad(loss)(params, x)))
