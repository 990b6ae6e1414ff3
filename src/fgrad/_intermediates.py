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
import numpy as np

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
    unused: frozenset[str] = frozenset()  # keys the output does not depend on
    materialize: bool = False  # zeros (True) or None (False) for the unused keys

    def zeros(self) -> dict[str, list[jax.Array]]:
        return {
            k: [jnp.zeros(s.shape, s.dtype) for s in v]
            for k, v in self.shapes.items()
            if k not in self.unused
        }

    def unflatten(self, leaves_by_key: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, tree in self.trees.items():
            if k in self.unused:
                zeros = [jnp.zeros(s.shape, s.dtype) for s in self.shapes[k]]
                out[k] = jax.tree.unflatten(tree, zeros) if self.materialize else None
            else:
                out[k] = jax.tree.unflatten(tree, list(leaves_by_key[k]))
        return out


def _check_names_arg(names: Any, caller: str) -> None:
    """``names`` must be None, a tap name or a sequence of tap names (said at transform time)."""
    if names is None or isinstance(names, str):
        return
    if isinstance(names, Sequence) and all(isinstance(n, str) for n in names):
        return
    bad = (
        names
        if not isinstance(names, Sequence)
        else next(n for n in names if not isinstance(n, str))
    )
    raise TypeError(
        f"{caller}: names must be a tap name (the string given to fgrad.tap, e.g. 'h'), a "
        f"sequence of tap names, or None for every tap; got {bad!r} "
        f"({type(bad).__name__})."
    )


def _check_flags(caller: str, on_repeat: Any, allow_unused: Any, materialize_grads: Any) -> None:
    if on_repeat not in _ON_REPEAT:
        raise ValueError(f"{caller}: on_repeat must be one of {_ON_REPEAT}, got {on_repeat!r}.")
    is_bool = lambda v: isinstance(v, (bool, np.bool_))
    if allow_unused is not None and not is_bool(allow_unused):
        raise TypeError(
            f"{caller}: allow_unused must be True or False (or None for the default), got "
            f"{allow_unused!r} ({type(allow_unused).__name__})."
        )
    if not is_bool(materialize_grads):
        raise TypeError(
            f"{caller}: materialize_grads must be True or False, got {materialize_grads!r} "
            f"({type(materialize_grads).__name__})."
        )
    if materialize_grads and allow_unused is False:
        raise ValueError(
            f"{caller}: materialize_grads=True gives zeros for unused taps, so it implies "
            "allow_unused=True (as torch.autograd.grad says: allow_unused must be True or "
            "not passed when materialize_grads=True); got allow_unused=False."
        )


def _check_names(names: Names, known: Sequence[str], caller: str) -> list[str]:
    chosen = [names] if isinstance(names, str) else list(names or ())
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


def _describe(h: _trace.Hit) -> str:
    return "[" + ", ".join(f"{s.dtype}{list(s.shape)}" for s in h.shapes) + "]"


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
            f"{caller}: on_repeat='sum' needs every hit of tap {n!r} to have the same structure, "
            f"shapes and dtypes, got {', '.join(_describe(h) for h in hs)}. Use "
            "on_repeat='split'."
        )
    return [n] * len(hs)


@dataclasses.dataclass(frozen=True)
class _Request:
    """What the caller asked for, checked when the transformation is built."""

    caller: str
    names: Names
    on_repeat: OnRepeat
    allow_unused: bool | None = None
    materialize_grads: bool = False


