"""What a tap's gradient means: every use of the tapped value (PyTorch's retain_grad),
unused taps (allow_unused / materialize_grads), dead code, lax.cond branches, arguments
passed as jax.grad passes them, complex taps; checked against PyTorch and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fgrad
from helpers import assert_tree_allclose

W = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
X = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)


def torch_h(retain=True):
    w, x = torch.from_numpy(W).requires_grad_(True), torch.from_numpy(X)
    h = torch.tanh(x @ w)
    if retain:
        h.retain_grad()
    return h


# --- 1. the retain_grad idiom: every use of the tapped value counts ------------------------


def statement_tap(w, x):
    h = jnp.tanh(x @ w)
    fgrad.tap("h", h)  # written as a statement, as h.retain_grad() is
    return jnp.sum(h**2)


def beside_tap(w, x):
    h = jnp.tanh(x @ w)
    ht = fgrad.tap("h", h)
    return jnp.sum(ht**2) + jnp.sum(h)


@pytest.mark.parametrize("jit", [False, True])
def test_statement_tap_and_tap_beside_the_original_match_retain_grad(jit):
    h = torch_h()
    (h**2).sum().backward()
    wrap = jax.jit if jit else (lambda f: f)
    got = wrap(fgrad.grad_intermediates(statement_tap))(W, X)
    assert_tree_allclose(got, {"h": h.grad})
    h = torch_h()
    ((h**2).sum() + h.sum()).backward()  # 2h + 1
    got = wrap(fgrad.grad_intermediates(beside_tap))(W, X)
    assert_tree_allclose(got, {"h": h.grad})
    value, grads = wrap(fgrad.value_and_grad_intermediates(beside_tap))(W, X)
    assert_tree_allclose((value, grads), ((h**2).sum() + h.sum(), {"h": h.grad}))
    _, values = wrap(fgrad.intermediates(statement_tap))(W, X)
    assert_tree_allclose(values, {"h": h})


def test_vjp_intermediates_counts_every_use():
    h = torch_h()
    ct = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    (h * 3.0 + h**2).backward(torch.from_numpy(ct))

    def f(w, x):
        h = jnp.tanh(x @ w)
        fgrad.tap("h", h)
        return h * 3.0 + h**2

    _, pullback = fgrad.vjp_intermediates(f)(W, X)
    assert_tree_allclose(pullback(jnp.asarray(ct)), {"h": h.grad})


def test_value_tapped_twice_and_tap_of_a_tap_and_literal():
    def f(x):
        h = jnp.sin(x)
        fgrad.tap("a", h)
        b = fgrad.tap("b", fgrad.tap("c", h))  # a tap's result is the same value
        k = fgrad.tap("k", 2.0)  # a literal: only the tap's result can carry it
        return jnp.sum(h * b * k)

    x = jnp.array([0.3, -0.7])
    got = fgrad.grad_intermediates(f)(x)
    full = 4.0 * jnp.sin(x)  # d/dh of 2 h^2, through both uses
    assert_tree_allclose(got, {"a": full, "b": full, "c": full, "k": jnp.sum(jnp.sin(x) ** 2)})


def test_tap_of_an_input_inside_jit_and_checkpoint_counts_uses_outside():
    def f(x):
        h = jnp.tanh(x)
        jax.jit(lambda v: fgrad.tap("j", v))(h)
        jax.checkpoint(lambda v: fgrad.tap("c", v) * 1.0)(h)
        return jnp.sum(h**2)

    x = jnp.array([0.1, 0.5])
    expected = 2.0 * jnp.tanh(x)
    assert_tree_allclose(fgrad.grad_intermediates(f)(x), {"j": expected, "c": expected})


def test_tap_in_scan_body_of_a_value_from_outside_counts_that_steps_uses():
    def f(c, xs):
        def step(h, x):
            ct = fgrad.tap("c", c)  # c is defined outside the body
            h = jnp.tanh(h * c + x)  # the original used beside the tap
            return h, h * ct

        h, ys = jax.lax.scan(step, jnp.zeros(3), xs)
        return jnp.sum(h) + jnp.sum(ys)

    c = jnp.array([0.5, -0.2, 0.9])
    xs = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)), jnp.float32)
    got = jax.jit(fgrad.grad_intermediates(f))(c, xs)["c"]
    assert got.shape == (4, 3)
    # the per-step gradients add up to the gradient w.r.t. c (c is used only in the scan)
    assert_tree_allclose(got.sum(0), jax.grad(f)(c, xs))


# --- 3. allow_unused / materialize_grads, as torch.autograd.grad ------------------------------


def three_taps(x):
    a = fgrad.tap("a", x * 2.0)
    fgrad.tap("b", x * 3.0)  # dead: reaches nothing returned
    s = fgrad.tap("s", x * 4.0)  # reaches the output only through stop_gradient
    return jnp.sum(a**2) + jnp.sum(jax.lax.stop_gradient(s)), s


def torch_three(allow_unused=None, materialize_grads=False):
    x = torch.tensor([0.5, -1.5])
    a, b, s = x * 2.0, x * 3.0, x * 4.0
    for t in (a, b, s):
        t.requires_grad_(True)
    y = (a**2).sum() + s.detach().sum()
    return torch.autograd.grad(
        y, [a, b, s], allow_unused=allow_unused, materialize_grads=materialize_grads
    )


X2 = jnp.array([0.5, -1.5])


@pytest.mark.parametrize("kind", ["grad", "value_and_grad", "vjp"])
def test_allow_unused_and_materialize_grads_match_torch(kind):
    def call(**kw):
        if kind == "grad":
            return fgrad.grad_intermediates(three_taps, ["a", "b", "s"], has_aux=True, **kw)(X2)[0]
        if kind == "value_and_grad":
            f = fgrad.value_and_grad_intermediates(three_taps, ["a", "b", "s"], has_aux=True, **kw)
            return f(X2)[1]
        out, pullback, _ = fgrad.vjp_intermediates(three_taps, ["a", "b", "s"], has_aux=True, **kw)(
            X2
        )
        return pullback(jnp.ones_like(out))

    name = {"grad": "grad_intermediates", "value_and_grad": "value_and_grad_intermediates"}
    caller = "fgrad." + name.get(kind, "vjp_intermediates")
    with pytest.raises(
        ValueError, match=rf"{caller}: the output does not depend on tap 'b'.*allow_unused=True"
    ):
        call()
    with pytest.raises(RuntimeError):  # PyTorch refuses too
        torch_three()
    a, b, s = torch_three(allow_unused=True)
    assert b is None and s is None
    got = call(allow_unused=True)
    assert got["b"] is None and got["s"] is None
    assert_tree_allclose(got["a"], a)
    zeros = torch_three(materialize_grads=True)
    assert_tree_allclose(call(materialize_grads=True), dict(zip("abs", zeros, strict=True)))


def test_unused_defaults_and_flags():
    g = fgrad.grad_intermediates(three_taps, has_aux=True)  # names=None: the taps used
    assert list(jax.jit(g)(X2)[0]) == ["a"]
    got = jax.jit(fgrad.grad_intermediates(three_taps, has_aux=True, allow_unused=True))(X2)[0]
    assert list(got) == ["a", "b", "s"] and got["b"] is None
    with pytest.raises(ValueError, match="does not depend on tap 'b'"):
        fgrad.grad_intermediates(three_taps, has_aux=True, allow_unused=False)(X2)
    for bad in ({"allow_unused": "yes"}, {"materialize_grads": 1}):
        with pytest.raises(
            TypeError,
            match=r"grad_intermediates: (allow_unused|materialize_grads) must be True or False",
        ):
            fgrad.grad_intermediates(three_taps, **bad)


# --- 4. dead hits do not count -------------------------------------------------------------


def test_dead_hit_is_not_a_hit():
    layer = lambda v: fgrad.tap("layer", jnp.sin(v))

    def f(x):
        layer(x * 5.0)  # traced, but its value reaches nothing returned
        return jnp.sum(layer(x) ** 2)

    x = jnp.array([0.2, 0.4])
    expected = {"layer": 2.0 * jnp.sin(x)}
    assert_tree_allclose(jax.jit(fgrad.grad_intermediates(f))(x), expected)
    assert_tree_allclose(fgrad.intermediates(f)(x)[1], {"layer": jnp.sin(x)})
    split = fgrad.grad_intermediates(f, on_repeat="split")(x)
    assert_tree_allclose(split, expected)  # one live hit: no '#i' keys
    # nor does it cost anything: after dead-code elimination the program holds as many
    # sines as jax.grad's
    count = lambda fn: sum(
        e.primitive.name == "sin"
        for e in jax._src.interpreters.partial_eval.dce_jaxpr(jax.make_jaxpr(fn)(x).jaxpr, [True])[
            0
        ].eqns
    )
    assert count(lambda x: fgrad.grad_intermediates(f)(x)["layer"]) == count(jax.grad(f))


# --- 5. taps inside lax.cond / lax.switch --------------------------------------------------


def branchy(x, i):
    branches = [
        lambda v: fgrad.tap("a", jnp.sin(v)) * 2.0,
        lambda v: fgrad.tap("b", jnp.cos(v)) * 3.0,
        lambda v: v * 4.0,
    ]
    return jnp.sum(jax.lax.switch(i, branches, x) ** 2)


def torch_branchy(x, i):
    x = torch.tensor(np.asarray(x))
    grads = {}
    if i == 0:
        a = torch.sin(x).requires_grad_(True)
        y, t = (a * 2.0).pow(2).sum(), a
    elif i == 1:
        b = torch.cos(x).requires_grad_(True)
        y, t = (b * 3.0).pow(2).sum(), b
    else:
        return {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    (g,) = torch.autograd.grad(y, t)
    grads = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    grads["ab"[i]] = g.numpy()
    return grads


@pytest.mark.parametrize("i", [0, 1, 2])
def test_switch_gives_the_taken_branchs_gradient_and_zeros_elsewhere(i):
    x = jnp.array([0.3, 1.1])
    got = jax.jit(fgrad.grad_intermediates(branchy))(x, jnp.int32(i))
    assert_tree_allclose(got, torch_branchy(x, i))
    _, values = jax.jit(fgrad.intermediates(branchy))(x, jnp.int32(i))
    expected = {"a": jnp.sin(x) * float(i == 0), "b": jnp.cos(x) * float(i == 1)}
    assert_tree_allclose(values, expected)


def test_cond_under_vmap_and_scan():
    def f(x):
        def step(c, v):
            y = jax.lax.cond(v > 0, lambda u: fgrad.tap("p", u * 3.0), lambda u: u * 0.5, v)
            return c + y**2, None

        return jax.lax.scan(step, 0.0, x)[0]

    xs = jnp.array([[1.0, -2.0, 3.0], [-1.0, 2.0, 0.5]])
    got = jax.vmap(fgrad.grad_intermediates(f))(xs)["p"]
    assert_tree_allclose(got, jnp.where(xs > 0, 2 * 3.0 * xs, 0.0))


# --- 12. arguments as jax.grad passes them -------------------------------------------------


def test_static_and_keyword_arguments_reach_the_function():
    def f(w, x, train, mode, *, scale):
        h = fgrad.tap("h", jnp.tanh(x @ w))
        if train:  # a Python bool
            h = h * 0.5
        assert mode == "sum"
        return jnp.sum(h**2) * scale

    w, x = jnp.asarray(W), jnp.asarray(X)
    scale = jnp.float32(3.0)
    h = jnp.tanh(x @ w)
    expected = {"h": 2 * 0.25 * h * 3.0}
    g = fgrad.grad_intermediates(f)(w, x, True, "sum", scale=scale)
    assert_tree_allclose(g, expected)
    _, gw = fgrad.grad_intermediates(f, argnums=0)(w, x, True, "sum", scale=scale)
    assert_tree_allclose(gw, jax.grad(f)(w, x, True, "sum", scale=scale))
    _, vals = fgrad.intermediates(f)(w, x, False, "sum", scale=scale)
    assert_tree_allclose(vals, {"h": h})
    _, pullback = fgrad.vjp_intermediates(f)(w, x, True, "sum", scale=scale)
    assert_tree_allclose(pullback(jnp.float32(1.0)), expected)


# --- 10. complex taps: PyTorch's convention ------------------------------------------------


def test_complex_tap_gradient_is_pytorchs():
    """A real loss of a complex intermediate: fgrad's gradient is PyTorch's .grad after
    retain_grad (the conjugate of jax.grad's)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=3).astype(np.float32)
    c = (rng.normal(size=3) + 1j * rng.normal(size=3)).astype(np.complex64)
    xt = torch.from_numpy(x).requires_grad_(True)
    z = xt * torch.from_numpy(c)
    z.retain_grad()
    loss = (z * z * (0.3 + 0.7j)).real.sum() + (z.abs() ** 2).sum()
    loss.backward()

    def f(x):
        z = fgrad.tap("z", x.astype(jnp.complex64) * jnp.asarray(c))
        d = jnp.complex64(0.3 + 0.7j)
        return jnp.sum(jnp.real(z * z * d)) + jnp.sum(jnp.abs(z) ** 2)

    got = jax.jit(fgrad.grad_intermediates(f))(jnp.asarray(x))
    assert got["z"].dtype == jnp.complex64
    assert_tree_allclose(got, {"z": z.grad.numpy()})
    _, pullback = fgrad.vjp_intermediates(f)(jnp.asarray(x))
    assert_tree_allclose(pullback(jnp.float32(1.0)), {"z": z.grad.numpy()})


# --- 11. errors say what was given and name the function called ----------------------------


def test_errors_say_what_was_given_and_who_was_called():
    f = lambda w, x: (jnp.tanh(fgrad.tap("h", x @ w)), jnp.sum(x))
    _, pullback = fgrad.vjp_intermediates(f)(W, X)
    with pytest.raises(
        ValueError,
        match=r"vjp_intermediates: .*\[1\] is missing \(given: \{\[0\]: float32\(5, 4\)\}\)",
    ):
        pullback((jnp.ones((5, 4)),))
    g = lambda x: fgrad.tap("h", x) * 2.0
    with pytest.raises(
        TypeError, match=r"^fgrad.grad_intermediates: the function must return a scalar"
    ):
        fgrad.grad_intermediates(g)(jnp.ones(2))
    with pytest.raises(ValueError, match=r"^fgrad.grad_intermediates: on_repeat must be one of"):
        fgrad.grad_intermediates(g, on_repeat="mean")


# --- 7. taps inside shard_map: global arrays, as outside it --------------------------------


def _mlp(w, x):
    h = fgrad.tap("h", jnp.tanh(x @ w))
    fgrad.tap("w", w)  # replicated: the same on every device
    return h


def test_taps_inside_shard_map_give_global_arrays():
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.devices("cpu")).reshape(4, 2), ("batch", "model"))
    w = jnp.asarray(W)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(8, 3)), jnp.float32)

    def local_loss(w, x):  # data parallel over 'batch'; 'model' replicates
        return jax.lax.psum(jnp.sum(_mlp(w, x) ** 2 * w[0, 0]), "batch")

    sharded = jax.shard_map(
        local_loss,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec("batch")),
        out_specs=PartitionSpec(),
    )
    plain = lambda w, x: jnp.sum(_mlp(w, x) ** 2 * w[0, 0])
    expected = fgrad.grad_intermediates(plain, argnums=0)(w, x)
    got = jax.jit(fgrad.grad_intermediates(sharded, argnums=0))(w, x)
    assert got[0]["h"].shape == (8, 4)
    assert_tree_allclose(got, expected)
    _, values = fgrad.intermediates(sharded)(w, x)
    assert_tree_allclose(values, fgrad.intermediates(plain)(w, x)[1])


def test_shard_map_layouts_that_cannot_be_served_say_why():
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array(jax.devices("cpu")), ("batch",))
    x = jnp.ones((8, 2))

    def scalar_tap(x):
        return jax.lax.psum(fgrad.tap("s", jnp.sum(x)), "batch")

    f = jax.shard_map(
        scalar_tap, mesh=mesh, in_specs=PartitionSpec("batch"), out_specs=PartitionSpec()
    )
    with pytest.raises(
        ValueError, match=r"tap 's' cannot be served: .*scalar that differs per device"
    ):
        fgrad.grad_intermediates(f)(x)
    g = jax.shard_map(
        lambda x: fgrad.tap("t", x * 2.0),
        mesh=mesh,
        in_specs=PartitionSpec("batch"),
        out_specs=PartitionSpec("batch"),
        check_vma=False,
    )
    with pytest.raises(ValueError, match=r"tap 't' cannot be served: .*check_vma=False"):
        fgrad.intermediates(g)(x)
