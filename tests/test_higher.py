"""fgrad.derivative: nested and Taylor mode against PyTorch and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fgrad
from fgrad.models import seed_net, seed_params
from helpers import assert_tree_allclose, torch_seed_net

Z = jnp.array([[4.0]])


def y_of_w1(w1):
    return seed_net({**seed_params(), "linear1.weight": w1}, Z)[1]


@pytest.mark.parametrize("method", ["nested", "taylor", "auto"])
@pytest.mark.parametrize("jit", [False, True])
def test_seed_second_derivative_matches_torch(method, jit):
    """In[43]: y'(w1) = 480 and y''(w1) = 128."""
    net = torch_seed_net()
    _, y = net(torch.tensor([[4.0]]))
    (d1,) = torch.autograd.grad(y, net.linear1.weight, create_graph=True)
    (d2,) = torch.autograd.grad(d1, net.linear1.weight)
    w1 = seed_params()["linear1.weight"]
    for order, expected, value in ((1, d1, 480.0), (2, d2, 128.0)):
        d = fgrad.derivative(y_of_w1, order, method=method)
        got = (jax.jit(d) if jit else d)(w1)
        assert_tree_allclose(got, expected)
        # Nested reverse mode is exact here; Taylor mode's series arithmetic rounds: 16
        # float32 ulps allowed (1 to 3 seen on this CPU, 10 on an H200 GPU).
        tol = 0 if method == "nested" else 16 * float(np.finfo(np.float32).eps)
        assert float(got[0, 0]) == pytest.approx(value, rel=tol)


# Closed forms of the k-th derivative at x.
CLOSED = {
    "sin": (jnp.sin, lambda k, x: math.sin(x + k * math.pi / 2)),
    "exp": (lambda x: jnp.exp(2.0 * x), lambda k, x: 2.0**k * math.exp(2.0 * x)),
    "sin_exp": (
        lambda x: jnp.sin(x) * jnp.exp(x),  # Im((1+i)^k e^{(1+i)x})
        lambda k, x: 2 ** (k / 2) * math.exp(x) * math.sin(x + k * math.pi / 4),
    ),
}


@pytest.mark.parametrize("name", sorted(CLOSED))
@pytest.mark.parametrize("order", [0, 1, 3, 8])
def test_closed_forms_to_order_8(name, order):
    f, dk = CLOSED[name]
    x = 0.3
    expected = dk(order, x)
    with jax.enable_x64(True):
        for method in ("nested", "taylor"):
            got = fgrad.derivative(f, order, method=method)(jnp.float64(x))
            np.testing.assert_allclose(float(got), expected, rtol=1e-10, err_msg=method)


def test_tanh_taylor_matches_nested_elementwise():
    """tanh has no simple closed form at order 8: Taylor and nested reverse mode agree, and
    order 2 equals the closed form -2 tanh sech²."""
    x = jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float32)
    with jax.enable_x64(True):
        x64 = x.astype(jnp.float64)
        for k in (2, 5, 8):
            t = fgrad.derivative(jnp.tanh, k, method="taylor")(x64)
            n = fgrad.derivative(jnp.tanh, k, method="nested")(x64)
            assert_tree_allclose(t, n, rtol=1e-9, atol=1e-9)
        closed = -2 * jnp.tanh(x64) / jnp.cosh(x64) ** 2
        assert_tree_allclose(fgrad.derivative(jnp.tanh, 2)(x64), closed)


def test_matches_torch_nested_autograd_on_arrays():
    """On an array argument each order differentiates the sum, as nested autograd.grad does."""
    x = np.linspace(-1.0, 1.0, 4).astype(np.float32)
    f_t = lambda t: (t**3).sum() * torch.sin(t)
    t = torch.tensor(x, requires_grad=True)
    (d1,) = torch.autograd.grad(f_t(t).sum(), t, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), t)
    f_j = lambda v: jnp.sum(v**3) * jnp.sin(v)
    assert_tree_allclose(fgrad.derivative(f_j, 1)(jnp.asarray(x)), d1)
    assert_tree_allclose(fgrad.derivative(f_j, 2)(jnp.asarray(x)), d2)


