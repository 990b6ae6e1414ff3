"""Hooks at taps: change a tapped value, or the gradient flowing back through it.

PyTorch: ``module.register_forward_hook`` returning a replacement,
``register_forward_pre_hook``, ``tensor.register_hook`` and
``register_full_backward_pre_hook``. fgrad: `with_hooks` traces the function, finds the
taps whose names match the given patterns and evaluates the traced program again with,
at each such tap, the forward hooks applied to the value and the value wrapped in an
identity whose ``jax.custom_vjp`` backward applies the backward hooks.

A hook acts on the tapped *value*, through all of its uses: before evaluating, every tap
is moved to right after the definition of the value it taps and every later use of that
value is redirected through the tap, so ``fgrad.tap("h", h)`` written as a statement
hooks ``h`` everywhere (as a hook on a PyTorch tensor sees every use of the tensor).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from fgrad import _trace
from fgrad._globs import match as glob_match
from fgrad._tap import is_tap

_CALLER = "fgrad.with_hooks"

Hooks = Mapping[str, Any] | None


# ---------------------------------------------------------------------------------------
# Patterns


def matches(name: str, pattern: str) -> bool:
    """Whether tap ``name`` is chosen by ``pattern`` (its exact name, or a glob)."""
    return name == pattern or glob_match(name, pattern)


# ---------------------------------------------------------------------------------------
# Taps at the definition of the value they tap


def _normalize_closed(closed, hooked: Callable[[str], bool] = lambda name: False):
    return closed.replace(jaxpr=_normalize(closed.jaxpr, {}, hooked))


def _normalize_param(v, memo, hooked):
    if isinstance(v, jcore.ClosedJaxpr):
        new = _normalize(v.jaxpr, memo, hooked)
        return v if new is v.jaxpr else v.replace(jaxpr=new)
    if isinstance(v, jcore.Jaxpr):
        return _normalize(v, memo, hooked)
    if isinstance(v, tuple) and any(isinstance(x, jcore.ClosedJaxpr | jcore.Jaxpr) for x in v):
        new = tuple(_normalize_param(x, memo, hooked) for x in v)
        return v if all(a is b for a, b in zip(new, v, strict=True)) else new
    return v


def _lift(eqn, hooked: Callable[[str], bool]) -> tuple[Any, list]:
    """For a jit or checkpoint equation: the hooked taps at the top of its (normalized)
    sub-program that tap only its inputs, taken out of it and returned as taps of the
    caller's variables, to be bound before ``eqn``; and ``eqn`` reading their results.
    A tap of an input then hooks the value through its uses outside the sub-program too
    (jit and checkpoint are transparent), as `_trace` places such taps' perturbations."""
    prim = eqn.primitive.name
    if prim not in _trace._CALLS and prim not in _trace._REMATS:
        return eqn, []
    key = "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"
    sub = eqn.params.get(key)
    closed = isinstance(sub, jcore.ClosedJaxpr)
    body = sub.jaxpr if closed else sub
    if not isinstance(body, jcore.Jaxpr):
        return eqn, []
    pos = {v: i for i, v in enumerate(body.invars)}
    keep, lifted, subst = [], [], {}
    invars = list(eqn.invars)
    for e in body.eqns:
        vars_in = [v for v in e.invars if isinstance(v, jcore.Var) and v in pos]
        liftable = is_tap(e) and hooked(e.params["name"]) and len(vars_in) == len(e.invars)
        outer_in = [eqn.invars[pos[v]] for v in vars_in] if liftable else []
        if not liftable or any(isinstance(v, jcore.Literal) for v in outer_in):
            keep.append(e)
            continue
        outer_out = [jcore.Var(v.aval) for v in outer_in]
        lifted.append(e.replace(invars=outer_in, outvars=outer_out))
        for v, o in zip(e.invars, e.outvars, strict=True):
            subst[o] = v
        for v, o in zip(vars_in, outer_out, strict=True):
            invars[pos[v]] = o
    if not lifted:
        return eqn, []
    sub_v = lambda v: subst.get(v, v) if isinstance(v, jcore.Var) else v
    keep = [
        e.replace(invars=[sub_v(v) for v in e.invars])
        if any(isinstance(v, jcore.Var) and v in subst for v in e.invars)
        else e
        for e in keep
    ]
    new_body = body.replace(eqns=keep, outvars=[sub_v(v) for v in body.outvars])
    new_sub = sub.replace(jaxpr=new_body) if closed else new_body
    return eqn.replace(invars=invars, params={**eqn.params, key: new_sub}), lifted


