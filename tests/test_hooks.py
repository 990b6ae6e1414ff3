"""fgrad.with_hooks against PyTorch's hooks on the same weights: tensor hooks
(register_hook), module forward hooks returning a replacement, forward pre-hooks; per scan
step, per example, under jit, checkpoint, sharding and nested differentiation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.ad_checkpoint import print_saved_residuals

import fgrad
from fgrad.interop import torch as tt
from helpers import assert_tree_allclose, cpu_data_parallel, from_torch
from models_torch_flax import LinenCNN, NnxCNN, make_torch_cnn, nhwc

RNG = np.random.default_rng(0)
T = lambda a: torch.from_numpy(np.asarray(a))


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --------------------------------------------------------------------------------------
# MLP: gradient reversal, and what grad_intermediates reports at a hooked tap

X_MLP = RNG.normal(size=(5, 4)).astype(np.float32)
Y_MLP = np.array([0, 2, 1, 1, 0])


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def mlp_loss(p, x, y):
    h = fgrad.tap("h", x @ p["0.weight"].T + p["0.bias"])
    return ce(jnp.tanh(h) @ p["2.weight"].T + p["2.bias"], y)


def test_gradient_reversal_matches_register_hook(mlp):
    lam = 0.7
    mlp.zero_grad()
    h = mlp[0](T(X_MLP))
    h.retain_grad()  # .grad is reported after the hook, whichever was registered first
    h.register_hook(lambda g: -lam * g)
    loss_t = torch.nn.functional.cross_entropy(mlp[2](mlp[1](h)), T(Y_MLP))
    loss_t.backward()
    grads_t = {k: v.grad for k, v in mlp.named_parameters()}

    p = tt.to_jax(mlp)
    hooked = fgrad.with_hooks(mlp_loss, backward={"h": lambda g: -lam * g})
    args = (p, jnp.asarray(X_MLP), jnp.asarray(Y_MLP))
    value, grads = jax.jit(jax.value_and_grad(hooked))(*args)
    assert_tree_allclose(value, loss_t)
    assert_tree_allclose(grads, grads_t)
    # grad_intermediates at a hooked tap: the gradient after the hook, as retain_grad.
    taps, pgrads = jax.jit(fgrad.grad_intermediates(hooked, argnums=0))(*args)
    assert_tree_allclose(taps["h"], h.grad)
    assert_tree_allclose(pgrads, grads_t)
    # The unhooked gradient flows the other way.
    assert_tree_allclose(jax.grad(mlp_loss)(*args)["0.bias"], grads_t["0.bias"] / -lam)


def test_statement_tap_hooks_every_use():
    """``fgrad.tap("h", h)`` as a statement hooks ``h`` itself: uses before and after it."""

    def f(w, x):
        h = w * x
        a = jnp.sin(h)  # a use before the tap statement
        fgrad.tap("h", h)
        return jnp.sum(a * h) + jnp.sum(h**2)

    w_t = torch.tensor(1.3, requires_grad=True)
    x = RNG.normal(size=3).astype(np.float32)
    h = w_t * T(x)
    h.retain_grad()
    h.register_hook(lambda g: g * T(x))
    (torch.sin(h) * h).sum().add((h**2).sum()).backward()
    hooked = fgrad.with_hooks(f, backward={"h": lambda g: g * jnp.asarray(x)})
    assert_tree_allclose(jax.grad(hooked)(1.3, jnp.asarray(x)), w_t.grad)
    assert_tree_allclose(fgrad.grad_intermediates(hooked)(1.3, jnp.asarray(x))["h"], h.grad)


@pytest.mark.parametrize("hook", ["linear", "nonlinear"])
def test_double_backward_matches_create_graph(hook):
    """PyTorch records a hook's computation under create_graph=True and runs the hook
    again when the second backward passes through the tensor: so does fgrad."""
    rule = (lambda g: -3.0 * g) if hook == "linear" else (lambda g: g * g)
    x0 = np.array([0.5, 1.5, -0.8], np.float32)
    x_t = T(x0).requires_grad_()
    h = x_t**2
    h.register_hook(rule)
    (gx_t,) = torch.autograd.grad(torch.sin(h).sum(), x_t, create_graph=True)
    (ggx_t,) = torch.autograd.grad((gx_t**2).sum(), x_t)

    f = lambda x: jnp.sum(jnp.sin(fgrad.tap("h", x**2)))
    hooked = fgrad.with_hooks(f, backward={"h": rule})
    x = jnp.asarray(x0)
    assert_tree_allclose(jax.grad(hooked)(x), gx_t)
    assert_tree_allclose(jax.grad(lambda x: jnp.sum(jax.grad(hooked)(x) ** 2))(x), ggx_t)


# --------------------------------------------------------------------------------------
# Transformations: vmap, jit, checkpoint, sharding


def per_example(w, x):
    h = jax.checkpoint(lambda w, x: fgrad.tap("h", jnp.tanh(w * x)))(w, x)
    return jnp.sum(h**2)


def normalize(v):
    return v / jnp.sqrt(jnp.sum(v**2))


def test_per_example_under_vmap_jit_checkpoint_and_sharding():
    calls = []

    def clip(g):  # per-example gradient clipping at the tap; counts its traces
        calls.append(None)
        return g / jnp.maximum(1.0, jnp.sqrt(jnp.sum(g**2)))

    hooked = fgrad.with_hooks(per_example, forward={"h": normalize}, backward={"h": clip})
    w, xs = jnp.float32(0.8), jnp.asarray(RNG.normal(size=(8, 3)).astype(np.float32))
    batched = jax.jit(jax.vmap(jax.value_and_grad(hooked), (None, 0)))
    values, grads = batched(w, xs)
    # Reference: each example alone, the hooks written by hand (forward normalized, the
    # clipped gradient of sum(u**2) at u = normalize(tanh(w x)) pulled back by hand).
    for x, v, gw in zip(xs, values, grads, strict=True):
        t = jnp.tanh(w * x)
        u = normalize(t)
        g_u = 2 * u
        g_u = g_u / jnp.maximum(1.0, jnp.linalg.norm(g_u))
        g_t = jax.vjp(normalize, t)[1](g_u)[0]
        assert_tree_allclose(v, jnp.sum(u**2))
        assert_tree_allclose(gw, jnp.sum(g_t * (1 - t**2) * x), rtol=1e-5, atol=1e-5)
    n = len(calls)
    batched(w + 1.0, xs * 2.0)  # jit: a second call does not retrace the hooks
    assert len(calls) == n
    shard, replicate = cpu_data_parallel("batch")
    sv, sg = batched(replicate(w), shard(xs))
    assert_tree_allclose((sv, sg), (values, grads))


# --------------------------------------------------------------------------------------
# RNN: a per-step backward hook inside lax.scan against hooks on each step of a loop

STEPS, HID = 4, 3


def rnn_loss(p, xs):
    def step(h, x):
        h = fgrad.tap("h", jnp.tanh(x @ p["w"].T + h @ p["u"].T))
        return h, jnp.sum(h * p["r"])

    _, ys = jax.lax.scan(step, jnp.zeros(HID), xs)
    return jnp.sum(ys**2)


def test_rnn_per_step_backward_hook_matches_torch_loop():
    scale = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    g = torch.Generator().manual_seed(1)
    p_t = {
        k: torch.randn(*s, generator=g).requires_grad_()
        for k, s in {"w": (HID, 2), "u": (HID, HID), "r": (HID,)}.items()
    }
    xs = RNG.normal(size=(STEPS, 2)).astype(np.float32)
    h, hs, loss_t = torch.zeros(HID), [], 0.0
    for t in range(STEPS):
        h = torch.tanh(p_t["w"] @ T(xs[t]) + p_t["u"] @ h)
        h.retain_grad()
        h.register_hook(lambda g, t=t: g * float(scale[t]))
        hs.append(h)
        loss_t = loss_t + (h * p_t["r"]).sum() ** 2
    loss_t.backward()

    hooked = fgrad.with_hooks(
        rnn_loss, backward={"h": lambda g, step: g * jnp.asarray(scale)[step]}
    )
    p = {k: from_torch(v) for k, v in p_t.items()}
    taps, grads = jax.jit(fgrad.grad_intermediates(hooked, argnums=0))(p, jnp.asarray(xs))
    assert_tree_allclose(grads, {k: v.grad for k, v in p_t.items()})
    assert_tree_allclose(taps["h"], torch.stack([h.grad for h in hs]))


def test_forward_constant_inside_scan_is_per_step_or_stacked():
    p = {"w": jnp.ones((HID, 2)), "u": 0.5 * jnp.eye(HID), "r": jnp.arange(HID, dtype=jnp.float32)}
    xs = jnp.asarray(RNG.normal(size=(STEPS, 2)).astype(np.float32))
    stacked = jnp.asarray(RNG.normal(size=(STEPS, HID)).astype(np.float32))
    out = fgrad.with_hooks(rnn_loss, forward={"h": stacked})(p, xs)
    assert_tree_allclose(out, jnp.sum((stacked @ p["r"]) ** 2))
    one = stacked[0]
    assert_tree_allclose(
        fgrad.with_hooks(rnn_loss, forward={"h": one})(p, xs), STEPS * jnp.sum(one * p["r"]) ** 2
    )


# --------------------------------------------------------------------------------------
# CNN: guided backprop (nnx), a forward pre-hook reading and changing a Conv's input (linen)

X_CNN = RNG.normal(size=(3, 1, 6, 6)).astype(np.float32)
Y_CNN = np.array([1, 0, 3])


@pytest.fixture(scope="module")
def cnn():
    return make_torch_cnn(classes=4)


@pytest.mark.parametrize("form", ["gradient", "value"])
def test_guided_backprop_matches_torch(cnn, form):
    """Guided backprop at the ReLU after bn: the gradient reaching the ReLU's input,
    g*(z > 0), keeps only its positive part (a tensor hook on bn's output in PyTorch)."""
    handle = cnn.bn.register_forward_hook(
        lambda m, i, o: o.register_hook(lambda g: g.clamp(min=0)) and None
    )
    try:
        x_t = T(X_CNN).requires_grad_()
        cnn(x_t)[:, 2].sum().backward()
    finally:
        handle.remove()
    if form == "gradient":
        rule = lambda g: jnp.maximum(g, 0.0)
    else:  # the form that also gets the forward value: the whole ReLU rule written out
        rule = lambda g, value: jnp.where(value > 0, jnp.maximum(g, 0.0), 0.0)
    model = tt.to_nnx(cnn, NnxCNN(classes=4))
    score = lambda m, x: m(x)[:, 2].sum()
    hooked = fgrad.with_hooks(fgrad.tap_nnx(score, "bn"), backward={"bn": rule})
    saliency = jax.jit(jax.grad(hooked, argnums=1))(model, jnp.asarray(nhwc(X_CNN)))
    assert_tree_allclose(saliency, nhwc(x_t.grad), rtol=1e-4, atol=1e-6)
    plain = jax.grad(score, argnums=1)(model, jnp.asarray(nhwc(X_CNN)))
    assert not np.allclose(plain, saliency, atol=1e-4)  # the hook changed something


def test_conv_forward_pre_hook_matches_torch(cnn):
    seen = {}

    def pre(m, inputs):
        seen["in"] = inputs[0].detach().clone()
        return (inputs[0] * 0.5,)

    handle = cnn.conv2.register_forward_pre_hook(pre)
    try:
        x_t = T(X_CNN).requires_grad_()
        loss_t = torch.nn.functional.cross_entropy(cnn(x_t), T(Y_CNN))
        loss_t.backward()
    finally:
        handle.remove()
    v = tt.to_linen(cnn)
    apply = fgrad.tap_linen(LinenCNN(classes=4).apply, "fc", inputs="conv2")
    loss = lambda v, x, y: ce(apply(v, x), y)
    args = (v, jnp.asarray(nhwc(X_CNN)), jnp.asarray(Y_CNN))
    _, acts = fgrad.intermediates(loss)(*args)
    assert set(acts) == {"conv2:in", "fc"}
    assert_tree_allclose(acts["conv2:in"], nhwc(seen["in"]), rtol=1e-5, atol=1e-5)
    hooked = fgrad.with_hooks(loss, forward={"conv2:in": lambda a: a * 0.5})
    value, gx = jax.value_and_grad(hooked, argnums=1)(*args)
    assert_tree_allclose(value, loss_t)
    assert_tree_allclose(gx, nhwc(x_t.grad), rtol=1e-4, atol=1e-6)
