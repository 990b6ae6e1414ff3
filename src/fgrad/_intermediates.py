"""Values of, and gradients with respect to, tapped intermediates.

PyTorch: ``autograd.grad(y, l)`` for a non-leaf ``l``, ``l.retain_grad()``, hooks.
fgrad: the function names ``l`` with `fgrad.tap`; these transformations trace it once,
add a zero perturbation at each requested tap and differentiate with respect to the
perturbations, so every tap's gradient comes from one forward and one backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from fgrad import _checks, _trace
from fgrad._typing import P, PyTree, with_params_of

Names = str | Sequence[str] | None
OnRepeat = Literal["error", "split", "sum"]
_ON_REPEAT = ("error", "split", "sum")


@dataclasses.dataclass(frozen=True)
class _Selection:
    """The taps to serve: their output keys, the plan for `_trace.run`, their shapes."""

    plan: _trace.Plan
    trees: dict[str, Any]  # key -> PyTreeDef
    shapes: dict[str, tuple[jax.ShapeDtypeStruct, ...]]  # key -> per-leaf shape

    def zeros(self) -> dict[str, list[jax.Array]]:
        return {k: [jnp.zeros(s.shape, s.dtype) for s in v] for k, v in self.shapes.items()}

    def unflatten(self, leaves_by_key: dict[str, Any]) -> dict[str, Any]:
        return {k: jax.tree.unflatten(self.trees[k], list(leaves_by_key[k])) for k in self.trees}


def _check_names(names: str | Sequence[str], known: Sequence[str], caller: str) -> list[str]:
    chosen = [names] if isinstance(names, str) else list(names)
    bad = [n for n in chosen if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{caller}: names must be strings, got {bad[0]!r}.")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{caller}: names lists a tap twice: {chosen}.")
    unknown = [n for n in chosen if n not in known]
    if unknown:
        listed = ", ".join(repr(n) for n in known) or "none"
        raise ValueError(
            f"{caller}: no tap named {unknown[0]!r} was hit while tracing the function; its "
            f"taps are: {listed}. Mark the value with fgrad.tap({unknown[0]!r}, value) inside "
            "the function, or pick one of those names."
        )
    return chosen


def _check_hit(h: _trace.Hit, caller: str, for_grad: bool) -> None:
    if h.blocked:
        raise ValueError(f"{caller}: tap {h.name!r} cannot be served: it is inside {h.blocked}.")
    if for_grad and not h.differentiable:
        dtypes = ", ".join(sorted({str(s.dtype) for s in h.shapes}))
        raise TypeError(
            f"{caller}: tap {h.name!r} holds {dtypes} values, which have no gradient. Tap a "
            "floating-point value instead (e.g. the embedding, not the token ids)."
        )


def _keys_for(hs: list[_trace.Hit], on_repeat: str, caller: str) -> list[str]:
    """The output key of each hit of one tap name."""
    n = hs[0].name
    if len(hs) == 1:
        return [n]
    if on_repeat == "error":
        raise ValueError(
            f"{caller}: tap {n!r} is hit {len(hs)} times in one call (a layer or function "
            "applied more than once?), so its gradient is ambiguous. Pass on_repeat='split' "
            f"for one entry per hit ({n + '#0'!r}, {n + '#1'!r}, ...), on_repeat='sum' for "
            "their sum, or give each use its own name."
        )
    if on_repeat == "split":
        return [f"{n}#{i}" for i in range(len(hs))]
    if len({(h.tree, h.shapes) for h in hs}) > 1:
        raise ValueError(
            f"{caller}: on_repeat='sum' needs every hit of tap {n!r} to have the same structure "
            f"and shapes, got {[[s.shape for s in h.shapes] for h in hs]}. Use "
            "on_repeat='split'."
        )
    return [n] * len(hs)


def _select(
    traced: _trace.Traced, names: Names, on_repeat: OnRepeat, caller: str, *, for_grad: bool
) -> _Selection:
    """The taps to serve, checked against what the program holds."""
    if on_repeat not in _ON_REPEAT:
        raise ValueError(f"{caller}: on_repeat must be one of {_ON_REPEAT}, got {on_repeat!r}.")
    hits = traced.by_name()
    if names is None:
        ok = lambda hs: not for_grad or all(h.differentiable for h in hs)
        chosen = [n for n, hs in hits.items() if ok(hs)]
    else:
        chosen = _check_names(names, list(hits), caller)
    keys: dict[_trace.Path, str] = {}
    trees: dict[str, Any] = {}
    shapes: dict[str, tuple[jax.ShapeDtypeStruct, ...]] = {}
    for n in chosen:
        for h in hits[n]:
            _check_hit(h, caller, for_grad)
        for h, k in zip(hits[n], _keys_for(hits[n], on_repeat, caller), strict=True):
            keys[h.path] = k
            trees[k], shapes[k] = h.tree, h.shapes
    return _Selection(_trace.Plan(keys), trees, shapes)


def intermediates(
    fn: Callable[P, Any], names: Names = None, *, on_repeat: OnRepeat = "error"
) -> Callable[P, tuple[Any, dict[str, PyTree]]]:
    """Transforms ``fn`` to also return the values of its taps.

    Args:
      fn: a function whose body calls `fgrad.tap`.
      names: a tap name or a sequence of names; ``None`` (default) means every tap.
      on_repeat: what to do with a tap name hit more than once in one call: ``"error"``
        (default), ``"split"`` (one entry per hit, keyed ``"name#0"``, ``"name#1"``, ...
        in program order) or ``"sum"`` (the hits' values summed).

    Returns:
      A function with ``fn``'s positional arguments returning ``(out, {name: value})``.
      A tap inside a ``lax.scan`` reports its values stacked on a leading axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> params = fgrad.models.seed_params()
      >>> (l, y), taps = fgrad.intermediates(fgrad.models.seed_net)(params, jnp.array([[4.0]]))
      >>> taps["l"]
      Array([[12.]], dtype=float32)
    """
    caller = "fgrad.intermediates"

    @functools.wraps(fn)
    def wrapped(*args):
        traced = _trace.trace(fn, args)
        sel = _select(traced, names, on_repeat, caller, for_grad=False)
        outs, rec = _trace.run(
            traced.jaxpr.jaxpr, traced.jaxpr.consts, jax.tree.leaves(args), sel.plan, {}
        )
        assert rec is not None  # recorded: run's record=True
        return jax.tree.unflatten(traced.out_tree, outs), sel.unflatten(rec)

    return with_params_of(fn, wrapped)


def _vjp(fn, names, args, *, has_aux, argnums, on_repeat, caller):
    """One forward pass of ``fn(*args)`` with zero perturbations at the chosen taps.

    Returns ``(out, pullback, aux)`` where ``pullback(ct)`` gives
    ``({name: leaves}, arg_grads_or_None)``.
    """
    traced = _trace.trace(fn, args)
    sel = _select(traced, names, on_repeat, caller, for_grad=True)
    nums = None if argnums is None else _checks.normalize_argnums(argnums, len(args), caller)
    diff_args = () if nums is None else tuple(args[i] for i in nums)
    _checks.require_float_tree(diff_args, caller, "the arguments chosen by argnums")

    def forward(perturb, diff):
        full = list(args)
        for i, a in zip(nums or (), diff, strict=True):
            full[i] = a
        outs, _ = _trace.run(
            traced.jaxpr.jaxpr,
            traced.jaxpr.consts,
            jax.tree.leaves(tuple(full)),
            sel.plan,
            perturb,
            record=False,  # the gradient needs the perturbations only
        )
        out = jax.tree.unflatten(traced.out_tree, outs)
        if has_aux:
            return _checks.split_aux(out, caller)
        return out, None

    out, pullback, aux = jax.vjp(forward, sel.zeros(), diff_args, has_aux=True)

    def pull(ct):
        tap_leaves, arg_grads = pullback(ct)
        taps = sel.unflatten(tap_leaves)
        if nums is None:
            return taps
        return taps, (arg_grads[0] if isinstance(argnums, int) else arg_grads)

    return out, pull, aux


def value_and_grad_intermediates(
    fn: Callable[P, Any],
    names: Names = None,
    *,
    has_aux: bool = False,
    argnums: int | Sequence[int] | None = None,
    on_repeat: OnRepeat = "error",
) -> Callable[P, tuple[Any, PyTree]]:
    """Transforms scalar ``fn`` to return its value and its gradient w.r.t. taps.

    Args:
      fn: a function returning a scalar (any array with one element, as PyTorch accepts
        in ``autograd.grad``), or ``(scalar, aux)`` with ``has_aux=True``.
      names: a tap name or a sequence of names; ``None`` (default) means every
        floating-point tap.
      has_aux: whether ``fn`` returns ``(scalar, aux)``.
      argnums: also differentiate with respect to these positional arguments, in the same
        backward pass (``l.retain_grad()`` followed by ``loss.backward()``).
      on_repeat: a tap name hit more than once in one call (a layer applied twice) is an
        error (``"error"``, default); ``"split"`` gives one gradient per hit, keyed
        ``"name#0"``, ``"name#1"``, ... in program order; ``"sum"`` gives the sum of the
        hits' gradients (the gradient w.r.t. one value added at every hit).

    Returns:
      A function with ``fn``'s arguments returning ``(value, grads)``, or
      ``((value, aux), grads)`` with ``has_aux``; ``grads`` is ``{name: gradient}``, or
      ``({name: gradient}, arg_grads)`` when ``argnums`` is given.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> net = lambda p, x: fgrad.models.seed_net(p, x)[1]
      >>> p, x = fgrad.models.seed_params(), jnp.array([[4.0]])
      >>> y, g = fgrad.value_and_grad_intermediates(net)(p, x)
      >>> y, g["l"]
      (Array([[900.]], dtype=float32), Array([[120.]], dtype=float32))
    """
    caller = "fgrad.value_and_grad_intermediates"

    @functools.wraps(fn)
    def wrapped(*args):
        out, pull, aux = _vjp(
            fn, names, args, has_aux=has_aux, argnums=argnums, on_repeat=on_repeat, caller=caller
        )
        y = _checks.scalar_output(
            out, caller, "For a non-scalar output use fgrad.vjp_intermediates with a cotangent."
        )
        grads = pull(jnp.ones_like(y))
        return ((out, aux) if has_aux else out), grads

    return with_params_of(fn, wrapped)


def grad_intermediates(
    fn: Callable[P, Any],
    names: Names = None,
    *,
    has_aux: bool = False,
    argnums: int | Sequence[int] | None = None,
    on_repeat: OnRepeat = "error",
) -> Callable[P, PyTree]:
    """Transforms scalar ``fn`` to return its gradient w.r.t. its taps: ``autograd.grad(y, l)``.

    Every requested tap's gradient comes from one forward and one backward pass. The
    result is differentiable (PyTorch's ``create_graph=True`` is always on), so a loss may
    contain it.

    Args:
      fn: a function returning a scalar (any array with one element, as PyTorch accepts
        in ``autograd.grad``), or ``(scalar, aux)`` with ``has_aux=True``.
      names: a tap name or a sequence of names; ``None`` (default) means every
        floating-point tap.
      has_aux: whether ``fn`` returns ``(scalar, aux)``.
      argnums: also differentiate with respect to these positional arguments.
      on_repeat: ``"error"`` (default), ``"split"`` or ``"sum"``; see
        `value_and_grad_intermediates`.

    Returns:
      A function with ``fn``'s arguments returning ``{name: gradient}`` (each shaped like
      the tapped value; stacked on a leading axis for a tap inside ``lax.scan``),
      ``({name: gradient}, arg_grads)`` when ``argnums`` is given, and ``(grads, aux)``
      with ``has_aux``.

    Examples:
      The seed notebook's ``autograd.grad(outputs=y, inputs=l)``:

      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> net = lambda p, x: fgrad.models.seed_net(p, x)[1]
      >>> fgrad.grad_intermediates(net, "l")(fgrad.models.seed_params(), jnp.array([[4.0]]))
      {'l': Array([[120.]], dtype=float32)}
    """
    vg: Callable[..., Any] = value_and_grad_intermediates(
        fn, names, has_aux=has_aux, argnums=argnums, on_repeat=on_repeat
    )

    @functools.wraps(fn)
    def wrapped(*args):
        (value, grads) = vg(*args)
        return (grads, value[1]) if has_aux else grads

    return with_params_of(fn, wrapped)


def vjp_intermediates(
    fn: Callable[P, Any],
    names: Names = None,
    *,
    has_aux: bool = False,
    argnums: int | Sequence[int] | None = None,
    on_repeat: OnRepeat = "error",
) -> Callable[P, tuple[Any, Callable[[Any], PyTree]]]:
    """Transforms ``fn`` to return its output and a reusable pullback to its taps.

    This is ``retain_graph=True``, always: the pullback is a pure function that can be
    called any number of times, with any cotangent, and differentiated again.

    Args:
      fn: any function of arrays whose body calls `fgrad.tap`; its output need not be
        a scalar.
      names: a tap name or a sequence of names; ``None`` (default) means every
        floating-point tap.
      has_aux: whether ``fn`` returns ``(output, aux)``; the aux is not differentiated.
      argnums: the pullback also returns the gradient w.r.t. these positional arguments.
      on_repeat: ``"error"`` (default), ``"split"`` or ``"sum"``; see
        `value_and_grad_intermediates`.

    Returns:
      A function with ``fn``'s arguments returning ``(out, pullback)``, or
      ``(out, pullback, aux)`` with ``has_aux``. ``pullback(ct)`` takes a cotangent shaped
      like ``out`` (PyTorch's ``grad_outputs``) and returns ``{name: gradient}``, or
      ``({name: gradient}, arg_grads)`` with ``argnums``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> net = lambda p, x: fgrad.models.seed_net(p, x)[1]
      >>> y, pullback = fgrad.vjp_intermediates(net, argnums=0)(
      ...     fgrad.models.seed_params(), jnp.array([[4.0]]))
      >>> taps, params_grad = pullback(jnp.ones_like(y))
      >>> taps2, _ = pullback(jnp.ones_like(y))  # a second backward is fine
      >>> taps["l"], taps2["l"], params_grad["linear2.bias"]
      (Array([[120.]], dtype=float32), Array([[120.]], dtype=float32), Array([60.], dtype=float32))
    """
    caller = "fgrad.vjp_intermediates"

    @functools.wraps(fn)
    def wrapped(*args):
        out, pull, aux = _vjp(
            fn, names, args, has_aux=has_aux, argnums=argnums, on_repeat=on_repeat, caller=caller
        )

        def pullback(ct):
            diff = _checks.first_structure_difference(out, ct)
            if diff is not None:
                raise ValueError(
                    f"{caller}: the cotangent must have the structure and shapes of the "
                    f"function's output, but cotangent{diff}."
                )
            return pull(ct)

        return (out, pullback, aux) if has_aux else (out, pullback)

    return with_params_of(fn, wrapped)