def _normalize(jaxpr, memo: dict, hooked: Callable[[str], bool]):
    """``jaxpr`` with every tap moved to just after the definition of what it taps, and
    every later use of a tapped variable reading the tap's output instead (sub-programs
    included; a tap of a jit's or checkpoint's input becomes a tap of the caller's
    variable). The program computes the same; only where a tap's output is used changes.

    A hooked tap of several values defined at different places cannot be placed after
    them all without missing the uses of the earlier ones in between: refused."""
    if id(jaxpr) in memo:
        return memo[id(jaxpr)][1]
    out: list = []
    subst: dict = {}
    sub = lambda v: subst.get(v, v) if isinstance(v, jcore.Var) else v
    changed = False
    pending = list(jaxpr.eqns)
    pending.reverse()
    while pending:
        eqn = pending.pop()
        params = {k: _normalize_param(v, memo, hooked) for k, v in eqn.params.items()}
        if any(params[k] is not eqn.params[k] for k in params):
            changed = True
            eqn = eqn.replace(params=params)
        eqn, lifted = _lift(eqn, hooked)
        if lifted:  # bind the lifted taps first, then the equation (reading their results)
            changed = True
            pending.append(eqn)
            pending.extend(reversed(lifted))
            continue
        invars = [sub(v) for v in eqn.invars]
        if any(a is not b for a, b in zip(invars, eqn.invars, strict=True)):
            eqn = eqn.replace(invars=invars)
        if not is_tap(eqn):
            out.append(eqn)
            continue
        outvars = [jcore.Var(v.aval) if isinstance(v, jcore.DropVar) else v for v in eqn.outvars]
        eqn = eqn.replace(outvars=outvars)
        tapped = {
            v: o for v, o in zip(eqn.invars, outvars, strict=True) if isinstance(v, jcore.Var)
        }
        where = 0
        for i, e in enumerate(out):
            if any(o in tapped for o in e.outvars):
                where = i + 1
        if hooked(eqn.params["name"]) and any(
            isinstance(v, jcore.Var) and v in tapped for e in out[:where] for v in e.invars
        ):
            raise ValueError(
                f"{_CALLER}: tap {eqn.params['name']!r} is hooked, but it taps several values "
                "and one of them is used before the last of them is computed, so a hook on "
                "the whole tapped value cannot act on that use. Tap each value separately "
                "(fgrad.tap(name, value) right where it is computed) and hook those."
            )
        later = []
        for e in out[where:]:
            if any(isinstance(v, jcore.Var) and v in tapped for v in e.invars):
                e = e.replace(
                    invars=[tapped.get(v, v) if isinstance(v, jcore.Var) else v for v in e.invars]
                )
            later.append(e)
        out[where:] = [eqn, *later]
        subst.update(tapped)
        changed = True
    if changed:
        outvars = [sub(v) for v in jaxpr.outvars]
        new = jaxpr.replace(eqns=out, outvars=outvars)
    else:
        new = jaxpr
    memo[id(jaxpr)] = (jaxpr, new)  # keep jaxpr alive so its id stays unique
    return new


# ---------------------------------------------------------------------------------------
# Hooks


@dataclasses.dataclass(frozen=True)
class _Hook:
    kind: str  # "forward" or "backward"
    pattern: str
    fn: Callable | None  # a callable hook, or
    const: Any  # an array (pytree) replacing the value
    wants: frozenset[str]  # keyword arguments it asks for: "step", "value"


def _is_array_tree(x) -> bool:
    leaves = jax.tree.leaves(x)
    return bool(leaves) and all(isinstance(a, jax.Array | np.ndarray | np.generic) for a in leaves)


def _asks_for(fn: Callable) -> frozenset[str]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: asks for nothing
        return frozenset()
    return frozenset(n for n in ("step", "value") if n in params)


