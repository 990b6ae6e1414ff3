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


def test_pytree_tap_hooks_see_and_return_the_tree():
    def f(x):
        kv = fgrad.tap("kv", {"k": 2.0 * x, "v": 3.0 * x})
        return jnp.sum(kv["k"] * kv["v"])

    hooked = fgrad.with_hooks(
        f,
        forward={"kv": lambda kv: {"k": kv["k"], "v": kv["v"] + 1.0}},
        backward={"kv": lambda g, value: {"k": g["k"] * value["v"], "v": g["v"]}},
    )
    x = jnp.array([0.5, -1.0])
    # forward: k = 2x, v = 3x + 1; gradient at k is v, scaled by v again; at v it is k.
    v, k = 3.0 * x + 1.0, 2.0 * x
    assert_tree_allclose(jax.jit(hooked)(x), jnp.sum(k * v))
    assert_tree_allclose(jax.jit(jax.grad(hooked))(x), 2.0 * v * v + 3.0 * k)


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
    out = jax.jit(fgrad.with_hooks(rnn_loss, forward={"h": stacked}))(p, xs)
    assert_tree_allclose(out, jnp.sum((stacked @ p["r"]) ** 2))
    by_step = fgrad.with_hooks(rnn_loss, forward={"h": lambda v, step: stacked[step]})
    assert_tree_allclose(jax.jit(by_step)(p, xs), out)  # a forward hook given the step index
    one = stacked[0]
    assert_tree_allclose(
        jax.jit(fgrad.with_hooks(rnn_loss, forward={"h": one}))(p, xs),
        STEPS * jnp.sum(one * p["r"]) ** 2,
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
    _, acts = jax.jit(fgrad.intermediates(loss))(*args)
    assert set(acts) == {"conv2:in", "fc"}
    assert_tree_allclose(acts["conv2:in"], nhwc(seen["in"]), rtol=1e-5, atol=1e-5)
    hooked = fgrad.with_hooks(loss, forward={"conv2:in": lambda a: a * 0.5})
    value, gx = jax.jit(jax.value_and_grad(hooked, argnums=1))(*args)
    assert_tree_allclose(value, loss_t)
    assert_tree_allclose(gx, nhwc(x_t.grad), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------
# Activation patching: one attention head's output replaced with its value on another input

D, HEADS, SEQ = 8, 2, 5


class TorchAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.out = torch.nn.Linear(D, D)
        self.hook_z = torch.nn.Identity()  # a hook point on the heads' outputs

    def forward(self, x):  # (B, T, D)
        b, t, _ = x.shape
        q, k, v = (a.reshape(b, t, HEADS, D // HEADS) for a in self.qkv(x).chunk(3, -1))
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / (D // HEADS) ** 0.5, -1)
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", att, v))
        return x + self.out(z.reshape(b, t, D))


def attention(p, x):
    b, t, _ = x.shape
    qkv = x @ p["qkv.weight"].T + p["qkv.bias"]
    q, k, v = (a.reshape(b, t, HEADS, D // HEADS) for a in jnp.split(qkv, 3, -1))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / (D // HEADS) ** 0.5, -1)
    z = fgrad.tap("z", jnp.einsum("bhqk,bkhd->bqhd", att, v))
    return x + z.reshape(b, t, D) @ p["out.weight"].T + p["out.bias"]


def test_activation_patching_one_head_matches_torch_forward_hook():
    torch.manual_seed(0)
    block = TorchAttention()
    clean, corrupt = (RNG.normal(size=(2, SEQ, D)).astype(np.float32) for _ in range(2))
    readout = RNG.normal(size=(D,)).astype(np.float32)
    head = 1
    cache = {}
    h = block.hook_z.register_forward_hook(lambda m, i, o: cache.setdefault("z", o.detach()))
    block(T(corrupt))
    h.remove()

    def patch(m, i, o):
        o = o.clone()
        o[:, :, head] = cache["z"][:, :, head]
        return o

    base_t = (block(T(clean)) @ T(readout)).sum()
    h = block.hook_z.register_forward_hook(patch)
    patched_t = (block(T(clean)) @ T(readout)).sum()
    patched_t.backward()
    h.remove()

    p = tt.to_jax(block)
    score = lambda p, x: jnp.sum(attention(p, x) @ jnp.asarray(readout))
    _, taps = jax.jit(fgrad.intermediates(score, "z"))(p, jnp.asarray(corrupt))
    hooked = fgrad.with_hooks(
        score, forward={"z": lambda z: z.at[:, :, head].set(taps["z"][:, :, head])}
    )
    patched, grads = jax.jit(jax.value_and_grad(hooked))(p, jnp.asarray(clean))
    base = jax.jit(score)(p, jnp.asarray(clean))
    assert_tree_allclose(patched - base, patched_t - base_t, rtol=1e-4, atol=1e-5)
    assert_tree_allclose(
        grads, {k: v.grad for k, v in block.named_parameters()}, rtol=1e-4, atol=1e-6
    )


# --------------------------------------------------------------------------------------
# Identity hooks cost nothing; tap names serve checkpoint policies


def hlo_ops(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sorted(re.findall(r"=\s*[^=]*?\s([a-z][\w-]*)\(", text))


def test_identity_hooks_compile_to_the_unhooked_program():
    args = (
        tt.to_jax(
            torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        ),
        jnp.asarray(X_MLP),
        jnp.asarray(Y_MLP),
    )
    ident = fgrad.with_hooks(
        mlp_loss, forward={"h": lambda v: v}, backward={"h": lambda g, value,: g}
    )
    plain_ops = hlo_ops(jax.value_and_grad(mlp_loss), *args)
    assert plain_ops == hlo_ops(jax.value_and_grad(ident), *args)
    assert len(plain_ops) > 10
    # Not vacuous: a hook that does something shows up.
    scaled = fgrad.with_hooks(mlp_loss, backward={"h": lambda g: g * 2.0})
    assert hlo_ops(jax.value_and_grad(scaled), *args) != plain_ops


def test_tap_names_serve_checkpoint_policies(capsys):
    def f(w, x):
        h = fgrad.tap("h", jnp.sin(w * x))
        k = fgrad.tap("k", jnp.cos(h * w))
        return jnp.sum(jnp.sin(k * w))

    hooked = fgrad.with_hooks(f, backward={"k": lambda g: 2.0 * g})
    x = jnp.arange(3.0)
    policies = jax.checkpoint_policies
    for fn in (f, hooked):
        for name in ("h", "k"):
            print_saved_residuals(
                jax.checkpoint(fn, policy=policies.save_only_these_names(name)), 2.0, x
            )
            saved = capsys.readouterr().out
            assert f"named '{name}'" in saved and "named" not in saved.replace(
                f"named '{name}'", ""
            )
        print_saved_residuals(jax.checkpoint(fn, policy=policies.nothing_saveable), 2.0, x)
        assert "named" not in capsys.readouterr().out
        offload = policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=["h"],
            offload_src="device",
            offload_dst="pinned_host",
        )
        print_saved_residuals(jax.checkpoint(fn, policy=offload), 2.0, x)
        assert "f32<host>[3]" in capsys.readouterr().out
        assert_tree_allclose(
            jax.grad(jax.checkpoint(fn, policy=offload))(2.0, x), jax.grad(fn)(2.0, x)
        )
    # x reaches the output only through k: its whole gradient passes the hook.
    assert_tree_allclose(jax.grad(hooked, 1)(2.0, x), jax.grad(f, 1)(2.0, x) * 2.0)


def test_taylor_mode_runs_through_the_gradient_of_a_tapped_function():
    """The checkpoint name a tap's JVP adds has a Taylor rule: jet still works."""
    df = jax.grad(lambda x: jnp.sin(fgrad.tap("h", 2.0 * x)) ** 2)  # = 2 sin(4x)
    x = jnp.float32(0.3)
    assert_tree_allclose(fgrad.derivative(df, 3, method="taylor")(x), -128 * jnp.cos(4 * x))


# --------------------------------------------------------------------------------------
# Patterns and errors


def test_patterns_are_globs_over_tap_names():
    def f(x):
        a = fgrad.tap("block/0/out", x * 2.0)
        b = fgrad.tap("block/0/inner/out", a * 3.0)
        return jnp.sum(fgrad.tap("head", b))

    x = jnp.ones(2)
    grad_of = lambda pattern: jax.grad(fgrad.with_hooks(f, backward={pattern: lambda g: 10.0 * g}))(
        x
    )
    assert_tree_allclose(grad_of("block/*/out"), jnp.full(2, 60.0))  # * stays in a segment
    assert_tree_allclose(grad_of("block/**"), jnp.full(2, 600.0))  # ** crosses them
    assert_tree_allclose(grad_of("**/out"), jnp.full(2, 600.0))
    assert_tree_allclose(grad_of("h?ad"), jnp.full(2, 60.0))


def with_while(x):
    return jax.lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, fgrad.tap("w", c[1] * 2.0)), (0, x)
    )[1]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"forward": {"h": lambda v: v[:1]}},
            ValueError,
            r"fgrad.with_hooks: the forward hook for tap 'h' \(pattern 'h'\) gave "
            r"float32\[1\], but the tap's value is float32\[2\]",
        ),
        (
            {"forward": {"h": lambda v: v.astype(jnp.int32)}},
            ValueError,
            r"gave int32\[2\].*float32\[2\]",
        ),
        ({"forward": {"h": lambda v: (v, v)}}, ValueError, r"gave \(float32\[2\], float32\[2\]\)"),
        (
            {"backward": {"h": lambda g: g.sum()}},
            ValueError,
            r"backward hook for tap 'h'.*gave float32\[\], but the tap's gradient is float32\[2\]",
        ),
        ({"backward": {"i": lambda g: g}}, TypeError, r"matches tap 'i', which holds int32"),
        (
            {"backward": {"h": "reverse"}},
            TypeError,
            r"is a str, which is neither callable nor an array",
        ),
        (
            {"forward": {"nope*": lambda v: v}},
            ValueError,
            r"'nope\*' matches no tap.*taps are: 'i', 'h'",
        ),
        (
            {"forward": {"h": lambda v, step: v}},
            ValueError,
            r"asks for `step`.*not inside a lax.scan",
        ),
        ({"forward": {"h": lambda v, value: v}}, TypeError, r"asks for `value`"),
    ],
)
def test_errors(kwargs, error, match):
    def f(x):
        i = fgrad.tap("i", jnp.arange(2))
        return jnp.sum(fgrad.tap("h", x * 2.0) * i.astype(jnp.float32))

    with pytest.raises(error, match=match):
        jax.grad(fgrad.with_hooks(f, **kwargs))(jnp.ones(2))


def test_hook_inside_while_loop_is_refused():
    with pytest.raises(
        ValueError, match=r"tap 'w' is hooked but cannot be served: it is inside lax.while_loop"
    ):
        fgrad.with_hooks(with_while, backward={"w": lambda g: g})(jnp.ones(2))


def test_nnx_input_taps_and_a_module_called_twice():
    from flax import nnx

    class Twice(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(3, 3, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return jnp.sum(self.lin(jnp.tanh(self.lin(x))))

    model, x = Twice(), jnp.asarray(RNG.normal(size=(2, 3)).astype(np.float32))
    model.lin.bias[...] = jnp.array([0.3, -0.2, 0.5])
    fn = fgrad.tap_nnx(lambda m, x: m(x), "lin", inputs="lin")
    _, acts = fgrad.intermediates(fn, on_repeat="split")(model, x)
    w, b = model.lin.kernel[...], model.lin.bias[...]
    assert_tree_allclose(acts["lin:in#0"], x)
    assert_tree_allclose(acts["lin:in#1"], jnp.tanh(x @ w + b))
    # A hook fires at every call of the module, as a PyTorch module hook does.
    hooked = fgrad.with_hooks(fn, forward={"lin:in": lambda v: v * 0.0})
    assert_tree_allclose(hooked(model, x), 2 * jnp.sum(b))  # two rows of lin(0) = b


# --------------------------------------------------------------------------------------
# Bench builders (run once; timings belong to `fgrad bench`, not to tests)


@pytest.mark.parametrize("op", ["hook_backward", "hook_forward"])
def test_bench_builders_agree(op):
    from fgrad.bench import _jax_ops, _ops_hooks
    from fgrad.bench._workloads import workloads

    w = workloads("tiny")[1]  # the tiny MLP
    assert _ops_hooks.APPLIES[op](w)
    results = {}
    for impl, build in _ops_hooks.JAX[op].items():
        fn, args = build(impl, w)
        results[impl] = fn(*args)
    assert_tree_allclose(results["fgrad"], results["jax"])
    grads_t = _ops_hooks.TORCH[op]["torch"]("torch", w, "cpu")()
    assert_tree_allclose(results["fgrad"], grads_t, rtol=1e-4, atol=1e-6)
    params, batch = _jax_ops._data(w)
    loss = _jax_ops._losses(w)[0]
    plain = jax.grad(lambda p, b: loss(p, b, lambda name, h: h))(params, batch)
    assert not np.allclose(plain["fc0.weight"], results["fgrad"]["fc0.weight"])
