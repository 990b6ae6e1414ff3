"""PyTorch's ``.grad`` as an explicit pytree: the accumulator and its frozen leaves.

In PyTorch ``loss.backward()`` adds into each leaf's ``.grad``, ``zero_grad()`` clears
it, and a leaf with ``requires_grad=False`` keeps ``.grad = None``. In fgrad the
accumulator is a pytree shaped like the parameters, ``None`` at frozen leaves, that the
caller threads through. This module holds `zero_grad` and the toolkit that `backward`,
`accumulate` and `step` share: the trainable mask, splitting parameters into trainable
and frozen parts and merging them back (equinox's ``partition``/``combine``), checking an
accumulator against its parameters, and adding a gradient into it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fgrad import _checks
from fgrad._typing import PyTree

Trainable = Any  # None | bool | pytree of bools | Callable[[path, leaf], bool]


def is_none(x: Any) -> bool:
    return x is None


def trainable_mask(params: Any, trainable: Trainable, caller: str) -> Any:
    """A pytree of Python bools shaped like ``params``."""
    if trainable is None or trainable is True or trainable is False:
        flag = trainable is not False
        return jax.tree.map(lambda _: flag, params)
    if callable(trainable):

        def decide(path, leaf):
            keep = trainable(jax.tree_util.keystr(path), leaf)
            if not isinstance(keep, bool):
                raise TypeError(
                    f"{caller}: the trainable predicate must return a Python bool for each "
                    f"leaf, got {type(keep).__name__} for {jax.tree_util.keystr(path)}."
                )
            return keep

        return jax.tree_util.tree_map_with_path(decide, params)
    for path, m in jax.tree_util.tree_leaves_with_path(trainable):
        if not isinstance(m, bool):
            raise TypeError(
                f"{caller}: trainable{jax.tree_util.keystr(path)} must be a Python bool, got "
                f"{type(m).__name__}."
            )
    try:  # broadcast each bool of the (prefix) tree over its subtree of params
        return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), trainable, params)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{caller}: trainable must be None, a bool, a predicate f(path, leaf) -> bool, or "
            f"a pytree of bools with the structure of params (or a prefix of it): {e}"
        ) from None


def zero_grad(params: PyTree, trainable: Trainable = None) -> PyTree:
    """A fresh gradient accumulator: zeros shaped like ``params``, ``None`` where frozen.

    PyTorch: ``optimizer.zero_grad(set_to_none=False)``, with ``requires_grad=False``
    leaves keeping ``.grad = None``.

    Args:
      params: a pytree of arrays.
      trainable: which leaves take gradients. ``None`` or ``True``: all. A pytree of
        Python bools with the structure of ``params`` (or a prefix of it), or a predicate
        ``f(path, leaf) -> bool`` where ``path`` is the leaf's key string, e.g.
        ``"['linear1.weight']"``.

    Returns:
      A pytree with the structure of ``params``: zeros of each trainable leaf's shape and
      dtype, ``None`` at the others.

    Examples:
      >>> import fgrad
      >>> p = fgrad.models.seed_params()
      >>> g = fgrad.zero_grad(p, trainable=lambda path, _: "linear2" in path)
      >>> g["linear1.weight"] is None, g["linear2.weight"]
      (True, Array([[0.]], dtype=float32))
    """
    caller = "fgrad.zero_grad"
    mask = trainable_mask(params, trainable, caller)
    trainable_params = jax.tree.map(lambda m, p: p if m else None, mask, params)
    _checks.require_float_tree(trainable_params, caller, "trainable parameters")
    return jax.tree.map(lambda m, p: jnp.zeros_like(p) if m else None, mask, params)


def check_grads(params: Any, grads: Any, caller: str) -> None:
    """``grads`` has the structure and shapes of ``params`` (None at frozen leaves), and
    the trainable leaves of ``params`` are floating point."""
    where = _checks.first_structure_difference(params, grads, none_ok=True)
    if where is not None:
        raise ValueError(
            f"{caller}: grads must have the structure and shapes of params (None at frozen "
            f"leaves), but grads{where}. Make it with fgrad.zero_grad(params, trainable=...)."
        )
    _checks.require_float_tree(split(params, grads)[0], caller, "trainable parameters")


def prepare_grads(params: Any, grads: Any, caller: str) -> Any:
    """``grads`` checked against ``params`` (zeros everywhere when None: zero_grad checks
    that every parameter is floating point)."""
    if grads is None:
        return zero_grad(params)
    check_grads(params, grads, caller)
    return grads


def split(params: Any, grads: Any) -> tuple[Any, Any]:
    """``params`` as (trainable part, frozen part): each ``None`` where the other has the
    leaf; a leaf is frozen where ``grads`` holds ``None``."""
    train = jax.tree.map(lambda g, p: None if g is None else p, grads, params, is_leaf=is_none)
    frozen = jax.tree.map(lambda g, p: p if g is None else None, grads, params, is_leaf=is_none)
    return train, frozen


def merge(train: Any, frozen: Any) -> Any:
    return jax.tree.map(lambda t, f: f if t is None else t, train, frozen, is_leaf=is_none)


def value_and_grad_trainable(fn, params, grads, args, has_aux, caller):
    """``(value, aux, g)``: the scalar ``fn(params, *args)`` and its gradient w.r.t. the
    trainable leaves only (``None`` at frozen ones, which are not differentiated)."""
    train, frozen = split(params, grads)

    def scalar_fn(t):
        out = fn(merge(t, frozen), *args)
        value, aux = _checks.split_aux(out, caller) if has_aux else (out, None)
        y = _checks.scalar_output(value, caller, "The loss must be a scalar.")
        return jnp.reshape(y, ()), (value, aux)

    (_, (value, aux)), g = jax.value_and_grad(scalar_fn, has_aux=True)(train)
    return value, aux, g


def add_into(grads: Any, g: Any, scale: Any = None) -> Any:
    """``grads + scale * g`` leafwise, in the accumulator's dtype; ``None`` stays ``None``."""

    def add(acc, d):
        if acc is None:
            return None
        d = d.astype(acc.dtype)
        return acc + (d if scale is None else d * jnp.asarray(scale, acc.dtype))

    return jax.tree.map(add, grads, g, is_leaf=is_none)