def _select(
    traced: _trace.Traced,
    inputs: Sequence[Any],
    req: _Request,
    *,
    for_grad: bool,
    differentiated: Sequence[bool],
) -> _Selection:
    """The taps to serve, checked against what the program holds.

    A hit whose tapped value reaches no output (dead code) does not count. For gradients, a
    key none of whose hits reaches the differentiated output differentiably is *unused*:
    an error, None or zeros as ``allow_unused`` / ``materialize_grads`` say.
    """
    caller = req.caller
    by_name = traced.by_name()
    if req.names is None:
        float_ok = lambda hs: not for_grad or all(h.differentiable for h in hs)
        chosen = [n for n, hs in by_name.items() if float_ok(hs)]
    else:
        chosen = _check_names(req.names, list(by_name), caller)
    for n in chosen:
        for h in by_name[n]:
            _check_hit(h, caller, for_grad)
    candidates = [h for n in chosen for h in by_name[n]]
    reach, diff = _trace.liveness(traced, inputs, candidates, differentiated)
    reaches = {h.path: r for h, r in zip(candidates, reach, strict=True)}
    diff_live = {h.path: d for h, d in zip(candidates, diff, strict=True)}
    keys: dict[_trace.Path, str] = {}
    trees: dict[str, Any] = {}
    shapes: dict[str, tuple[jax.ShapeDtypeStruct, ...]] = {}
    live_keys: set[str] = set()
    # Code traced only for its effects (Flax's nn.scan traces a parameter-only submodule
    # once more, its result unused) taps values that are live, parameters above all. A hit
    # whose result is discarded does not count when it taps the same value as a hit of the
    # name whose result is used; a statement-form tap of another value still counts.
    several = [h for n in chosen if len(by_name[n]) > 1 for h in by_name[n] if reaches[h.path]]
    used = dict(
        zip((h.path for h in several), _trace.results_reach(traced, inputs, several), strict=True)
    )
    roots = dict(zip((h.path for h in several), _trace.tapped_roots(traced, several), strict=True))
    for n in chosen:
        hs = [h for h in by_name[n] if reaches[h.path]]
        used_roots = {roots[h.path] for h in hs if used.get(h.path, False)}
        hs = [h for h in hs if used.get(h.path, True) or roots.get(h.path) not in used_roots]
        if not hs:  # every hit is dead code
            if for_grad:
                hs = by_name[n][:1]  # an unused tap: reported as the rules below say
            else:
                hs = by_name[n]  # values of dead code are still values
        for h, k in zip(hs, _keys_for(hs, req.on_repeat, caller), strict=True):
            trees[k], shapes[k] = h.tree, h.shapes
            if not for_grad or diff_live[h.path]:
                keys[h.path] = k
                live_keys.add(k)
    unused = [k for k in trees if k not in live_keys]
    if for_grad and unused:
        allow = req.allow_unused
        if req.names is None and allow is None and not req.materialize_grads:
            # names=None: the taps the output uses (all of them, zeros for the unused
            # ones, with materialize_grads=True)
            for k in unused:
                del trees[k], shapes[k]
            unused = []
        elif not (allow or req.materialize_grads):
            raise ValueError(
                f"{caller}: the output does not depend on tap {unused[0]!r} (its value reaches "
                "the output nowhere, or only through lax.stop_gradient or integer operations), "
                "so it has no gradient, as torch.autograd.grad says with allow_unused=False. "
                "Pass allow_unused=True to get None for it, materialize_grads=True to get "
                f"zeros, or leave {unused[0]!r} out of names."
            )
    return _Selection(
        _trace.Plan(keys), trees, shapes, frozenset(unused), bool(req.materialize_grads)
    )


def _out_mask(traced: _trace.Traced, has_aux: bool, caller: str) -> list[bool]:
    """Which output leaves are differentiated: all of them, or those of ``out`` in
    ``(out, aux)`` with ``has_aux``."""
    n = traced.out_tree.num_leaves
    state = [False] * traced.n_state  # module state after the call: not differentiated
    if not has_aux:
        return [True] * n + state
    idx = jax.tree.unflatten(traced.out_tree, list(range(n)))
    if not (isinstance(idx, (tuple, list)) and len(idx) == 2):
        avals = traced.jaxpr.out_avals[:n]
        returned = jax.tree.unflatten(
            traced.out_tree, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
        )
        what = (
            f"a {type(returned).__name__} of length {len(returned)}"
            if isinstance(returned, (tuple, list))
            else _checks.describe(returned)
        )
        raise TypeError(
            f"{caller}: with has_aux=True the function must return a pair (output, aux), "
            f"but it returned {what}. Return (output, aux), or drop "
            "has_aux=True."
        )
    y, _ = _checks.split_aux(idx, caller)
    chosen = set(jax.tree.leaves(y))
    return [i in chosen for i in range(n)] + state


