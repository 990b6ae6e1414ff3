"""Finding taps in a traced program and re-running it with taps read and perturbed.

`trace` turns ``fn(*args, **kwargs)`` into a jaxpr once (array arguments traced, the
others, such as a Python ``bool`` or ``str``, passed as they are, as ``jax.grad`` passes
them). `find_hits` walks it (sub-programs included) and reports every tap: its name, the
shapes its gradient has (stacked on a leading axis per enclosing ``scan``) and whether it
can be served at all. `run` evaluates the jaxpr again, binding every primitive as it is,
except that taps are recorded and the tapped *variable* gets a perturbation added where it
is defined (or bound as an input), so that every reader of the value sees it, not only the
tap's result: the gradient with respect to the perturbation is then the gradient with
respect to the tapped value through all its uses, as PyTorch's ``retain_grad`` counts
them. Differentiating `run` with respect to the perturbations (all zero) gives the
gradient with respect to every tap in one backward pass; that is how
`fgrad.grad_intermediates` works. `liveness` says which hits reach the output at all
(dead code does not count as a hit) and which reach it differentiably.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.interpreters import partial_eval as pe
from jax.extend import core as jcore

from fgrad import _checks
from fgrad._tap import is_tap

# Primitives whose sub-program runs exactly once per call: taps inside them are served
# by evaluating the sub-program inline (call-like) or under jax.checkpoint (remat).
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_REMATS = frozenset({"remat2", "checkpoint", "remat"})
_SCANS = frozenset({"scan"})
# lax.cond / lax.switch: one of several sub-programs runs; a tap in a branch that did not
# run gets a zero gradient and reports zeros, as a PyTorch hook in an untaken `if` never
# fires.
_CONDS = frozenset({"cond"})

# Why a tap inside these cannot be served, said in the error.
_BLOCKED_WHY = {
    "while": (
        "lax.while_loop (or a fori_loop with traced bounds): its number of iterations is "
        "not known when tracing, so there is nowhere to stack one gradient per iteration, "
        "and JAX cannot reverse-differentiate it anyway. Use lax.scan, or fori_loop with "
        "Python-int bounds (which becomes a scan)"
    ),
    "custom_jvp_call": (
        "a jax.custom_jvp function: its derivative comes from the custom rule, which "
        "never sees the tap. Move the tap outside the custom_jvp function"
    ),
    "custom_vjp_call": (
        "a jax.custom_vjp function: its gradient comes from the custom backward rule, "
        "which never sees the tap. Move the tap outside the custom_vjp function"
    ),
    "shard_map_no_vma": (
        "a shard_map with check_vma=False: fgrad cannot tell whether the tapped value "
        "differs per device or is the same on all, so it cannot assemble a global array. "
        "Use check_vma=True (the default), or tap outside the shard_map"
    ),
    "xla_pmap": (
        "jax.pmap: fgrad cannot see into pmap's per-device program. Use jax.shard_map "
        "(taps inside shard_map are served) or jit with sharded arrays, or tap outside pmap"
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
        return all(jnp.issubdtype(s.dtype, jnp.inexact) for s in self.shapes)


@dataclasses.dataclass(frozen=True)
class Traced:
    """``fn(*args, **kwargs)`` as a closed jaxpr, with its taps."""

    jaxpr: Any  # ClosedJaxpr
    out_tree: Any
    hits: tuple[Hit, ...]  # in program order
    in_tree: Any = None  # PyTreeDef of (args, kwargs)
    dynamic: tuple[bool, ...] | None = None  # per leaf of (args, kwargs): traced or not
    # Flax nnx modules among the arguments may change their state (BatchNorm statistics,
    # counters) when called: the jaxpr then also returns every traced argument leaf as it
    # is after the call, after fn's own outputs, so the caller can write it back.
    n_state: int = 0
    # Variables of closed-over nnx models (tap_nnx(..., model=m)) whose values the call
    # changed: their new values are the last n_closed of the state outputs.
    closed: tuple[Any, ...] = ()
    # fn's output leaves that are Python numbers (a count in the aux): index -> value, so
    # they come back as Python numbers, as jax.value_and_grad returns them.
    python_outs: Mapping[int, Any] = dataclasses.field(default_factory=dict)

    def split_outputs(self, outs: Sequence[Any]) -> tuple[list, list]:
        """``fn``'s output leaves and the arguments' leaves after the call."""
        n = len(outs) - self.n_state
        return list(outs[:n]), list(outs[n:])

    def restore_python_outs(self, outs: Sequence[Any], where: Sequence[bool]) -> list:
        """``fn``'s output leaves with the Python numbers it returned put back at the
        leaves marked in ``where`` (tracing made them arrays)."""
        return [
            self.python_outs[i] if w and i in self.python_outs else x
            for i, (x, w) in enumerate(zip(outs, where, strict=True))
        ]

    def write_back(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None, state) -> None:
        """Updates the nnx modules among ``(args, kwargs)`` to their state after the call,
        as ``nnx.grad`` does (BatchNorm's running statistics, counters, RNG state)."""
        if not self.n_state:
            return
        state = list(state)
        if self.closed:
            values = state[-len(self.closed) :]
            if any(isinstance(v, jax.core.Tracer) for v in values):
                raise ValueError(
                    "fgrad.tap_nnx: the model given as model=... changed its state (train "
                    "mode: BatchNorm statistics, counters) inside a jax transformation "
                    "around fgrad's (jax.jit?), so its new state cannot be written back to "
                    "a model the function closes over. Pass the model as an argument "
                    "(tap_nnx(fn, argnum=0)) and use nnx.jit, or call model.eval() first."
                )
            for var, value in zip(self.closed, values, strict=True):
                var.set_value(value)
            state = state[: -len(self.closed)]
        if not state:
            return
        from flax import nnx

        leaves = jax.tree.leaves((tuple(args), dict(kwargs or {})))
        it = iter(state)
        full = [next(it) if d else x for x, d in zip(leaves, self.dynamic or (), strict=True)]
        after = jax.tree.unflatten(self.in_tree, full)
        is_mod = lambda x: isinstance(x, nnx.Module)
        before = jax.tree.leaves((tuple(args), dict(kwargs or {})), is_leaf=is_mod)
        for old, new in zip(before, jax.tree.leaves(after, is_leaf=is_mod), strict=True):
            if is_mod(old):
                nnx.update(old, nnx.state(new))

    def by_name(self) -> dict[str, list[Hit]]:
        out: dict[str, list[Hit]] = {}
        for h in self.hits:
            out.setdefault(h.name, []).append(h)
        return out

    def inputs(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> list:
        """The leaves of ``(args, kwargs)`` that the jaxpr takes as inputs, in order."""
        leaves = jax.tree.leaves((tuple(args), dict(kwargs or {})))
        if self.dynamic is None:
            return leaves
        return [x for x, d in zip(leaves, self.dynamic, strict=True) if d]


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


def _is_array_like(x: Any) -> bool:
    """Whether ``x`` is traced as jax.grad traces a differentiated argument's leaves:
    arrays (jax, numpy) and numpy scalars. Python numbers, bools, strings and other objects
    reach the function as they are, as jax.grad passes a non-differentiated argument."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "__jax_array__")


def trace(
    fn,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_argnums: Sequence[int] | None = None,
    caller: str = "fgrad",
) -> Traced:
    """Traces ``fn(*args, **kwargs)`` to a jaxpr and finds its taps. An nnx model among
    the arguments that shares a submodule or variable is refused (as a pytree it would be
    copied apart), naming ``caller``.

    Without ``dynamic_argnums`` every leaf is traced (as before). With it, the leaves of
    those positional arguments are traced, and of the others only the arrays: Python
    numbers, bools, strings and other objects reach ``fn`` as they are (so ``if train:``
    works), as under ``jax.grad``.
    """
    args, kwargs = tuple(args), dict(kwargs or {})
    leaves, in_tree = jax.tree.flatten((args, kwargs))
    if dynamic_argnums is None:
        dynamic = (True,) * len(leaves)
    else:
        dyn: list[bool] = []
        for i, a in enumerate(args):
            dyn += [i in dynamic_argnums or _is_array_like(x) for x in jax.tree.leaves(a)]
        dyn += [_is_array_like(x) for x in jax.tree.leaves(kwargs)]
        dynamic = tuple(dyn)

    stateful = _has_nnx_module((args, kwargs))
    if stateful:
        _checks.refuse_shared_nnx((args, kwargs), caller)
    updates: list[tuple[Any, Any]] = []
    python_outs: dict[int, Any] = {}

    def flat_fn(*traced_leaves):
        it = iter(traced_leaves)
        full = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        a, k = jax.tree.unflatten(in_tree, full)
        stack = _closed_updates.__dict__.setdefault("stack", [])
        stack.append(updates)
        try:
            out = fn(*a, **k)
        finally:
            stack.pop()
        python_outs.update(
            (i, x)
            for i, x in enumerate(jax.tree.leaves(out))
            if isinstance(x, (bool, int, float, complex))
        )
        state = []
        if stateful:
            after = jax.tree.leaves((a, k))
            state = [x for x, d in zip(after, dynamic, strict=True) if d]
        return out, state + [v for _, v in updates]

    inputs = [x for x, d in zip(leaves, dynamic, strict=True) if d]
    closed, (out_shape, state_shape) = jax.make_jaxpr(flat_fn, return_shape=True)(*inputs)
    out_tree = jax.tree.structure(out_shape)
    hits = tuple(find_hits(closed.jaxpr))
    closed_vars = tuple(var for var, _ in updates)
    return Traced(
        closed, out_tree, hits, in_tree, dynamic, len(state_shape), closed_vars, python_outs
    )


# While `trace` runs fn: where tap_nnx reports the new values of a closed-over model's
# variables (a stack, for an fgrad transformation inside another).
_closed_updates = threading.local()


def report_closed_updates(pairs: Sequence[tuple[Any, Any]]) -> bool:
    """Called by tap_nnx: ``(variable, new value)`` pairs of a closed-over model that the
    call changed, to become outputs of the traced program and be written back. Returns
    False when no fgrad trace is running (the caller then cannot serve them)."""
    stack = getattr(_closed_updates, "stack", None)
    if not stack:
        return False
    stack[-1].extend(pairs)
    return True


def tracing() -> bool:
    """Whether an fgrad `trace` is running (so closed-over state can be reported)."""
    return bool(getattr(_closed_updates, "stack", None))


def _has_nnx_module(tree: Any) -> bool:
    import sys

    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return False
    is_mod = lambda x: isinstance(x, nnx.Module)
    return any(is_mod(x) for x in jax.tree.leaves(tree, is_leaf=is_mod))


def _from_pmap(eqn) -> bool:
    """Whether a shard_map is how this JAX version implements jax.pmap."""
    names = getattr(eqn.params.get("mesh"), "axis_names", ())
    return any("pmap" in str(n) for n in names)


def find_hits(jaxpr) -> list[Hit]:
    """Every tap application of ``jaxpr``, sub-programs included, in program order."""
    hits: list[Hit] = []
    _collect(jaxpr, (), (), None, hits, {})
    return hits


@dataclasses.dataclass(frozen=True)
class _Shard:
    """Inside a shard_map: its mesh's axis sizes and the scan depth where it began."""

    sizes: Mapping[str, int]
    depth: int
    layout: Mapping[Any, Any] = dataclasses.field(default_factory=dict)  # see _layout


def _varying(aval) -> frozenset | None:
    """The mesh axes along which a value inside shard_map differs per device (None if
    this JAX does not say)."""
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None and hasattr(mat, "varying"):
        return frozenset(mat.varying)
    vma = getattr(aval, "vma", None)
    return None if vma is None else frozenset(vma)


def _global_leaf(var, shard: _Shard) -> tuple[tuple[int, ...] | None, str | None]:
    """The global shape of a tapped leaf inside shard_map: per-device blocks joined along
    the axis that carries the shard_map's sharding (followed from its in_specs), or the
    local shape where it does not vary. Returns (shape, None) or (None, why it cannot be
    served)."""
    aval = var.aval
    varying = _varying(aval)
    if varying is None:
        return None, "a shard_map whose values' per-device layout this JAX does not record"
    axes = [a for a in shard.sizes if a in varying]
    if not axes:
        return tuple(aval.shape), None
    if not aval.shape:
        return None, (
            "a shard_map, where it is a scalar that differs per device (along "
            f"{', '.join(axes)}), so it has no global array to report. Tap an array with a "
            "leading (batch) axis, or the value after lax.psum"
        )
    where = shard.layout.get(var)
    if where is None or set(where[1]) != set(axes):
        return None, (
            f"a shard_map, where its local value (shape {tuple(aval.shape)}) differs per "
            f"device along mesh axes {axes}, but fgrad cannot tell which of its axes those "
            "devices' blocks are joined along (it follows the sharded axis of the "
            "shard_map's in_specs through elementwise operations, dot_general, transpose, "
            "broadcast_in_dim and reductions only). Tap the value outside the shard_map, "
            "or tap a value computed from the inputs by those operations"
        )
    k, mesh_axes = where
    n = 1
    for a in mesh_axes:
        n *= shard.sizes[a]
    shape = list(aval.shape)
    shape[k] *= n
    return tuple(shape), None


def _spec(var, layout: Mapping[Any, Any]) -> Any:
    """The PartitionSpec of a tapped leaf inside shard_map, as `_global_leaf` joins it."""
    from jax.sharding import PartitionSpec

    if not _varying(var.aval):
        return PartitionSpec()
    if var not in layout:  # `_global_leaf` blocks such a tap: never served
        raise ValueError("fgrad: a tap inside shard_map whose layout is unknown was planned.")
    k, mesh_axes = layout[var]
    return PartitionSpec(*([None] * k), mesh_axes)


# Primitives that act elementwise: the output's axes are its operands' axes.
_ELEMENTWISE = frozenset(
    "abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type "
    "copy copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow "
    "is_finite le lgamma digamma log log1p logistic lt max min mul ne neg nextafter not or pow "
    "real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh xor "
    "stop_gradient optimization_barrier".split()
)
_REDUCES = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split()
)


_CONFLICT = ("conflict",)


def _layout(jaxpr, in_layouts: Sequence[Any], out: dict) -> list:
    """Per variable of a shard_map body (sub-programs included, into ``out``): which of
    its axes holds the per-device blocks, ``(axis, mesh_axes)``, or None (replicated, or
    not followed). ``in_layouts`` gives the body inputs' layouts (from the in_specs)."""
    env: dict = {}

    def put(v, lay):
        if lay is None or not isinstance(v, jcore.Var):
            return
        env[v] = lay
        # a sub-program shared by several call sites: a variable with two layouts has none
        out[v] = lay if out.get(v, lay) == lay else _CONFLICT

    def get(v) -> Any:
        return env.get(v) if isinstance(v, jcore.Var) else None

    for v, lay in zip(jaxpr.invars, in_layouts, strict=True):
        put(v, lay)
    for eqn in jaxpr.eqns:
        ins: list[Any] = [get(v) for v in eqn.invars]
        known = [x for x in ins if x is not None]
        prim, params = eqn.primitive.name, eqn.params
        outs: list = [None] * len(eqn.outvars)
        subs = _sub_jaxprs(params)
        if not known:
            pass
        elif is_tap(eqn):
            outs = ins
        elif prim in _ELEMENTWISE and len(set(known)) == 1:
            shapes = {tuple(v.aval.shape) for v in eqn.invars if get(v) is not None}
            if {tuple(o.aval.shape) for o in eqn.outvars} == shapes:
                outs = [known[0]] * len(outs)
        elif prim == "transpose":
            k, ax = ins[0]
            outs = [(list(params["permutation"]).index(k), ax)]
        elif prim == "broadcast_in_dim":
            k, ax = ins[0]
            outs = [(params["broadcast_dimensions"][k], ax)]
        elif prim in _REDUCES:
            k, ax = ins[0]
            red = params["axes"]
            if k not in red:
                outs = [(k - sum(1 for a in red if a < k), ax)] * len(outs)
        elif prim == "dot_general" and len(known) == 1:
            (lc, rc), (lb, rb) = params["dimension_numbers"]
            lhs, rhs = eqn.invars
            n_l = len(lhs.aval.shape)
            lfree = [d for d in range(n_l) if d not in lc and d not in lb]
            rfree = [d for d in range(len(rhs.aval.shape)) if d not in rc and d not in rb]
            if ins[0] is not None:
                k, ax = ins[0]
                pos = (
                    list(lb).index(k)
                    if k in lb
                    else len(lb) + lfree.index(k)
                    if k in lfree
                    else None
                )
            else:
                k, ax = ins[1]
                pos = (
                    list(rb).index(k)
                    if k in rb
                    else len(rb) + len(lfree) + rfree.index(k)
                    if k in rfree
                    else None
                )
            if pos is not None and not (k in lb or k in rb):  # batch dims: both sharded
                outs = [(pos, ax)]
        elif len(subs) == 1 and (prim in _CALLS or prim in _REMATS or "custom" in prim):
            inner, _ = _as_open(subs[0])
            if len(inner.invars) == len(ins) and len(inner.outvars) == len(outs):
                outs = _layout(inner, ins, out)
        for v, lay in zip(eqn.outvars, outs, strict=True):
            put(v, lay)
    return [get(v) for v in jaxpr.outvars]


def _shard_layout(eqn) -> dict:
    """`_layout` of a shard_map's body, from its in_specs."""
    body, _ = _as_open(eqn.params["jaxpr"])
    ins: list[Any] = []
    for spec in eqn.params["in_specs"]:
        entries = [(k, e) for k, e in enumerate(tuple(spec)) if e is not None and e != ()]
        if len(entries) == 1:
            k, e = entries[0]
            ins.append((k, tuple(e) if isinstance(e, (tuple, list)) else (e,)))
        else:
            ins.append(None)  # replicated, or sharded along several axes: not followed
    out: dict = {}
    _layout(body, ins, out)
    return {v: lay for v, lay in out.items() if lay is not _CONFLICT}


def _collect(jaxpr, prefix: Path, stack, blocked, hits: list, memo: dict, shard=None):
    for i, eqn in enumerate(jaxpr.eqns):
        if is_tap(eqn):
            why = blocked
            shapes = []
            for v in eqn.invars:
                local = tuple(v.aval.shape)
                if shard is not None and why is None:
                    if len(stack) > shard.depth:
                        why = (
                            "a lax.scan inside a shard_map: fgrad serves taps directly in a "
                            "shard_map body (or in jit, checkpoint or cond there). Tap "
                            "outside the scan, or move the scan outside the shard_map"
                        )
                    else:
                        shape, why = _global_leaf(v, shard)
                        local = shape or local
                shapes.append(jax.ShapeDtypeStruct((*stack, *local), v.aval.dtype))
            hits.append(
                Hit(eqn.params["name"], (*prefix, i), eqn.params["tree"], tuple(shapes), why)
            )
            continue
        subs = _sub_jaxprs(eqn.params)
        if not subs:
            continue
        prim = eqn.primitive.name
        inner_shard = shard
        if prim in _SCANS:
            inner_stack, inner_blocked = (*stack, int(eqn.params["length"])), blocked
        elif prim in _CALLS or prim in _REMATS or prim in _CONDS:
            inner_stack, inner_blocked = stack, blocked
        elif prim == "shard_map" and _from_pmap(eqn):
            inner_stack, inner_blocked = stack, blocked or _BLOCKED_WHY["xla_pmap"]
        elif prim == "shard_map" and not eqn.params.get("check_vma", False):
            inner_stack, inner_blocked = stack, blocked or _BLOCKED_WHY["shard_map_no_vma"]
        elif prim == "shard_map":
            inner_stack, inner_blocked = stack, blocked
            if shard is not None:
                inner_blocked = blocked or "a shard_map nested in another shard_map"
            mesh = eqn.params["mesh"]
            inner_shard = _Shard(
                dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True)),
                len(stack),
                _shard_layout(eqn),
            )
        else:
            inner_stack = stack
            inner_blocked = blocked or _BLOCKED_WHY.get(
                prim, f"the higher-order primitive `{prim}`, which fgrad cannot see into"
            )
        for j, sub in enumerate(subs):
            if _has_tap(sub, memo):
                _collect(sub, (*prefix, i, j), inner_stack, inner_blocked, hits, memo, inner_shard)


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


