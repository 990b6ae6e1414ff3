"""Argument checks shared by fgrad's public functions, with messages that say what to do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp


def is_float(x: Any) -> bool:
    """Whether ``x`` (an array, a ShapeDtypeStruct or a Python number) is floating point."""
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float, complex)):
        return isinstance(x, float)
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def is_int(x: Any) -> TypeGuard[int]:
    """Whether ``x`` is a Python int and not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(x, int) and not isinstance(x, bool)


def positive_int(value: Any, name: str, caller: str) -> int:
    """``value`` if it is a positive int (not a bool), else a ValueError naming it."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{caller}: {name} must be a positive int, got {value!r}.")
    return value


def require_float_tree(tree: Any, caller: str, what: str) -> None:
    """Raises TypeError naming the first leaf of ``tree`` that is not floating point."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not is_float(leaf):
            where = jax.tree_util.keystr(path) or "(the whole value)"
            dtype = getattr(leaf, "dtype", type(leaf).__name__)
            raise TypeError(
                f"{caller}: {what} must be floating point to be differentiated, but leaf "
                f"{where} has dtype {dtype}. Convert it first, e.g. x.astype(jnp.float32) "
                "(PyTorch likewise refuses requires_grad on integer tensors)."
            )


def scalar_output(out: Any, caller: str, hint: str) -> jax.Array:
    """Checks that ``out`` is one real floating-point number (any shape of size 1, as
    PyTorch accepts for an implicit ``grad_outputs``) and returns it."""
    leaves = jax.tree.leaves(out)
    if len(leaves) != 1 or not hasattr(leaves[0], "shape"):
        raise TypeError(
            f"{caller}: the function must return a single scalar array, got "
            f"{jax.tree.structure(out)}. {hint}"
        )
    (y,) = leaves
    if y.size != 1:
        raise TypeError(
            f"{caller}: the function must return a scalar (an array with one element), got "
            f"shape {tuple(y.shape)}. Reduce it first (e.g. .sum() or .mean()). {hint}"
        )
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise TypeError(
            f"{caller}: the function must return a real floating-point scalar, got dtype {y.dtype}."
        )
    return y


def split_aux(out: Any, caller: str) -> tuple[Any, Any]:
    """Splits ``(out, aux)`` returned by a ``has_aux=True`` function."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        got = f"a {type(out).__name__}"
        if isinstance(out, (tuple, list)):
            got += f" of length {len(out)}"
        raise TypeError(
            f"{caller}: with has_aux=True the function must return a pair (output, aux), got {got}."
        )
    return out[0], out[1]


def normalize_argnums(argnums: int | Sequence[int], nargs: int, caller: str) -> tuple[int, ...]:
    """``argnums`` as a tuple of non-negative indices into ``nargs`` positional args."""
    nums: tuple[Any, ...] = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not nums or not all(is_int(i) for i in nums):
        raise TypeError(
            f"{caller}: argnums must be an int or a non-empty tuple of ints, got {argnums!r}."
        )
    out = []
    for i in nums:
        j = i + nargs if i < 0 else i
        if not 0 <= j < nargs:
            raise ValueError(
                f"{caller}: argnums={argnums!r} refers to argument {i}, but the function "
                f"was called with {nargs} positional argument(s)."
            )
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"{caller}: argnums={argnums!r} names an argument twice.")
    return tuple(out)


def first_structure_difference(expected: Any, got: Any, *, none_ok: bool = False) -> str | None:
    """Where pytree ``got`` first differs from ``expected`` in structure or leaf shape,
    as a sentence fragment naming the path; None if they agree. With ``none_ok``, a
    ``None`` in ``got`` may stand for any leaf of ``expected`` (a frozen parameter)."""
    is_leaf = (lambda x: x is None) if none_ok else None
    e_map = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    g_map = {
        jax.tree_util.keystr(p): v
        for p, v in jax.tree_util.tree_leaves_with_path(got, is_leaf=is_leaf)
    }
    for k in e_map:
        if k not in g_map:
            return f"{k} is missing"
    for k in g_map:
        if k not in e_map:
            return f"{k} is not expected"
    for k, ev in e_map.items():
        gv = g_map[k]
        if gv is None and none_ok:
            continue
        if jnp.shape(ev) != jnp.shape(gv):
            return f"{k} has shape {jnp.shape(gv)}, expected {jnp.shape(ev)}"
    try:  # same paths and shapes; the container types must agree as well
        jax.tree.map(lambda *_: None, expected, got)
    except (ValueError, TypeError):
        return " has other container types than expected (e.g. a list where a tuple is)"
    return None


def describe_tree(tree: Any) -> str:
    """A short description of a pytree of arrays for an error message: its leaves' shapes
    and dtypes by path, e.g. ``"(a tuple) [0]: float32(2, 3)"``."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        return f"an empty {type(tree).__name__}"
    parts = []
    for path, leaf in leaves[:6]:
        where = jax.tree_util.keystr(path) or "the value"
        dtype = getattr(leaf, "dtype", type(leaf).__name__)
        parts.append(f"{where}: {dtype}{tuple(jnp.shape(leaf))}")
    more = f", ... ({len(leaves)} leaves)" if len(leaves) > 6 else ""
    return "{" + ", ".join(parts) + more + "}"


