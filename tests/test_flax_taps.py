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
    with pytest.raises(TypeError, match="paths must be a submodule path"):
        fgrad.tap_linen(LinenCNN().apply, [])
    model = NnxCNN()
    with pytest.raises(ValueError, match=r"no submodule path matches 'head'"):
        fgrad.tap_nnx(lambda m, x: m(x), "head")(model, x)
    with pytest.raises(TypeError, match=r"expected an nnx\.Module as argument 1"):
        fgrad.tap_nnx(lambda x, m: m(x), argnum=1)(x, v)
    with pytest.raises(ValueError, match="argnum=2"):
        fgrad.tap_nnx(lambda m, x: m(x), argnum=2)(model, x)


# --- globs, modules that never ran, unclear errors ----------------------------------------


class Block(ln.Module):
    @ln.compact
    def __call__(self, x):
        return ln.Dense(2, name="inner")(jnp.tanh(ln.Dense(2, name="Dense_0")(x)))


class Outer(ln.Module):
    @ln.compact
    def __call__(self, x):
        x = Block(name="block_0")(x)
        return jnp.sum(Block(name="block_1")(x) ** 2)


def test_glob_star_stops_at_slash_and_double_star_crosses_it():
    x = jnp.ones((1, 2))
    v = Outer().init(jax.random.key(0), x)
    names = lambda pat: sorted(fgrad.intermediates(fgrad.tap_linen(Outer().apply, pat))(v, x)[1])
    assert names("block_*") == ["block_0", "block_1"]
    assert names("block_*/*") == [f"block_{i}/{n}" for i in (0, 1) for n in ("Dense_0", "inner")]
    assert names("**/inner") == ["block_0/inner", "block_1/inner"]
    assert names("block_1/**") == ["block_1/Dense_0", "block_1/inner"]
    assert len(names("*")) == 6  # a lone '*' is every submodule
    with pytest.raises(ValueError, match=r"no submodule path matches 'inner'.*'\*\*'"):
        names("inner")
    m = nnx.Sequential(
        nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jnp.tanh),
        nnx.Linear(2, 1, rngs=nnx.Rngs(1)),
    )
    f = lambda pat: fgrad.intermediates(fgrad.tap_nnx(lambda m, x: jnp.sum(m(x)), pat))(m, x)
    assert sorted(f("layers/*")[1]) == ["layers/0", "layers/1"]
    assert sorted(f("layers/0/**")[1]) == ["layers/0/layers/0"]


def test_tap_nnx_on_a_function_that_rebuilds_the_model_raises():
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    seq = nnx.Sequential(model)

    def rebuilt(x):  # runs a copy of the model, never `seq` itself
        return jnp.sum(nnx.merge(graphdef, state)(x))

    f = fgrad.tap_nnx(rebuilt, "layers/0", model=seq)
    with pytest.raises(ValueError, match=r"no submodule matching 'layers/0' ran.*nnx\.merge"):
        fgrad.grad_intermediates(f)(jnp.ones((1, 2)))


def test_unclear_errors_made_clear():
    x = jnp.ones((1, 2))
    v = Outer().init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"paths must be a submodule path .*got 0 \(int\)"):
        fgrad.tap_linen(Outer().apply, 0)
    with pytest.raises(
        ValueError, match=r"method='forward', but no submodule's 'forward' ran.*'__call__'"
    ):
        fgrad.tap_linen(Outer().apply, method="forward")(v, x)


# --- nnx in train mode: module state written back, as nnx.grad does ----------------------


class TrainNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.calls = nnx.Variable(jnp.int32(0))  # an integer variable

    def __call__(self, x):
        self.calls[...] = self.calls[...] + 1
        return self.bn(self.lin(x))


def test_nnx_train_mode_state_is_written_back():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    model, reference = TrainNet(nnx.Rngs(0)), TrainNet(nnx.Rngs(0))
    model.train()
    reference.train()
    y = reference(x)  # one train-mode call: the statistics PyTorch/nnx would hold after it
    loss = fgrad.tap_nnx(lambda m, x: jnp.sum(m(x) ** 2), "*")
    grads = fgrad.grad_intermediates(loss)(model, x)
    assert_tree_allclose(grads["bn"], 2.0 * y)
    assert_tree_allclose(model.bn.mean[...], reference.bn.mean[...])
    assert_tree_allclose(model.bn.var[...], reference.bn.var[...])
    assert int(model.calls[...]) == 1
    fgrad.intermediates(loss)(model, x)  # a second call moves them again
    reference(x)
    assert_tree_allclose(model.bn.mean[...], reference.bn.mean[...])
    assert int(model.calls[...]) == 2
    # closed over instead of passed: served too, its state written back
    closed = fgrad.tap_nnx(lambda x: jnp.sum(model(x) ** 2), model=model)
    grads = fgrad.grad_intermediates(closed)(x)
    y = reference(x)
    assert_tree_allclose(grads["bn"], 2.0 * y)
    assert_tree_allclose(model.bn.mean[...], reference.bn.mean[...])
    assert int(model.calls[...]) == 3
    with pytest.raises(ValueError, match=r"changed its state .*jax\.jit.*as an argument"):
        jax.jit(fgrad.grad_intermediates(closed))(x)
    assert not isinstance(model.bn.mean[...], jax.core.Tracer)  # nothing leaked


def test_argnums_on_an_nnx_model_with_integer_variables_matches_nnx_grad():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    model, reference = TrainNet(nnx.Rngs(0)), TrainNet(nnx.Rngs(0))
    loss = lambda m, x: jnp.sum(m(x) ** 2)
    expected = nnx.grad(loss)(reference, x)  # gradients of the parameters only
    taps, grads = fgrad.grad_intermediates(fgrad.tap_nnx(loss, "lin"), argnums=0)(model, x)
    assert list(taps) == ["lin"]
    assert_tree_allclose(grads.lin.kernel[...], expected["lin"]["kernel"][...])
    assert_tree_allclose(grads.bn.scale[...], expected["bn"]["scale"][...])
    assert grads.calls[...].dtype == jax.dtypes.float0  # an integer leaf: no gradient
    assert int(model.calls[...]) == int(reference.calls[...]) == 1


def test_nnx_model_sharing_a_submodule_is_refused_not_split():
    """An nnx model using one Linear as two attributes: nnx.grad sums the two uses'
    gradients; as a JAX pytree the model would be copied apart (gradients split between
    the copies), so fgrad refuses it and says how to keep the sharing."""

    class Shared(nnx.Module):
        def __init__(self):
            lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
            self.a, self.b = lin, lin

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    m, x = Shared(), jnp.ones((3, 2))
    loss = lambda m, x: jnp.sum(m(x) ** 2)
    for call in (
        lambda: fgrad.tap_nnx(loss, "a")(m, x),
        lambda: fgrad.grad_intermediates(fgrad.tap_nnx(loss, "a"), argnums=0)(m, x),
        lambda: fgrad.intermediates(loss)(m, x),
    ):
        with pytest.raises(ValueError, match=r"shares a submodule.*nnx\.split"):
            call()
    # the way the message gives: differentiate the state; the sharing is kept
    graphdef, state = nnx.split(m)
    merged = lambda s, x: loss(nnx.merge(graphdef, s), x)
    _, g = fgrad.value_and_grad_intermediates(merged, argnums=0)(state, x)
    want = nnx.grad(loss)(m, x)
    np.testing.assert_allclose(g[1]["a"]["kernel"].value, want["a"]["kernel"].value, rtol=1e-6)