# --- where each tapped value is defined ---------------------------------------------------
#
# A site is (program prefix, variable): the perturbation of tap leaf (key, j) is added when
# that variable is bound in the (sub-)program at that prefix. A tap of a tap's result is a
# tap of the same value (taps are the identity); a tap inside a jit or checkpoint of one of
# its inputs is a tap of the caller's variable (jit and checkpoint are transparent). Inside
# a scan body or a cond branch the site stays there: the tap counts the uses in that step
# or branch. A literal has no variable: its perturbation is added to the tap's result.

Entries = list[tuple[str, int]]  # (key, leaf index)


@dataclasses.dataclass
class _Sites:
    at: dict[Path, dict[Any, Entries]]  # prefix -> {variable: entries}
    at_tap: dict[Path, Entries]  # tap path -> entries added to the tap's result


def _place(jaxpr, prefix: Path, plan: Plan, sites: _Sites) -> None:
    alias: dict[Any, Any] = {}  # a tap's result -> the variable it is the identity of
    here = sites.at.setdefault(prefix, {})
    for i, eqn in enumerate(jaxpr.eqns):
        path = (*prefix, i)
        if is_tap(eqn):
            for o, v in zip(eqn.outvars, eqn.invars, strict=True):
                if not isinstance(v, jcore.Literal):
                    alias[o] = alias.get(v, v)
            key = plan.keys.get(path)
            if key is None:
                continue
            for j, v in enumerate(eqn.invars):
                if isinstance(v, jcore.Literal):
                    sites.at_tap.setdefault(path, []).append((key, j))
                else:
                    here.setdefault(alias.get(v, v), []).append((key, j))
            continue
        if not plan.enters(path):
            continue
        prim = eqn.primitive.name
        for b, sub in enumerate(_sub_jaxprs(eqn.params)):
            sub_prefix = (*path, b)
            if not plan.enters(sub_prefix):
                continue
            sub_open, _ = _as_open(sub)
            _place(sub_open, sub_prefix, plan.within(sub_prefix), sites)
            if prim in _CALLS or prim in _REMATS:  # lift sites on its inputs to the caller
                inner = sites.at[sub_prefix]
                for pos, v in enumerate(sub_open.invars):
                    outer = eqn.invars[pos]
                    if v in inner and not isinstance(outer, jcore.Literal):
                        here.setdefault(alias.get(outer, outer), []).extend(inner.pop(v))


