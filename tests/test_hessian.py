"""hvp and hessian against PyTorch (autograd.functional and torch.func) and jax.hessian."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fgrad
from fgrad.models import seed_net, seed_params
from helpers import assert_tree_allclose, from_torch, torch_seed_net

SIZES = (3, 5, 4, 1)


def torch_mlp_fn(x, y):
    def f(*ps):
        h = x
        for i in range(0, len(ps), 2):
            h = h @ ps[i].T + ps[i + 1]
            if i + 2 < len(ps):
                h = torch.tanh(h)
        return ((h - y) ** 2).mean()

    return f


def jax_mlp_fn(p, x, y):
    h = x
    for i in range(0, len(p), 2):
        h = h @ p[i].T + p[i + 1]
        if i + 2 < len(p):
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


@pytest.fixture(scope="module")
def mlp():
    g = torch.Generator().manual_seed(0)
    ps = []
    for a, b in itertools.pairwise(SIZES):
        ps += [torch.randn(b, a, generator=g), torch.randn(b, generator=g)]
    x = torch.randn(7, SIZES[0], generator=g)
    y = torch.randn(7, SIZES[-1], generator=g)
    v = [torch.randn(p.shape, generator=g) for p in ps]
    params = [from_torch(p) for p in ps]  # the same MLP for JAX
    args = (from_torch(x), from_torch(y))
    return ps, x, y, v, params, args


def test_hvp_matches_torch_functional_and_func(mlp):
    ps, x, y, v, params, args = mlp
    f_t = torch_mlp_fn(x, y)
    _, expected = torch.autograd.functional.hvp(f_t, tuple(ps), tuple(v))
    _, func_hvp = torch.func.jvp(torch.func.grad(lambda p: f_t(*p)), (tuple(ps),), (tuple(v),))
    for method in ("auto", "forward_over_reverse", "reverse_over_reverse"):
        hv = jax.jit(lambda p, t, method=method: fgrad.hvp(jax_mlp_fn, p, t, *args, method=method))(
            params, [from_torch(t) for t in v]
        )
        assert_tree_allclose(hv, list(expected), rtol=1e-4, atol=1e-5)
        assert_tree_allclose(hv, list(func_hvp), rtol=1e-4, atol=1e-5)


def test_hessian_blocks_match_torch_functional_hessian(mlp):
    ps, x, y, _, params, args = mlp
    expected = torch.autograd.functional.hessian(torch_mlp_fn(x, y), tuple(ps))
    full = jax.jit(fgrad.hessian(jax_mlp_fn))(params, *args)
    chunked = jax.jit(fgrad.hessian(jax_mlp_fn, chunk_size=7))(params, *args)
    assert_tree_allclose(full, [list(r) for r in expected], rtol=1e-4, atol=1e-5)
    assert_tree_allclose(chunked, full, rtol=1e-5, atol=1e-6)
    assert_tree_allclose(full, jax.hessian(jax_mlp_fn)(params, *args), rtol=1e-5, atol=1e-6)


def test_seed_network_full_hessian_matches_torch():
    """All second derivatives of the notebook's y w.r.t. (w1, w2, b2); y''(w1) = 128."""
    net = torch_seed_net()
    z = torch.tensor([[4.0]])

    def y_t(w1, w2, b2):
        l = z @ w1.T
        return ((l @ w2.T + b2) ** 2).sum()

    expected = torch.autograd.functional.hessian(
        y_t, (net.linear1.weight, net.linear2.weight, net.linear2.bias)
    )
    y_fn = lambda p: seed_net(p, jnp.array([[4.0]]))[1]
    h = fgrad.hessian(y_fn)(seed_params())
    names = ["linear1.weight", "linear2.weight", "linear2.bias"]
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            assert_tree_allclose(h[a][b], expected[i][j])
    assert float(h["linear1.weight"]["linear1.weight"].squeeze()) == 128.0


