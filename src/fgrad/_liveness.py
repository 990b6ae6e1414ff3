"""Which inputs a function's output depends on, read from its traced program.

PyTorch decides that a leaf's ``.grad`` stays ``None`` (or that ``autograd.grad`` finds
an input unused) by whether the backward graph reaches it. fgrad asks the same question
of the traced program: an input is *live* when its tangent reaches the output's tangent
in the function's JVP program after dead-code elimination. So ``0 * w`` is live (PyTorch
gives a zero gradient), while ``lax.stop_gradient(w)``, ``jnp.zeros_like(w)`` and a
parameter the function never reads are not (PyTorch gives ``None``).

It is decided once per trace, as a Python ``if`` decides PyTorch's graph: an input used
only inside one branch of a ``lax.cond`` counts as live whichever branch runs, since the
traced program holds both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax._src.interpreters import partial_eval as pe

from fgrad import _checks


def reaches_output(fn: Callable[[Any], Any], primals: Any) -> Any:
    """A pytree of Python bools shaped like ``primals``: whether the output of
    ``fn(primals)`` depends differentiably on each leaf. Leaves that are not floating
    point are ``False``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fgrad._liveness import reaches_output
      >>> f = lambda p: p["a"] * 0.0 + jax.lax.stop_gradient(p["b"])
      >>> reaches_output(f, {"a": 1.0, "b": 2.0, "c": 3.0})
      {'a': True, 'b': False, 'c': False}
    """
    leaves, tree = jax.tree.flatten(primals)
    idx = [i for i, leaf in enumerate(leaves) if _checks.is_float(leaf)]
    if not idx:
        return jax.tree.unflatten(tree, [False] * len(leaves))

    def with_floats(floats):
        full = list(leaves)
        for i, v in zip(idx, floats, strict=True):
            full[i] = v
        return fn(jax.tree.unflatten(tree, full))

    def tangent_out(floats, tangents):
        return jax.jvp(with_floats, (floats,), (tangents,))[1]

    floats = [leaves[i] for i in idx]
    closed = jax.make_jaxpr(tangent_out)(floats, floats)
    _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    live = [False] * len(leaves)
    for i, u in zip(idx, used[len(idx) :], strict=True):
        live[i] = bool(u)
    return jax.tree.unflatten(tree, live)