def _sites(jaxpr, plan: Plan, at_result: bool = False) -> _Sites:
    sites = _Sites({}, {})
    if at_result:  # every perturbation on the tap's result only
        for path, key in plan.keys.items():
            n = _tap_arity(jaxpr, path)
            sites.at_tap[path] = [(key, j) for j in range(n)]
        return sites
    _place(jaxpr, (), plan, sites)
    return sites


def _tap_arity(jaxpr, path: Path) -> int:
    """The number of leaves of the tap at ``path``."""
    j, eqn = jaxpr, None
    rest = list(path)
    while rest:
        eqn = j.eqns[rest.pop(0)]
        if rest:
            j = _as_open(_sub_jaxprs(eqn.params)[rest.pop(0)])[0]
    assert eqn is not None
    return len(eqn.invars)


def _add(x, entries: Entries, perturb: Mapping[str, Sequence[Any]]):
    for key, j in entries:
        if key in perturb:
            x = x + perturb[key][j].astype(x.dtype)
    return x


def run(
    jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    plan: Plan,
    perturb: Mapping[str, Sequence[Any]],
    *,
    record: bool = True,
    at_result: bool = False,
) -> tuple[list[Any], dict[str, list[Any]] | None]:
    """Evaluates ``jaxpr``; at each tap in ``plan`` records the leaves under the tap's key
    (unless ``record`` is false: then None is returned for them, and scans and checkpoints
    carry no recorded values out), and adds ``perturb[key]`` (if given) to the tapped
    variable where it is defined, so that every reader of it sees the perturbation.
    Recorded values are the values the tap sees (perturbed: the perturbations fgrad
    passes are zeros).

    Taps inside a ``scan`` take, and report, values stacked on a leading axis. Taps in a
    ``cond`` branch that did not run report zeros. With ``at_result`` the perturbations
    are added to the taps' results instead (what reads the tap's result, not the value).
    """
    recorded: dict[str, list[Any]] | None = {} if record else None
    sites = _sites(jaxpr, plan, at_result)
    outs = _run(jaxpr, consts, args, (), plan, perturb, recorded, sites)
    return outs, recorded