def test_argnums_and_mixed_partials():
    f = lambda a, b: a**2 * b**3
    assert float(fgrad.derivative(f, 2, argnums=1)(2.0, 3.0)) == pytest.approx(4.0 * 18.0)
    nested = fgrad.derivative(fgrad.derivative(f, argnums=0), argnums=1)
    assert float(nested(2.0, 3.0)) == pytest.approx(2 * 2.0 * 3 * 9.0)
    mixed = fgrad.derivative(f, 3, argnums=(0, 1, 1))  # d/db d/db d/da = 2a * 6b
    assert float(mixed(2.0, 3.0)) == pytest.approx(2 * 2.0 * 6 * 3.0)
    # against PyTorch's nested autograd.grad on the same mixed partial
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    (da,) = torch.autograd.grad(a**2 * b**3, a, create_graph=True)
    (dab,) = torch.autograd.grad(da, b)
    assert float(fgrad.derivative(f, 2, argnums=(0, 1))(2.0, 3.0)) == pytest.approx(dab.item())


def test_auto_picks_taylor_only_where_it_applies():
    x = jnp.float32(0.4)
    assert fgrad.derivative(jnp.sin, 3, return_method=True)(x)[1] == "taylor"
    assert fgrad.derivative(jnp.sin, 2, return_method=True)(x)[1] == "nested"
    # an elementwise f on a vector: Taylor mode per element; anything else: nested
    assert fgrad.derivative(jnp.sin, 3, return_method=True)(jnp.ones(3))[1] == "taylor"
    mixing = lambda v: jnp.sin(v) * jnp.sum(v)
    assert fgrad.derivative(mixing, 3, return_method=True)(jnp.ones(3))[1] == "nested"
    # relu is a custom_jvp function: jet has no rule for it, auto falls back to nested.
    f = lambda v: jax.nn.relu(v) ** 4
    value, how = fgrad.derivative(f, 3, return_method=True)(x)
    assert how == "nested" and float(value) == pytest.approx(24 * 0.4, rel=1e-5)
    with pytest.raises(NotImplementedError, match=r"no rule for.*custom_jvp_call"):
        fgrad.derivative(f, 3, method="taylor")(x)


# --- errors --------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(TypeError, match=r"argument 0 must be floating point.*int32"):
        fgrad.derivative(jnp.sin, 2)(jnp.int32(3))
    with pytest.raises(TypeError, match="argument 0 must be floating point"):
        fgrad.derivative(jnp.sin, 2)(3)
    with pytest.raises(TypeError, match=r"argument 0 must be floating point.*complex"):
        fgrad.derivative(jnp.sin, 2)(1j)
    with pytest.raises(ValueError, match="order must be >= 0"):
        fgrad.derivative(jnp.sin, -1)
    with pytest.raises(TypeError, match="order must be an int"):
        fgrad.derivative(jnp.sin, 1.5)
    with pytest.raises(ValueError, match="method must be one of"):
        fgrad.derivative(jnp.sin, 2, method="forward")
    with pytest.raises(ValueError, match=r"names 2 differentiations but order=1; pass order=2"):
        fgrad.derivative(lambda a, b: a * b, 1, argnums=(0, 1))
    with pytest.raises(ValueError, match="cannot take mixed partials"):
        fgrad.derivative(lambda a, b: a * b, 2, argnums=(0, 1), method="taylor")
    with pytest.raises(TypeError, match="argnums must be an int or a tuple of ints"):
        fgrad.derivative(jnp.sin, 1, argnums=True)
    with pytest.raises(ValueError, match="refers to argument 1"):
        fgrad.derivative(jnp.sin, 2, argnums=1)(1.0)
    with pytest.raises(TypeError, match="f must return one floating-point array"):
        fgrad.derivative(lambda x: (x, x), 1)(1.0)
    with pytest.raises(ValueError, match="method='taylor' needs an argument with one element"):
        fgrad.derivative(lambda v: jnp.sum(v**2), 2, method="taylor")(jnp.ones(3))


def _tanh_derivative_closed_form(k: int, x: float) -> float:
    """d^k/dx^k tanh(x) = P_k(tanh x), with P_0(t) = t and P_{k+1}(t) = P_k'(t)(1 - t²)."""
    poly = np.polynomial.Polynomial([0.0, 1.0])
    one_minus_t2 = np.polynomial.Polynomial([1.0, 0.0, -1.0])
    for _ in range(k):
        poly = poly.deriv() * one_minus_t2
    return float(poly(math.tanh(x)))


@pytest.mark.parametrize("order", [1, 4, 8])
def test_tanh_compositions_to_order_8_closed_form(order):
    """tanh(2x + 1) and its composition with an affine map: 2^k P_k(tanh(2x + 1))."""
    x = 0.2
    expected = 2.0**order * _tanh_derivative_closed_form(order, 2 * x + 1)
    with jax.enable_x64(True):
        f = lambda v: jnp.tanh(2.0 * v + 1.0)
        for method in ("taylor", "nested"):
            got = fgrad.derivative(f, order, method=method)(jnp.float64(x))
            np.testing.assert_allclose(float(got), expected, rtol=1e-9, err_msg=method)


