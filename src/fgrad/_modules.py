"""Taps on the outputs of chosen layers of an unmodified Flax model.

PyTorch users register a forward hook on any submodule; fgrad's equivalent is to tap the
submodule's output without editing the model's code. For linen the outputs are caught
with ``flax.linen.intercept_methods``; for nnx the chosen submodule objects are given,
for the duration of the call, a subclass whose ``__call__`` taps its result. Each tap is
named by the module's path (``"Dense_0"``, ``"block/Conv_1"``, ``"layers/2"``).
With ``inputs=``, chosen submodules also have their inputs tapped (PyTorch's
``register_forward_pre_hook``), named by the path and ``":in"`` (``"Dense_0:in"``).
"""

from __future__ import annotations

import fnmatch
import functools
import threading
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import linen as nn
from flax import nnx

from fgrad._tap import tap

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
    pats = [paths] if isinstance(paths, str) else list(paths)
    if not pats or not all(isinstance(p, str) and p for p in pats):
        raise TypeError(
            f"{caller}: paths must be a module path or glob pattern (e.g. 'Dense_0', "
            f"'block/*'), or a non-empty sequence of them; got {paths!r}."
        )
    return pats


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _check_all_matched(patterns, seen: Sequence[str], caller: str) -> None:
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(s, p) for s in seen)]
    if missing:
        listed = ", ".join(repr(s) for s in dict.fromkeys(seen)) or "none"
        raise ValueError(
            f"{caller}: no submodule path matches {missing[0]!r}; the model's submodule paths "
            f"are: {listed}."
        )


def tap_linen(
    fn: Callable, paths: Paths = "*", *, method: str = "__call__", inputs: Paths | None = None
) -> Callable:
    """Taps the outputs of chosen submodules of a Flax linen model, unmodified.

    The linen equivalent of ``module.register_forward_hook`` for
    ``autograd.grad(loss, activation)``: every submodule whose path matches ``paths``
    has its output tapped under its path, so `fgrad.grad_intermediates` and friends can
    read and differentiate it.

    Args:
      fn: a function that applies a linen model, typically ``model.apply``.
      paths: a module path (``"Dense_0"``, ``"encoder/layer_1"``) or glob pattern
        (``"*"``: every submodule; ``"block_*/Conv_0"``), or a sequence of them. Each
        pattern must match at least one submodule.
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

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        seen: list[str] = []

        def interceptor(next_fun, a, k, context):
            at = "/".join(context.module.path)
            if at and context.method_name == method and _matches(at, in_patterns):
                a = _tap_inputs(at + INPUT_SUFFIX, tuple(a))
            out = next_fun(*a, **k)
            if context.method_name != method:
                return out
            path = "/".join(context.module.path)
            if not path:  # the root module: its output is fn's own
                return out
            seen.append(path)
            return tap(path, out) if _matches(path, patterns) else out

        with nn.intercept_methods(interceptor):
            out = fn(*args, **kwargs)
        _check_all_matched(patterns, seen, caller)
        _check_all_matched(in_patterns, seen, caller)
        return out

    return wrapped


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
            return out if name is None else tap(name, out)

        _subclasses[cls] = type(cls)(cls.__name__, (cls,), {"__call__": __call__})
    return _subclasses[cls]


def tap_nnx(
    fn: Callable,
    paths: Paths = "*",
    *,
    argnum: int = 0,
    model: nnx.Module | None = None,
    inputs: Paths | None = None,
) -> Callable:
    """Taps the outputs of chosen submodules of a Flax nnx model, unmodified.

    The nnx equivalent of ``module.register_forward_hook``: every submodule whose path
    matches ``paths`` has the result of its ``__call__`` tapped under its path
    (``"blocks/0"``, ``"head"``).

    Args:
      fn: a function that calls the model.
      paths: a submodule path or glob pattern (``"*"``: every submodule), or a sequence
        of them. Each pattern must match at least one submodule.
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
        found = [
            ("/".join(str(k) for k in path), mod)
            for path, mod in nnx.iter_modules(m)
            if path and callable(mod)
        ]
        _check_all_matched(patterns, [p for p, _ in found], caller)
        _check_all_matched(in_patterns, [p for p, _ in found], caller)
        chosen = [(p, mod) for p, mod in found if _matches(p, [*patterns, *in_patterns])]
        by_id = getattr(_names, "by_id", None)
        inputs_by_id = getattr(_names, "inputs_by_id", None)
        _names.by_id = dict(by_id or {})
        _names.inputs_by_id = dict(inputs_by_id or {})
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
            return fn(*args, **kwargs)
        finally:
            for mod, cls in originals:
                object.__setattr__(mod, "__class__", cls)
            _names.by_id = by_id
            _names.inputs_by_id = inputs_by_id

    return wrapped