def _record(recorded: dict, key: str, leaves: Sequence[Any]) -> None:
    if key in recorded:  # hits that share a key are summed
        recorded[key] = [a + b for a, b in zip(recorded[key], leaves, strict=True)]
    else:
        recorded[key] = list(leaves)


def _run(jaxpr, consts, args, prefix, plan, perturb, recorded, sites: _Sites):
    env: dict[Any, Any] = {}
    here = sites.at.get(prefix, {})

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def write(v, x):
        entries = here.get(v)
        env[v] = x if entries is None else _add(x, entries, perturb)

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        write(v, x)
    for v, x in zip(jaxpr.invars, args, strict=True):
        write(v, x)
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        path = (*prefix, i)
        # The equation's context (e.g. config it was traced under), as jax.core.eval_jaxpr.
        ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
        with ctx:
            if is_tap(eqn):
                outs = _run_tap(eqn, invals, plan.keys.get(path), perturb, recorded, plan)
                if path in sites.at_tap:  # a tapped literal: perturb the tap's result
                    outs = list(outs)
                    for key, j in sites.at_tap[path]:
                        outs[j] = _add(outs[j], [(key, j)], perturb)
            elif plan.enters(path):
                outs = _run_higher(eqn, invals, path, plan, perturb, recorded, sites)
            else:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                if not eqn.primitive.multiple_results:
                    outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            write(v, x)
    return [read(v) for v in jaxpr.outvars]


