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
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
from jax.experimental import jet
from jax.extend import core as jcore

from fgrad import _checks
from fgrad._typing import P, with_params_of

Method = Literal["auto", "nested", "taylor"]
_METHODS = ("auto", "nested", "taylor")


def _nested(f: Callable, nums: Sequence[int]) -> Callable:
    """Reverse mode once per entry of ``nums``, each w.r.t. that positional argument."""
    g = f
    for i in nums:
        g = jax.grad(lambda *a, g=g: jnp.sum(g(*a)), argnums=i)
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
    """Taylor mode; the caller has made sure jet has a rule for every primitive of g."""
    # One jet along v = ones: the k-th output term is d^k/dt^k g(x + t·1) at t = 0.
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
    f: Callable[P, Any],
    order: int = 1,
    *,
    argnums: int | Sequence[int] = 0,
    method: Method = "auto",
    return_method: bool = False,
) -> Callable[P, Any]:
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
        A tuple gives a mixed partial: one entry per differentiation, in order
        (``argnums=(0, 1)`` is ∂²f/∂x₀∂x₁, with ``order=2``).
      method: ``"nested"`` (reverse mode ``order`` times: works for any ``f``),
        ``"taylor"`` (one Taylor-mode pass with ``jax.experimental.jet``, whose cost grows
        linearly rather than exponentially with the order: needs an argument with one
        element or an elementwise ``f``, and jet rules for every primitive), or
        ``"auto"``: Taylor mode from order 3 on when the argument has one element and jet
        covers ``f``, nested otherwise.
      return_method: also return which method ran (``"nested"`` or ``"taylor"``): how
        ``"auto"`` says what it picked.

    Returns:
      A function with ``f``'s arguments returning the derivative, shaped like the
      (last) differentiated argument, or ``f``'s output for order 0; with
      ``return_method``, ``(derivative, method)``.

    Examples:
      The seed notebook's ``y''(w1) = 2 x² w2² = 128``:

      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> p, x = fgrad.models.seed_params(), jnp.array([[4.0]])
      >>> y = lambda w1: fgrad.models.seed_net({**p, "linear1.weight": w1}, x)[1]
      >>> fgrad.derivative(y, order=2)(p["linear1.weight"])
      Array([[128.]], dtype=float32)
      >>> d4, how = fgrad.derivative(jnp.sin, order=4, return_method=True)(0.5)
      >>> how, bool(jnp.isclose(d4, jnp.sin(0.5), rtol=1e-5))  # 4th derivative: sin again
      ('taylor', True)
      >>> fgrad.derivative(lambda a, b: a**2 * b**3, order=2, argnums=(0, 1))(2.0, 3.0)
      Array(108., dtype=float32, weak_type=True)
    """
    caller = "fgrad.derivative"
    if not _checks.is_int(order):
        raise TypeError(f"{caller}: order must be an int, got {order!r}.")
    if order < 0:
        raise ValueError(f"{caller}: order must be >= 0, got {order}.")
    if method not in _METHODS:
        raise ValueError(f"{caller}: method must be one of {_METHODS}, got {method!r}.")
    mixed = not isinstance(argnums, int)
    if mixed:
        nums_spec = tuple(cast(Sequence[int], argnums))
        if not nums_spec or not all(_checks.is_int(i) for i in nums_spec):
            raise TypeError(
                f"{caller}: argnums must be an int or a tuple of ints, got {argnums!r}."
            )
        if len(nums_spec) != order:
            raise ValueError(
                f"{caller}: argnums={argnums!r} names {len(nums_spec)} differentiations but "
                f"order={order}; pass order={len(nums_spec)}."
            )
        if method == "taylor" and len(set(nums_spec)) > 1:
            raise ValueError(f"{caller}: method='taylor' cannot take mixed partials; use 'nested'.")
    elif not _checks.is_int(argnums):  # a bool
        raise TypeError(f"{caller}: argnums must be an int or a tuple of ints, got {argnums!r}.")

    def checked(*args: Any):
        out = cast(Callable[..., Any], f)(*args)  # positional arguments only
        if not (hasattr(out, "dtype") or isinstance(out, float)) or not _checks.is_float(out):
            raise TypeError(
                f"{caller}: f must return one floating-point array, got "
                f"{getattr(out, 'dtype', type(out).__name__)}."
            )
        return out

    @functools.wraps(f)
    def wrapped(*args: Any):
        spec = nums_spec if mixed else (argnums,) * max(order, 1)
        nums = [_checks.normalize_argnums(i, len(args), caller)[0] for i in spec]
        for i in set(nums):
            x = args[i]
            if not (isinstance(x, (int, float)) or hasattr(x, "dtype")):
                raise TypeError(
                    f"{caller}: argument {i} must be an array or a number, got {type(x).__name__}."
                )
            _checks.require_float_tree(x, caller, f"argument {i}")
            args = (*args[:i], jnp.asarray(x), *args[i + 1 :])
        if order == 0:
            out, used = checked(*args), "nested"
        else:
            used = method
            i = nums[0]
            g = lambda xi: checked(*args[:i], xi, *args[i + 1 :])
            missing = lambda: sorted(_missing_jet_rules(jax.make_jaxpr(g)(args[i]).jaxpr))
            if method == "auto":
                one = len(set(nums)) == 1 and args[i].size == 1 and order >= 3
                used = "taylor" if one and not missing() else "nested"
            elif method == "taylor" and (absent := missing()):
                raise NotImplementedError(
                    f"{caller}: Taylor mode (jax.experimental.jet) has no rule for "
                    f"{absent}; use method='nested' or 'auto'."
                )
            if used == "taylor":
                out = _taylor(g, order, args[i], caller)
            else:
                out = _nested(checked, nums)(*args)
        return (out, used) if return_method else out

    return with_params_of(f, wrapped)
