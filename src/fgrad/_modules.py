"""Taps on the outputs of chosen layers of an unmodified Flax model.

PyTorch users register a forward hook on any submodule; fgrad's equivalent is to tap the
submodule's output without editing the model's code. For linen the outputs are caught
with ``flax.linen.intercept_methods``; for nnx the chosen submodule objects are given,
for the duration of the call, a subclass whose ``__call__`` taps its result. Each tap is
named by the module's path (``"Dense_0"``, ``"block/Conv_1"``, ``"layers/2"``).

Paths are chosen by glob patterns as file paths are: ``*`` and ``?`` stop at ``/``,
``**`` crosses it, ``[seq]`` is a character class. ``"ResNetBlock_*"`` is every block but
not the layers inside them, ``"ResNetBlock_*/*"`` the layers directly inside a block,
``"**"`` every submodule at any depth, as does ``"*"`` for the default of tapping every
submodule (a lone ``"*"`` keeps its historical meaning: every submodule).

With ``inputs=``, chosen submodules also have their inputs tapped (PyTorch's
``register_forward_pre_hook``), named by the path and ``":in"`` (``"Dense_0:in"``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import errors as flax_errors
from flax import linen as nn
from flax import nnx

from fgrad import _checks, _trace
from fgrad._globs import match as glob_match
from fgrad._tap import tap
from fgrad._typing import P, R

Paths = str | Sequence[str]

INPUT_SUFFIX = ":in"  # a module's input tap is named f"{path}{INPUT_SUFFIX}"


def _tap_inputs(name: str, args: tuple) -> tuple:
    """``args`` with its array arguments tapped as ``name``: the array itself when there
    is one, else the tuple of them."""
    where = [i for i, a in enumerate(args) if isinstance(a, jax.Array | np.ndarray)]
    if not where:
        return args
    new = list(args)
    if len(where) == 1:
        new[where[0]] = tap(name, args[where[0]])
    else:
        for i, x in zip(where, tap(name, tuple(args[i] for i in where)), strict=True):
            new[i] = x
    return tuple(new)


def _patterns(paths: Paths, caller: str) -> list[str]:
    pats = [paths] if isinstance(paths, str) else paths
    ok = isinstance(pats, (list, tuple)) and pats and all(isinstance(p, str) and p for p in pats)
    if not ok:
        raise TypeError(
            f"{caller}: paths must be a submodule path (a string such as 'Dense_0' or "
            f"'block/Conv_1', as the model's submodules are named) or glob pattern ('*', "
            f"'block_*/**'), or a non-empty list or tuple of them; got {paths!r} "
            f"({type(paths).__name__})."
        )
    return list(pats)


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(glob_match(path, p) for p in patterns)


def _check_all_matched(patterns, seen: Sequence[str], caller: str) -> None:
    missing = [p for p in patterns if not any(glob_match(s, p) for s in seen)]
    if missing:
        listed = ", ".join(repr(s) for s in dict.fromkeys(seen)) or "none"
        hint = ""
        if "/" not in missing[0] and any("/" in s for s in seen):
            hint = " ('*' does not cross '/': use '**' for any depth, e.g. '**/Conv_0')"
        raise ValueError(
            f"{caller}: no submodule path matches {missing[0]!r}; the model's submodule paths "
            f"are: {listed}.{hint}"
        )


def tap_linen(
    fn: Callable[P, R],
    paths: Paths = "*",
    *,
    method: str = "__call__",
    inputs: Paths | None = None,
) -> Callable[P, R]:
    """Taps the outputs of chosen submodules of a Flax linen model, unmodified.

    The linen equivalent of ``module.register_forward_hook`` for
    ``autograd.grad(loss, activation)``: every submodule whose path matches ``paths``
    has its output tapped under its path, so `fgrad.grad_intermediates` and friends can
    read and differentiate it.

    Args:
      fn: a function that applies a linen model, typically ``model.apply``.
      paths: a module path (``"Dense_0"``, ``"encoder/layer_1"``) or glob pattern, or a
        sequence of them. In a pattern ``*`` stops at ``/`` and ``**`` crosses it:
        ``"block_*"`` is every block but not the layers inside, ``"block_*/**"`` all
        inside them, ``"**/Conv_0"`` every ``Conv_0`` at any depth; a lone ``"*"`` (the
        default) is every submodule. Each pattern must match at least one submodule
        that ran.
      method: the module method whose result is tapped.
      inputs: also tap the inputs of the submodules matching these paths or patterns
        (``register_forward_pre_hook``): the array positional arguments of ``method``
        (the array, or a tuple of them), named ``"<path>:in"``.

    Returns:
      ``fn`` with the outputs tapped, named by module path.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import fgrad
      >>> model = nn.Sequential([nn.Dense(3), nn.tanh, nn.Dense(1)])
      >>> x = jnp.ones((2, 4))
      >>> variables = model.init(jax.random.key(0), x)
      >>> loss = lambda v, x: jnp.sum(fgrad.tap_linen(model.apply, "layers_0")(v, x))
      >>> g = fgrad.grad_intermediates(loss)(variables, x)
      >>> list(g), g["layers_0"].shape
      (['layers_0'], (2, 3))
    """
    caller = "fgrad.tap_linen"
    patterns = _patterns(paths, caller)
    in_patterns = [] if inputs is None else _patterns(inputs, caller)

    if not isinstance(method, str) or not method:
        raise TypeError(
            f"{caller}: method must be a method name such as '__call__', got {method!r}."
        )

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        seen: list[str] = []
        methods: set[str] = set()

        def interceptor(next_fun, a, k, context):
            at = "/".join(context.module.path)
            if at and context.method_name == method and _matches(at, in_patterns):
                a = _tap_inputs(at + INPUT_SUFFIX, tuple(a))
            out = next_fun(*a, **k)
            methods.add(context.method_name)
            if context.method_name != method:
                return out
            path = "/".join(context.module.path)
            if not path:  # the root module: its output is fn's own
                return out
            seen.append(path)
            return tap(path, out) if _matches(path, patterns) else out

        with nn.intercept_methods(interceptor):
            out = fn(*args, **kwargs)
        if not seen and methods and method not in methods:
            ran = ", ".join(repr(m) for m in sorted(methods))
            raise ValueError(
                f"{caller}: method={method!r}, but no submodule's {method!r} ran; the "
                f"methods that ran are: {ran}. (PyTorch's forward is linen's __call__, the "
                "default.)"
            )
        _check_all_matched(patterns, seen, caller)
        _check_all_matched(in_patterns, seen, caller)
        return out

    return wrapped


def _call_with_closed_model(fn, model, args, kwargs):
    """Calls ``fn``, which closes over ``model``, inside an fgrad trace, letting the
    model's variables change (BatchNorm statistics in train mode, counters): they are made
    writable at the current trace level for the call, their new values are reported to
    fgrad's trace (which returns them from the traced program and writes them back), and
    they are restored, so that no tracer is left in the model."""
    from flax.nnx import tracers

    variables = [v for _, v in nnx.graph.iter_graph(model) if isinstance(v, nnx.Variable)]
    saved = [(v, v._trace_state, v.get_value()) for v in variables]
    try:
        for v in variables:
            object.__setattr__(v, "_trace_state", tracers.TraceState())
        out = fn(*args, **kwargs)
        changed = [(v, v.get_value()) for v, _, old in saved if v.get_value() is not old]
        _trace.report_closed_updates(changed)
        return out
    finally:
        for v, state, old in saved:
            v.set_value(old)
            object.__setattr__(v, "_trace_state", state)


_names = threading.local()  # id(module) -> tap name, while a tap_nnx call runs
_subclasses: dict[type, type] = {}


def _tapping_subclass(cls: type) -> type:
    """A subclass of the nnx module class ``cls`` whose ``__call__`` taps its result."""
    if cls not in _subclasses:

        def __call__(self, *args, **kwargs):
            in_name = getattr(_names, "inputs_by_id", {}).get(id(self))
            if in_name is not None:
                args = _tap_inputs(in_name, args)
            out = cls.__call__(self, *args, **kwargs)
            name = getattr(_names, "by_id", {}).get(id(self))
            if name is None:
                return out
            _names.ran.add(name)
            return tap(name, out)

        _subclasses[cls] = type(cls)(cls.__name__, (cls,), {"__call__": __call__})
    return _subclasses[cls]


def tap_nnx(
    fn: Callable[P, R],
    paths: Paths = "*",
    *,
    argnum: int = 0,
    model: nnx.Module | None = None,
    inputs: Paths | None = None,
) -> Callable[P, R]:
    """Taps the outputs of chosen submodules of a Flax nnx model, unmodified.

    The nnx equivalent of ``module.register_forward_hook``: every submodule whose path
    matches ``paths`` has the result of its ``__call__`` tapped under its path
    (``"blocks/0"``, ``"head"``).

    Args:
      fn: a function that calls the model.
      paths: a submodule path or glob pattern, or a sequence of them; globs as in
        `tap_linen` (``*`` stops at ``/``, ``**`` crosses it, a lone ``"*"`` is every
        submodule). Each pattern must match at least one submodule of the model, and one
        that ran: a function that calls another copy of the model (rebuilt with
        ``nnx.merge``) is an error, not an empty result.
      argnum: which positional argument of ``fn`` is the model (nnx modules are pytrees,
        so inside a JAX transformation ``fn`` receives a copy: the copy is tapped).
      model: the model, when ``fn`` closes over it instead of taking it as an argument.
      inputs: also tap the inputs of the submodules matching these paths or patterns
        (``register_forward_pre_hook``): the array positional arguments of ``__call__``
        (the array, or a tuple of them), named ``"<path>:in"``.

    Returns:
      ``fn`` with the outputs tapped, named by submodule path.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import fgrad
      >>> model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.tanh,
      ...                        nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
      >>> loss = lambda m, x: jnp.sum(m(x))
      >>> g = fgrad.grad_intermediates(fgrad.tap_nnx(loss, "layers/0"))(model, jnp.ones((2, 4)))
      >>> list(g), g["layers/0"].shape
      (['layers/0'], (2, 3))
    """
    caller = "fgrad.tap_nnx"
    patterns = _patterns(paths, caller)
    in_patterns = [] if inputs is None else _patterns(inputs, caller)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        m = model
        if m is None:
            if not 0 <= argnum < len(args):
                raise ValueError(
                    f"{caller}: argnum={argnum} but the function was called with {len(args)} "
                    "positional argument(s); pass model=... if it closes over the model."
                )
            m = args[argnum]
        if not isinstance(m, nnx.Module):
            raise TypeError(
                f"{caller}: expected an nnx.Module as argument {argnum} (or model=...), got "
                f"{type(m).__name__}."
            )
        _checks.refuse_shared_nnx(m, caller)
        found = [
            ("/".join(str(k) for k in path), mod)
            for path, mod in nnx.iter_modules(m)
            if path and callable(mod)
        ]
        _check_all_matched(patterns, [p for p, _ in found], caller)
        _check_all_matched(in_patterns, [p for p, _ in found], caller)
        chosen = [(p, mod) for p, mod in found if _matches(p, [*patterns, *in_patterns])]
        by_id, ran = getattr(_names, "by_id", None), getattr(_names, "ran", None)
        inputs_by_id = getattr(_names, "inputs_by_id", None)
        _names.by_id = dict(by_id or {})
        _names.inputs_by_id = dict(inputs_by_id or {})
        _names.ran = set()
        originals = []
        try:
            for p, mod in chosen:
                if _matches(p, patterns):
                    _names.by_id[id(mod)] = p
                if _matches(p, in_patterns):
                    _names.inputs_by_id[id(mod)] = p + INPUT_SUFFIX
                originals.append((mod, type(mod)))
                # object.__setattr__: nnx refuses attribute writes from inside a trace,
                # but the class swap changes no state and is undone below.
                object.__setattr__(mod, "__class__", _tapping_subclass(type(mod)))
            try:
                if model is not None and _trace.tracing():
                    out = _call_with_closed_model(fn, model, args, kwargs)
                else:
                    out = fn(*args, **kwargs)
            except flax_errors.TraceContextError as e:
                if model is None:
                    raise
                raise ValueError(
                    f"{caller}: the model given as model=... changes its state in this call "
                    "(train mode: BatchNorm statistics, Dropout's RNG count, a counter), and "
                    "a model the function closes over cannot be written to from inside the "
                    "transformation. Pass the model as an argument instead (tap_nnx(fn, "
                    "argnum=0), fn(model, ...)): fgrad then writes its new state back, as "
                    "nnx.grad does. Or call model.eval() first."
                ) from e
        finally:
            for mod, cls in originals:
                object.__setattr__(mod, "__class__", cls)
            ran_here = _names.ran
            _names.by_id, _names.ran = by_id, ran
            _names.inputs_by_id = inputs_by_id
            if ran is not None:  # an enclosing tap_nnx saw these run too
                ran |= ran_here
        never = [p for p in patterns if not any(glob_match(r, p) for r in ran_here)]
        if never:
            raise ValueError(
                f"{caller}: no submodule matching {never[0]!r} ran while the function was "
                "called, though the model given has such submodules. Does the function "
                "call another copy of the model (nnx.merge(graphdef, state), nnx.jit, a "
                "clone)? tap_nnx taps the model object it is given: pass the function that "
                "calls that object (argnum=..., or model=... if it closes over it), or call "
                "tap_nnx inside the function on the model it rebuilds."
            )
        return out

    return wrapped