def _run_tap(eqn, invals, key, perturb, recorded, plan):
    """A tap: its value recorded under ``key`` (the perturbation, if any, was added where
    the tapped variable is defined); its output computed by ``plan.at_tap`` if set."""
    del perturb
    if key is not None and recorded is not None:
        _record(recorded, key, invals)
    # Re-bind, so the tap stays visible to an fgrad transformation around this one.
    bind = lambda xs: eqn.primitive.bind(*xs, **eqn.params)
    if key is not None and plan.at_tap is not None:
        return plan.at_tap(key, invals, plan.steps, bind)
    return bind(invals)


def _run_higher(eqn, invals, path, plan, perturb, recorded, sites):
    prim = eqn.primitive.name
    params = eqn.params
    record = recorded is not None
    if prim in _CONDS or prim == "shard_map":
        run_it = _run_cond if prim in _CONDS else _run_shard_map
        outs, rec = run_it(eqn, invals, path, plan, perturb, record, sites)
        for k, leaves in (rec or {}).items():
            _record(recorded, k, leaves)
        return outs
    sub_prefix = (*path, 0)  # these primitives have one sub-program
    sub, sub_consts = _as_open(params["jaxpr"] if "jaxpr" in params else params["call_jaxpr"])
    sub_plan = plan.within(sub_prefix)
    if prim in _CALLS:
        return _run(sub, sub_consts, invals, sub_prefix, sub_plan, perturb, recorded, sites)
    sub_perturb = {k: perturb[k] for k in set(sub_plan.keys.values()) if k in perturb}
    if prim in _REMATS:

        def body(xs, ps):
            rec: dict[str, list[Any]] | None = {} if record else None
            outs = _run(sub, sub_consts, xs, sub_prefix, sub_plan, ps, rec, sites)
            return outs, rec

        outs, rec = jax.checkpoint(
            body, prevent_cse=params.get("prevent_cse", True), policy=params.get("policy")
        )(list(invals), sub_perturb)
    elif prim in _SCANS:
        outs, rec = _run_scan(
            params, sub, sub_consts, invals, sub_prefix, sub_plan, sub_perturb, record, sites
        )
    else:
        # find_hits marks these taps as blocked, and the public functions refuse to serve
        # blocked taps before running: reaching here is a bug in fgrad, not in the caller.
        raise AssertionError(f"fgrad: cannot serve taps inside `{prim}`")
    for k, leaves in (rec or {}).items():
        _record(recorded, k, leaves)
    return outs


