"""Finding taps in a traced program and re-running it with taps read and perturbed.

`trace` turns ``fn(*args)`` into a jaxpr once. `find_sites` walks it (sub-programs
included) and reports every tap: its name, the shapes its gradient has (stacked on a
leading axis per enclosing ``scan``) and whether it can be served at all. `run`
evaluates the jaxpr again, binding every primitive as it is, except that taps are
recorded and have a perturbation added. Differentiating `run` with respect to the
perturbations (all zero) gives the gradient with respect to every tap in one backward
pass; that is how `fgrad.grad_intermediates` works.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.extend import core as jcore

from fgrad._tap import is_tap

# Primitives whose sub-program runs exactly once per call: taps inside them are served
# by evaluating the sub-program inline (call-like) or under jax.checkpoint (remat).
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_REMATS = frozenset({"remat2", "checkpoint", "remat"})
_SCANS = frozenset({"scan"})

# Why a tap inside these cannot be served, said in the error.
_BLOCKED_WHY = {
    "while": (
        "lax.while_loop (or a fori_loop with traced bounds): its number of iterations is "
        "not known when tracing, so there is nowhere to stack one gradient per iteration, "
        "and JAX cannot reverse-differentiate it anyway. Use lax.scan, or fori_loop with "
        "Python-int bounds (which becomes a scan)"
    ),
    "cond": (
        "a lax.cond/lax.switch branch: a tap that may or may not run has no well-defined "
        "value. Move the tap outside the cond (tap its result)"
    ),
    "custom_jvp_call": (
        "a jax.custom_jvp function: its derivative comes from the custom rule, which "
        "never sees the tap. Move the tap outside the custom_jvp function"
    ),
    "custom_vjp_call": (
        "a jax.custom_vjp function: its gradient comes from the custom backward rule, "
        "which never sees the tap. Move the tap outside the custom_vjp function"
    ),
}


Path = tuple[int, ...]  # equation index, then (equation, sub-program) index pairs


@dataclasses.dataclass(frozen=True)
class Hit:
    """One place in a traced program where a tap is applied."""

    name: str
    path: Path  # where: unique per hit, stable across re-traces of the same program
    tree: Any  # PyTreeDef of the tapped value
    shapes: tuple[jax.ShapeDtypeStruct, ...]  # per leaf, stacked per enclosing scan
    blocked: str | None = None  # why it cannot be served, or None

    @property
    def differentiable(self) -> bool:
        return all(jax.numpy.issubdtype(s.dtype, jax.numpy.inexact) for s in self.shapes)


@dataclasses.dataclass(frozen=True)
class Traced:
    """``fn(*args)`` as a closed jaxpr, with its taps."""

    jaxpr: Any  # ClosedJaxpr
    out_tree: Any
    hits: tuple[Hit, ...]  # in program order

    def by_name(self) -> dict[str, list[Hit]]:
        out: dict[str, list[Hit]] = {}
        for h in self.hits:
            out.setdefault(h.name, []).append(h)
        return out


def _as_open(j):
    """(jaxpr, consts) from a Jaxpr or a ClosedJaxpr."""
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, j.consts
    return j, ()


def _sub_jaxprs(params) -> list:
    return list(jcore.jaxprs_in_params(params))


def _has_tap(jaxpr, memo: dict) -> bool:
    """Whether ``jaxpr`` or a sub-program holds a tap (memoised by identity)."""
    key = id(jaxpr)
    if key not in memo:
        found = any(
            is_tap(e) or any(_has_tap(sub, memo) for sub in _sub_jaxprs(e.params))
            for e in jaxpr.eqns
        )
        memo[key] = (jaxpr, found)  # keep jaxpr alive so its id stays unique
    return memo[key][1]


def trace(fn, args: Sequence[Any]) -> Traced:
    """Traces ``fn(*args)`` to a jaxpr and finds its taps."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out_tree = jax.tree.structure(out_shape)
    return Traced(closed, out_tree, tuple(find_hits(closed.jaxpr)))


def find_hits(jaxpr) -> list[Hit]:
    """Every tap application of ``jaxpr``, sub-programs included, in program order."""
    hits: list[Hit] = []
    _collect(jaxpr, (), (), None, hits, {})
    return hits