def _parse(hooks: Hooks, kind: str) -> list[_Hook]:
    if hooks is None:
        return []
    if not isinstance(hooks, Mapping):
        raise TypeError(
            f"{_CALLER}: {kind}= must be a dict {{pattern: hook}}, got {type(hooks).__name__}."
        )
    out = []
    for pattern, hook in hooks.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(
                f"{_CALLER}: {kind}= keys must be tap names or glob patterns (non-empty "
                f"strings), got {pattern!r}."
            )
        if callable(hook):
            wants = _asks_for(hook)
            if kind == "forward" and "value" in wants:
                raise TypeError(
                    f"{_CALLER}: the forward hook for {pattern!r} asks for `value`, which only "
                    "backward hooks are given (a forward hook receives the value as its "
                    "argument). Rename the parameter."
                )
            out.append(_Hook(kind, pattern, hook, None, wants))
        elif _is_array_tree(hook):
            out.append(_Hook(kind, pattern, None, hook, frozenset()))
        else:
            what = "value" if kind == "forward" else "gradient"
            raise TypeError(
                f"{_CALLER}: the {kind} hook for {pattern!r} is a {type(hook).__name__}, which "
                f"is neither callable nor an array. Pass a function of the {what} (returning "
                f"its replacement) or an array to replace the {what} with."
            )
    return out


def _describe(x) -> str:
    leaves, tree = jax.tree.flatten(x)

    def one(a):
        shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
        if shape is None or dtype is None:
            return type(a).__name__
        return f"{jnp.dtype(dtype).name}[{','.join(str(d) for d in shape)}]"

    if tree == jax.tree.structure(0):  # type: ignore[operator]  # PyTreeDef: untyped
        return one(leaves[0])
    return str(jax.tree.unflatten(tree, [one(a) for a in leaves])).replace("'", "")


def _same_type(a, b) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    if tree_a != tree_b:  # type: ignore[operator]  # PyTreeDef: untyped
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if getattr(y, "shape", None) is None or getattr(y, "dtype", None) is None:
            return False
        if tuple(x.shape) != tuple(y.shape) or jnp.dtype(x.dtype) != jnp.dtype(y.dtype):
            return False
    return True


def _apply(hook: _Hook, x, hit: _trace.Hit, steps: tuple, value=None):
    """``hook`` applied to ``x`` (the value, or its gradient) at ``hit``, checked."""
    what = "value" if hook.kind == "forward" else "gradient"
    if hook.fn is None:
        new = hook.const
        stacked = jax.tree.unflatten(
            hit.tree, [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in hit.shapes]
        )
        if steps and not _same_type(x, new) and _same_type(stacked, new):
            new = jax.tree.map(lambda a: a[tuple(steps)], new)  # one slice per scan step
    else:
        kwargs = {}
        if "step" in hook.wants:
            if not steps:
                raise ValueError(
                    f"{_CALLER}: the {hook.kind} hook for tap {hit.name!r} asks for `step`, "
                    "but the tap is not inside a lax.scan. Drop the `step` parameter, or "
                    "give it a default and use a separate hook here."
                )
            kwargs["step"] = steps[-1]
        if "value" in hook.wants:
            kwargs["value"] = value
        new = hook.fn(x, **kwargs)
    if not _same_type(x, new):
        per = " per scan step" if steps else ""
        raise ValueError(
            f"{_CALLER}: the {hook.kind} hook for tap {hit.name!r} (pattern {hook.pattern!r}) "
            f"gave {_describe(new)}, but the tap's {what} is {_describe(x)}{per}. A hook must "
            f"return a {what} of the same structure, shapes and dtypes (under vmap, the "
            "shapes of one example)."
        )
    return new


def _backward_identity(hit: _trace.Hit, hooks: list[_Hook]) -> Callable:
    """The identity on the tap's leaves, whose backward applies ``hooks`` to the gradient."""
    keep_value = any("value" in h.wants for h in hooks)

    @jax.custom_vjp
    def ident(leaves, steps):
        del steps
        return list(leaves)

    def fwd(leaves, steps):
        # The output is the hooked identity again, not the plain leaves: a second
        # differentiation (create_graph=True) then meets the hook too, as PyTorch runs a
        # tensor's hook whenever a gradient flows into the tensor, double backward included.
        return ident(leaves, steps), (list(leaves) if keep_value else None, steps)

    def bwd(res, cts):
        value, steps = res
        g = jax.tree.unflatten(hit.tree, list(cts))
        v = None if value is None else jax.tree.unflatten(hit.tree, value)
        for h in hooks:
            g = _apply(h, g, hit, steps, value=v)
        return hit.tree.flatten_up_to(g), None

    ident.defvjp(fwd, bwd)
    return ident