def _run_cond(eqn, invals, path, plan, perturb, record, sites):
    """lax.cond / lax.switch with each branch interpreted; every branch returns a recorded
    value for every key of every branch (zeros for the keys of the others)."""
    branches = eqn.params["branches"]
    index, ops = invals[0], list(invals[1:])
    keys = set(plan.within(path).keys.values())
    sub_perturb = {k: perturb[k] for k in keys if k in perturb}
    zeros: dict[str, list[jax.ShapeDtypeStruct]] = {}
    if record:
        for b, br in enumerate(branches):
            b_plan = plan.within((*path, b))
            for h in _shapes_of(_as_open(br)[0], (*path, b)):
                if h.path in b_plan.keys:
                    zeros.setdefault(b_plan.keys[h.path], list(h.shapes))

    def branch(b):
        sub, sub_consts = _as_open(branches[b])
        b_prefix = (*path, b)
        b_plan = plan.within(b_prefix)

        def f(xs, ps):
            rec: dict[str, list[Any]] | None = {} if record else None
            outs = _run(sub, sub_consts, xs, b_prefix, b_plan, ps, rec, sites)
            if rec is None:
                return outs, None
            full = {
                k: rec[k] if k in rec else [jnp.zeros(s.shape, s.dtype) for s in shapes]
                for k, shapes in zeros.items()
            }
            return outs, full

        return f

    return jax.lax.switch(index, [branch(b) for b in range(len(branches))], ops, sub_perturb)