def _sin_whose_backward_calls_a_custom_vjp(call=lambda inner, x: inner(x)):
    """``sin`` as a custom_vjp whose backward rule calls another custom_vjp (``cos``, as
    ``call(inner, x)``): the gradient's program holds a custom_vjp, which forward mode
    refuses."""

    @jax.custom_vjp
    def inner(x):
        return jnp.cos(x)

    inner.defvjp(lambda x: (jnp.cos(x), x), lambda x, g: (-g * jnp.sin(x),))

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * call(inner, x),))
    return f


def test_hvp_falls_back_where_a_custom_vjp_forbids_forward_mode():
    f = _sin_whose_backward_calls_a_custom_vjp()
    loss = lambda p: jnp.sum(f(p))
    p, v = jnp.array([0.3, 1.2]), jnp.array([1.0, -2.0])
    with pytest.raises(TypeError, match="forward-mode"):
        fgrad.hvp(loss, p, v, method="forward_over_reverse")
    assert_tree_allclose(fgrad.hvp(loss, p, v), -jnp.sin(p) * v)


def test_hvp_fallback_is_read_from_the_program_under_jit_vmap_and_scan():
    """The custom_vjp that refuses forward mode sits in a lax.map (a scan) inside another
    custom_vjp's backward rule: found in the gradient's program, sub-programs included,
    also when hvp is traced under jit and vmap."""
    f = _sin_whose_backward_calls_a_custom_vjp(lambda inner, x: jax.lax.map(inner, x))
    loss = lambda p: jnp.sum(f(p))
    p, vs = jnp.array([0.3, 1.2]), jnp.array([[1.0, -2.0], [0.5, 0.25]])
    expected = -jnp.sin(p) * vs  # H = diag(-sin p)
    assert_tree_allclose(jax.jit(fgrad.hvp, static_argnums=0)(loss, p, vs[0]), expected[0])
    assert_tree_allclose(jax.vmap(lambda v: fgrad.hvp(loss, p, v))(vs), expected)
    # a custom_vjp whose rules use none: forward-over-reverse differentiates through it
    plain = jax.custom_vjp(jnp.sin)
    plain.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))
    hv = fgrad.hvp(lambda q: jnp.sum(plain(q)), p, vs[0], method="forward_over_reverse")
    assert_tree_allclose(hv, expected[0])


