"""n-th derivatives: PyTorch's nested ``autograd.grad(..., create_graph=True)``.

The seed notebook takes ``y''(w1)`` as ``autograd.grad(autograd.grad(y, w1,
create_graph=True)[0], w1)``. Each ``autograd.grad`` of a non-scalar output sums it
first (``grad_outputs`` of ones), so the k-th derivative is defined by

    d₀(x) = f(x),    d_k(x) = ∇ₓ Σ d_{k-1}(x),

which for an ``x`` with one element is the ordinary k-th derivative, and for a function
acting elementwise is the elementwise k-th derivative. `derivative` computes exactly that,
by nested reverse mode or by Taylor mode (``jax.experimental.jet``), whose cost grows
linearly rather than exponentially with the order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.experimental import jet
from jax.extend import core as jcore

from fgrad import _checks

Method = Literal["auto", "nested", "taylor"]
_METHODS = ("auto", "nested", "taylor")


def _nested(g: Callable, order: int) -> Callable:
    for _ in range(order):
        g = jax.grad(lambda x, g=g: jnp.sum(g(x)))
    return g


def _missing_jet_rules(jaxpr) -> set[str]:
    """Primitives of ``jaxpr`` (sub-programs included) that jax.experimental.jet lacks."""
    missing = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive not in jet.jet_rules:
            missing.add(eqn.primitive.name)
        for sub in jcore.jaxprs_in_params(eqn.params):
            missing |= _missing_jet_rules(sub)
    return missing


def _taylor(g: Callable, order: int, x: jax.Array, caller: str) -> jax.Array:
    # One jet along v = ones: the k-th output term is d^k/dt^k g(x + t·1) at t = 0.
    missing = sorted(_missing_jet_rules(jax.make_jaxpr(g)(x).jaxpr))
    if missing:
        raise NotImplementedError(
            f"{caller}: Taylor mode (jax.experimental.jet) has no rule for {missing}; use "
            "method='nested' or 'auto'."
        )
    series = [jnp.ones_like(x)] + [jnp.zeros_like(x)] * (order - 1)
    _, out_series = jet.jet(g, (x,), (series,))
    dk = out_series[order - 1]
    if x.size == 1:
        return jnp.reshape(jnp.sum(dk), x.shape).astype(x.dtype)
    if jnp.shape(dk) == x.shape:
        return dk.astype(x.dtype)
    raise ValueError(
        f"{caller}: method='taylor' needs an argument with one element, or a function that "
        f"acts elementwise (output shaped like the argument); got argument shape {x.shape} "
        f"and output shape {jnp.shape(dk)}. Use method='nested'."
    )


def derivative(
    f: Callable,
    order: int = 1,
    *,
    argnums: int = 0,
    method: Method = "auto",
) -> Callable:
    """The ``order``-th derivative of ``f`` with respect to one array argument.

    ``derivative(f, 2)(x)`` is PyTorch's
    ``autograd.grad(autograd.grad(f(x), x, create_graph=True)[0], x)``: each order
    differentiates the sum of the previous one, so for an ``x`` with one element it is the
    ordinary k-th derivative and for an elementwise ``f`` the elementwise one. The result
    is itself differentiable.

    Args:
      f: a function of arrays returning a floating-point array.
      order: the order, an int ``>= 0`` (0 returns ``f`` itself).
      argnums: which positional argument to differentiate; the others are held fixed.
        For a mixed partial, nest: ``derivative(derivative(f, argnums=0), argnums=1)``.
      method: ``"nested"`` (reverse mode ``order`` times: works for any ``f``),
        ``"taylor"`` (one Taylor-mode pass with ``jax.experimental.jet``: needs an
        argument with one element or an elementwise ``f``, and jet rules for every
        primitive), or ``"auto"``: Taylor mode from order 3 on when the argument has one
        element and jet covers ``f``, nested otherwise.

    Returns:
      A function with ``f``'s arguments returning the derivative, shaped like the
      differentiated argument (or ``f``'s output for order 0).

    Examples:
      The seed notebook's ``y''(w1) = 2 x² w2² = 128``:

      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> p, x = fgrad.models.seed_params(), jnp.array([[4.0]])
      >>> y = lambda w1: fgrad.models.seed_net({**p, "linear1.weight": w1}, x)[1]
      >>> fgrad.derivative(y, order=2)(p["linear1.weight"])
      Array([[128.]], dtype=float32)
      >>> d4 = fgrad.derivative(jnp.sin, order=4, method="taylor")(0.5)  # 4th: sin again
      >>> bool(jnp.isclose(d4, jnp.sin(0.5), rtol=1e-5))
      True
    """
    caller = "fgrad.derivative"
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"{caller}: order must be an int, got {order!r}.")
    if order < 0:
        raise ValueError(f"{caller}: order must be >= 0, got {order}.")
    if method not in _METHODS:
        raise ValueError(f"{caller}: method must be one of {_METHODS}, got {method!r}.")
    if isinstance(argnums, bool) or not isinstance(argnums, int):
        raise TypeError(
            f"{caller}: argnums must be one int, got {argnums!r}. For a mixed partial "
            "derivative, nest: derivative(derivative(f, argnums=0), argnums=1)."
        )

    @functools.wraps(f)
    def wrapped(*args: Any):
        (i,) = _checks.normalize_argnums(argnums, len(args), caller)
        x = args[i]
        if not (isinstance(x, (int, float)) or hasattr(x, "dtype")):
            raise TypeError(
                f"{caller}: argument {i} must be an array or a number, got {type(x).__name__}."
            )
        _checks.require_float_tree(x, caller, f"argument {i}")
        x = jnp.asarray(x)

        def g(xi):
            out = f(*args[:i], xi, *args[i + 1 :])
            if not (hasattr(out, "dtype") or isinstance(out, float)) or not _checks.is_float(out):
                raise TypeError(
                    f"{caller}: f must return one floating-point array, got "
                    f"{getattr(out, 'dtype', type(out).__name__)}."
                )
            return out

        if order == 0:
            return g(x)
        use = method
        if method == "auto":
            covered = (
                order >= 3 and x.size == 1 and not _missing_jet_rules(jax.make_jaxpr(g)(x).jaxpr)
            )
            use = "taylor" if covered else "nested"
        if use == "taylor":
            return _taylor(g, order, x, caller)
        return _nested(g, order)(x)

    return wrapped