def _collect(jaxpr, prefix: Path, stack, blocked, hits: list, memo: dict):
    for i, eqn in enumerate(jaxpr.eqns):
        if is_tap(eqn):
            shapes = tuple(
                jax.ShapeDtypeStruct((*stack, *v.aval.shape), v.aval.dtype) for v in eqn.invars
            )
            hits.append(Hit(eqn.params["name"], (*prefix, i), eqn.params["tree"], shapes, blocked))
            continue
        subs = _sub_jaxprs(eqn.params)
        if not subs:
            continue
        prim = eqn.primitive.name
        if prim in _SCANS:
            inner_stack, inner_blocked = (*stack, int(eqn.params["length"])), blocked
        elif prim in _CALLS or prim in _REMATS:
            inner_stack, inner_blocked = stack, blocked
        else:
            inner_stack = stack
            inner_blocked = blocked or _BLOCKED_WHY.get(
                prim, f"the higher-order primitive `{prim}`, which fgrad cannot see into"
            )
        for j, sub in enumerate(subs):
            if _has_tap(sub, memo):
                _collect(sub, (*prefix, i, j), inner_stack, inner_blocked, hits, memo)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `run` does at each requested tap: the key its perturbation and value go under.

    Several hits may share a key: their perturbation is the same array (so the gradient
    is the sum over hits) and their recorded values are summed.

    ``at_tap`` (optional; `fgrad.with_hooks` uses it) computes a planned tap's output:
    ``at_tap(key, leaves, steps, bind)``, where ``steps`` holds the step index of each
    enclosing ``scan`` (outermost first) and ``bind(leaves)`` re-binds the tap itself.
    """

    keys: Mapping[Path, str]
    at_tap: Any = None
    steps: tuple = ()

    def within(self, prefix: Path) -> Plan:
        keys = {p: k for p, k in self.keys.items() if _inside(p, prefix)}
        return dataclasses.replace(self, keys=keys)

    def enters(self, prefix: Path) -> bool:
        return any(_inside(p, prefix) for p in self.keys)


def _inside(path: Path, prefix: Path) -> bool:
    """Whether ``path`` lies strictly inside the sub-program(s) at ``prefix``."""
    return len(path) > len(prefix) and path[: len(prefix)] == prefix


def run(
    jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    plan: Plan,
    perturb: Mapping[str, Sequence[Any]],
    *,
    record: bool = True,
) -> tuple[list[Any], dict[str, list[Any]] | None]:
    """Evaluates ``jaxpr``; at each tap in ``plan`` records the (unperturbed) leaves under
    the tap's key (unless ``record`` is false: then None is returned for them, and scans
    and checkpoints carry no recorded values out) and adds ``perturb[key]`` if given.

    Taps inside a ``scan`` take, and report, values stacked on a leading axis.
    """
    recorded: dict[str, list[Any]] | None = {} if record else None
    outs = _run(jaxpr, consts, args, (), plan, perturb, recorded)
    return outs, recorded


def _record(recorded: dict, key: str, leaves: Sequence[Any]) -> None:
    if key in recorded:  # hits that share a key are summed
        recorded[key] = [a + b for a, b in zip(recorded[key], leaves, strict=True)]
    else:
        recorded[key] = list(leaves)


def _run(jaxpr, consts, args, prefix, plan, perturb, recorded):
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        path = (*prefix, i)
        # The equation's context (e.g. config it was traced under), as jax.core.eval_jaxpr.
        ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
        with ctx:
            if is_tap(eqn):
                outs = _run_tap(eqn, invals, plan.keys.get(path), perturb, recorded, plan)
            elif plan.enters(path):
                outs = _run_higher(eqn, invals, path, plan, perturb, recorded)
            else:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _run_tap(eqn, invals, key, perturb, recorded, plan):
    if key is not None:
        if recorded is not None:
            _record(recorded, key, invals)
        if key in perturb:
            invals = [x + p.astype(x.dtype) for x, p in zip(invals, perturb[key], strict=True)]
    # Re-bind, so the tap stays visible to an fgrad transformation around this one.
    bind = lambda xs: eqn.primitive.bind(*xs, **eqn.params)
    if key is not None and plan.at_tap is not None:
        return plan.at_tap(key, invals, plan.steps, bind)
    return bind(invals)


def _run_higher(eqn, invals, path, plan, perturb, recorded):
    prim = eqn.primitive.name
    params = eqn.params
    sub_prefix = (*path, 0)  # these primitives have one sub-program
    sub, sub_consts = _as_open(params["jaxpr"] if "jaxpr" in params else params["call_jaxpr"])
    sub_plan = plan.within(sub_prefix)
    if prim in _CALLS:
        return _run(sub, sub_consts, invals, sub_prefix, sub_plan, perturb, recorded)
    sub_perturb = {k: perturb[k] for k in set(sub_plan.keys.values()) if k in perturb}
    record = recorded is not None
    if prim in _REMATS:

        def body(xs, ps):
            rec: dict[str, list[Any]] | None = {} if record else None
            outs = _run(sub, sub_consts, xs, sub_prefix, sub_plan, ps, rec)
            return outs, rec

        outs, rec = jax.checkpoint(
            body, prevent_cse=params.get("prevent_cse", True), policy=params.get("policy")
        )(list(invals), sub_perturb)
    elif prim in _SCANS:
        outs, rec = _run_scan(
            params, sub, sub_consts, invals, sub_prefix, sub_plan, sub_perturb, record
        )
    else:
        # find_hits marks these taps as blocked, and the public functions refuse to serve
        # blocked taps before running: reaching here is a bug in fgrad, not in the caller.
        raise AssertionError(f"fgrad: cannot serve taps inside `{prim}`")
    for k, leaves in (rec or {}).items():
        _record(recorded, k, leaves)
    return outs


def _scan_operands(params, invals) -> tuple[list, list, list]:
    """A scan's operands split into (consts, initial carry, xs). JAX up to 0.10 counts
    them (``num_consts``, ``num_carry``); JAX 0.11 describes them as a flat tree
    (``ft_in``)."""
    if "ft_in" in params:
        consts, init, xs = params["ft_in"].update(list(invals)).unpack()
        return list(consts), list(init), list(xs)
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    return (
        list(invals[:n_consts]),
        list(invals[n_consts : n_consts + n_carry]),
        list(invals[n_consts + n_carry :]),
    )


def _run_scan(params, body, body_consts, invals, prefix, plan, perturb, record):
    consts, init, xs = _scan_operands(params, invals)
    n_carry = len(init)

    # With at_tap, each step also gets its index (for hooks that ask for it).
    index = jax.numpy.arange(params["length"]) if plan.at_tap is not None else None

    def step(carry, x):
        x_t, p_t, i = x
        inner = plan if i is None else dataclasses.replace(plan, steps=(*plan.steps, i))
        rec: dict[str, list[Any]] | None = {} if record else None
        outs = _run(body, body_consts, [*consts, *carry, *x_t], prefix, inner, p_t, rec)
        return outs[:n_carry], (outs[n_carry:], rec)

    carry, (ys, rec) = jax.lax.scan(
        step,
        list(init),
        (list(xs), perturb, index),
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    return [*carry, *ys], rec
