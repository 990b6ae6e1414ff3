"""Every public function under the four transformations the README promises.

One table of cases, each a function of arrays built on one public fgrad function, and four
checks shared by all of them:
- ``jax.jit``: traced once for two calls, and equal to the eager result;
- ``jax.vmap``: equal to a Python loop over the batch;
- ``jax.grad`` through it (where the result is differentiable): equal to central finite
  differences in float64;
- inside ``lax.scan``: equal to a Python loop over the scanned axis.
Each case's own numbers are checked against PyTorch or closed forms in its module's tests;
here the question is only whether the transformations change them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import fgrad
from helpers import assert_tree_allclose


def _net(p, x):
    h = fgrad.tap("h", jnp.tanh(x @ p["w"] + p["b"]))
    return h @ p["v"]


def _loss(p, x):
    return jnp.mean(_net(p, x) ** 2)


def _critic(p, x):
    return _net(p, x)


def _hidden(p, x):
    return jnp.tanh(x @ p["w"] + p["b"])


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(2, name="inner")(x))


class _NnxDense(nnx.Module):
    def __init__(self, w):
        self.inner = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=w.dtype)
        self.inner.kernel.set_value(w)


@dataclasses.dataclass(frozen=True)
class Case:
    """``fn(p, x)``: ``p`` a params pytree, ``x`` an input batch of 4 examples; ``grad``:
    whether ``fn``'s result is differentiable in ``p``."""

    fn: Callable
    grad: bool = True


def _tap_linen(p, x):
    model = _Dense()
    variables = {"params": {"inner": {"kernel": p["w"][:, :2], "bias": p["b"][:2]}}}
    f = lambda v, x: jnp.sum(model.apply(v, x) ** 2)
    return fgrad.grad_intermediates(fgrad.tap_linen(f, "inner"))(variables, x)


def _tap_nnx(p, x):
    model = _NnxDense(p["w"][:, :2])  # the tapped function's argument 0
    f = lambda m, x: jnp.sum(jnp.tanh(m.inner(x)) ** 2)
    return fgrad.grad_intermediates(fgrad.tap_nnx(f, "inner"))(model, x)


_SGD = optax.sgd(0.1, momentum=0.9)

CASES: dict[str, Case] = {
    "tap": Case(lambda p, x: _loss(p, x)),
    "intermediates": Case(lambda p, x: fgrad.intermediates(_loss)(p, x)),
    "grad_intermediates": Case(lambda p, x: fgrad.grad_intermediates(_loss)(p, x)),
    "value_and_grad_intermediates": Case(
        lambda p, x: fgrad.value_and_grad_intermediates(_loss, argnums=0)(p, x)
    ),
    "vjp_intermediates": Case(
        lambda p, x: (lambda o, pb: pb(jnp.ones_like(o)))(*fgrad.vjp_intermediates(_net)(p, x))
    ),
    "zero_grad": Case(lambda p, x: fgrad.zero_grad(p), grad=False),
    "backward": Case(lambda p, x: fgrad.backward(_loss, p, x)),
    "accumulate": Case(lambda p, x: fgrad.accumulate(_loss, p, x, microbatches=2)),
    "step": Case(
        lambda p, x: fgrad.step(_SGD, p, _SGD.init(p), jax.grad(_loss)(p, x)),
    ),
    "derivative": Case(lambda p, x: fgrad.derivative(jnp.sin, 3)(p["b"])),
    "derivative_taylor": Case(
        lambda p, x: fgrad.derivative(lambda t: jnp.sin(t) * t, 4, method="taylor")(p["b"])
    ),
    "hvp": Case(lambda p, x: fgrad.hvp(lambda q: _loss(q, x), p, p)),
    "linearize_grad": Case(
        lambda p, x: (lambda g, hv: (g, hv(p)))(*fgrad.linearize_grad(_loss, p, x))
    ),
    "hessian": Case(lambda p, x: fgrad.hessian(lambda b: _loss({**p, "b": b}, x))(p["b"])),
    "hessian_diagonal": Case(
        lambda p, x: fgrad.curvature.hessian_diagonal(_loss, p, x, method="exact")
    ),
    "hessian_trace": Case(
        lambda p, x: fgrad.curvature.hessian_trace(_loss, p, x, key=jax.random.key(0), samples=6)
    ),
    "hessian_eigenvalues": Case(
        lambda p, x: (
            fgrad.curvature.hessian_eigenvalues(
                _loss, p, x, key=jax.random.key(0), iterations=4
            ).values
        ),
        grad=False,  # eigenvalues of a Lanczos estimate: differentiable, but not smoothly
    ),
    "hessian_spectrum": Case(
        lambda p, x: (
            fgrad.curvature.hessian_spectrum(
                _loss, p, x, key=jax.random.key(0), iterations=4, runs=2, grid_size=8, sigma=0.5
            ).density
        ),
        grad=False,
    ),
    "input_gradient": Case(lambda p, x: fgrad.penalties.input_gradient(_critic, p, x)),
    "intermediate_gradient": Case(
        lambda p, x: fgrad.penalties.intermediate_gradient(_critic, p, x, "h")
    ),
    "wgan_gp": Case(
        lambda p, x: fgrad.penalties.wgan_gp(_critic, p, x, 0.5 * x, key=jax.random.key(1))
    ),
    "r1": Case(lambda p, x: fgrad.penalties.r1(_critic, p, x)),
    "r2": Case(lambda p, x: fgrad.penalties.r2(_critic, p, x)),
    "gradient_norm_exact": Case(lambda p, x: fgrad.penalties.gradient_norm(_loss, p, x)),
    "gradient_norm_fd": Case(
        lambda p, x: fgrad.penalties.gradient_norm(_loss, p, x, method="finite_difference"),
        # its gradient is by design Zhao et al.'s finite-difference approximation of the
        # exact norm's gradient, not the derivative of its value (test_penalties checks it)
        grad=False,
    ),
    "jacobian_norm": Case(
        lambda p, x: fgrad.penalties.jacobian_norm(_hidden, p, x, key=jax.random.key(2))
    ),
    "lazy": Case(
        lambda p, x: fgrad.penalties.lazy(fgrad.penalties.r1, every=2)(jnp.int32(2), _critic, p, x)
    ),
    "tap_linen": Case(_tap_linen),
    "tap_nnx": Case(_tap_nnx),
}