def describe(tree: Any) -> str:
    """A short description of a pytree as a user would recognise it: ``an array of shape
    (3,) and dtype float32``, ``a list of 3 Python floats``, ``a dict with keys ['a']``."""

    def one(x: Any) -> str:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return f"an array of shape {tuple(x.shape)} and dtype {x.dtype}"
        return f"a Python {type(x).__name__}"

    if isinstance(tree, (list, tuple)):
        kinds = sorted({"array" if hasattr(x, "shape") else type(x).__name__ for x in tree})
        inner = f" of {', '.join(kinds)}" if kinds and len(kinds) <= 2 else ""
        return f"a {type(tree).__name__} of {len(tree)} item(s){inner}"
    if isinstance(tree, dict):
        return f"a dict with keys {sorted(map(str, tree))}"
    if tree is None:
        return "None"
    if len(jax.tree.leaves(tree)) != 1:
        return f"a {type(tree).__name__} pytree with structure {jax.tree.structure(tree)}"
    return one(tree)


def half_precision(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating dtype narrower than 32 bits (bfloat16, float16)."""
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def require_prng_key(key: Any, caller: str) -> None:
    """Raises TypeError unless ``key`` is a JAX PRNG key: a typed key
    (``jax.random.key``) or a raw ``uint32[2]`` one (``jax.random.PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype == jnp.uint32 and jnp.shape(key)[-1:] == (2,):
        return
    got = f"{type(key).__name__}" if dtype is None else f"an array of {dtype}{jnp.shape(key)}"
    raise TypeError(f"{caller}: key must be a JAX PRNG key, e.g. jax.random.key(0); got {got}.")


def real_number(value: Any, name: str, caller: str) -> None:
    """Raises TypeError unless ``value`` is a real number: a Python int or float (not a
    bool) or a real scalar array (traced ones included)."""
    if isinstance(value, bool) or not (
        isinstance(value, (int, float))
        or (
            hasattr(value, "dtype")
            and jnp.ndim(value) == 0
            and (
                jnp.issubdtype(value.dtype, jnp.floating)
                or jnp.issubdtype(value.dtype, jnp.integer)
            )
        )
    ):
        raise TypeError(f"{caller}: {name} must be a real number, got {value!r}.")


def batch_size(batch: Any, caller: str) -> int:
    """The leading (example) size shared by every leaf of ``batch``; a ValueError naming
    the leaf where one is a scalar or the sizes differ, or where the batch is empty."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(f"{caller}: the batch is empty; pass arrays with a leading batch axis.")
    sizes: dict[str, int | None] = {
        jax.tree_util.keystr(p): (jnp.shape(x)[0] if jnp.ndim(x) else None) for p, x in leaves
    }
    for where, size in sizes.items():
        if size is None:
            raise ValueError(
                f"{caller}: batch{where} is a scalar; every batch leaf needs a leading batch "
                "axis (pass constants through a closure instead)."
            )
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"{caller}: every leaf of the batch must have the same leading (batch) size, got "
            f"{sizes}."
        )
    size = next(iter(sizes.values()))
    assert size is not None  # scalars were refused above
    return size


def refuse_shared_nnx(tree: Any, caller: str) -> None:
    """Raises ValueError if an nnx model in ``tree`` shares a submodule or variable between
    two of its attributes: JAX's pytree view of an nnx model (what fgrad's transformations
    trace) copies shared parts apart, so their gradients and state would be split between
    the copies instead of summed, as ``nnx.grad`` and PyTorch sum them."""
    from flax import nnx

    is_module = lambda x: isinstance(x, nnx.Module)
    for path, m in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_module):
        if is_module(m) and len(jax.tree.leaves(m)) != len(jax.tree.leaves(nnx.state(m))):
            where = jax.tree_util.keystr(path) or "the model"
            raise ValueError(
                f"{caller}: {where} shares a submodule or variable between two of its "
                "attributes (one nnx.Linear used as both self.a and self.b, tied weights). "
                "As a JAX pytree an nnx model copies shared parts apart, which would split "
                "their gradients and state between the copies. Differentiate its state "
                "instead: graphdef, state = nnx.split(model), and call "
                "nnx.merge(graphdef, state) inside the function (nnx keeps the sharing); "
                "apply fgrad.tap_nnx inside the function to the merged model."
            )


def equal_split(n: int, microbatches: Any, caller: str, hint: str = "") -> int:
    """The size of each of ``microbatches`` equal micro-batches of a batch of ``n``; a
    ValueError naming ``caller`` if ``microbatches`` is not a positive int or does not
    divide ``n`` (``hint``: what else the caller accepts)."""
    positive_int(microbatches, "microbatches", caller)
    if n % microbatches:
        raise ValueError(
            f"{caller}: a batch of {n} cannot be split into {microbatches} equal "
            f"micro-batches. Pick a divisor of {n}{hint}."
        )
    return n // microbatches