def _intermediates_values(fn: Callable, req: _Request) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        traced = _trace.trace(fn, args, kwargs, dynamic_argnums=(), caller=req.caller)
        inputs = traced.inputs(args, kwargs)
        mask = [False] * (traced.out_tree.num_leaves + traced.n_state)
        sel = _select(traced, inputs, req, for_grad=False, differentiated=mask)
        outs, rec = _trace.run(traced.jaxpr.jaxpr, traced.jaxpr.consts, inputs, sel.plan, {})
        outs, state = traced.split_outputs(outs)
        outs = traced.restore_python_outs(outs, [True] * len(outs))
        traced.write_back(args, kwargs, state)
        assert rec is not None  # recorded: run's record=True
        return jax.tree.unflatten(traced.out_tree, outs), sel.unflatten(rec)

    return wrapped


def intermediates(
    fn: Callable[P, Any], names: Names = None, *, on_repeat: OnRepeat = "error"
) -> Callable[P, tuple[Any, dict[str, PyTree]]]:
    """Transforms ``fn`` to also return the values of its taps.

    A tap in a ``lax.cond``/``lax.switch`` branch reports the value from the branch that
    ran, and zeros where its branch did not run. A hit in dead code (its value reaches
    nothing ``fn`` returns) does not count when the name has a live hit.

    Args:
      fn: a function whose body calls `fgrad.tap`.
      names: a tap name or a sequence of names; ``None`` (default) means every tap.
      on_repeat: what to do with a tap name hit more than once in one call: ``"error"``
        (default), ``"split"`` (one entry per hit, keyed ``"name#0"``, ``"name#1"``, ...
        in program order) or ``"sum"`` (the hits' values summed).

    Returns:
      A function with ``fn``'s arguments returning ``(out, {name: value})``. A tap inside
      a ``lax.scan`` reports its values stacked on a leading axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> params = fgrad.models.seed_params()
      >>> (l, y), taps = fgrad.intermediates(fgrad.models.seed_net)(params, jnp.array([[4.0]]))
      >>> taps["l"]
      Array([[12.]], dtype=float32)
    """
    caller = "fgrad.intermediates"
    _check_names_arg(names, caller)
    _check_flags(caller, on_repeat, None, False)
    return with_params_of(fn, _intermediates_values(fn, _Request(caller, names, on_repeat)))


def _vjp(fn, req: _Request, args, kwargs, *, has_aux, argnums):
    """One forward pass of ``fn(*args, **kwargs)`` with zero perturbations at the chosen
    taps.

    Returns ``(out, pullback, aux)`` where ``pullback(ct)`` gives
    ``({name: leaves}, arg_grads_or_None)``.
    """
    caller = req.caller
    nums = None if argnums is None else _checks.normalize_argnums(argnums, len(args), caller)
    diff_args = () if nums is None else tuple(args[i] for i in nums)
    # Integer leaves of nnx modules (counters, RNG state) are held fixed and get no
    # gradient, as under nnx.grad's Param filter; any other integer leaf is an error.
    d_leaves, d_tree = jax.tree.flatten(diff_args)
    fixed = _nnx_integer_leaves(diff_args)
    _checks.require_float_tree(
        [x for x, f in zip(d_leaves, fixed, strict=True) if not f],
        caller,
        "the arguments chosen by argnums",
    )
    traced = _trace.trace(fn, args, kwargs, dynamic_argnums=nums or (), caller=req.caller)
    mask = _out_mask(traced, has_aux, caller)
    sel = _select(traced, traced.inputs(args, kwargs), req, for_grad=True, differentiated=mask)

    def with_fixed(float_leaves):
        it = iter(float_leaves)
        return [x if f else next(it) for x, f in zip(d_leaves, fixed, strict=True)]

    def forward(perturb, float_leaves):
        diff = jax.tree.unflatten(d_tree, with_fixed(float_leaves))
        full = list(args)
        for i, a in zip(nums or (), diff, strict=True):
            full[i] = a
        outs, _ = _trace.run(
            traced.jaxpr.jaxpr,
            traced.jaxpr.consts,
            traced.inputs(full, kwargs),
            sel.plan,
            perturb,
            record=False,  # the gradient needs the perturbations only
        )
        outs, state = traced.split_outputs(outs)
        outs = traced.restore_python_outs(outs, [not d for d in mask[: len(outs)]])
        out = jax.tree.unflatten(traced.out_tree, outs)
        if has_aux:
            y, aux = _checks.split_aux(out, caller)
            return y, (aux, state)
        return out, (None, state)

    floats = [x for x, f in zip(d_leaves, fixed, strict=True) if not f]
    out, pullback, (aux, state) = jax.vjp(forward, sel.zeros(), floats, has_aux=True)
    traced.write_back(args, kwargs, state)

    def pull(ct):
        conj_ct = jax.tree.map(_conj_if_complex, ct)
        tap_leaves, float_grads = pullback(conj_ct)
        no_grad = lambda x: np.zeros(np.shape(x), jax.dtypes.float0)  # as jax.grad(allow_int)
        it = iter(float_grads)
        arg_grads = jax.tree.unflatten(
            d_tree, [no_grad(x) if f else next(it) for x, f in zip(d_leaves, fixed, strict=True)]
        )
        # PyTorch's convention for complex values: the conjugate of JAX's cotangent.
        tap_leaves = jax.tree.map(_conj_if_complex, tap_leaves)
        taps = sel.unflatten(tap_leaves)
        if nums is None:
            return taps
        return taps, (arg_grads[0] if isinstance(argnums, int) else arg_grads)

    return out, pull, aux