def _tap_vars(jaxpr, plan: Plan) -> dict[str, list]:
    """Per key of ``plan``: the variables its tap's leaves are, as the tap sees them."""
    out: dict[str, list] = {}

    def walk(j, prefix):
        for i, eqn in enumerate(j.eqns):
            path = (*prefix, i)
            if is_tap(eqn) and path in plan.keys:
                out.setdefault(plan.keys[path], list(eqn.invars))
            elif plan.enters(path):
                for b, sub in enumerate(_sub_jaxprs(eqn.params)):
                    walk(_as_open(sub)[0], (*path, b))

    walk(jaxpr, ())
    return out


def _run_shard_map(eqn, invals, path, plan, perturb, record, sites):
    """shard_map with its body interpreted; perturbations enter, and recorded values
    leave, as global arrays: per-device blocks joined along the axis that carries the
    sharding (`_layout`), or replicated where the tapped value does not vary."""
    params = eqn.params
    sub_prefix = (*path, 0)
    sub_plan = plan.within(sub_prefix)
    body, body_consts = _as_open(params["jaxpr"])
    rel = Plan({p[len(sub_prefix) :]: k for p, k in sub_plan.keys.items()})
    avals = _tap_vars(body, rel)
    layout = _shard_layout(eqn)
    keys = sorted(avals)
    p_keys = [k for k in keys if k in perturb]
    p_leaves = [x for k in p_keys for x in perturb[k]]
    p_specs = [_spec(v, layout) for k in p_keys for v in avals[k]]
    rec_specs = [_spec(v, layout) for k in keys for v in avals[k]] if record else []
    n_in, n_out = len(invals), len(eqn.outvars)

    def f(*xs):
        it = iter(xs[n_in:])
        ps = {k: [next(it) for _ in avals[k]] for k in p_keys}
        rec: dict[str, list[Any]] | None = {} if record else None
        outs = _run(body, body_consts, list(xs[:n_in]), sub_prefix, sub_plan, ps, rec, sites)
        extra = [x for k in keys for x in rec[k]] if rec is not None else []
        return (*outs, *extra)

    res = jax.shard_map(
        f,
        mesh=params["mesh"],
        in_specs=(*params["in_specs"], *p_specs),
        out_specs=(*params["out_specs"], *rec_specs),
        axis_names=set(params.get("newly_manual_axes", params.get("axis_names", ()))),
        check_vma=params.get("check_vma", True),
    )(*invals, *p_leaves)
    outs, extra = list(res[:n_out]), iter(res[n_out:])
    rec = {k: [next(extra) for _ in avals[k]] for k in keys} if record else None
    return outs, rec


def _shapes_of(jaxpr, prefix: Path) -> list[Hit]:
    """The hits of a sub-program, shapes stacked only by the scans inside it."""
    hits: list[Hit] = []
    _collect(jaxpr, prefix, (), None, hits, {})
    return hits


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


def _run_scan(params, body, body_consts, invals, prefix, plan, perturb, record, sites):
    consts, init, xs = _scan_operands(params, invals)
    n_carry = len(init)

    # With at_tap, each step also gets its index (for hooks that ask for it).
    index = jax.numpy.arange(params["length"]) if plan.at_tap is not None else None

    def step(carry, x):
        x_t, p_t, i = x
        inner = plan if i is None else dataclasses.replace(plan, steps=(*plan.steps, i))
        rec: dict[str, list[Any]] | None = {} if record else None
        outs = _run(body, body_consts, [*consts, *carry, *x_t], prefix, inner, p_t, rec, sites)
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


# --- which hits reach the output ----------------------------------------------------------