# --- high orders: exact or refused, eager and jit alike -----------------------------------


def test_high_orders_do_not_overflow_and_agree_eager_and_jit():
    # order! overflows float32 from 35 on (NaN before); e^0.5/34! is a denormal that jit
    # flushed to zero (0.0 eagerly, 1.6487 under jit before).
    x = jnp.float32(0.5)
    cases = [
        (lambda v: v**3, 35, 0.0),
        (jnp.sin, 35, math.sin(0.5 + 35 * math.pi / 2)),
        (jnp.sin, 40, math.sin(0.5 + 40 * math.pi / 2)),
        (jnp.exp, 34, math.exp(0.5)),
    ]
    for f, order, expected in cases:
        got = fgrad.derivative(f, order)(x)
        assert float(got) == pytest.approx(expected, rel=1e-5, abs=1e-6), (order, got)
    d = fgrad.derivative(jnp.exp, 34)
    assert float(jax.jit(d)(x)) == pytest.approx(float(d(x)), rel=1e-6)


def test_taylor_refuses_functions_that_mix_elements():
    x = jnp.array([0.5, 1.0, 2.0])
    for f, what in ((lambda v: v * jnp.sum(v), "reduce_sum"), (lambda v: v[::-1] ** 3, "rev")):
        with pytest.raises(ValueError, match=rf"does not act elementwise|mixes elements.*`{what}`"):
            fgrad.derivative(f, 3, method="taylor")(x)
    # auto computes them by nested reverse mode, d_3 = ∇Σ d_2, as PyTorch would
    xt = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    d = (xt * xt.sum() ** 2 + torch.sin(xt).sum()).sum()
    for _ in range(3):
        (d,) = torch.autograd.grad(d, xt, create_graph=True)
        d = d.sum() if _ < 2 else d
    mixing = lambda v: v * jnp.sum(v) ** 2 + jnp.sum(jnp.sin(v))
    got, how = fgrad.derivative(mixing, 3, return_method=True)(x)
    assert how == "nested"
    assert_tree_allclose(got, d)
    got, how = fgrad.derivative(lambda v: v[::-1] ** 3, 3, return_method=True)(x)
    assert how == "nested"
    assert_tree_allclose(got, jnp.full(3, 6.0))  # ∂³/∂v_j³ of v_j³, summed


def test_order_30_on_a_vector_is_taylor_per_element_or_refused():
    # Hung before: auto nested 30 reverse passes (compile time grows ~4x per order).
    x = jnp.array([0.0, 1.0, 2.0])
    got, how = fgrad.derivative(jnp.sin, 30, return_method=True)(x)
    assert how == "taylor"
    expected = [math.sin(float(v) + 30 * math.pi / 2) for v in x]
    assert_tree_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"order 30 by nested reverse mode is out of reach.*`rev`"):
        fgrad.derivative(lambda v: jnp.sin(v) * v[::-1], 30)(x)
    with pytest.raises(ValueError, match=r"order 100 by Taylor mode is out of reach"):
        fgrad.derivative(lambda v: jnp.tanh(jnp.sin(v) * 2.0 + v**2), 100)(jnp.float32(0.5))


def test_a_derivative_beyond_the_dtype_range_is_inf_not_nan():
    """d^k/dx^k 1/(1-x) = k! / (1-x)^(k+1): at x = 0.5 and k = 30, 5.7e41 exceeds float32
    (NaN before: the series' intermediate coefficients overflowed to inf - inf); at
    x = -0.5 it is 9.2e26, in range. float64 holds both."""
    f = lambda x: 1 / (1 - x)
    x = jnp.array([0.5, -0.5], jnp.float32)
    want = np.array([math.factorial(30) / (1 - v) ** 31 for v in (0.5, -0.5)])
    got, how = fgrad.derivative(f, 30, return_method=True)(x)
    assert how == "taylor"
    for d in (np.asarray(got), np.asarray(jax.jit(fgrad.derivative(f, 30))(x))):
        assert np.isposinf(d[0])
        np.testing.assert_allclose(d[1], want[1], rtol=1e-5)
    with jax.enable_x64(True):
        got64 = np.asarray(fgrad.derivative(f, 30)(jnp.asarray(x, jnp.float64)))
    np.testing.assert_allclose(got64, want, rtol=1e-12)
    assert np.isnan(float(fgrad.derivative(jnp.sqrt, 5)(-1.0)))  # a real NaN stays NaN
