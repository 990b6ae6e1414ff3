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


@dataclasses.dataclass(frozen=True)
class Site:
    """A tap found in a traced program."""

    name: str
    tree: Any  # PyTreeDef of the tapped value
    shapes: tuple[jax.ShapeDtypeStruct, ...]  # per leaf, stacked per enclosing scan
    count: int = 1  # how many times the program hits it (per scan step)
    blocked: str | None = None  # why it cannot be served, or None

    @property
    def differentiable(self) -> bool:
        return all(jax.numpy.issubdtype(s.dtype, jax.numpy.inexact) for s in self.shapes)


@dataclasses.dataclass(frozen=True)
class Traced:
    """``fn(*args)`` as a closed jaxpr, with its taps."""

    jaxpr: Any  # ClosedJaxpr
    out_tree: Any
    sites: dict[str, Site]


def _as_open(j):
    """(jaxpr, consts) from a Jaxpr or a ClosedJaxpr."""
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, j.consts
    return j, ()


def _sub_jaxprs(params) -> list:
    return list(jcore.jaxprs_in_params(params))


def _tap_names(jaxpr, memo: dict) -> frozenset[str]:
    """Names of every tap in ``jaxpr`` and its sub-programs (memoised by identity)."""
    key = id(jaxpr)
    if key not in memo:
        names: set[str] = set()
        for e in jaxpr.eqns:
            if is_tap(e):
                names.add(e.params["name"])
            for sub in _sub_jaxprs(e.params):
                names |= _tap_names(sub, memo)
        memo[key] = (jaxpr, frozenset(names))  # keep jaxpr alive so its id stays unique
    return memo[key][1]


def trace(fn, args: Sequence[Any]) -> Traced:
    """Traces ``fn(*args)`` to a jaxpr and finds its taps."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out_tree = jax.tree.structure(out_shape)
    return Traced(closed, out_tree, find_sites(closed.jaxpr))


def find_sites(jaxpr) -> dict[str, Site]:
    """Every tap of ``jaxpr``, by name, in program order."""
    sites: dict[str, Site] = {}
    _collect(jaxpr, (), None, sites, {})
    return sites


def _collect(jaxpr, stack: tuple[int, ...], blocked: str | None, sites: dict, memo: dict):
    for eqn in jaxpr.eqns:
        if is_tap(eqn):
            name = eqn.params["name"]
            if name in sites:
                sites[name] = dataclasses.replace(sites[name], count=sites[name].count + 1)
                continue
            shapes = tuple(
                jax.ShapeDtypeStruct(stack + tuple(v.aval.shape), v.aval.dtype) for v in eqn.invars
            )
            sites[name] = Site(name, eqn.params["tree"], shapes, 1, blocked)
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
        for sub in subs:
            if _tap_names(sub, memo):
                _collect(sub, inner_stack, inner_blocked, sites, memo)


def run(
    jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    perturb: Mapping[str, Sequence[Any]],
    record: frozenset[str] | set[str],
) -> tuple[list[Any], dict[str, list[Any]]]:
    """Evaluates ``jaxpr``; taps in ``perturb`` get the perturbation added, taps in
    ``record`` have their (unperturbed) leaves returned.

    Taps inside a ``scan`` take, and report, values stacked on a leading axis.
    """
    recorded: dict[str, list[Any]] = {}
    outs = _run(jaxpr, consts, args, perturb, frozenset(record), recorded, {})
    return outs, recorded


def _run(jaxpr, consts, args, perturb, record, recorded, memo):
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    wanted = set(perturb) | record
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        # The equation's context (e.g. config it was traced under), as jax.core.eval_jaxpr.
        ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
        with ctx:
            if is_tap(eqn):
                outs = _run_tap(eqn, invals, perturb, record, recorded)
            elif wanted and any(wanted & _tap_names(s, memo) for s in _sub_jaxprs(eqn.params)):
                outs = _run_higher(eqn, invals, perturb, record, recorded, memo)
            else:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _run_tap(eqn, invals, perturb, record, recorded):
    name = eqn.params["name"]
    if name in record:
        recorded[name] = list(invals)
    if name in perturb:
        invals = [x + p.astype(x.dtype) for x, p in zip(invals, perturb[name], strict=True)]
    # Re-bind, so the tap stays visible to an fgrad transformation around this one.
    return eqn.primitive.bind(*invals, **eqn.params)


def _subset(names, sub_jaxpr):
    return set(names) & _tap_names(sub_jaxpr, {})


def _run_higher(eqn, invals, perturb, record, recorded, memo):
    prim = eqn.primitive.name
    params = eqn.params
    if prim in _CALLS:
        sub, sub_consts = _as_open(params["jaxpr"])
        return _run(sub, sub_consts, invals, perturb, record, recorded, memo)
    if prim in _REMATS:
        sub, sub_consts = _as_open(params["jaxpr"])
        names = _subset(set(perturb) | record, sub)
        sub_perturb = {n: perturb[n] for n in names if n in perturb}
        sub_record = frozenset(names & record)

        def body(xs, ps):
            rec: dict[str, list[Any]] = {}
            outs = _run(sub, sub_consts, xs, ps, sub_record, rec, {})
            return outs, rec

        outs, rec = jax.checkpoint(
            body, prevent_cse=params.get("prevent_cse", True), policy=params.get("policy")
        )(list(invals), sub_perturb)
        recorded.update(rec)
        return outs
    if prim in _SCANS:
        return _run_scan(params, invals, perturb, record, recorded)
    # find_sites marks these taps as blocked, and the public functions refuse to serve
    # blocked taps before running: reaching here is a bug in fgrad, not in the caller.
    raise AssertionError(f"fgrad: cannot serve taps inside `{prim}`")


def _run_scan(params, invals, perturb, record, recorded):
    body_closed = params["jaxpr"]
    body, body_consts = _as_open(body_closed)
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts = invals[:n_consts]
    init = invals[n_consts : n_consts + n_carry]
    xs = invals[n_consts + n_carry :]
    names = _subset(set(perturb) | record, body)
    sub_perturb = {n: perturb[n] for n in names if n in perturb}
    sub_record = frozenset(names & record)

    def step(carry, x):
        x_t, p_t = x
        rec: dict[str, list[Any]] = {}
        outs = _run(body, body_consts, [*consts, *carry, *x_t], p_t, sub_record, rec, {})
        return outs[:n_carry], (outs[n_carry:], rec)

    carry, (ys, rec) = jax.lax.scan(
        step,
        list(init),
        (list(xs), sub_perturb),
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    recorded.update(rec)
    return [*carry, *ys]