def _check_cotangent_dtypes(out: Any, ct: Any, caller: str) -> None:
    """A cotangent leaf of a floating output leaf must be floating (complex only for a
    complex output leaf)."""
    paths = jax.tree_util.tree_leaves_with_path(ct)
    for (path, c), o in zip(paths, jax.tree.leaves(out), strict=True):
        c_dtype, o_dtype = jnp.result_type(c), jnp.result_type(o)
        if not jnp.issubdtype(o_dtype, jnp.inexact):
            continue  # an integer output: JAX's own rule (a float0 cotangent)
        ok = jnp.issubdtype(c_dtype, jnp.inexact) and (
            jnp.issubdtype(o_dtype, jnp.complexfloating)
            or not jnp.issubdtype(c_dtype, jnp.complexfloating)
        )
        if not ok:
            where = jax.tree_util.keystr(path) or ""
            raise TypeError(
                f"{caller}: the pullback's cotangent{where} has dtype {c_dtype}, but the "
                f"output{where} it pairs with has dtype {o_dtype}: give a cotangent of dtype "
                f"{o_dtype} (e.g. jnp.ones_like(out){where})."
            )


def _nnx_integer_leaves(tree: Any) -> list[bool]:
    """Per leaf of ``tree``: whether it is a non-float leaf inside an nnx module."""
    import sys

    nnx = sys.modules.get("flax.nnx")
    is_mod = (lambda x: isinstance(x, nnx.Module)) if nnx is not None else (lambda x: False)
    out: list[bool] = []
    for node in jax.tree.leaves(tree, is_leaf=is_mod):
        if is_mod(node):
            out += [not _checks.is_float(x) for x in jax.tree.leaves(node)]
        else:
            out.append(False)
    return out


def _conj_if_complex(x):
    return jnp.conj(x) if jnp.iscomplexobj(x) else x


_UNUSED_DOC = """allow_unused: what to do with a requested tap the output does not depend on
        (its value reaches the output nowhere, or only through ``lax.stop_gradient`` or
        integer operations), as in ``torch.autograd.grad``: ``False`` raises an error
        naming it, ``True`` gives ``None`` for it. The default, ``None``, is ``False``
        for taps named in ``names`` (PyTorch's default) and leaves unused taps out of the
        result when ``names`` is ``None``.
      materialize_grads: give zeros instead of ``None`` for unused taps (implies
        ``allow_unused=True``, as in PyTorch, so ``allow_unused=False`` with it is an
        error); with ``names=None`` every floating-point tap is returned, zeros for
        the unused ones."""


