"""zero_grad and backward: PyTorch's .grad accumulation, checked against PyTorch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fgrad
from fgrad.models import seed_dy_dl as f_fn  # the notebook's f = dy/dl
from fgrad.models import seed_net, seed_params
from fgrad.models import seed_y as y_fn  # the notebook's y
from helpers import assert_tree_allclose, from_torch, torch_seed_net

Z = jnp.array([[4.0]])


def torch_grads(net):
    return {
        "linear1.weight": net.linear1.weight.grad,
        "linear2.weight": net.linear2.weight.grad,
        "linear2.bias": net.linear2.bias.grad,
    }


@pytest.mark.parametrize("jit", [False, True])
def test_backward_matches_torch_backward(jit):
    net = torch_seed_net()
    z = torch.tensor([[4.0]])
    _, y = net(z)
    y.backward()
    bw = functools.partial(fgrad.backward, y_fn)
    bw = jax.jit(bw) if jit else bw
    value, grads = bw(seed_params(), Z, grads=fgrad.zero_grad(seed_params()))
    assert float(value[0, 0]) == 900.0
    assert_tree_allclose(grads, torch_grads(net))
    assert z.grad is None


@pytest.mark.parametrize("jit", [False, True])
def test_accumulation_f_then_y_matches_torch(jit):
    """In[46]: f.backward(retain_graph=True); y.backward() -> 512, 828, 64."""
    net = torch_seed_net()
    l, y = net(torch.tensor([[4.0]]))
    (f,) = torch.autograd.grad(y, l, create_graph=True)
    f.backward(retain_graph=True)
    y.backward()

    def both(p, z, g):
        _, g = fgrad.backward(f_fn, p, z, grads=g)
        return fgrad.backward(y_fn, p, z, grads=g)[1]

    both = jax.jit(both, donate_argnums=2) if jit else both
    grads = both(seed_params(), Z, fgrad.zero_grad(seed_params()))
    assert_tree_allclose(grads, torch_grads(net))
    assert_tree_allclose(
        grads, {"linear1.weight": [[512.0]], "linear2.weight": [[828.0]], "linear2.bias": [64.0]}
    )


def test_frozen_leaves_stay_none_like_requires_grad_false():
    net = torch_seed_net()
    net.linear1.weight.requires_grad_(False)
    _, y = net(torch.tensor([[4.0]]))
    y.backward()
    p = seed_params()
    for trainable in (
        {"linear1.weight": False, "linear2.weight": True, "linear2.bias": True},
        lambda path, leaf: "linear1" not in path,
    ):
        g0 = fgrad.zero_grad(p, trainable=trainable)
        assert g0["linear1.weight"] is None
        _, g = jax.jit(functools.partial(fgrad.backward, y_fn))(p, Z, grads=g0)
        _, g = fgrad.backward(y_fn, p, Z, grads=g)
        expected = {k: None if v is None else 2 * v for k, v in torch_grads(net).items()}
        assert_tree_allclose(g, expected)


def test_zero_grad_shapes_dtypes_and_prefix_mask():
    p = {"a": jnp.ones((2, 3), jnp.float16), "b": {"c": jnp.ones(4), "d": jnp.ones(())}}
    g = fgrad.zero_grad(p, trainable={"a": True, "b": False}, set_to_none=False)
    assert g["a"].dtype == jnp.float16 and g["a"].shape == (2, 3) and not g["a"].any()
    assert g["b"] == {"c": None, "d": None}
    assert fgrad.zero_grad(p, trainable=False) == {"a": None, "b": {"c": None, "d": None}}


def test_has_aux():
    def loss(p, z):
        l, y = seed_net(p, z)
        return jnp.sum(y), l

    (value, aux), g = fgrad.backward(loss, seed_params(), Z, has_aux=True)
    assert float(value) == 900.0 and float(aux[0, 0]) == 12.0
    assert float(g["linear2.bias"][0]) == 60.0


# --- errors --------------------------------------------------------------------------------


def test_zero_grad_errors():
    p = seed_params()
    with pytest.raises(TypeError, match=r"trainable\['linear1.weight'\] must be a Python bool"):
        fgrad.zero_grad(
            p, trainable={"linear1.weight": 1, "linear2.weight": True, "linear2.bias": True}
        )
    with pytest.raises(ValueError, match="pytree of bools with the structure of params"):
        fgrad.zero_grad(p, trainable={"other": True})
    with pytest.raises(TypeError, match="predicate must return a Python bool"):
        fgrad.zero_grad(p, trainable=lambda path, leaf: "yes")
    with pytest.raises(TypeError, match=r"leaf \['n'\] has dtype int32"):
        fgrad.zero_grad({"n": jnp.arange(3)})


def test_backward_errors():
    p = seed_params()
    with pytest.raises(TypeError, match=r"must return a scalar .*shape \(2, 1\)"):
        fgrad.backward(y_fn, p, jnp.ones((2, 1)))
    bad = {"linear1.weight": jnp.zeros((1, 1)), "linear2.weight": jnp.zeros((1, 1))}
    with pytest.raises(ValueError, match=r"grads\['linear2.bias'\] is missing"):
        fgrad.backward(y_fn, p, Z, grads=bad)
    bad = {**fgrad.zero_grad(p), "linear2.bias": jnp.zeros((2,))}
    with pytest.raises(
        ValueError, match=r"grads\['linear2.bias'\] has shape \(2,\), expected \(1,\)"
    ):
        fgrad.backward(y_fn, p, Z, grads=bad)
    with pytest.raises(TypeError, match="must return a pair"):
        fgrad.backward(y_fn, p, Z, has_aux=True)
    with pytest.raises(TypeError, match=r"leaf \['n'\] has dtype int32"):
        fgrad.backward(lambda q, z: jnp.sum(q["x"]), {"x": jnp.ones(2), "n": jnp.arange(2)}, Z)


def test_two_heads_and_a_penalty_accumulate_like_torch():
    """loss_a.backward(retain_graph=True); loss_b.backward(retain_graph=True);
    penalty.backward() with a frozen trunk layer: the same .grad in fgrad."""
    torch.manual_seed(0)
    trunk1, trunk2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)
    head_a, head_b = torch.nn.Linear(8, 1), torch.nn.Linear(8, 3)
    mods = {"trunk1": trunk1, "trunk2": trunk2, "head_a": head_a, "head_b": head_b}
    params = {k: {"w": from_torch(m.weight), "b": from_torch(m.bias)} for k, m in mods.items()}
    trunk1.weight.requires_grad_(False)
    x_np = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    x = torch.from_numpy(x_np).requires_grad_(True)
    h = torch.tanh(trunk2(torch.tanh(trunk1(x))))
    loss_a = (head_a(h) ** 2).mean()
    loss_b = torch.nn.functional.cross_entropy(head_b(h), torch.tensor([0, 1, 2, 0, 1]))
    (gx,) = torch.autograd.grad(loss_a, x, create_graph=True)
    penalty = (gx**2).sum()
    loss_a.backward(retain_graph=True)
    loss_b.backward(retain_graph=True)
    penalty.backward()

    lin = lambda p, v: v @ p["w"].T + p["b"]
    trunk = lambda p, v: jnp.tanh(lin(p["trunk2"], jnp.tanh(lin(p["trunk1"], v))))
    fa = lambda p, v: jnp.mean(lin(p["head_a"], trunk(p, v)) ** 2)
    fb = lambda p, v: optax_ce(lin(p["head_b"], trunk(p, v)), jnp.array([0, 1, 2, 0, 1]))
    fpen = lambda p, v: jnp.sum(jax.grad(fa, argnums=1)(p, v) ** 2)

    @jax.jit
    def three(p, v):
        g = fgrad.zero_grad(p, trainable=lambda path, _: path != "['trunk1']['w']")
        for f in (fa, fb, fpen):
            _, g = fgrad.backward(f, p, v, grads=g)
        return g

    got = three(params, jnp.asarray(x_np))
    expected = {k: {"w": m.weight.grad, "b": m.bias.grad} for k, m in mods.items()}
    assert got["trunk1"]["w"] is None and expected["trunk1"]["w"] is None
    assert_tree_allclose(got, expected)


def optax_ce(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
