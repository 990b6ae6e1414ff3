"""Convolutions in XLA:CPU's fast layout, inside loop bodies too.

XLA's CPU backend runs a convolution through its fast kernels (Eigen's or XNNPACK's)
only when its dimension numbers are canonical: input ``(batch, spatial..., feature)``, kernel
``(spatial..., in, out)``, output like the input. Outside any loop, XLA rewrites every
other convolution into that form with transposes around it; inside a ``while`` body (so
inside ``lax.scan``) it does not, and those convolutions fall to a naive loop nest, far
slower (jax#12868). The backward pass of any convolution contains
non-canonical ones (its input and kernel gradients), whatever layout the model uses.

`canonical_convs` does XLA's rewrite itself, in the traced program of a function:
every ``conv_general_dilated`` with one feature group and one batch group becomes a
canonical convolution between transposes. The numbers are unchanged (the same
convolution, read in another order); only where XLA:CPU runs it changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

_CONV = "conv_general_dilated"
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})


def _canonical(dn: Any) -> Any:
    """The canonical dimension numbers for ``len(dn.lhs_spec) - 2`` spatial dimensions."""
    nd = len(dn.lhs_spec) - 2
    spatial = tuple(range(1, nd + 1))
    return jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, nd + 1, *spatial),
        rhs_spec=(nd + 1, nd, *range(nd)),
        out_spec=(0, nd + 1, *spatial),
    )


def is_canonical(params: dict) -> bool:
    """Whether a ``conv_general_dilated`` equation already has the canonical layout."""
    return tuple(params["dimension_numbers"]) == tuple(_canonical(params["dimension_numbers"]))


def _rewritable(params: dict) -> bool:
    return (
        params["feature_group_count"] == 1
        and params["batch_group_count"] == 1
        and not is_canonical(params)
    )


def _conv(lhs: jax.Array, rhs: jax.Array, params: dict) -> jax.Array:
    """The convolution ``params`` describes, computed in the canonical layout."""
    dn = params["dimension_numbers"]
    lhs_c = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
    rhs_c = jnp.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
    out_c = jax.lax.conv_general_dilated_p.bind(
        lhs_c, rhs_c, **{**params, "dimension_numbers": _canonical(dn)}
    )
    # Canonical output axis j is the original output's axis order[j]: invert the order.
    order = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
    return jnp.transpose(out_c, tuple(order.index(a) for a in range(len(order))))


def _has_rewritable(jaxpr: Any) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == _CONV and _rewritable(eqn.params):
            return True
        if eqn.primitive.name in _CALLS and _has_rewritable(eqn.params["jaxpr"].jaxpr):
            return True
    return False


def _run(jaxpr: Any, consts: Any, args: Any) -> list:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        # The equation's context (e.g. config it was traced under), as jax.core.eval_jaxpr.
        ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
        with ctx:
            if name == _CONV and _rewritable(eqn.params):
                outs = [_conv(invals[0], invals[1], eqn.params)]
            elif name in _CALLS and _has_rewritable(eqn.params["jaxpr"].jaxpr):
                sub = eqn.params["jaxpr"]
                outs = _run(sub.jaxpr, sub.consts, invals)
            else:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def canonical_convs(f: Callable) -> Callable:
    """``f`` with every convolution of its traced program in XLA:CPU's canonical layout.

    Convolutions inside ``jit`` sub-programs are rewritten as well; those inside other
    sub-programs (``scan``, ``cond``, ``checkpoint``, custom derivative rules) are left as
    they are. A function without a rewritable convolution runs unchanged.

    Args:
      f: a function of pytrees of arrays.

    Returns:
      A function with ``f``'s signature and results.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fgrad._conv_layout import canonical_convs
      >>> conv = lambda x, k: jax.lax.conv(x, k, (1, 1), "SAME")  # NCHW, OIHW
      >>> x, k = jnp.ones((2, 3, 8, 8)), jnp.ones((4, 3, 3, 3))
      >>> bool(jnp.allclose(canonical_convs(conv)(x, k), conv(x, k)))
      True
    """

    def g(*args: Any) -> Any:
        flat, tree = jax.tree.flatten(args)
        closed, out_shape = jax.make_jaxpr(
            lambda *leaves: f(*jax.tree.unflatten(tree, leaves)), return_shape=True
        )(*flat)
        if not _has_rewritable(closed.jaxpr):
            return f(*args)
        outs = _run(closed.jaxpr, closed.consts, flat)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return g