def _value_and_grad(fn: Callable, req: _Request, has_aux: bool, argnums) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out, pull, aux = _vjp(fn, req, args, kwargs, has_aux=has_aux, argnums=argnums)
        y = _checks.scalar_output(
            out,
            req.caller,
            "For a non-scalar output use fgrad.vjp_intermediates with a cotangent.",
        )
        grads = pull(jnp.ones_like(y))
        return ((out, aux) if has_aux else out), grads

    return wrapped


def value_and_grad_intermediates(
    fn: Callable[P, Any],
    names: Names = None,
    *,
    has_aux: bool = False,
    argnums: int | Sequence[int] | None = None,
    on_repeat: OnRepeat = "error",
    allow_unused: bool | None = None,
    materialize_grads: bool = False,
) -> Callable[P, tuple[Any, PyTree]]:
    """Transforms scalar ``fn`` to return its value and its gradient w.r.t. taps.

    The gradient at a tap is the gradient with respect to the tapped *value* through all of
    its uses, as PyTorch's ``retain_grad`` gives it, whether the tap's result is used,
    discarded (``fgrad.tap("h", h)`` written as a statement) or used beside ``h``. A tap
    inside a ``lax.scan`` body or a ``lax.cond`` branch counts the uses in that step or
    branch; a tap in a branch that did not run gets zeros. Complex taps get PyTorch's
    gradient (the conjugate of ``jax.grad``'s).

    Args:
      fn: a function returning a scalar (any array with one element, as PyTorch accepts
        in ``autograd.grad``), or ``(scalar, aux)`` with ``has_aux=True``. Keyword
        arguments and non-array arguments (a Python ``bool`` for ``if train:``, a
        ``str``) reach it as they are, as under ``jax.grad``.
      names: a tap name or a sequence of names; ``None`` (default) means every
        floating-point tap the output depends on.
      has_aux: whether ``fn`` returns ``(scalar, aux)``.
      argnums: also differentiate with respect to these positional arguments, in the same
        backward pass (``l.retain_grad()`` followed by ``loss.backward()``).
      on_repeat: a tap name hit more than once in one call (a layer applied twice) is an
        error (``"error"``, default); ``"split"`` gives one gradient per hit, keyed
        ``"name#0"``, ``"name#1"``, ... in program order; ``"sum"`` gives the sum of the
        hits' gradients (the gradient w.r.t. one value added at every hit). A hit in dead
        code (its value reaches nothing ``fn`` returns) does not count.
      {unused}

    Returns:
      A function with ``fn``'s arguments returning ``(value, grads)``, or
      ``((value, aux), grads)`` with ``has_aux``; ``grads`` is ``{{name: gradient}}``, or
      ``({{name: gradient}}, arg_grads)`` when ``argnums`` is given.

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
    _check_names_arg(names, caller)
    _check_flags(caller, on_repeat, allow_unused, materialize_grads)
    req = _Request(caller, names, on_repeat, allow_unused, materialize_grads)
    return with_params_of(fn, _value_and_grad(fn, req, has_aux, argnums))


def grad_intermediates(
    fn: Callable[P, Any],
    names: Names = None,
    *,
    has_aux: bool = False,
    argnums: int | Sequence[int] | None = None,
    on_repeat: OnRepeat = "error",
    allow_unused: bool | None = None,
    materialize_grads: bool = False,
) -> Callable[P, PyTree]:
    """Transforms scalar ``fn`` to return its gradient w.r.t. its taps: ``autograd.grad(y, l)``.

    Every requested tap's gradient comes from one forward and one backward pass. The
    result is differentiable (PyTorch's ``create_graph=True`` is always on), so a loss may
    contain it. The gradient at a tap counts every use of the tapped value (PyTorch's
    ``retain_grad``); see `value_and_grad_intermediates`.

    Args:
      fn: a function returning a scalar (any array with one element, as PyTorch accepts
        in ``autograd.grad``), or ``(scalar, aux)`` with ``has_aux=True``.
      names: a tap name or a sequence of names; ``None`` (default) means every
        floating-point tap the output depends on.
      has_aux: whether ``fn`` returns ``(scalar, aux)``.
      argnums: also differentiate with respect to these positional arguments.
      on_repeat: ``"error"`` (default), ``"split"`` or ``"sum"``; see
        `value_and_grad_intermediates`.
      {unused}

    Returns:
      A function with ``fn``'s arguments returning ``{{name: gradient}}`` (each shaped like
      the tapped value; stacked on a leading axis for a tap inside ``lax.scan``),
      ``({{name: gradient}}, arg_grads)`` when ``argnums`` is given, and ``(grads, aux)``
      with ``has_aux``.

    Examples:
      The seed notebook's ``autograd.grad(outputs=y, inputs=l)``:

      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> net = lambda p, x: fgrad.models.seed_net(p, x)[1]
      >>> fgrad.grad_intermediates(net, "l")(fgrad.models.seed_params(), jnp.array([[4.0]]))
      {{'l': Array([[120.]], dtype=float32)}}

      A tap written as a statement, as ``h.retain_grad()`` is, counts every use of ``h``:

      >>> def f(x):
      ...     h = jnp.tanh(x)
      ...     fgrad.tap("h", h)
      ...     return jnp.sum(h ** 2)
      >>> fgrad.grad_intermediates(f)(jnp.zeros(2))
      {{'h': Array([0., 0.], dtype=float32)}}
    """
    caller = "fgrad.grad_intermediates"
    _check_names_arg(names, caller)
    _check_flags(caller, on_repeat, allow_unused, materialize_grads)
    req = _Request(caller, names, on_repeat, allow_unused, materialize_grads)
    vg = _value_and_grad(fn, req, has_aux, argnums)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        (value, grads) = vg(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return with_params_of(fn, wrapped)


def vjp_intermediates(
    fn: Callable[P, Any],
    names: Names = None,
    *,
    has_aux: bool = False,
    argnums: int | Sequence[int] | None = None,
    on_repeat: OnRepeat = "error",
    allow_unused: bool | None = None,
    materialize_grads: bool = False,
) -> Callable[P, tuple[Any, Callable[[Any], PyTree]]]:
    """Transforms ``fn`` to return its output and a reusable pullback to its taps.

    This is ``retain_graph=True``, always: the pullback is a pure function that can be
    called any number of times, with any cotangent, and differentiated again. The
    gradient at a tap counts every use of the tapped value (PyTorch's ``retain_grad``).

    Args:
      fn: any function of arrays whose body calls `fgrad.tap`; its output need not be
        a scalar.
      names: a tap name or a sequence of names; ``None`` (default) means every
        floating-point tap the output depends on.
      has_aux: whether ``fn`` returns ``(output, aux)``; the aux is not differentiated.
      argnums: the pullback also returns the gradient w.r.t. these positional arguments.
      on_repeat: ``"error"`` (default), ``"split"`` or ``"sum"``; see
        `value_and_grad_intermediates`.
      {unused}

    Returns:
      A function with ``fn``'s arguments returning ``(out, pullback)``, or
      ``(out, pullback, aux)`` with ``has_aux``. ``pullback(ct)`` takes a cotangent shaped
      like ``out`` (PyTorch's ``grad_outputs``) and returns ``{{name: gradient}}``, or
      ``({{name: gradient}}, arg_grads)`` with ``argnums``.

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
    _check_names_arg(names, caller)
    _check_flags(caller, on_repeat, allow_unused, materialize_grads)
    req = _Request(caller, names, on_repeat, allow_unused, materialize_grads)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out, pull, aux = _vjp(fn, req, args, kwargs, has_aux=has_aux, argnums=argnums)

        def pullback(ct):
            diff = _checks.first_structure_difference(out, ct)
            if diff is not None:
                raise ValueError(
                    f"{caller}: the cotangent must have the structure and shapes of the "
                    f"function's output, {_checks.describe_tree(out)}, but cotangent{diff} "
                    f"(given: {_checks.describe_tree(ct)})."
                )
            _check_cotangent_dtypes(out, ct, caller)
            return pull(ct)

        return (out, pullback, aux) if has_aux else (out, pullback)

    return with_params_of(fn, wrapped)


for _f in (value_and_grad_intermediates, grad_intermediates, vjp_intermediates):
    _f.__doc__ = (_f.__doc__ or "").format(unused=_UNUSED_DOC)
