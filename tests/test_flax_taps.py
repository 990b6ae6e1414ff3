"""Gradients w.r.t. layer outputs of unmodified Flax models (tap_linen, tap_nnx), checked
against PyTorch forward hooks with retain_grad on the same weights."""

import flax.linen as ln
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import fgrad
from fgrad.interop import torch as tt
from helpers import assert_tree_allclose
from models_torch_flax import LinenCNN, NnxCNN, nhwc

LAYERS = ["conv1", "bn", "conv2", "fc"]
X = np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32)
Y = np.array([1, 0, 3, 9])


def torch_layer_grads(model, x, y):
    """Loss, layer outputs and their gradients via forward hooks and retain_grad."""
    outs = {}

    def keep(name):
        def hook(module, inputs, out):  # returns None: the output is left as it is
            out.retain_grad()
            outs[name] = out

        return hook

    hooks = [getattr(model, n).register_forward_hook(keep(n)) for n in LAYERS]
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    for h in hooks:
        h.remove()
    return loss, {n: nhwc(o) for n, o in outs.items()}, {n: nhwc(o.grad) for n, o in outs.items()}


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_linen_layer_grads_match_torch_hooks(cnn):
    loss_t, acts_t, grads_t = torch_layer_grads(cnn, X, Y)
    v = tt.to_linen(cnn)
    apply = fgrad.tap_linen(LinenCNN().apply, LAYERS)
    loss = lambda v, x, y: ce(apply(v, x), y)
    x = jnp.asarray(nhwc(X))
    value, grads = jax.jit(fgrad.value_and_grad_intermediates(loss))(v, x, jnp.asarray(Y))
    assert_tree_allclose(value, loss_t)
    assert_tree_allclose(grads, grads_t)
    _, acts = fgrad.intermediates(loss)(v, x, jnp.asarray(Y))
    assert_tree_allclose(acts, acts_t)


def test_nnx_layer_grads_match_torch_hooks(cnn):
    _, _, grads_t = torch_layer_grads(cnn, X, Y)
    model = tt.to_nnx(cnn, NnxCNN())
    loss = fgrad.tap_nnx(lambda m, x, y: ce(m(x), y), "*")
    x = jnp.asarray(nhwc(X))
    grads = fgrad.grad_intermediates(loss)(model, x, jnp.asarray(Y))
    assert_tree_allclose(grads, grads_t)
    # closing over the model instead of passing it:
    closed = fgrad.tap_nnx(lambda x, y: ce(model(x), y), "conv*", model=model)
    assert_tree_allclose(
        jax.jit(fgrad.grad_intermediates(closed))(x, jnp.asarray(Y)),
        {k: grads_t[k] for k in ("conv1", "conv2")},
    )
    assert type(model.conv1) is nnx.Conv  # the class swap is undone


def test_vmap_per_example_layer_grads_match_torch_loop(cnn):
    v = tt.to_linen(cnn)
    apply = fgrad.tap_linen(LinenCNN().apply, ["conv2", "fc"])

    def per_example(x, y):
        loss = lambda v, x: ce(apply(v, x[None]), y[None])
        g = fgrad.grad_intermediates(loss)(v, x)
        return {k: g[k][0] for k in g}

    got = jax.jit(jax.vmap(per_example))(jnp.asarray(nhwc(X)), jnp.asarray(Y))
    for i in range(len(X)):
        _, _, g_t = torch_layer_grads(cnn, X[i : i + 1], Y[i : i + 1])
        assert_tree_allclose({k: got[k][i] for k in got}, {k: g_t[k][0] for k in got})


def test_shared_layer_applied_twice():
    class Twice(ln.Module):
        @ln.compact
        def __call__(self, x):
            d = ln.Dense(3, name="shared")
            return jnp.sum(d(jnp.tanh(d(x))))

    x = jnp.ones((2, 3))
    v = Twice().init(jax.random.key(0), x)
    f = fgrad.tap_linen(Twice().apply, "shared")
    with pytest.raises(ValueError, match="tap 'shared' is hit 2 times"):
        fgrad.grad_intermediates(f)(v, x)
    g = fgrad.grad_intermediates(f, on_repeat="split")(v, x)
    k = v["params"]["shared"]["kernel"]
    h1 = x @ k + v["params"]["shared"]["bias"]
    assert_tree_allclose(g["shared#1"], jnp.ones((2, 3)))
    assert_tree_allclose(g["shared#0"], (1 - jnp.tanh(h1) ** 2) * (jnp.ones((2, 3)) @ k.T))


def test_errors(cnn):
    v = tt.to_linen(cnn)
    x = jnp.asarray(nhwc(X))
    with pytest.raises(ValueError, match=r"no submodule path matches 'conv3'.*'conv1', 'bn'"):
        fgrad.tap_linen(LinenCNN().apply, ["conv1", "conv3"])(v, x)
    with pytest.raises(TypeError, match="paths must be a module path"):
        fgrad.tap_linen(LinenCNN().apply, [])
    model = NnxCNN()
    with pytest.raises(ValueError, match=r"no submodule path matches 'head'"):
        fgrad.tap_nnx(lambda m, x: m(x), "head")(model, x)
    with pytest.raises(TypeError, match=r"expected an nnx\.Module as argument 1"):
        fgrad.tap_nnx(lambda x, m: m(x), argnum=1)(x, v)
    with pytest.raises(ValueError, match="argnum=2"):
        fgrad.tap_nnx(lambda m, x: m(x), argnum=2)(model, x)