@dataclasses.dataclass(frozen=True)
class _Site:
    hit: _trace.Hit
    forward: list[_Hook]
    backward: list[_Hook]

    def __call__(self, leaves, steps, bind):
        steps = tuple(steps)
        # A tapped Python number reaches here as the jaxpr's literal: make it an array of
        # the tap's dtype, so hooks see (and are checked against) an array like any other.
        leaves = [
            a if isinstance(a, jax.Array) else jnp.asarray(a, s.dtype)
            for a, s in zip(leaves, self.hit.shapes, strict=True)
        ]
        x = jax.tree.unflatten(self.hit.tree, list(leaves))
        for h in self.forward:
            x = _apply(h, x, self.hit, steps)
        leaves = bind(self.hit.tree.flatten_up_to(x))  # the tap, seen by transforms around
        if self.backward:
            leaves = _backward_identity(self.hit, self.backward)(list(leaves), steps)
        return list(leaves)


def _sites(hits, forward: list[_Hook], backward: list[_Hook]) -> dict[_trace.Path, _Site]:
    names = list(dict.fromkeys(h.name for h in hits))
    for hook in (*forward, *backward):
        if not any(matches(n, hook.pattern) for n in names):
            listed = ", ".join(repr(n) for n in names) or "none"
            raise ValueError(
                f"{_CALLER}: {hook.kind} hook pattern {hook.pattern!r} matches no tap hit while "
                f"tracing the function; its taps are: {listed}. Mark the value with "
                "fgrad.tap(name, value) (or tap a Flax module with fgrad.tap_linen / "
                "fgrad.tap_nnx) and use its name; in a glob, `*` stays within one `/` "
                "segment and `**` crosses them."
            )
    sites = {}
    for h in hits:
        f = [k for k in forward if matches(h.name, k.pattern)]
        b = [k for k in backward if matches(h.name, k.pattern)]
        if not f and not b:
            continue
        if h.blocked:
            raise ValueError(
                f"{_CALLER}: tap {h.name!r} is hooked but cannot be served: it is inside "
                f"{h.blocked}."
            )
        if b and not h.differentiable:
            dtypes = ", ".join(sorted({str(s.dtype) for s in h.shapes}))
            raise TypeError(
                f"{_CALLER}: backward hook pattern {b[0].pattern!r} matches tap {h.name!r}, "
                f"which holds {dtypes} values: no gradient flows through it, so the hook "
                "would never run. Hook a floating-point tap instead."
            )
        sites[h.path] = _Site(h, f, b)
    return sites


def _changes_state(traced: _trace.Traced) -> bool:
    """Whether the call changed the state of an nnx module among the arguments (so it must
    be written back); not when every state output is its input passed through, so that a
    model inside a transformation around this one (jit, grad) is not needlessly mutated."""
    if not traced.n_state:
        return False
    if traced.closed:
        return True
    j = traced.jaxpr.jaxpr
    after = j.outvars[len(j.outvars) - traced.n_state :]
    return any(a is not b for a, b in zip(after, j.invars, strict=True))


