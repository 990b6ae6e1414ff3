"""`tap`: an identity that names an intermediate value.

`tap` binds a JAX primitive, ``fgrad_tap``, so the name survives into every traced
program, sub-programs (``jit``, ``scan``, ``checkpoint``) included. fgrad's
transformations (`fgrad.intermediates`, `fgrad.grad_intermediates`, ...) find the taps
in the traced program and read or perturb them; everywhere else the primitive is the
identity: it lowers to nothing, and differentiates, batches and Taylor-expands as the
identity, so a tapped model compiles to exactly the same XLA program as an untapped one.
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import jet
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

T = TypeVar("T")

tap_p = Primitive("fgrad_tap")
tap_p.multiple_results = True


def _tap_impl(*leaves, name, tree):
    del name, tree
    return list(leaves)


def _tap_abstract_eval(*avals, name, tree):
    del name, tree
    return list(avals)


def _tap_lowering(ctx, *leaves, name, tree):
    del ctx, name, tree
    return list(leaves)


def _tap_jvp(primals, tangents, *, name, tree):
    # The tangent passes through untouched: a tap never changes a derivative. The primal
    # is also named for jax.checkpoint's policies (save_only_these_names(name), ...),
    # which look at the differentiated program: an identity that compiles to nothing.
    outs = tap_p.bind(*primals, name=name, tree=tree)
    return [checkpoint_name(o, name) for o in outs], list(tangents)


def _tap_transpose(cts, *leaves, name, tree):
    # Only reached if a tap is applied to a linear (tangent) value: still the identity.
    del leaves, name, tree
    return list(cts)


def _tap_jet(primals, series, *, name, tree):
    return tap_p.bind(*primals, name=name, tree=tree), list(series)


def _tap_batch(args, dims, *, name, tree):
    # The batch axis goes first, so a tap under jax.vmap inside the transformed function
    # reports its values stacked as vmap returns them, not in the layout batching chose.
    mapped = [isinstance(d, int) for d in dims]  # an unmapped leaf has no int batch axis
    args = [
        jax.numpy.moveaxis(x, d, 0) if m else x for x, d, m in zip(args, dims, mapped, strict=True)
    ]
    dims = [0 if m else d for d, m in zip(dims, mapped, strict=True)]
    return tap_p.bind(*args, name=name, tree=tree), dims


tap_p.def_impl(_tap_impl)
tap_p.def_abstract_eval(_tap_abstract_eval)
mlir.register_lowering(tap_p, _tap_lowering)
ad.primitive_jvps[tap_p] = _tap_jvp
ad.primitive_transposes[tap_p] = _tap_transpose
batching.primitive_batchers[tap_p] = _tap_batch
jet.jet_rules[tap_p] = _tap_jet  # type: ignore[assignment]  # typed by its first rule

# The name the JVP rule gives a tap's primal is an identity JAX gives no Taylor rule: give it
# one, so Taylor mode (jet) still runs through the gradient of a tapped function.
_name_p = jax.make_jaxpr(lambda x: checkpoint_name(x, "fgrad"))(0.0).eqns[0].primitive


def _name_jet(primals, series, *, name):
    return _name_p.bind(primals[0], name=name), series[0]


# jet's rule table is typed after one of JAX's own rules; ours takes the name keyword.
jet.jet_rules.setdefault(_name_p, _name_jet)  # type: ignore[arg-type]


def tap(name: str, x: T) -> T:
    """Names an intermediate value so fgrad can read it or differentiate with respect to it.

    ``tap(name, x)`` returns ``x`` unchanged. It is PyTorch's ``l.retain_grad()`` (or
    keeping a handle on ``l`` to call ``autograd.grad(y, l)``) made pure: under
    `fgrad.intermediates` the tap's value is returned, under `fgrad.grad_intermediates`
    the gradient of the output with respect to it. Outside those transformations it costs
    nothing: it compiles to no operation at all.

    The gradient is with respect to the tapped *value*, through all of its uses, as
    ``retain_grad`` counts them: the tap may be written as a statement
    (``fgrad.tap("h", h)``, its result discarded), and ``h`` may be used beside the tap's
    result. A tap inside a ``lax.scan`` body or a ``lax.cond`` branch of a value from
    outside it counts the uses in that step or branch.

    Args:
      name: the name the value is reported under. A name may be used once per call of the
        function being transformed.
      x: an array or a pytree of arrays.

    Returns:
      ``x``, unchanged.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> def f(w, x):
      ...     h = fgrad.tap("h", w * x)
      ...     return (h ** 2).sum()
      >>> fgrad.grad_intermediates(f)(3.0, jnp.array([1.0, 2.0]))
      {'h': Array([ 6., 12.], dtype=float32)}
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"fgrad.tap: name must be a non-empty string, got {name!r}.")
    leaves, tree = jax.tree.flatten(x)
    if not leaves:
        return x
    try:
        out = tap_p.bind(*leaves, name=name, tree=tree)
    except TypeError as e:
        kinds = sorted({type(leaf).__name__ for leaf in leaves})
        raise TypeError(
            f"fgrad.tap({name!r}, ...): every leaf must be an array or a number, got {kinds}."
        ) from e
    return jax.tree.unflatten(tree, out)


def is_tap(eqn: Any) -> bool:
    """Whether a jaxpr equation is a tap."""
    return eqn.primitive is tap_p