def test_errors():
    p = {"a": jnp.ones(2), "b": jnp.ones(())}
    f = lambda p: jnp.sum(p["a"] ** 2) * p["b"]
    with pytest.raises(ValueError, match=r"v\['b'\] is missing"):
        fgrad.hvp(f, p, {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"v\['a'\] has shape \(3,\), expected \(2,\)"):
        fgrad.hvp(f, p, {"a": jnp.ones(3), "b": jnp.ones(())})
    with pytest.raises(ValueError, match="method must be one of"):
        fgrad.hvp(f, p, p, method="fwd")
    # a list where params is an array: the message says what each is
    with pytest.raises(
        ValueError,
        match=r"fgrad\.hvp: .*params is an array of shape \(3,\) and dtype float32 but v is "
        r"a list of 3 item\(s\) of float.*jnp\.asarray\(v\)",
    ):
        fgrad.hvp(lambda w: jnp.sum(w**3), jnp.ones(3), [1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match=r"must return a scalar .*shape \(2,\)"):
        fgrad.hessian(lambda p: p["a"] * p["b"])(p)
    with pytest.raises(TypeError, match=r"must return a scalar"):
        fgrad.hvp(lambda p: p["a"] * p["b"], p, p)
    with pytest.raises(TypeError, match="argument 0 must be floating point"):
        fgrad.hessian(lambda n: jnp.sum(n**2))(jnp.arange(3))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fgrad.hessian(f, chunk_size=0)
    with pytest.raises(TypeError, match="argnums must be one int"):
        fgrad.hessian(f, argnums=(0,))


def test_hessian_of_other_argnum_and_x64():
    with jax.enable_x64(True):
        f = lambda a, b: jnp.sum(jnp.sin(a) * b**3)
        a, b = jnp.array([0.1, 0.2]), jnp.array([1.5, -0.5])
        h = fgrad.hessian(f, argnums=1)(a, b)
        assert h.dtype == jnp.float64
        np.testing.assert_allclose(
            h, np.diag(6 * np.sin([0.1, 0.2]) * np.array([1.5, -0.5])), rtol=1e-12
        )


def test_hvp_of_python_floats_both_methods():
    """f(w) = sin(w) at w = 1 with v = 1: H v = -sin(1), also through reverse-over-reverse
    (explicit, or the fallback for a custom_vjp), where Python-float inputs used to crash."""

    @jax.custom_vjp
    def ident(w):
        return w

    ident.defvjp(lambda w: (w, None), lambda r, g: (g,))
    want = -np.sin(1.0)
    for method in ("forward_over_reverse", "reverse_over_reverse", "auto"):
        got = fgrad.hvp(lambda w: jnp.sin(w), 1.0, 1.0, method=method)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    got = fgrad.hvp(lambda w: jnp.sin(ident(w)), 1.0, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)


# --- linearize_grad: the gradient and the Hessian as a function ------------------------------


def test_linearize_grad_is_pytorchs_retained_double_backward_graph(mlp):
    """PyTorch's way to many products with one Hessian: the gradient with
    create_graph=True, then autograd.grad through it with retain_graph=True per vector."""
    ps, x, y, v, params, args = mlp
    leaves = [p.detach().clone().requires_grad_() for p in ps]
    g_t = torch.autograd.grad(torch_mlp_fn(x, y)(*leaves), leaves, create_graph=True)
    g, hvp = fgrad.linearize_grad(jax_mlp_fn, params, *args)
    assert_tree_allclose(g, [t.detach() for t in g_t], rtol=1e-5, atol=1e-6)
    for scale in (1.0, -0.5, 3.0):
        vs = [scale * t for t in v]
        want = torch.autograd.grad(g_t, leaves, grad_outputs=vs, retain_graph=True)
        assert_tree_allclose(hvp([from_torch(t) for t in vs]), list(want), rtol=1e-4, atol=1e-5)


def test_linearize_grad_matches_torch_gradient_and_hvp(mlp):
    ps, x, y, v, params, args = mlp
    f_t = torch_mlp_fn(x, y)
    leaves = [p.detach().clone().requires_grad_() for p in ps]
    expected_g = torch.autograd.grad(f_t(*leaves), leaves)
    _, expected_hv = torch.autograd.functional.hvp(f_t, tuple(ps), tuple(v))
    vj = [from_torch(t) for t in v]
    for method in ("auto", "forward_over_reverse", "reverse_over_reverse"):
        # the linear map leaves jit as a pytree and is applied in another jit
        g, hv_fn = jax.jit(
            lambda p, method=method: fgrad.linearize_grad(jax_mlp_fn, p, *args, method=method)
        )(params)
        assert_tree_allclose(g, list(expected_g), rtol=1e-5, atol=1e-6)
        hv = jax.jit(lambda h, t: h(t))(hv_fn, vj)
        assert_tree_allclose(hv, list(expected_hv), rtol=1e-4, atol=1e-5)
        scratch = fgrad.hvp(jax_mlp_fn, params, vj, *args)
        assert_tree_allclose(hv_fn(vj), scratch, rtol=1e-5, atol=1e-6)


def test_linearize_grad_in_a_newton_cg_loop_against_a_dense_float64_solve():
    """Newton's direction H⁻¹g of an L2-regularised logistic regression by conjugate
    gradients in a lax.while_loop, one linearisation for every product, against
    numpy's solve of the dense float64 Hessian."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        xs, ys = jnp.asarray(rng.normal(size=(40, 5))), jnp.asarray(rng.integers(0, 2, 40) * 1.0)
        p = {"w": jnp.asarray(rng.normal(size=5)), "b": jnp.asarray(0.3)}

        def loss(p, x, y):
            z = x @ p["w"] + p["b"]
            l2 = 0.1 * (jnp.sum(p["w"] ** 2) + p["b"] ** 2)
            return jnp.mean(jax.nn.softplus(z) - y * z) + l2

        @jax.jit
        def newton_direction(p):
            g, hvp = fgrad.linearize_grad(loss, p, xs, ys)
            dot = lambda a, b: sum(
                jnp.vdot(u, w) for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
            )
            axpy = lambda s, a, b: jax.tree.map(lambda u, w: s * u + w, a, b)

            def body(c):
                d, r, q, rr, k = c
                hq = hvp(q)
                alpha = rr / dot(q, hq)
                d, r = axpy(alpha, q, d), axpy(-alpha, hq, r)
                rr_new = dot(r, r)
                return d, r, axpy(rr_new / rr, q, r), rr_new, k + 1

            zero = jax.tree.map(jnp.zeros_like, g)
            init = (zero, g, g, dot(g, g), 0)
            d, *_ = jax.lax.while_loop(lambda c: (c[3] > 1e-28) & (c[4] < 20), body, init)
            return g, d

        g, d = newton_direction(p)
        flat = lambda t: np.concatenate([np.ravel(t["b"]), np.ravel(t["w"])])
        unflat = lambda a: {"b": jnp.asarray(a[0]), "w": jnp.asarray(a[1:])}
        dense = jax.hessian(lambda a: loss(unflat(a), xs, ys))(jnp.asarray(flat(p)))
        np.testing.assert_allclose(flat(d), np.linalg.solve(np.asarray(dense), flat(g)), rtol=1e-10)
        assert d["w"].dtype == jnp.float64


def test_linearize_grad_falls_back_where_a_custom_vjp_forbids_forward_mode():
    f = _sin_whose_backward_calls_a_custom_vjp()
    loss = lambda p: jnp.sum(f(p))
    p, v = jnp.array([0.3, 1.2]), jnp.array([1.0, -2.0])
    with pytest.raises(TypeError, match="forward-mode"):
        fgrad.linearize_grad(loss, p, method="forward_over_reverse")
    g, hvp = fgrad.linearize_grad(loss, p)
    assert_tree_allclose(g, jnp.cos(p))
    assert_tree_allclose(hvp(v), -jnp.sin(p) * v)
    # Python floats, each method: f = sin at 1, v = 1
    for method in ("forward_over_reverse", "reverse_over_reverse", "auto"):
        g, hvp = fgrad.linearize_grad(lambda w: jnp.sin(w), 1.0, method=method)
        np.testing.assert_allclose([g, hvp(1.0)], [np.cos(1.0), -np.sin(1.0)], rtol=1e-6)


def test_a_custom_vjp_on_the_data_leaves_forward_mode_alone():
    """A custom_vjp that no tangent reaches (applied to the data) does not stop forward
    mode: method='forward_over_reverse' computes, as plain JAX does."""

    @jax.custom_vjp
    def clip_grad(x):
        return x

    clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1, 1),))
    f = lambda p, x: jnp.sum(jnp.sin(p * clip_grad(x)) ** 2)
    p, x, v = jnp.array([0.3, 1.0]), jnp.array([1.0, 2.0]), jnp.array([1.0, 0.5])
    want = jax.jvp(jax.grad(lambda q: f(q, x)), (p,), (v,))[1]
    for method in ("forward_over_reverse", "auto", "reverse_over_reverse"):
        assert_tree_allclose(fgrad.hvp(f, p, v, x, method=method), want)
        assert_tree_allclose(fgrad.linearize_grad(f, p, x, method=method)[1](v), want)


def test_the_fallback_runs_the_function_once_and_results_keep_weak_types():
    """Where forward mode is refused, the decision comes from the traced program (not from
    running it): a callback inside f fires once per call; and an HVP at Python floats is
    weakly typed, as jax.jvp of jax.grad's is."""
    calls = []
    f = _sin_whose_backward_calls_a_custom_vjp()

    def loss(p):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.sum(f(p))

    p, v = jnp.array([0.3, 1.2]), jnp.array([1.0, -2.0])
    fgrad.linearize_grad(loss, p)
    assert len(calls) == 1
    assert_tree_allclose(jax.jit(lambda q: fgrad.linearize_grad(loss, q)[1](v))(p), -jnp.sin(p) * v)
    assert len(calls) == 2
    hv = fgrad.hvp(lambda q: q["a"] ** 2 * q["b"], {"a": 3.0, "b": 2.0}, {"a": 1.0, "b": 0.0})
    assert (hv["b"] * jnp.ones(2, jnp.bfloat16)).dtype == jnp.bfloat16


def test_linearize_grad_errors():
    p = {"a": jnp.ones(2), "b": jnp.ones(())}
    f = lambda p: jnp.sum(p["a"] ** 2) * p["b"]
    _, hvp = fgrad.linearize_grad(f, p)
    with pytest.raises(ValueError, match=r"fgrad\.linearize_grad: hvp\(v\): .*v\['b'\] is missing"):
        hvp({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"linearize_grad: hvp\(v\): .*v\['a'\] has shape \(3,\)"):
        jax.jit(lambda h, t: h(t))(hvp, {"a": jnp.ones(3), "b": jnp.ones(())})
    with pytest.raises(TypeError, match=r"linearize_grad: hvp\(v\) takes one argument v"):
        hvp(p, p)
    with pytest.raises(TypeError, match=r"linearize_grad: hvp\(v\): v\['a'\] is complex"):
        hvp({"a": jnp.ones(2, jnp.complex64), "b": jnp.ones(())})
    with pytest.raises(TypeError, match=r"fgrad\.hvp: v\['a'\] is complex but the parameter"):
        fgrad.hvp(f, p, {"a": jnp.ones(2, jnp.complex64), "b": jnp.ones(())})
    with pytest.raises(ValueError, match=r"fgrad\.linearize_grad: method must be one of"):
        fgrad.linearize_grad(f, p, method="fwd")
    with pytest.raises(TypeError, match=r"fgrad\.linearize_grad: params .*floating"):
        fgrad.linearize_grad(lambda n: jnp.sum(n**2), jnp.arange(3))
    with pytest.raises(TypeError, match=r"fgrad\.linearize_grad: .*must return a scalar"):
        fgrad.linearize_grad(lambda p: p["a"] * p["b"], p)


def test_curvature_estimators_linearize_once():
    """Every estimator's products share one linearisation: the Lanczos loop of
    hessian_eigenvalues holds only the tangent half of an HVP; the forward pass (its tanh)
    runs once, before the loop, where a JVP of the gradient would run it in every step."""
    from jax.extend.core import jaxprs_in_params

    params = [jnp.ones((4, 3)), jnp.ones(4), jnp.ones((2, 4)), jnp.ones(2)]
    x, y = jnp.ones((6, 3)), jnp.ones((6, 2))
    f = lambda p: jax_mlp_fn(p, x, y)

    def count(jaxpr, name):
        n = sum(e.primitive.name == name for e in jaxpr.eqns)
        return n + sum(count(s, name) for e in jaxpr.eqns for s in jaxprs_in_params(e.params))

    def in_loops(jaxpr, name):
        loops = [e for e in jaxpr.eqns if e.primitive.name in ("scan", "while")]
        assert loops
        return sum(count(s, name) for e in loops for s in jaxprs_in_params(e.params))

    assert count(jax.make_jaxpr(lambda p: jax.jvp(jax.grad(f), (p,), (p,)))(params).jaxpr, "tanh")
    eig = lambda p: fgrad.curvature.hessian_eigenvalues(f, p, key=jax.random.key(0), iterations=5)
    jaxpr = jax.make_jaxpr(eig)(params).jaxpr
    assert count(jaxpr, "tanh") > 0 and in_loops(jaxpr, "tanh") == 0
    assert in_loops(jaxpr, "dot_general") > 0  # the products are in the loop