def liveness(
    traced: Traced, inputs: Sequence[Any], hits: Sequence[Hit], differentiated: Sequence[bool]
) -> tuple[list[bool], list[bool]]:
    """For each hit: whether its tapped value reaches any output at all (a hit in dead
    code does not), and whether it reaches the outputs marked in ``differentiated`` (one
    flag per output leaf) differentiably (not through ``lax.stop_gradient`` or integer
    operations). Read, as `fgrad._liveness.reaches_output` reads it, from the JVP program
    of `run` with the perturbations as inputs, after dead-code elimination: structural
    liveness from the primal outputs, differentiable liveness from the tangent outputs.
    Hits must not be blocked; integer hits are only checked structurally.
    """
    if not hits:
        return [], []
    keys = [str(i) for i in range(len(hits))]
    plan = Plan({h.path: k for h, k in zip(hits, keys, strict=True)})
    zeros = [[jnp.zeros(s.shape, s.dtype) for s in h.shapes] for h in hits]
    diff_hit = [h.differentiable for h in hits]

    def f(ps):
        outs, _ = run(
            traced.jaxpr.jaxpr,
            traced.jaxpr.consts,
            inputs,
            plan,
            dict(zip(keys, ps, strict=True)),
            record=False,
        )
        return outs

    def split(ps):  # differentiable perturbations and the others
        d = [p for p, ok in zip(ps, diff_hit, strict=True) if ok]
        n = [p for p, ok in zip(ps, diff_hit, strict=True) if not ok]
        return d, n

    def merge(d, n):
        di, ni = iter(d), iter(n)
        return [next(di) if ok else next(ni) for ok in diff_hit]

    d0, n0 = split(zeros)

    def primal_and_tangent(d, t, n):
        return jax.jvp(lambda d: f(merge(d, n)), (d,), (t,))

    closed = jax.make_jaxpr(primal_and_tangent)(d0, d0, n0)
    n_out = len(closed.jaxpr.outvars) // 2
    sizes = [len(p) for p in zeros]
    n_d = sum(len(p) for p in d0)
    _, used_primal = pe.dce_jaxpr(closed.jaxpr, [True] * n_out + [False] * n_out)
    _, used_tangent = pe.dce_jaxpr(closed.jaxpr, [False] * n_out + list(differentiated))
    # invars: d (n_d leaves), t (n_d leaves), n (the rest)
    d_used = used_primal[:n_d]
    t_used = used_tangent[n_d : 2 * n_d]
    n_used = used_primal[2 * n_d :]
    reach, diff = [], []
    di = dti = ni = 0
    for h, size in zip(hits, sizes, strict=True):
        if h.differentiable:
            reach.append(any(d_used[di : di + size]))
            diff.append(any(t_used[dti : dti + size]))
            di += size
            dti += size
        else:
            reach.append(any(n_used[ni : ni + size]))
            diff.append(False)
            ni += size
    return reach, diff


def results_reach(traced: Traced, inputs: Sequence[Any], hits: Sequence[Hit]) -> list[bool]:
    """For each (unblocked) hit: whether the tap's *result* reaches any output (a tap
    written as a statement, or one in code traced only for its side effects, does not)."""
    if not hits:
        return []
    keys = [str(i) for i in range(len(hits))]
    plan = Plan({h.path: k for h, k in zip(hits, keys, strict=True)})
    zeros = [[jnp.zeros(s.shape, s.dtype) for s in h.shapes] for h in hits]

    def f(ps):
        perturb = dict(zip(keys, ps, strict=True))
        outs, _ = run(
            traced.jaxpr.jaxpr,
            traced.jaxpr.consts,
            inputs,
            plan,
            perturb,
            record=False,
            at_result=True,
        )
        return outs

    closed = jax.make_jaxpr(f)(zeros)
    _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    out, i = [], 0
    for z in zeros:
        out.append(any(used[i : i + len(z)]))
        i += len(z)
    return out


def tapped_roots(traced: Traced, hits: Sequence[Hit]) -> list[tuple]:
    """For each hit: the variables it taps, each traced back through taps (identities) and
    into sub-programs to the variable of the outermost program it is (a sub-program's input
    that is the same value on every run of it: a call's operand, a scan's constant, a cond's
    operand). Two hits with equal roots tap the same value."""
    roots: dict[Path, tuple] = {}
    wanted = {h.path for h in hits}

    def walk(jaxpr, prefix: Path, env: dict) -> None:
        root = lambda v: env.get(v, v) if isinstance(v, jcore.Var) else object()
        for i, eqn in enumerate(jaxpr.eqns):
            path = (*prefix, i)
            if is_tap(eqn):
                rs = tuple(root(v) for v in eqn.invars)
                if path in wanted:
                    roots[path] = rs
                env.update(zip(eqn.outvars, rs, strict=True))
                continue
            prim = eqn.primitive.name
            ops = [root(v) for v in eqn.invars]
            ins: list[Any] | None = None  # operands that reach the sub-program as they are
            if prim in _SCANS:
                n_consts = len(_scan_operands(eqn.params, eqn.invars)[0])
                ins = ops[:n_consts] + [object() for _ in ops[n_consts:]]
            elif prim in _CONDS:
                ins = ops[1:]
            elif prim in _CALLS or prim in _REMATS:
                ins = ops
            for j, sub in enumerate(_sub_jaxprs(eqn.params)):
                inner, _ = _as_open(sub)
                sub_env: dict = {}
                if ins is not None and len(ins) == len(inner.invars):
                    sub_env = dict(zip(inner.invars, ins, strict=True))
                walk(inner, (*path, j), sub_env)

    walk(traced.jaxpr.jaxpr, (), {})
    return [roots[h.path] for h in hits]
