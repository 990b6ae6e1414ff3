"""``optimizer.step()`` for optax, with PyTorch's handling of ``None`` gradients.

``torch.optim`` skips every parameter whose ``.grad`` is ``None``: no update, no weight
decay, no change to its momentum or Adam moments. optax updates every leaf it is given
(weight decay moves even a leaf whose gradient is zero). `step` gives optax PyTorch's
rule: leaves whose gradient is ``None`` come back bit-for-bit unchanged, and so do their
slots in the optimizer state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fgrad._grads import Trainable, check_grads, is_none, trainable_mask
from fgrad._typing import PyTree


def _keep_frozen(new: Any, old: Any, frozen: Any, params_tree: Any) -> Any:
    """In ``new`` (an optimizer state), put back ``old``'s leaves at frozen parameters, in
    every subtree shaped like the parameters (momenta, moments, traces)."""
    shaped_like_params = lambda x: jax.tree.structure(x) == params_tree

    def restore(n, o):
        if not shaped_like_params(n):
            return n
        return jax.tree.map(lambda a, b, f: b if f else a, n, o, frozen)

    return jax.tree.map(restore, new, old, is_leaf=shaped_like_params)


def step(
    optimizer: optax.GradientTransformation,
    params: PyTree,
    opt_state: PyTree,
    grads: PyTree,
    *,
    trainable: Trainable = None,
) -> tuple[Any, Any]:
    """``optimizer.step()``: applies an optax optimizer, leaving ``None``-grad leaves untouched.

    As in ``torch.optim``, a parameter whose gradient is ``None`` (a frozen leaf, as made
    by `fgrad.zero_grad`) gets no update at all: not the step, not weight decay, and its
    optimizer state (momentum, Adam moments) keeps its value. Every other leaf gets
    exactly optax's update.

    Args:
      optimizer: any ``optax.GradientTransformation``.
      params: the parameters.
      opt_state: ``optimizer.init(params)``, or the state returned by a previous ``step``.
      grads: gradients shaped like ``params``, ``None`` at frozen leaves (e.g. from
        `fgrad.backward` or `fgrad.accumulate`).
      trainable: optionally, which leaves are trainable (as in `fgrad.zero_grad`); a
        gradient given for a leaf marked frozen is then an error.

    Returns:
      ``(params, opt_state)`` after the update.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import fgrad
      >>> params = {"frozen": jnp.ones(2), "w": jnp.ones(2)}
      >>> opt = optax.adamw(0.1, weight_decay=0.5)
      >>> grads = {"frozen": None, "w": jnp.array([1.0, -1.0])}
      >>> new, _ = fgrad.step(opt, params, opt.init(params), grads)
      >>> new["frozen"]  # untouched: no step, no weight decay
      Array([1., 1.], dtype=float32)
      >>> [round(float(v), 4) for v in new["w"]]  # 1 - 0.1 * (±1 + 0.5 * 1)
      [0.85, 1.05]
    """
    caller = "fgrad.step"
    check_grads(params, grads, caller)
    if trainable is not None:
        mask = trainable_mask(params, trainable, caller)
        for (path, g), m in zip(
            jax.tree_util.tree_leaves_with_path(grads, is_leaf=is_none),
            jax.tree.leaves(mask),
            strict=True,
        ):
            if g is not None and not m:
                raise ValueError(
                    f"{caller}: grads{jax.tree_util.keystr(path)} holds a gradient but the "
                    "leaf is frozen (trainable is False there). Build the accumulator with "
                    "fgrad.zero_grad(params, trainable=...) so frozen leaves stay None."
                )
    frozen = jax.tree.map(lambda g: g is None, grads, is_leaf=is_none)
    full = jax.tree.map(
        lambda g, p: jnp.zeros_like(p) if g is None else g.astype(p.dtype),
        grads,
        params,
        is_leaf=is_none,
    )
    # optax's own arithmetic (e.g. Adam's bias correction, a Python float to the power of
    # an int32 count) needs standard promotion; run it so even where the caller is strict.
    with jax.numpy_dtype_promotion("standard"):
        updates, new_state = optimizer.update(full, opt_state, params)
    new_params = jax.tree.map(
        lambda f, p, u: p if f else (p + u.astype(p.dtype)), frozen, params, updates
    )
    new_state = _keep_frozen(new_state, opt_state, frozen, jax.tree.structure(params))
    return new_params, new_state
