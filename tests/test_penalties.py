"""Gradient penalties: value and parameter gradient against PyTorch create_graph=True
implementations on identical weights, and one contract shared by every penalty."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fgrad
from fgrad import penalties as P
from fgrad.interop.torch import to_linen
from helpers import assert_tree_allclose, from_torch
from models_torch_flax import LinenCNN, make_torch_cnn, nhwc

B, D, H, C = 6, 3, 8, 2
RNG = np.random.default_rng(0)
X = RNG.normal(size=(B, D)).astype(np.float32)
X2 = RNG.normal(size=(B, D)).astype(np.float32)
EPS = RNG.uniform(size=B).astype(np.float32)
V = RNG.normal(size=(3, B, C)).astype(np.float32)
V /= np.linalg.norm(V, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    l1, l2 = torch.nn.Linear(D, H), torch.nn.Linear(H, C)
    params = {
        "l1": {"w": from_torch(l1.weight), "b": from_torch(l1.bias)},
        "l2": {"w": from_torch(l2.weight), "b": from_torch(l2.bias)},
    }
    return (l1, l2), params


def jax_net(p, x):
    h = fgrad.tap("h", jnp.tanh(x @ p["l1"]["w"].T + p["l1"]["b"]))
    return h @ p["l2"]["w"].T + p["l2"]["b"]  # (batch, C)


def jax_critic(p, x):
    return jnp.sum(jax_net(p, x) ** 2, axis=1)  # one score per example


def torch_net(mods, x, keep=None):
    h = torch.tanh(mods[0](x))
    if keep is not None:
        keep.append(h)
    return mods[1](h)


def torch_critic(mods, x, keep=None):
    return (torch_net(mods, x, keep) ** 2).sum(1)


def grad_or_zeros(t):
    """PyTorch leaves .grad None where a parameter does not reach the penalty (e.g. a last
    bias, which no input gradient depends on); the gradient there is zero."""
    return torch.zeros_like(t) if t.grad is None else t.grad


def torch_grads(mods):
    return {
        "l1": {"w": grad_or_zeros(mods[0].weight), "b": grad_or_zeros(mods[0].bias)},
        "l2": {"w": grad_or_zeros(mods[1].weight), "b": grad_or_zeros(mods[1].bias)},
    }


def run_torch(mods, penalty):
    for m in mods:
        m.zero_grad()
    value = penalty()
    value.backward()
    return value, torch_grads(mods)


def sq_norms(g):
    return (g.flatten(1) ** 2).sum(1)


# PyTorch create_graph=True references, written the way the papers state them.
def t_input_gradient(mods):
    x = torch.from_numpy(X).requires_grad_(True)
    (g,) = torch.autograd.grad(torch_critic(mods, x).sum(), x, create_graph=True)
    return sq_norms(g).mean()


def t_intermediate(mods):
    keep = []
    out = torch_critic(mods, torch.from_numpy(X), keep)
    (g,) = torch.autograd.grad(out.sum(), keep[0], create_graph=True)
    return sq_norms(g).mean()


def t_wgan_gp(mods):
    eps = torch.from_numpy(EPS)[:, None]
    x_hat = (eps * torch.from_numpy(X) + (1 - eps) * torch.from_numpy(X2)).requires_grad_(True)
    (g,) = torch.autograd.grad(torch_critic(mods, x_hat).sum(), x_hat, create_graph=True)
    return 10.0 * ((g.norm(dim=1) - 1) ** 2).mean()


def t_r(data):
    def pen(mods):
        x = torch.from_numpy(data).requires_grad_(True)
        (g,) = torch.autograd.grad(torch_critic(mods, x).sum(), x, create_graph=True)
        return 5.0 * sq_norms(g).mean()

    return pen


def t_gradient_norm(mods):
    y = torch.from_numpy(X2[:, :C])
    loss = ((torch_net(mods, torch.from_numpy(X)) - y) ** 2).mean()
    ps = [mods[0].weight, mods[0].bias, mods[1].weight, mods[1].bias]
    gs = torch.autograd.grad(loss, ps, create_graph=True)
    return torch.sqrt(sum((g**2).sum() for g in gs))


def t_jacobian(mods):
    x = torch.from_numpy(X).requires_grad_(True)
    out = torch_net(mods, x)
    total = 0
    for v in torch.from_numpy(V):
        (u,) = torch.autograd.grad((out * v).sum(), x, create_graph=True)
        total = total + sq_norms(u).mean()
    return C * total / len(V)


def mse(p, x, y):
    return jnp.mean((jax_net(p, x) - y) ** 2)


JX, JX2, JY = jnp.asarray(X), jnp.asarray(X2), jnp.asarray(X2[:, :C])
CASES = {
    "input_gradient": (lambda p: P.input_gradient(jax_critic, p, JX), t_input_gradient),
    "intermediate_gradient": (
        lambda p: P.intermediate_gradient(jax_critic, p, JX, "h"),
        t_intermediate,
    ),
    "wgan_gp": (lambda p: P.wgan_gp(jax_critic, p, JX, JX2, epsilon=jnp.asarray(EPS)), t_wgan_gp),
    "r1": (lambda p: P.r1(jax_critic, p, JX), t_r(X)),
    "r2": (lambda p: P.r2(jax_critic, p, JX2), t_r(X2)),
    "gradient_norm": (lambda p: P.gradient_norm(mse, p, JX, JY), t_gradient_norm),
    "jacobian_norm": (
        lambda p: P.jacobian_norm(jax_net, p, JX, vectors=jnp.asarray(V)),
        t_jacobian,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_param_gradient_match_torch(mlp, name):
    mods, params = mlp
    ours, theirs = CASES[name]
    value_t, grads_t = run_torch(mods, lambda: theirs(mods))
    value, grads = jax.jit(jax.value_and_grad(ours))(params)
    assert_tree_allclose(value, value_t, rtol=1e-5)
    assert_tree_allclose(grads, grads_t, rtol=1e-4, atol=1e-6)


def test_cnn_critic_wgan_gp_and_r1_match_torch():
    net = make_torch_cnn(seed=1, classes=1)
    real = RNG.normal(size=(4, 1, 8, 8)).astype(np.float32)
    fake = RNG.normal(size=(4, 1, 8, 8)).astype(np.float32)
    eps = RNG.uniform(size=4).astype(np.float32)
    params = to_linen(net)
    critic = lambda v, x: LinenCNN(classes=1).apply(v, x)

    def torch_pen():
        e = torch.from_numpy(eps)[:, None, None, None]
        x_hat = (e * torch.from_numpy(real) + (1 - e) * torch.from_numpy(fake)).requires_grad_()
        (g,) = torch.autograd.grad(net(x_hat).sum(), x_hat, create_graph=True)
        gp = 10.0 * ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
        xr = torch.from_numpy(real).requires_grad_()
        (gr,) = torch.autograd.grad(net(xr).sum(), xr, create_graph=True)
        return gp + 5.0 * sq_norms(gr).mean()

    net.zero_grad()
    value_t = torch_pen()
    value_t.backward()

    def ours(v):
        x_real, x_fake = jnp.asarray(nhwc(real)), jnp.asarray(nhwc(fake))
        gp = P.wgan_gp(critic, v, x_real, x_fake, epsilon=jnp.asarray(eps))
        return gp + P.r1(critic, v, x_real)

    value, grads = jax.jit(jax.value_and_grad(ours))(params)
    assert_tree_allclose(value, value_t, rtol=1e-4)
    # PyTorch's gradients in Flax layout: the same module holding its .grad as weights
    as_grads = copy.deepcopy(net)
    with torch.no_grad():
        for g, q in zip(as_grads.parameters(), net.parameters(), strict=True):
            g.copy_(grad_or_zeros(q))
    assert_tree_allclose(grads["params"], to_linen(as_grads)["params"], rtol=2e-3, atol=1e-5)


def test_finite_difference_gradient_norm_approximates_exact(mlp):
    _, params = mlp
    exact = jax.grad(lambda p: P.gradient_norm(mse, p, JX, JY))(params)
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)])
    errors = []
    for r in (0.1, 0.01):
        fd = jax.jit(
            jax.grad(
                lambda p, r=r: P.gradient_norm(mse, p, JX, JY, method="finite_difference", r=r)
            )
        )(params)
        errors.append(float(jnp.linalg.norm(flat(fd) - flat(exact)) / jnp.linalg.norm(flat(exact))))
    assert errors[1] < 0.01  # r = 0.01: within 1%
    assert errors[1] < errors[0] / 3  # first order in r
    value = P.gradient_norm(mse, params, JX, JY, method="finite_difference")
    assert_tree_allclose(value, P.gradient_norm(mse, params, JX, JY))


# --- the contract every penalty keeps --------------------------------------------------

DUPLICATED = {
    "input_gradient": lambda p, x: P.input_gradient(jax_critic, p, x),
    "intermediate_gradient": lambda p, x: P.intermediate_gradient(jax_critic, p, x, "h"),
    "wgan_gp": lambda p, x: P.wgan_gp(
        jax_critic, p, x, x[::-1], epsilon=jnp.linspace(0.0, 1.0, x.shape[0]) % 0.7
    ),
    "r1": lambda p, x: P.r1(jax_critic, p, x),
    "r2": lambda p, x: P.r2(jax_critic, p, x),
    "gradient_norm": lambda p, x: P.gradient_norm(mse, p, x, x[:, :C]),
    "jacobian_norm": lambda p, x: P.jacobian_norm(
        jax_net, p, x, vectors=jnp.tile(jnp.asarray(V), (1, x.shape[0] // B, 1))
    ),
}


@pytest.mark.parametrize("name", sorted(DUPLICATED))
def test_contract_batch_mean_jit_vmap_no_recompile(mlp, name):
    _, params = mlp
    pen = DUPLICATED[name]
    x = JX
    twice = jnp.concatenate([x, x])
    if name == "wgan_gp":  # interpolates pair x_i with x_{n-1-i}: duplicate pairs, too
        value_twice = P.wgan_gp(
            jax_critic,
            params,
            twice,
            jnp.concatenate([x[::-1]] * 2),
            epsilon=jnp.tile(jnp.linspace(0.0, 1.0, B) % 0.7, 2),
        )
    else:
        value_twice = pen(params, twice)
    assert_tree_allclose(value_twice, pen(params, x), rtol=1e-5)  # a mean: batch-size free
    traces = []

    def counted(p, x):
        traces.append(1)
        return pen(p, x)

    f = jax.jit(counted)
    f(params, x)
    f(jax.tree.map(lambda a: a * 1.01, params), x + 0.1)
    assert len(traces) == 1
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
    per = jax.vmap(pen, (0, None))(stacked, x)
    assert_tree_allclose(per[1], pen(jax.tree.map(lambda a: 0.5 * a, params), x), rtol=1e-5)


def test_contract_zero_where_the_gradient_is_zero(mlp):
    _, params = mlp
    flat = lambda p, x: jnp.zeros(x.shape[0]) + 0.0 * jnp.sum(p["l1"]["b"])  # no x-dependence
    assert float(P.input_gradient(flat, params, JX)) == 0.0
    assert float(P.r1(flat, params, JX)) == 0.0 and float(P.r2(flat, params, JX)) == 0.0
    assert (
        float(
            P.jacobian_norm(
                lambda p, x: jnp.zeros((x.shape[0], C)), params, JX, key=jax.random.key(0)
            )
        )
        == 0.0
    )
    tapped = lambda p, x: jnp.zeros(x.shape[0]) + 0.0 * fgrad.tap("h", x).sum(1)
    assert float(P.intermediate_gradient(tapped, params, JX, "h")) == 0.0
    w_min = {"w": jnp.ones(3)}
    assert float(P.gradient_norm(lambda p: jnp.sum((p["w"] - 1.0) ** 2), w_min)) == 0.0
    # WGAN-GP's zero is at gradient norm 1: a linear critic with a unit weight vector
    unit = jnp.array([0.6, 0.8, 0.0])
    assert float(P.wgan_gp(lambda w, x: x @ w, unit, JX, JX2, key=jax.random.key(0))) < 1e-10


def test_key_is_keyword_only_so_extra_arguments_pass_through(mlp):
    """A critic's extra positional argument is not taken for the key; a key given
    positionally (where it used to go) is refused with the fix."""
    unit = jnp.array([0.6, 0.8, 0.0])
    scaled = lambda w, x, s: s * (x @ w)  # gradient s·w, norm s: penalty 10 (s - 1)²
    gp = P.wgan_gp(scaled, unit, JX, JX2, 2.0, key=jax.random.key(0))
    assert_tree_allclose(gp, 10.0, rtol=1e-6)
    jn = P.jacobian_norm(
        lambda w, x, s: s * x[:, :2] @ w, jnp.eye(2), JX, 3.0, key=jax.random.key(1)
    )
    assert_tree_allclose(jn, 18.0, rtol=1e-5)  # J = 3·I₂: ‖J‖_F² = 18 for every projection
    with pytest.raises(TypeError, match=r"wgan_gp: key is keyword-only.*key=jax\.random\.key"):
        P.wgan_gp(lambda w, x: x @ w, unit, JX, JX2, jax.random.key(0))
    with pytest.raises(TypeError, match=r"jacobian_norm: key is keyword-only"):
        P.jacobian_norm(jax_net, mlp[1], JX, jax.random.key(0))


def test_lazy_regularisation(mlp):
    _, params = mlp
    lazy_r1 = jax.jit(P.lazy(functools.partial(P.r1, jax_critic), every=4))
    full = P.r1(jax_critic, params, JX)
    assert_tree_allclose(lazy_r1(8, params, JX), 4 * full, rtol=1e-6)
    assert float(lazy_r1(9, params, JX)) == 0.0
    g = jax.grad(lambda p: lazy_r1(0, p, JX))(params)
    assert_tree_allclose(
        g, jax.tree.map(lambda a: 4 * a, jax.grad(P.r1, 1)(jax_critic, params, JX))
    )
    with pytest.raises(ValueError, match="every must be a positive int"):
        P.lazy(P.r1, every=0)


def test_errors(mlp):
    _, params = mlp
    with pytest.raises(ValueError, match=r"same shape .* \(6, 3\) and \(5, 3\)"):
        P.wgan_gp(jax_critic, params, JX, JX2[:5], key=jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"one score per example, shape \(6,\) or \(6, 1\); got \(6, 2\)"
    ):
        P.r1(jax_net, params, JX)
    with pytest.raises(ValueError, match="one score per example"):
        P.wgan_gp(jax_net, params, JX, JX2, key=jax.random.key(0))
    with pytest.raises(TypeError, match="x must be floating point"):
        P.input_gradient(jax_critic, params, jnp.ones((6, 3), jnp.int32))
    with pytest.raises(TypeError, match="real must be floating point"):
        P.r1(jax_critic, params, jnp.ones((6, 3), jnp.int32))
    with pytest.raises(TypeError, match=r"pass key=jax\.random\.key"):
        P.wgan_gp(jax_critic, params, JX, JX2)
    with pytest.raises(TypeError, match=r"pass key=jax\.random\.key"):
        P.jacobian_norm(jax_net, params, JX)
    with pytest.raises(ValueError, match=r"epsilon must have shape \(6,\)"):
        P.wgan_gp(jax_critic, params, JX, JX2, epsilon=jnp.ones(5))
    with pytest.raises(ValueError, match="method must be 'exact' or 'finite_difference'"):
        P.gradient_norm(mse, params, JX, JY, method="fd")
    with pytest.raises(TypeError, match="must return a scalar"):
        P.gradient_norm(jax_net, params, JX)
    with pytest.raises(ValueError, match=r"shape \(6, C\)"):
        P.jacobian_norm(jax_critic, params, JX, key=jax.random.key(0))


# --- gradient_norm: stationary points, float64, traced r -----------------------------


def _torch_gradient_norm(w0, loss_t):
    w = torch.tensor(np.asarray(w0), requires_grad=True)
    (g,) = torch.autograd.grad(loss_t(w), w, create_graph=True)
    n = g.norm()
    n.backward()
    return n, w.grad


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_gradient_norm_gradient_at_a_stationary_point_is_zero_as_in_torch(method):
    # ∇L = 0 at w = 1 for L = Σ (w - 1)²: PyTorch's norm backward gives 0, not NaN.
    w0 = np.ones(3, np.float32)
    n_t, g_t = _torch_gradient_norm(w0, lambda w: ((w - 1.0) ** 2).sum())
    loss = lambda p: jnp.sum((p - 1.0) ** 2)
    value, grad = jax.jit(jax.value_and_grad(lambda p: P.gradient_norm(loss, p, method=method)))(
        jnp.asarray(w0)
    )
    assert_tree_allclose((value, grad), (n_t, g_t))
    assert not bool(jnp.any(jnp.isnan(grad)))


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_gradient_norm_keeps_float64(mlp, method):
    # float64 in, float64 out: value and parameter gradient against PyTorch in float64.
    mods, params = mlp
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x, y = jnp.asarray(X, jnp.float64), jnp.asarray(X2[:, :C], jnp.float64)
        kw = {"r": 1e-6} if method == "finite_difference" else {}
        # (float32 inside gave a 3e-8 relative error here, and check_grads failed at 1e-4)
        value, grads = jax.jit(
            jax.value_and_grad(lambda p: P.gradient_norm(mse, p, x, y, method=method, **kw))
        )(p64)
        assert value.dtype == jnp.float64
        assert {a.dtype for a in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float64)}
        m64 = copy.deepcopy(mods)
        for m in m64:
            m.double()
        t64 = lambda: t_gradient_norm_data(m64, X.astype(np.float64), X2[:, :C].astype(np.float64))
        value_t, grads_t = run_torch(m64, t64)
        assert_tree_allclose(value, value_t, rtol=1e-12)
        tol = 1e-12 if method == "exact" else 1e-5  # first order in r
        assert_tree_allclose(grads, grads_t, rtol=tol, atol=tol)


def t_gradient_norm_data(mods, x, y):
    loss = ((torch_net(mods, torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
    ps = [mods[0].weight, mods[0].bias, mods[1].weight, mods[1].bias]
    gs = torch.autograd.grad(loss, ps, create_graph=True)
    return torch.sqrt(sum((g**2).sum() for g in gs))


def test_gradient_norm_finite_difference_step_may_be_traced(mlp):
    _, params = mlp
    fd = lambda p, r: P.gradient_norm(mse, p, JX, JY, method="finite_difference", r=r)
    traced = jax.jit(jax.grad(fd))(params, 0.01)
    assert_tree_allclose(traced, jax.grad(fd)(params, 0.01), rtol=1e-5)
    with pytest.raises(ValueError, match="gradient_norm: r must be a positive float"):
        P.gradient_norm(mse, params, JX, JY, method="finite_difference", r=0.0)
    with pytest.raises(TypeError, match=r"gradient_norm: r must be a positive float .* \(2,\)"):
        jax.jit(fd)(params, jnp.ones(2))


def test_hostile_inputs_get_errors_naming_the_penalty(mlp):
    _, params = mlp
    with pytest.raises(TypeError, match=r"wgan_gp: key must be a JAX PRNG key.*got int"):
        P.wgan_gp(jax_critic, params, JX, JX2, key=0)
    with pytest.raises(TypeError, match=r"jacobian_norm: key must be a JAX PRNG key"):
        P.jacobian_norm(jax_net, params, JX, key=0)
    with pytest.raises(TypeError, match=r"r1: gamma must be a real number, got 'a'"):
        P.r1(jax_critic, params, JX, gamma="a")
    with pytest.raises(TypeError, match=r"gradient_norm: r \(the finite-difference step\) must"):
        P.gradient_norm(mse, params, JX, JY, method="finite_difference", r="a")
    with pytest.raises(TypeError, match=r"intermediate_gradient: names must be a tap name"):
        P.intermediate_gradient(jax_critic, params, JX, 3)
    with pytest.raises(ValueError, match=r"^fgrad\.penalties\.intermediate_gradient: no tap named"):
        P.intermediate_gradient(jax_critic, params, JX, "g")
    with pytest.raises(TypeError, match=r"lazy: penalty must be a function"):
        P.lazy(3, every=2)
    # size-1 batches and parameters: correct numbers (closed forms)
    assert float(P.input_gradient(lambda w, x: x @ w, jnp.array([3.0, 4.0]), JX[:1, :2])) == 25.0
    assert float(P.gradient_norm(lambda w: w**2, jnp.float32(2.0))) == 4.0


def test_an_empty_batch_is_refused_naming_the_penalty(mlp):
    """A batch of size 0 is refused (was a ZeroDivisionError)."""
    _, params = mlp
    calls = {
        "wgan_gp": lambda: P.wgan_gp(jax_critic, params, JX[:0], JX2[:0], key=jax.random.key(0)),
        "r1": lambda: P.r1(jax_critic, params, JX[:0]),
        "r2": lambda: P.r2(jax_critic, params, JX[:0]),
        "input_gradient": lambda: P.input_gradient(jax_critic, params, JX[:0]),
        "jacobian_norm": lambda: P.jacobian_norm(jax_net, params, JX[:0], key=jax.random.key(0)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^fgrad\.penalties\.{name}: .* empty batch"):
            call()


def test_jacobian_norm_refuses_vectors_that_are_not_unit_norm(mlp):
    """The estimate scales with the vectors' squared norm: 3 v gave 9x the value."""
    _, params = mlp
    v = jnp.asarray(V)
    jac = jax.vmap(jax.jacfwd(lambda z: jax_net(params, z[None])[0]))(JX)  # (B, C, D)
    want = C * np.mean(np.sum(np.einsum("pnc,ncd->pnd", V, np.asarray(jac)) ** 2, -1))
    np.testing.assert_allclose(float(P.jacobian_norm(jax_net, params, JX, vectors=v)), want, 1e-5)
    with pytest.raises(ValueError, match=r"^fgrad\.penalties\.jacobian_norm: each vector must"):
        P.jacobian_norm(jax_net, params, JX, vectors=3 * v)
