"""n-th derivatives: PyTorch's nested ``autograd.grad(..., create_graph=True)``.

The seed notebook takes ``y''(w1)`` as ``autograd.grad(autograd.grad(y, w1,
create_graph=True)[0], w1)``. Each ``autograd.grad`` of a non-scalar output sums it
first (``grad_outputs`` of ones), so the k-th derivative is defined by

    d₀(x) = f(x),    d_k(x) = ∇ₓ Σ d_{k-1}(x),

which for an ``x`` with one element is the ordinary k-th derivative, and for a function
acting elementwise is the elementwise k-th derivative. `derivative` computes exactly that,
by nested reverse mode or by Taylor mode (``jax.experimental.jet``), whose cost grows
with the square of the order rather than exponentially.
"""

from __future__ import annotations

import functools
import math
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


# Primitives that act elementwise: each output element depends only on the same element
# of each (same-shaped) operand.
_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt
    integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg not or pow
    reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh xor""".split()
)
_SUBJAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_ALIGNED, _OTHER = "aligned", "other"  # a value that depends on x: elementwise in it, or not


def _not_elementwise(jaxpr, states: list, shape: tuple) -> tuple[list, str | None]:
    """Follows the dependence on one argument ``x`` of ``shape`` through ``jaxpr``.

    ``states[i]`` says how input ``i`` depends on x: None (not at all), ``_ALIGNED``
    (shaped like x, element j a function of x_j alone) or ``_OTHER``. Returns the output
    states and the name of the first primitive that mixes elements of x (None if none)."""
    env: dict = {}
    for v, st in zip(jaxpr.invars, states, strict=True):
        env[v] = st
    read = lambda v: None if isinstance(v, jcore.Literal) else env.get(v)
    first_bad = None
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs: list[str | None]
        if all(st is None for st in ins):
            outs = [None] * len(eqn.outvars)
        elif eqn.primitive.name in _ELEMENTWISE and all(st in (None, _ALIGNED) for st in ins):
            ok = all(tuple(o.aval.shape) == shape for o in eqn.outvars)
            outs = [_ALIGNED if ok else _OTHER] * len(eqn.outvars)
            if not ok and first_bad is None:
                first_bad = eqn.primitive.name
        else:
            sub = next((eqn.params[k] for k in _SUBJAXPR_PARAMS if k in eqn.params), None)
            sub = getattr(sub, "jaxpr", sub)
            if sub is not None and len(sub.invars) == len(ins):
                outs, bad = _not_elementwise(sub, ins, shape)
            else:
                outs, bad = [_OTHER] * len(eqn.outvars), eqn.primitive.name
            if first_bad is None and _OTHER in outs:
                first_bad = bad if bad is not None else eqn.primitive.name
        for v, st in zip(eqn.outvars, outs, strict=True):
            env[v] = st
    return [read(v) for v in jaxpr.outvars], first_bad


def _elementwise_obstacle(g: Callable, x: jax.Array) -> str | None:
    """None if ``g`` acts elementwise on ``x`` (its output shaped like ``x``, element j a
    function of ``x_j`` alone), decided from its traced program; else why not."""
    closed = jax.make_jaxpr(g)(x)
    (out,) = closed.jaxpr.outvars
    out_shape = tuple(getattr(out.aval, "shape", ()))  # a ShapedArray: typed as AbstractValue
    if out_shape != tuple(x.shape):
        return f"its output has shape {out_shape}, the argument {tuple(x.shape)}"
    (state,), bad = _not_elementwise(closed.jaxpr, [_ALIGNED], tuple(x.shape))
    if state == _OTHER:
        return f"it mixes elements of the argument (`{bad}` in its program)"
    return None


def _taylor(g: Callable, order: int, x: jax.Array, mode: str = "cond") -> jax.Array:
    """Taylor mode; the caller has made sure jet has a rule for every primitive of ``g``
    and that ``x`` has one element or ``g`` acts elementwise on it.

    One jet along ``s·1`` in Taylor coefficients (no factorials): coefficient k is
    ``s^k g^(k)(x) / k!``. With ``s = (k!)^(1/k)`` that is ``g^(k)(x)`` up to a factor
    near 1, and every lower coefficient of the input's series is ``s^j / j! >= 1``: no
    ``k!`` is ever formed (it overflows float32 from k = 35) and nothing is scaled
    towards the denormals (which XLA flushes under ``jit`` but not eagerly).

    Where a derivative exceeds the dtype's range, that series' intermediate coefficients
    can overflow to ``inf - inf = NaN``. ``mode="unscaled"`` uses ``s = 1`` instead (the
    coefficients are ``g^(j)(x)/j!``, smaller) and applies ``k!`` in factors that fit the
    dtype, so such a result overflows to inf, as the docs promise. ``"scaled"``: the first
    series alone; ``"cond"``: the first, and the second where the first is NaN (under a
    ``lax.cond``: compiled, but run only then)."""
    log_fact = math.lgamma(order + 1)
    step = math.exp(log_fact / order)
    rescale = math.exp(log_fact - order * math.log(step))  # k!/s^k, ~1, in float64

    def coefficient(s: float) -> jax.Array:
        series = [jnp.full_like(x, s)] + [jnp.zeros_like(x)] * (order - 1)
        _, out_series = jet.jet(g, (x,), (series,), factorial_scaled=False)
        return out_series[order - 1]

    def unscaled() -> jax.Array:
        c1 = coefficient(1.0)
        big = 0.5 * math.log(float(jnp.finfo(jnp.result_type(c1)).max))
        pieces = max(1, math.ceil(log_fact / big))
        for _ in range(pieces):
            c1 = c1 * jnp.asarray(math.exp(log_fact / pieces), jnp.result_type(c1))
        return c1

    if mode == "unscaled":
        dk = unscaled()
    else:
        ck = coefficient(step)
        dk = ck * jnp.asarray(rescale, jnp.result_type(ck))
        if mode == "cond":
            dk = jax.lax.cond(
                jnp.any(jnp.isnan(dk)),
                lambda d: jnp.where(jnp.isnan(d), unscaled(), d),
                lambda d: d,
                dk,
            )
    if x.size == 1:
        return jnp.reshape(jnp.sum(dk), x.shape).astype(x.dtype)
    return jnp.reshape(dk, x.shape).astype(x.dtype)


# Nested reverse mode grows its program about 2-4x per order, Taylor mode with the square
# of the order. Past this many operations XLA's compile time (minutes and more) is out of
# reach: refuse, saying why.
_MAX_EQNS = 50_000


def _count_eqns(jaxpr) -> int:
    return sum(
        1 + sum(_count_eqns(sub) for sub in jcore.jaxprs_in_params(e.params)) for e in jaxpr.eqns
    )


def _check_taylor_size(g: Callable, order: int, x: jax.Array, caller: str) -> None:
    """Refuses an order whose Taylor-mode program would exceed `_MAX_EQNS` operations,
    predicted from the programs at orders 4 and 8 (``a k² + b k``)."""
    if order <= 16:
        return
    size = lambda k: _count_eqns(jax.make_jaxpr(functools.partial(_taylor, g, k))(x).jaxpr)
    c4, c8 = size(4), size(8)
    a = max((c8 - 2 * c4) / 32, 0.0)
    b = max((c4 - 16 * a) / 4, 0.0)
    predicted = a * order**2 + b * order
    if predicted > _MAX_EQNS:
        raise ValueError(
            f"{caller}: order {order} by Taylor mode is out of reach: its program would have "
            f"about {predicted:.2g} operations ({c8} at order 8, growing with the square of "
            f"the order), and compiling more than {_MAX_EQNS} takes minutes to hours. Lower "
            "the order."
        )


def _check_nested_size(
    f: Callable, nums: Sequence[int], args: Sequence, why: Callable[[], str], caller: str
):
    """Refuses an order whose nested reverse-mode program would exceed `_MAX_EQNS`
    operations, predicted from its sizes at orders 2 and 3 (cheap to trace: about a fifth
    of order 5, a fraction of a percent of order 8) and their ratio."""
    order = len(nums)
    if order <= 4:
        return
    c2, c3 = (_count_eqns(jax.make_jaxpr(_nested(f, nums[:j]))(*args).jaxpr) for j in (2, 3))
    growth = max(c3 / max(c2, 1), 1.0)
    predicted = c3 * growth ** (order - 3)
    if predicted > _MAX_EQNS:
        raise ValueError(
            f"{caller}: order {order} by nested reverse mode is out of reach: its program "
            f"has {c3} operations at order 3 and grows about {growth:.1f}x per order "
            f"(about {predicted:.2g} at order {order}; compiling more than {_MAX_EQNS} "
            "takes minutes to hours). Taylor mode, whose cost grows with the square of the "
            f"order, does not apply: {why()}. Lower the order, or differentiate a function of "
            "one element (e.g. jax.vmap over fgrad.derivative of a scalar function) so "
            "that Taylor mode can run."
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
      method: ``"nested"`` (reverse mode ``order`` times: works for any ``f``, but its
        program grows 2-4x per order, so an order whose program would exceed tens of
        thousands of operations is refused with the reason), ``"taylor"`` (one
        Taylor-mode pass with ``jax.experimental.jet``, whose cost grows with the order
        squared, not exponentially: needs an argument with one element or an ``f`` that
        acts elementwise on it, decided from ``f``'s traced program, and jet rules for
        every primitive; anything else is refused rather than answered with another
        quantity), or ``"auto"``:
        Taylor mode from order 3 on wherever it applies, nested otherwise.
      return_method: also return which method ran (``"nested"`` or ``"taylor"``): how
        ``"auto"`` says what it picked.

    Returns:
      A function with ``f``'s arguments returning the derivative, shaped like the
      (last) differentiated argument, or ``f``'s output for order 0; with
      ``return_method``, ``(derivative, method)``. Taylor mode never forms ``order!``
      (it works on rescaled Taylor coefficients), so high orders are as accurate as the
      derivative's own size allows: eager and ``jit`` agree, and a result is infinite
      only where the derivative exceeds the dtype's range.

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

    @functools.partial(jax.jit, static_argnums=(0, 1, 2))
    def taylor_jit(i: int, k: int, mode: str, arrays: tuple):
        g = lambda xi: checked(*arrays[:i], xi, *arrays[i + 1 :])
        return _taylor(g, k, arrays[i], mode)

    def taylor_mode(i: int, k: int, args: Sequence, g: Callable, mode: str) -> jax.Array:
        # Compiled rather than op by op: the series has O(k²) small operations, which run
        # eagerly would take minutes. Array arguments go through one cached jit; other
        # arguments (Python numbers, strings) stay as they are, closed over.
        if all(isinstance(a, jax.Array) for a in args):
            return taylor_jit(i, k, mode, tuple(args))
        return jax.jit(lambda xi: _taylor(g, k, xi, mode))(args[i])

    def taylor_compiled(i: int, k: int, args: Sequence, g: Callable) -> jax.Array:
        # Traced (under the user's jit): both series in one program, the second run only
        # where the first is NaN. Concrete: the second is compiled only when needed.
        if any(isinstance(a, jax.core.Tracer) for a in args):
            return taylor_mode(i, k, args, g, "cond")
        out = taylor_mode(i, k, args, g, "scaled")
        if isinstance(out, jax.core.Tracer):  # concrete arguments, but inside an outer
            return taylor_mode(i, k, args, g, "cond")  # trace (a scan body): staged too
        if bool(jnp.any(jnp.isnan(out))):
            out = jnp.where(jnp.isnan(out), taylor_mode(i, k, args, g, "unscaled"), out)
        return out

    @functools.wraps(f)
    def wrapped(*args: Any):
        spec = nums_spec if mixed else (argnums,) * max(order, 1)
        nums = [_checks.normalize_argnums(i, len(args), caller)[0] for i in spec]
        for i in set(nums):
            x = args[i]
            if not (isinstance(x, (int, float, complex)) or hasattr(x, "dtype")):
                raise TypeError(
                    f"{caller}: argument {i} must be an array or a number, got {type(x).__name__}."
                )
            _checks.require_float_tree(x, caller, f"argument {i}")
            args = (*args[:i], jnp.asarray(x), *args[i + 1 :])
        if order == 0:
            out, used = checked(*args), "nested"
        else:
            i = nums[0]
            x = args[i]
            g = lambda xi: checked(*args[:i], xi, *args[i + 1 :])

            def missing_rules() -> list[str]:
                return sorted(_missing_jet_rules(jax.make_jaxpr(g)(x).jaxpr))

            def taylor_obstacle() -> str | None:  # None: Taylor mode computes the docs' d_k
                if len(set(nums)) > 1:
                    return "the derivative is a mixed partial"
                if absent := missing_rules():
                    return f"jax.experimental.jet has no rule for {absent}"
                if x.size == 1:
                    return None
                reason = _elementwise_obstacle(g, x)
                if reason is None:
                    return None
                return (
                    f"argument {i} has {x.size} elements and f does not act elementwise on "
                    f"it: {reason}"
                )

            used = method
            why: Callable[[], str] = lambda: taylor_obstacle() or "method='nested' was asked for"
            if method == "auto":
                reason = taylor_obstacle() if order >= 3 else "orders below 3 are nested"
                used = "taylor" if reason is None else "nested"
                why = lambda: reason or ""
            elif method == "taylor":
                if absent := missing_rules():
                    raise NotImplementedError(
                        f"{caller}: Taylor mode (jax.experimental.jet) has no rule for "
                        f"{absent}; use method='nested' or 'auto'."
                    )
                if x.size != 1 and (reason := _elementwise_obstacle(g, x)) is not None:
                    raise ValueError(
                        f"{caller}: method='taylor' needs an argument with one element, or a "
                        f"function that acts elementwise on it (it would compute another "
                        f"quantity); got argument {i} of shape {tuple(x.shape)}, and {reason}. "
                        "Use method='nested' (or 'auto')."
                    )
            if used == "taylor":
                _check_taylor_size(g, order, x, caller)
                out = taylor_compiled(i, order, args, g)
            else:
                _check_nested_size(checked, nums, args, why, caller)
                out = _nested(checked, nums)(*args)
        return (out, used) if return_method else out

    return with_params_of(f, wrapped)
