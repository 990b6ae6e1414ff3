"""Curvature estimators against the dense Hessian (float64): one contract for all."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fgrad
from fgrad import curvature


def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - y) ** 2) + 0.01 * jnp.sum(p["w1"] ** 2)


@pytest.fixture(scope="module")
def problem():
    """A small MLP (43 parameters) in float64 with its dense Hessian and spectrum."""
    with jax.enable_x64(True):
        r = np.random.default_rng(0)
        p = {
            "w1": jnp.asarray(r.normal(size=(4, 6))),
            "b1": jnp.asarray(r.normal(size=6)),
            "w2": jnp.asarray(r.normal(size=(6, 2))) / 2,
        }
        x, y = jnp.asarray(r.normal(size=(9, 4))), jnp.asarray(r.normal(size=(9, 2)))
        flat, unravel = ravel_pytree(p)
        dense = jax.hessian(lambda v: loss(unravel(v), x, y))(flat)
        eig = np.linalg.eigvalsh(np.asarray(dense))
        yield p, (x, y), np.asarray(dense), eig


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def n_of(p):
    return ravel_pytree(p)[0].size


def test_exact_diagonal(problem):
    p, batch, dense, _ = problem
    for chunk in (None, 5):
        d = jax.jit(functools.partial(curvature.hessian_diagonal, loss, chunk_size=chunk))(
            p, *batch
        )
        np.testing.assert_allclose(ravel_pytree(d)[0], np.diag(dense), rtol=1e-10, atol=1e-12)


def test_hutchinson_diagonal_within_standard_error(problem):
    p, batch, dense, _ = problem
    est = curvature.hessian_diagonal(
        loss, p, *batch, method="hutchinson", key=jax.random.key(1), samples=400
    )
    value, stderr = ravel_pytree(est.value)[0], ravel_pytree(est.stderr)[0]
    z = np.abs(value - np.diag(dense)) / stderr
    assert np.mean(z < 2) > 0.85 and z.max() < 5  # ~95% inside 2 standard errors


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_standard_error(problem, method):
    p, batch, dense, _ = problem
    f = jax.jit(functools.partial(curvature.hessian_trace, loss, method=method, samples=60))
    est = f(p, *batch, key=jax.random.key(2))
    assert abs(float(est.value) - np.trace(dense)) < 4 * float(est.stderr)


def test_hutchpp_is_exact_with_3n_samples(problem):
    p, batch, dense, _ = problem
    est = curvature.hessian_trace(loss, p, *batch, key=jax.random.key(3), samples=3 * n_of(p))
    np.testing.assert_allclose(float(est.value), np.trace(dense), rtol=1e-9)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigenvalues_exact_with_full_krylov_space(problem, which):
    p, batch, dense, eig = problem
    f = jax.jit(
        functools.partial(
            curvature.hessian_eigenvalues,
            loss,
            k=3,
            which=which,
            iterations=n_of(p),
            return_vectors=True,
        )
    )
    ev = f(p, *batch, key=jax.random.key(4))
    expected = eig[::-1][:3] if which == "largest" else eig[:3]
    np.testing.assert_allclose(ev.values, expected, rtol=1e-4, atol=1e-8)
    vecs = jax.vmap(lambda t: ravel_pytree(t)[0])(ev.vectors)
    for lam, u in zip(ev.values, vecs, strict=True):
        np.testing.assert_allclose(dense @ u, lam * u, atol=1e-6)


def test_top_eigenvalue_converges_early(problem):
    p, batch, _, eig = problem
    ev = curvature.hessian_eigenvalues(loss, p, *batch, key=jax.random.key(5), k=1, iterations=25)
    np.testing.assert_allclose(float(ev.values[0]), eig[-1], rtol=1e-4)


def test_spectrum(problem):
    p, batch, dense, eig = problem
    n = n_of(p)
    s = jax.jit(functools.partial(curvature.hessian_spectrum, loss, iterations=n, runs=30))(
        p, *batch, key=jax.random.key(6)
    )
    dx = float(s.grid[1] - s.grid[0])
    np.testing.assert_allclose(float(jnp.sum(s.density) * dx), 1.0, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(s.weights.sum(1)), 1.0, rtol=1e-10)
    # with a full Krylov space every node is an exact eigenvalue
    nodes = np.asarray(s.nodes).ravel()
    assert np.abs(nodes[:, None] - eig[None]).min(1).max() < 1e-6
    # tr(H)/n and tr(H^2)/n within the runs' standard error
    for g, exact in ((lambda t: t, np.trace(dense) / n), (lambda t: t**2, np.sum(eig**2) / n)):
        per_run = np.sum(np.asarray(s.weights) * g(np.asarray(s.nodes)), axis=1)
        se = per_run.std(ddof=1) / np.sqrt(len(per_run))
        assert abs(float(s.moment(g)) - exact) < 4 * se


def test_low_rank_hessian_breakdown_is_handled():
    """A rank-2 Hessian: the Krylov space is exhausted after 2 steps; Lanczos restarts and
    still returns the exact spectrum (two nonzero eigenvalues, zeros elsewhere)."""
    u = jnp.array([1.0, 2.0, 0.0, 1.0, 0.0, 0.0])
    w = jnp.array([0.0, 1.0, 1.0, 0.0, -1.0, 0.0])
    f = lambda p: 3.0 * jnp.dot(u, p) ** 2 + 0.5 * jnp.dot(w, p) ** 2
    h = np.asarray(jax.hessian(f)(jnp.zeros(6)))
    ev = curvature.hessian_eigenvalues(f, jnp.zeros(6), key=jax.random.key(7), k=6, iterations=6)
    assert np.all(np.isfinite(ev.values))
    np.testing.assert_allclose(ev.values, np.linalg.eigvalsh(h)[::-1], atol=1e-9)


def test_errors(problem):
    p, batch, _, _ = problem
    with pytest.raises(ValueError, match="k=50 is larger than the number of parameters"):
        curvature.hessian_eigenvalues(loss, p, *batch, key=jax.random.key(0), k=50)
    with pytest.raises(ValueError, match="iterations must lie between k=3"):
        curvature.hessian_eigenvalues(loss, p, *batch, key=jax.random.key(0), k=3, iterations=2)
    with pytest.raises(TypeError, match=r"pass key=jax\.random\.key"):
        curvature.hessian_trace(loss, p, *batch)
    with pytest.raises(TypeError, match=r"pass key=jax\.random\.key"):
        curvature.hessian_diagonal(loss, p, *batch, method="hutchinson")
    with pytest.raises(ValueError, match=r"Hutch\+\+ needs samples >= 3"):
        curvature.hessian_trace(loss, p, *batch, key=jax.random.key(0), samples=2)
    with pytest.raises(ValueError, match="method must be 'exact' or 'hutchinson'"):
        curvature.hessian_diagonal(loss, p, *batch, method="dense")
    with pytest.raises(ValueError, match="which must be 'largest' or 'smallest'"):
        curvature.hessian_eigenvalues(loss, p, *batch, key=jax.random.key(0), which="both")
    with pytest.raises(TypeError, match=r"hessian_trace: key must be a JAX PRNG key.*got int"):
        curvature.hessian_trace(loss, p, *batch, key=0)
    with pytest.raises(TypeError, match=r"hessian_spectrum: sigma must be a real number"):
        curvature.hessian_spectrum(loss, p, *batch, key=jax.random.key(0), iterations=4, sigma="a")
    with pytest.raises(ValueError, match="iterations=99 exceeds"):
        curvature.hessian_spectrum(loss, p, *batch, key=jax.random.key(0), iterations=99)
    # the error names the estimator the caller called, not the HVP inside it
    with pytest.raises(TypeError, match=r"fgrad\.curvature\.hessian_trace: .*must return a scalar"):
        curvature.hessian_trace(lambda p, x, y: p["b1"], p, *batch, key=jax.random.key(0))
    assert fgrad.curvature is curvature


def test_spectrum_refuses_a_width_that_is_not_positive(problem):
    # sigma=-1 gave a "density" with negative values, sigma=0 NaN
    p, batch, _, _ = problem
    for sigma in (-1.0, 0.0, float("inf")):
        with pytest.raises(ValueError, match=r"hessian_spectrum: sigma.* must be a positive"):
            curvature.hessian_spectrum(
                loss, p, *batch, key=jax.random.key(0), iterations=4, sigma=sigma
            )


def test_bfloat16_parameters_linear_algebra_in_float32_results_as_given():
    # Hessian diag(2, 4, ..., 12): every estimator is exact on it with enough probes
    a = jnp.arange(1.0, 7.0, dtype=jnp.float32)
    f = lambda p: jnp.sum(a * p.astype(jnp.float32) ** 2)
    p = jnp.ones(6, jnp.bfloat16)
    key = jax.random.key(0)
    run = lambda est, **kw: jax.jit(functools.partial(est, f, **kw))
    diag = run(curvature.hessian_diagonal)(p)
    tr = run(curvature.hessian_trace, samples=18)(p, key=key)  # Hutch++ exact with 3n
    ev = run(curvature.hessian_eigenvalues, k=2, iterations=6)(p, key=key)
    s = run(curvature.hessian_spectrum, iterations=6, runs=2)(p, key=key)
    for x in (diag, tr.value, ev.values, s.density, s.nodes):
        assert x.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(diag, np.float32), 2 * np.asarray(a))
    np.testing.assert_allclose(float(tr.value), 42.0, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(ev.values, np.float32), [12.0, 10.0], rtol=1e-2)


def test_exact_diagonal_of_many_parameters_works_in_bounded_chunks():
    # 30k parameters ran out of memory: all n unit vectors at once is an n x n array.
    # By default it is built 256 HVPs at a time: no intermediate holds more than 256 n.
    n = 3000
    a = jnp.linspace(0.5, 2.0, n)
    f = lambda p: jnp.sum(a * p**2) + jnp.sum(p) ** 2
    jaxpr = jax.make_jaxpr(functools.partial(curvature.hessian_diagonal, f))(jnp.zeros(n)).jaxpr

    def sizes(jp):
        for e in jp.eqns:
            yield from (int(np.prod(v.aval.shape)) for v in e.outvars)
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from sizes(sub)

    assert max(sizes(jaxpr)) <= 256 * n
    diag = jax.jit(functools.partial(curvature.hessian_diagonal, f))(jnp.zeros(n))
    np.testing.assert_allclose(diag, 2 * a + 2, rtol=1e-12)