def _params(dtype, shift=0.0):
    rng = np.random.default_rng(0)
    p = {
        "w": rng.normal(size=(3, 4)) * 0.5,
        "b": rng.normal(size=(4,)) * 0.5 + shift,
        "v": rng.normal(size=(4,)),
    }
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), p)


def _x(dtype, shift=0.0):
    return jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)) + shift, dtype)


def _close(a, b, tol=2e-5):
    assert_tree_allclose(a, b, rtol=tol, atol=tol)


_REFS: dict[str, Callable] = {}


def _ref(name):
    """``jax.jit(fn)`` for a case, compiled once and shared by the loops below."""
    if name not in _REFS:
        _REFS[name] = jax.jit(CASES[name].fn)
    return _REFS[name]


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_traces_once_and_equals_eager(name):
    traces = []

    def f(p, x):
        traces.append(None)
        return CASES[name].fn(p, x)

    p, x = _params(jnp.float32), _x(jnp.float32)
    jitted = jax.jit(f)
    first = jitted(p, x)
    jitted(_params(jnp.float32, 0.1), _x(jnp.float32, 0.1))
    assert len(traces) == 1
    _close(first, CASES[name].fn(p, x))


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_equals_a_loop(name):
    ps = [_params(jnp.float32, s) for s in (0.0, 0.2, -0.3)]
    xs = [_x(jnp.float32, s) for s in (0.0, 0.5, 1.0)]
    got = jax.jit(jax.vmap(CASES[name].fn))(_stack(ps), _stack(xs))
    _close(got, _stack([_ref(name)(p, x) for p, x in zip(ps, xs, strict=True)]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_scan_equals_a_loop(name):
    xs = [_x(jnp.float32, s) for s in (0.0, 0.5, 1.0)]
    p = _params(jnp.float32)
    body = lambda carry, x: (carry, CASES[name].fn(p, x))
    _, got = jax.jit(lambda xs: jax.lax.scan(body, 0.0, xs))(jnp.stack(xs))
    _close(got, _stack([_ref(name)(p, x) for x in xs]))


def _scalar(tree) -> jax.Array:
    """A fixed random linear functional of every floating leaf, so every output counts."""
    leaves = [jnp.ravel(a) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]
    flat = jnp.concatenate(leaves)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=flat.shape), flat.dtype)
    return jnp.sum(flat * weights)


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.grad))
def test_grad_through_it_equals_finite_differences(name):
    """The directional derivative of jax.grad against a central difference, in float64."""
    with jax.enable_x64(True):
        p, x = _params(jnp.float64), _x(jnp.float64)
        direction = jax.tree.map(
            lambda a: jnp.asarray(np.random.default_rng(4).normal(size=a.shape), a.dtype), p
        )
        f = lambda p: _scalar(CASES[name].fn(p, x))
        eps = 1e-5

        @jax.jit
        def both(p, d):
            g = jax.grad(f)(p)
            ad = sum(
                jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d), strict=True)
            )
            shifted = lambda s: f(jax.tree.map(lambda a, b: a + s * b, p, d))
            return ad, (shifted(eps) - shifted(-eps)) / (2 * eps)

        ad, fd = both(p, direction)
        np.testing.assert_allclose(ad, fd, rtol=1e-6, atol=1e-8)
