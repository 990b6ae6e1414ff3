"""Every public function keeps the precision it is given: float32 in, float32 out; float64
in (with x64), float64 out; bfloat16 in, bfloat16 out where bfloat16 makes sense. One table,
one check, on the traced program (``jax.eval_shape``: the dtypes are decided there, and
nothing is compiled). The numbers themselves are checked against PyTorch and float64
references in each function's own test file (e.g. test_penalties' float64 gradient_norm)."""

import functools
from inspect import signature

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen, nnx

import fgrad
from fgrad import curvature as C
from fgrad import penalties as P
from fgrad.interop import torch as tt

R = np.random.default_rng(0)
W, B, X = R.normal(size=(3, 2)), R.normal(size=2), R.normal(size=(4, 3))
KEY = jax.random.key(0)


def net(p, x):
    return fgrad.tap("h", jnp.tanh(x @ p["w"] + p["b"]))  # (batch, 2)


def loss(p, x):
    return jnp.mean(net(p, x) ** 2)


def critic(p, x):
    return jnp.sum(net(p, x), axis=1)


class Dense(linen.Module):
    @linen.compact
    def __call__(self, x):
        return jnp.tanh(linen.Dense(2, param_dtype=x.dtype, dtype=x.dtype)(x))


class NnxDense(nnx.Module):
    def __init__(self, dtype):
        self.lin = nnx.Linear(3, 2, param_dtype=dtype, dtype=dtype, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


def _lazy(p, x):
    return P.lazy(functools.partial(P.r1, critic), every=2)(0, p, x)


def _tap_linen(p, x):
    v = Dense().init(jax.random.key(1), x)
    tapped = fgrad.tap_linen(Dense().apply)
    return fgrad.grad_intermediates(lambda v, x: jnp.sum(tapped(v, x) ** 2))(v, x)


def _tap_nnx(p, x):
    m = NnxDense(x.dtype)
    tapped = fgrad.tap_nnx(lambda m, x: m(x))
    return fgrad.grad_intermediates(lambda m, x: jnp.sum(tapped(m, x) ** 2))(m, x)


def _step(p, x):
    opt = optax.adam(0.1)
    return fgrad.step(opt, p, opt.init(p), jax.grad(loss)(p, x))


def _zero_grad(p, x):
    # zeros rather than PyTorch's None, where zero_grad has (or gains) set_to_none
    kw = {"set_to_none": False} if "set_to_none" in signature(fgrad.zero_grad).parameters else {}
    return fgrad.zero_grad(p, **kw)


def _vjp(p, x):
    out, pullback = fgrad.vjp_intermediates(loss)(p, x)
    return out, pullback(jnp.ones((), out.dtype))


def _interop(p, x):
    lin = torch.nn.Linear(3, 2).to(
        {jnp.float32: torch.float32, jnp.float64: torch.float64, jnp.bfloat16: torch.bfloat16}[
            x.dtype.type
        ]
    )
    return tt.to_jax(lin), tt.to_linen(torch.nn.Sequential(lin))


# name -> f(params, x), whose floating leaves must all have x's dtype
CASES = {
    "tap": lambda p, x: fgrad.tap("t", x),
    "intermediates": lambda p, x: fgrad.intermediates(net)(p, x),
    "grad_intermediates": lambda p, x: fgrad.grad_intermediates(loss)(p, x),
    "value_and_grad_intermediates": lambda p, x: fgrad.value_and_grad_intermediates(loss)(p, x),
    "vjp_intermediates": _vjp,
    "zero_grad": _zero_grad,
    "backward": lambda p, x: fgrad.backward(loss, p, x, grads=fgrad.zero_grad(p)),
    "accumulate": lambda p, x: fgrad.accumulate(loss, p, x, microbatches=2),
    "step": _step,
    "derivative": lambda p, x: fgrad.derivative(jnp.sin, 3)(x),
    "derivative_nested": lambda p, x: fgrad.derivative(lambda v: jnp.sum(v * p["b"][0]) ** 2, 2)(x),
    "hvp": lambda p, x: fgrad.hvp(loss, p, p, x),
    "linearize_grad": lambda p, x: (lambda g, hv: (g, hv(p)))(*fgrad.linearize_grad(loss, p, x)),
    "hessian": lambda p, x: fgrad.hessian(loss)(p, x),
    "hessian_diagonal": lambda p, x: C.hessian_diagonal(loss, p, x),
    "hessian_diagonal_hutchinson": lambda p, x: C.hessian_diagonal(
        loss, p, x, method="hutchinson", key=KEY, samples=4
    ),
    "hessian_trace": lambda p, x: C.hessian_trace(loss, p, x, key=KEY, samples=6),
    "hessian_eigenvalues": lambda p, x: C.hessian_eigenvalues(loss, p, x, key=KEY, iterations=4),
    "hessian_spectrum": lambda p, x: C.hessian_spectrum(
        loss, p, x, key=KEY, iterations=4, runs=2, grid_size=8
    ),
    "input_gradient": lambda p, x: P.input_gradient(critic, p, x),
    "intermediate_gradient": lambda p, x: P.intermediate_gradient(critic, p, x, "h"),
    "wgan_gp": lambda p, x: P.wgan_gp(critic, p, x, x[::-1], key=KEY),
    "r1": lambda p, x: P.r1(critic, p, x),
    "r2": lambda p, x: P.r2(critic, p, x),
    "lazy": _lazy,
    "gradient_norm": lambda p, x: P.gradient_norm(loss, p, x),
    "gradient_norm_fd": lambda p, x: P.gradient_norm(loss, p, x, method="finite_difference"),
    "gradient_norm_param_grad": lambda p, x: (
        jax.grad(P.gradient_norm)(loss, p, x)
        if False
        else jax.grad(lambda q: P.gradient_norm(loss, q, x))(p)
    ),
    "jacobian_norm": lambda p, x: P.jacobian_norm(net, p, x, key=KEY),
    "tap_linen": _tap_linen,
    "tap_nnx": _tap_nnx,
    "interop_torch": _interop,
}
# bfloat16 makes no sense for: a Taylor series or a nested derivative at 8 bits of mantissa
# compared with anything, and Hessians built from bfloat16 HVPs; the estimators convert
# (tested in test_curvature). Everything else must run in bfloat16 and return bfloat16.
NO_BF16 = {"derivative", "derivative_nested", "hessian", "hvp", "linearize_grad"}


def _inputs(dtype):
    p = {"w": jnp.asarray(W, dtype), "b": jnp.asarray(B, dtype)}
    return p, jnp.asarray(X, dtype)


def _float_leaves(tree):
    leaves = jax.tree.leaves(tree, is_leaf=lambda a: isinstance(a, nnx.Variable))
    leaves = [getattr(a, "value", a) for a in leaves]
    return [a for a in leaves if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)]


def _params():
    out = []
    for name in sorted(CASES):
        for dt in ("float32", "float64", "bfloat16"):
            if dt == "bfloat16" and name in NO_BF16:
                continue
            out.append(pytest.param(name, dt, id=f"{name}-{dt}"))
    return out


@pytest.mark.parametrize(("name", "dtype"), _params())
def test_keeps_the_dtype_it_is_given(name, dtype):
    with jax.enable_x64(dtype == "float64"):
        p, x = _inputs(jnp.dtype(dtype))
        got = jax.eval_shape(CASES[name], p, x)
        leaves = _float_leaves(got)
        assert leaves, name
        assert {str(a.dtype) for a in leaves} == {dtype}, name
