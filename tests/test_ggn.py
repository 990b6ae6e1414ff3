"""GGN and Fisher products and diagonals against dense float64 references, curvlinops and
BackPACK on the same weights (an MLP and a CNN, PyTorch layouts on both sides)."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.flatten_util import ravel_pytree

from fgrad import curvature
from fgrad.interop.torch import to_jax
from helpers import cpu_data_parallel

CE, MSE = curvature.cross_entropy, curvature.mean_squared_error
N = 8


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _conv(x, w, b):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    return y + b[None, :, None, None]


def mlp_fn(p, x):
    h = jnp.tanh(x @ p["0.weight"].T + p["0.bias"])
    return h @ p["2.weight"].T + p["2.bias"]


def cnn_fn(p, x):
    h = jnp.tanh(_conv(x, p["0.weight"], p["0.bias"]))
    return h.reshape(h.shape[0], -1) @ p["3.weight"].T + p["3.bias"]


def _torch_models():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(2, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(18, 3)
    )
    return {"mlp": (mlp.double(), mlp_fn, (N, 4)), "cnn": (cnn.double(), cnn_fn, (N, 2, 5, 5))}


@functools.cache
def _build(name):
    with jax.enable_x64(True):
        module, fn, shape = _torch_models()[name]
        r = np.random.default_rng(1)
        x = r.normal(size=shape)
        labels = r.integers(0, 3, N)
        targets = r.normal(size=(N, 3))
        return module, fn, to_jax(module), jnp.asarray(x), jnp.asarray(labels), jnp.asarray(targets)


def _mlp_model():
    return _build("mlp")


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def model(request):
    """(torch module, model_fn, params (PyTorch names and layouts, float64), x, labels,
    regression targets)."""
    return _build(request.param)


def _y(model, loss):
    return model[4] if loss is CE else model[5]


def _torch_y(model, loss):
    return torch.from_numpy(np.array(_y(model, loss)))


def _torch_loss(loss):
    return torch.nn.CrossEntropyLoss() if loss is CE else torch.nn.MSELoss()


@functools.partial(jax.jit, static_argnums=(0, 1))
def dense_ggn(fn, loss, p, x, y):
    """Jᵀ H_L J in float64 from the full Jacobian and the loss Hessian."""
    flat, unravel = ravel_pytree(p)
    out = fn(p, x)
    jac = jax.jacobian(lambda f: fn(unravel(f), x).reshape(-1))(flat)
    h = jax.hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1))
    return jac.T @ h @ jac


@functools.partial(jax.jit, static_argnums=(0, 1))
def dense_ef(fn, loss, p, x, y):
    """(1/N) Σ gₙ gₙᵀ from per-example gradients."""
    flat, unravel = ravel_pytree(p)
    g = jax.vmap(lambda xn, yn: jax.grad(lambda f: loss(fn(unravel(f), xn[None]), yn[None]))(flat))(
        x, y
    )
    return g.T @ g / g.shape[0]


def _random_like(p, seed):
    flat, unravel = ravel_pytree(p)
    return unravel(jnp.asarray(np.random.default_rng(seed).normal(size=flat.size)))


def _flat(t):
    return np.asarray(ravel_pytree(t)[0])


def _torch_list(module, tree):
    return [torch.from_numpy(np.array(tree[k])) for k, _ in module.named_parameters()]


def _from_torch_list(module, tensors):
    return {
        k: t.detach().numpy() for (k, _), t in zip(module.named_parameters(), tensors, strict=True)
    }


@pytest.mark.parametrize("loss", [CE, MSE], ids=["ce", "mse"])
def test_ggn_vp_equals_dense_jt_h_j(model, loss):
    _, fn, p, x, *_ = model
    y = _y(model, loss)
    v = _random_like(p, 2)
    got = jax.jit(lambda p, x, y, v: curvature.ggn_vp(fn, loss, p, x, y, v))(p, x, y, v)
    np.testing.assert_allclose(
        _flat(got), dense_ggn(fn, loss, p, x, y) @ _flat(v), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("loss", [CE, MSE], ids=["ce", "mse"])
def test_ggn_and_empirical_fisher_equal_curvlinops(model, loss):
    from curvlinops import EFLinearOperator, GGNLinearOperator

    module, fn, p, x, *_ = model
    y = _y(model, loss)
    v = _random_like(p, 3)
    data = [(torch.from_numpy(np.array(x)), _torch_y(model, loss))]
    args = (module, _torch_loss(loss), list(module.parameters()), data)
    kw = {"check_deterministic": False}
    ref_ggn = _from_torch_list(module, GGNLinearOperator(*args, **kw) @ _torch_list(module, v))
    ref_ef = _from_torch_list(module, EFLinearOperator(*args, **kw) @ _torch_list(module, v))
    ggn = curvature.ggn_vp(fn, loss, p, x, y, v)
    ef = curvature.fisher_vp(fn, loss, p, x, y, v, kind="empirical")
    # curvlinops' empirical Fisher for MSELoss is D (outputs per example) times fgrad's
    scale = 1.0 if loss is CE else 3.0
    np.testing.assert_allclose(_flat(ggn), _flat(ref_ggn), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scale * _flat(ef), _flat(ref_ef), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        _flat(ef), dense_ef(fn, loss, p, x, y) @ _flat(v), rtol=1e-10, atol=1e-12
    )


def test_ggn_diagonal_equals_backpack_and_dense(model):
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    module, fn, p, x, *_ = model
    for loss in (CE, MSE):
        y = _y(model, loss)
        ext_module = extend(copy.deepcopy(module))  # BackPACK's hooks stay off the shared one
        lossfn = extend(_torch_loss(loss))
        ext_module.zero_grad()
        with backpack(DiagGGNExact()):
            lossfn(ext_module(torch.from_numpy(np.array(x))), _torch_y(model, loss)).backward()
        ref = {k: q.diag_ggn_exact.detach().numpy() for k, q in ext_module.named_parameters()}
        got = jax.jit(functools.partial(curvature.ggn_diagonal, fn, loss))(p, x, y)
        np.testing.assert_allclose(_flat(got), _flat(ref), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            _flat(got), np.diag(dense_ggn(fn, loss, p, x, y)), rtol=1e-10, atol=1e-12
        )


def test_monte_carlo_fisher_and_diagonal_within_sampling_error():
    """The MC Fisher (fgrad's and curvlinops') is the GGN in expectation: with many draws
    both land on the exact GGN within a few standard errors (the MLP; the CNN's exact
    operators are checked above)."""
    from curvlinops import FisherMCLinearOperator

    model = _mlp_model()
    module, fn, p, x, *_ = model
    v = _random_like(p, 4)

    @functools.partial(jax.jit, static_argnums=0)
    def fgrad_mc(loss, p, x, y, v):
        key = jax.random.key(0)
        return (
            curvature.fisher_vp(fn, loss, p, x, y, v, kind="mc", key=key, samples=2000),
            curvature.ggn_diagonal(fn, loss, p, x, y, method="mc", key=key, samples=2000),
            dense_ggn(fn, loss, p, x, y),
        )

    for loss in (CE, MSE):
        y = _y(model, loss)
        ours, diag, dense = fgrad_mc(loss, p, x, y, v)
        exact, exact_diag = np.asarray(dense) @ _flat(v), np.diag(dense)
        data = [(torch.from_numpy(np.array(x)), _torch_y(model, loss))]
        op = FisherMCLinearOperator(
            module,
            _torch_loss(loss),
            list(module.parameters()),
            data,
            mc_samples=2000,
            check_deterministic=False,
        )
        theirs = _flat(_from_torch_list(module, op @ _torch_list(module, v)))
        scale = np.linalg.norm(exact)
        assert np.linalg.norm(_flat(ours) - exact) < 0.1 * scale
        assert np.linalg.norm(theirs - exact) < 0.1 * scale
        assert np.linalg.norm(_flat(diag) - exact_diag) < 0.1 * np.linalg.norm(exact_diag)


def test_monte_carlo_fisher_is_the_mean_of_its_draws():
    """One draw by hand: targets from the loss's sampler, per-example gradients, outer
    products (closed form of the estimator, not only its expectation)."""
    p, x = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)))}, jnp.ones((4, 3))
    x = x * jnp.arange(1.0, 5.0)[:, None]
    fn = lambda p, x: jnp.tanh(x @ p["w"])
    v = {"w": jnp.ones((3, 2))}
    key = jax.random.key(7)
    got = curvature.fisher_vp(fn, MSE, p, x, jnp.zeros((4, 2)), v, kind="mc", key=key, samples=2)
    out = fn(p, x)
    total = 0
    for k in jax.random.split(key, 2):
        t = MSE.sample(k, out)
        g = jax.vmap(lambda xn, tn: jax.grad(lambda q: MSE(fn(q, xn[None]), tn[None]))(p)["w"])(
            x, t
        )  # per-example gradients at the drawn targets
        total = total + jnp.einsum("nij,n->ij", g, jnp.einsum("nij,ij->n", g, v["w"]))
    np.testing.assert_allclose(got["w"], total / 8, rtol=1e-10)


def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters():
    r = np.random.default_rng(5)
    p = {"w": jnp.asarray(r.normal(size=(4, 3))), "b": jnp.asarray(r.normal(size=3))}
    x, labels = jnp.asarray(r.normal(size=(6, 4))), jnp.asarray(r.integers(0, 3, 6))
    fn = lambda p, x: x @ p["w"] + p["b"]
    v = _random_like(p, 6)

    @functools.partial(jax.jit, static_argnums=0)
    def both(loss, p, x, y, v):
        f = lambda q, x, y: loss(fn(q, x), y)
        return (
            curvature.hessian_diagonal(f, p, x, y),
            curvature.hessian_diagonal(fn, p, x, y, operator="ggn", loss_fn=loss),
            jax.jvp(lambda q: jax.grad(f)(q, x, y), (p,), (v,))[1],
            curvature.ggn_vp(fn, loss, p, x, y, v),
        )

    for loss, y in ((CE, labels), (MSE, jnp.asarray(r.normal(size=(6, 3))))):
        h, g, hv, gv = both(loss, p, x, y, v)
        np.testing.assert_allclose(_flat(g), _flat(h), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(_flat(gv), _flat(hv), rtol=1e-10, atol=1e-12)


def test_a_loss_with_negative_output_curvature_keeps_it():
    """J^T H_L J exactly when H_L has a negative eigenvalue (no clipping): for a model
    linear in its parameters it is the Hessian, and so are the exact diagonal and K-FAC
    of one example (K-FAC is exact for one layer and one example)."""
    with jax.enable_x64(True):
        w = jnp.array([[1.0, 2.0], [0.5, -1.0]])
        x, y = jnp.array([[1.0, 2.0]]), jnp.zeros((1, 2))
        loss = lambda o, y: jnp.mean(o[:, 0] ** 2 - 0.5 * o[:, 1] ** 2)  # H_L = diag(1, -½)·…
        model = lambda w, x: x @ w
        h = jax.hessian(lambda w: loss(model(w, x), y))(w).reshape(4, 4)
        diag = curvature.ggn_diagonal(model, loss, w, x, y)
        np.testing.assert_allclose(diag.ravel(), jnp.diag(h), rtol=1e-12, atol=1e-12)
        assert float(diag.min()) < 0
        k = curvature.kfac(model, loss, w, x, y)
        np.testing.assert_allclose(k.dense(), h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("loss", "target"),
    [
        (CE, np.int64(2)),  # a label
        (CE, np.array([0.2, 0.0, 0.5, 0.3])),  # class probabilities
        (CE, np.array([0.4, -0.3, 0.5, 0.9])),  # weights summing to 1.5, one negative
        (CE, np.array([-0.4, 0.1, -0.2, 0.0])),  # summing below zero: a concave loss
        (MSE, np.array([[0.3, -1.0], [2.0, 0.5]])),  # an example with 2x2 outputs
    ],
)
def test_closed_form_loss_hessian_roots_equal_the_dense_hessian(loss, target):
    """fgrad's losses give their per-example output Hessian's root in closed form (no
    eigendecomposition per example): S diag(signs) Sᵀ equals the dense float64 Hessian of
    the loss of a batch of one (jax.hessian)."""
    from fgrad._ggn import _loss_sqrt

    o = jnp.array([0.3, -1.2, 2.0, 0.1]).reshape(np.shape(target) or (4,))
    t = jnp.asarray(target)
    root, signs = _loss_sqrt(loss, o, t)
    flat, unravel = ravel_pytree(o)
    dense = jax.hessian(lambda f: loss(unravel(f)[None], t[None]))(flat)
    np.testing.assert_allclose((root * signs) @ root.T, dense, rtol=1e-12, atol=1e-14)
    generic = _loss_sqrt(lambda a, b: loss(a, b), o, t)  # any other callable: eigh
    np.testing.assert_allclose((generic[0] * generic[1]) @ generic[0].T, dense, atol=1e-12)


@pytest.fixture(scope="module")
def mlp_problem():
    with jax.enable_x64(True):
        module, fn, shape = _torch_models()["mlp"]
        r = np.random.default_rng(2)
        x, y = jnp.asarray(r.normal(size=shape)), jnp.asarray(r.integers(0, 3, N))
        p = to_jax(module)
        yield fn, p, x, y, dense_ggn(fn, CE, p, x, y), dense_ef(fn, CE, p, x, y)


def test_every_estimator_takes_the_ggn_and_the_fisher(mlp_problem):
    fn, p, x, y, ggn, ef = mlp_problem
    n = ggn.shape[0]
    key = jax.random.key(3)
    ggn, ef = np.asarray(ggn), np.asarray(ef)
    kw = {"operator": "ggn", "loss_fn": CE}

    @jax.jit  # one compiled program for every estimator
    def estimates(p, x, y):
        return (
            curvature.hessian_diagonal(fn, p, x, y, **kw),
            curvature.hessian_trace(fn, p, x, y, key=key, samples=3 * n, **kw),
            curvature.hessian_spectrum(fn, p, x, y, key=key, iterations=n, runs=1, **kw),
            [
                curvature.hessian_eigenvalues(
                    fn, p, x, y, key=key, k=3, iterations=n, operator=op, loss_fn=CE
                )
                for op in ("ggn", "fisher")
            ],
            # the MC Fisher through an estimator is one fixed draw per key
            jax.vmap(
                lambda k: curvature.hessian_diagonal(
                    fn, p, x, y, operator="fisher_mc", loss_fn=CE, key=k
                )
            )(jax.random.split(key, 400)),
        )

    diag, tr, spec, (eig_ggn, eig_ef), mc = estimates(p, x, y)
    np.testing.assert_allclose(_flat(diag), np.diag(ggn), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tr.value, np.trace(ggn), rtol=1e-8)
    # n Lanczos steps: the quadrature nodes are every eigenvalue, none negative
    np.testing.assert_allclose(spec.nodes[0], np.linalg.eigvalsh(ggn), atol=1e-9)
    for eig, dense in ((eig_ggn, ggn), (eig_ef, ef)):
        np.testing.assert_allclose(eig.values, np.linalg.eigvalsh(dense)[::-1][:3], rtol=1e-8)
    # over many keys the MC Fisher's diagonal averages to the GGN's
    mean = _flat(jax.tree.map(lambda a: a.mean(0), mc))
    assert np.linalg.norm(mean - np.diag(ggn)) < 0.1 * np.linalg.norm(np.diag(ggn))


def test_microbatches_equal_the_whole_batch_in_one_scan_sharded(mlp_problem):
    fn, p, x, y, *_ = mlp_problem
    v = _random_like(p, 8)
    shard, replicate = cpu_data_parallel("data")
    x16 = jnp.concatenate([x, x[::-1] * 0.5])
    y16 = jnp.concatenate([y, y[::-1]])
    whole_ggn, whole_ef, whole_diag = jax.jit(
        lambda p, x, y, v: (
            curvature.ggn_vp(fn, CE, p, x, y, v),
            curvature.fisher_vp(fn, CE, p, x, y, v),
            curvature.ggn_diagonal(fn, CE, p, x, y),
        )
    )(p, x16, y16, v)

    @jax.jit
    def scanned(p, x, y, v):
        return (
            curvature.ggn_vp(fn, CE, p, x, y, v, microbatches=2),
            curvature.fisher_vp(fn, CE, p, x, y, v, microbatches=2),
            curvature.ggn_diagonal(fn, CE, p, x, y, microbatches=2),
        )

    g, f, d = scanned(replicate(p), shard(x16), shard(y16), replicate(v))
    np.testing.assert_allclose(_flat(g), _flat(whole_ggn), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_flat(f), _flat(whole_ef), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_flat(d), _flat(whole_diag), rtol=1e-10, atol=1e-12)
    assert "while" in jax.jit(scanned).lower(p, x16, y16, v).as_text()  # one compiled loop


def test_errors_name_the_function():
    p, x = {"w": jnp.ones((3, 2))}, jnp.ones((4, 3))
    fn = lambda p, x: x @ p["w"]
    v = p
    custom = lambda o, y: jnp.mean((o - y) ** 2)
    with pytest.raises(
        ValueError, match=r"fgrad.curvature.fisher_vp: .*no rule.*cross_entropy.*sampler="
    ):
        curvature.fisher_vp(
            fn, custom, p, x, jnp.zeros((4, 2)), v, kind="mc", key=jax.random.key(0)
        )
    # a sampler makes any loss work
    curvature.fisher_vp(
        fn,
        custom,
        p,
        x,
        jnp.zeros((4, 2)),
        v,
        kind="mc",
        key=jax.random.key(0),
        sampler=lambda k, o: o + jax.random.normal(k, o.shape),
    )
    with pytest.raises(
        ValueError, match=r"fgrad.curvature.ggn_vp: integer labels .* shape \(batch,\)"
    ):
        curvature.ggn_vp(fn, CE, p, x, jnp.zeros((3,), jnp.int32), v)
    with pytest.raises(
        ValueError, match=r"fgrad.curvature.fisher_vp: mean_squared_error needs targets"
    ):
        curvature.fisher_vp(fn, MSE, p, x, jnp.zeros((4, 3)), v)
    with pytest.raises(
        ValueError, match=r"fgrad.curvature.ggn_diagonal: cross_entropy needs logits"
    ):
        curvature.ggn_diagonal(lambda p, x: (x @ p["w"])[..., None], CE, p, x, jnp.zeros((4, 2, 1)))
    with pytest.raises(
        ValueError, match=r"fgrad.curvature.fisher_vp: outputs and targets must share"
    ):
        curvature.fisher_vp(fn, custom, p, x, jnp.zeros((5, 2)), v)
    with pytest.raises(ValueError, match=r"fgrad.curvature.fisher_vp: kind must be"):
        curvature.fisher_vp(fn, CE, p, x, jnp.zeros((4,), jnp.int32), v, kind="type2")
    with pytest.raises(
        TypeError, match=r"fgrad.curvature.hessian_trace: operator='ggn' needs loss_fn"
    ):
        curvature.hessian_trace(fn, p, x, jnp.zeros((4, 2)), key=jax.random.key(0), operator="ggn")
    with pytest.raises(ValueError, match=r"fgrad.curvature.hessian_eigenvalues: operator must be"):
        curvature.hessian_eigenvalues(
            fn, p, x, key=jax.random.key(0), operator="gn", loss_fn=custom
        )
    with pytest.raises(ValueError, match=r"fgrad.curvature.ggn_vp: v must have the structure"):
        curvature.ggn_vp(fn, custom, p, x, jnp.zeros((4, 2)), {"w": jnp.ones(3)})


def test_ggn_vp_through_a_custom_vjp_model():
    """A custom_vjp activation refuses forward mode; the JVP then comes from transposing
    the VJP, and the product still equals the dense reference (built by reverse mode)."""

    @jax.custom_vjp
    def act(z):
        return jnp.tanh(z)

    act.defvjp(lambda z: (jnp.tanh(z), z), lambda z, g: (g * (1 - jnp.tanh(z) ** 2),))
    r = np.random.default_rng(9)
    p = {"w": jnp.asarray(r.normal(size=(4, 3))), "v": jnp.asarray(r.normal(size=(3, 3)))}
    x, y = jnp.asarray(r.normal(size=(5, 4))), jnp.asarray(r.integers(0, 3, 5))
    fn = lambda p, x: act(x @ p["w"]) @ p["v"]
    flat, unravel = ravel_pytree(p)
    jac = jax.jacrev(lambda f: fn(unravel(f), x).reshape(-1))(flat)
    out = fn(p, x)
    h = jax.hessian(lambda o: CE(o.reshape(out.shape), y))(out.reshape(-1))
    v = _random_like(p, 10)
    got = jax.jit(lambda p, x, y, v: curvature.ggn_vp(fn, CE, p, x, y, v))(p, x, y, v)
    np.testing.assert_allclose(_flat(got), (jac.T @ h @ jac) @ _flat(v), rtol=1e-10, atol=1e-12)


def test_bad_outputs_and_an_empty_batch_are_refused_naming_the_function():
    """A model_fn returning a tuple or integers, and an empty batch, get clear errors (were
    JAX's linear_transpose TypeError, an attribute error, or NaN / zeros)."""
    p, x, y = {"w": jnp.ones((3, 2))}, jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32)
    pair = lambda p, x: (x @ p["w"], 0)
    ints = lambda p, x: (x @ p["w"]).astype(jnp.int32)
    fn = lambda p, x: x @ p["w"]
    calls = {
        "ggn_vp": lambda f, x, y: curvature.ggn_vp(f, CE, p, x, y, p),
        "fisher_vp": lambda f, x, y: curvature.fisher_vp(f, CE, p, x, y, p, kind="empirical"),
        "ggn_diagonal": lambda f, x, y: curvature.ggn_diagonal(f, CE, p, x, y),
        "kfac": lambda f, x, y: curvature.kfac(f, CE, p, x, y),
    }
    for name, call in calls.items():
        for bad, got in ((pair, r"PyTreeDef\(\(\*, \*\)\)"), (ints, "int32")):
            with pytest.raises(
                TypeError, match=rf"fgrad\.curvature\.{name}: model_fn\(params, x\) must .*{got}"
            ):
                call(bad, x, y)
        with pytest.raises(ValueError, match=rf"fgrad\.curvature\.{name}: the batch is empty"):
            call(fn, x[:0], y[:0])


def test_monte_carlo_fisher_without_a_key_names_the_argument_the_user_passed():
    p, x, y = {"w": jnp.ones((3, 2))}, jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32)
    fn = lambda p, x: x @ p["w"]
    cases = [
        ("kfac", "fisher='mc'", lambda: curvature.kfac(fn, CE, p, x, y, fisher="mc")),
        (
            "hessian_diagonal",
            "operator='fisher_mc'",
            lambda: curvature.hessian_diagonal(fn, p, x, y, operator="fisher_mc", loss_fn=CE),
        ),
        ("fisher_vp", "kind='mc'", lambda: curvature.fisher_vp(fn, CE, p, x, y, p, kind="mc")),
    ]
    for name, arg, call in cases:
        with pytest.raises(TypeError, match=rf"^fgrad\.curvature\.{name}: {arg} draws targets"):
            call()