def with_hooks(fn: Callable, *, forward: Hooks = None, backward: Hooks = None) -> Callable:
    """Transforms ``fn`` to change tapped values, or the gradients flowing back through them.

    PyTorch's hooks, done functionally. At every tap whose name matches a pattern:

    .. math::

       h \\mapsto \\mathrm{forward}(h), \\qquad
       \\bar h \\mapsto \\mathrm{backward}(\\bar h)

    where :math:`\\bar h` is the gradient of the output with respect to the tapped value,
    summed over all its uses (``tensor.register_hook``). The result is a plain function
    of ``fn``'s arguments: jit, vmap (hooks see one example), grad (also
    nested: the backward hooks' computation is differentiated, as PyTorch's
    ``create_graph=True`` does), `fgrad.grad_intermediates` (whose gradient at a hooked tap
    is the one after the backward hooks, as ``retain_grad`` reports it) and the rest
    compose with it. A tap inside ``lax.scan`` is hooked on every step, and inside
    ``jax.checkpoint`` as well.

    A hook acts on the tapped value through all of its uses, wherever the tap is written
    (``fgrad.tap("h", h)`` as a statement hooks ``h``; a tap of an input of a ``jax.jit``
    or ``jax.checkpoint`` function also hooks the caller's uses of that input). To act on
    one branch only, tap a value only that branch uses, as PyTorch code hooks a
    ``.clone()``. A hooked tap of a pytree whose leaves are computed at different places
    is refused when an earlier leaf is used before the last is computed: tap the leaves
    separately. Backward hooks are
    ``jax.custom_vjp`` rules, so forward mode (``jax.jvp``) through a backward-hooked tap
    is refused by JAX; `fgrad.hvp` falls back to reverse-over-reverse there.

    Hooks are applied in the dict's order where several patterns match a tap, on every hit
    of the tap (a module called twice is hooked twice). A hook may ask for keyword
    arguments by naming them: ``step`` (the index of the enclosing ``lax.scan``'s step,
    innermost) and, for backward hooks, ``value`` (the tapped value in the forward pass,
    e.g. for guided backprop).

    Args:
      fn: a function whose body calls `fgrad.tap` (or wrapped by `fgrad.tap_linen` /
        `fgrad.tap_nnx`).
      forward: ``{pattern: hook}`` with ``hook(value) -> value'`` (PyTorch's forward hook
        returning a replacement), or ``{pattern: array}`` to replace the value with a
        constant (an array shaped like the value, or inside ``lax.scan`` stacked over the
        steps).
      backward: ``{pattern: hook}`` with ``hook(g) -> g'``, or ``hook(g, value=...)``;
        or an array to replace the gradient with.

    Patterns are tap names or globs, as `fgrad.tap_linen` reads module paths: ``*``
    matches within one ``/``-separated segment, ``**`` across segments, ``?`` one
    character, ``[seq]`` a character class, and a lone ``"*"`` every tap. Each pattern
    must match a tap.

    Returns:
      A function with ``fn``'s arguments and output.

    Examples:
      Gradient reversal (``h.register_hook(lambda g: -g)``):

      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> def f(w, x):
      ...     h = fgrad.tap("h", w * x)
      ...     return jnp.sum(h ** 2)
      >>> reversed_f = fgrad.with_hooks(f, backward={"h": lambda g: -g})
      >>> jax.grad(f)(2.0, jnp.array([1.0, 3.0])), jax.grad(reversed_f)(2.0, jnp.array([1.0, 3.0]))
      (Array(40., dtype=float32, weak_type=True), Array(-40., dtype=float32, weak_type=True))

      Activation patching (a forward hook returning a replacement):

      >>> patched = fgrad.with_hooks(f, forward={"h": jnp.array([0.0, 1.0])})
      >>> patched(2.0, jnp.array([1.0, 3.0]))
      Array(1., dtype=float32)
    """
    fwd_hooks = _parse(forward, "forward")
    bwd_hooks = _parse(backward, "backward")
    if not callable(fn):
        raise TypeError(f"{_CALLER}: fn must be callable, got {type(fn).__name__}.")

    hooked = lambda name: any(matches(name, h.pattern) for h in (*fwd_hooks, *bwd_hooks))

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        # Arrays traced, Python numbers/bools/strings passed as they are (``if train:``
        # works), as jax.grad passes non-differentiated arguments; nnx modules' state
        # changes (BatchNorm statistics) are written back, as nnx.grad does.
        traced = _trace.trace(fn, args, kwargs, dynamic_argnums=(), caller=_CALLER)
        closed = _normalize_closed(traced.jaxpr, hooked)
        sites = _sites(_trace.find_hits(closed.jaxpr), fwd_hooks, bwd_hooks)
        keys = {path: str(i) for i, path in enumerate(sites)}
        by_key = {str(i): site for i, site in enumerate(sites.values())}
        at_tap = lambda key, leaves, steps, bind: by_key[key](leaves, steps, bind)
        plan = _trace.Plan(keys, at_tap=at_tap)
        outs, _ = _trace.run(
            closed.jaxpr, closed.consts, traced.inputs(args, kwargs), plan, {}, record=False
        )
        outs, state = traced.split_outputs(outs)
        if _changes_state(traced):
            traced.write_back(args, kwargs, state)
        return jax.tree.unflatten(traced.out_tree, outs)

    return wrapped
