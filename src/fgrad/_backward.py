"""``loss.backward()``: add a loss's gradient into the explicit ``.grad`` pytree.

The accumulator comes from `fgrad.zero_grad` (``None`` at frozen leaves); `backward`
differentiates only the trainable leaves and adds into it, as PyTorch's
``loss.backward()`` adds into ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fgrad import _grads
from fgrad._typing import PyTree


def backward(
    fn: Callable,
    params: PyTree,
    *args: Any,
    grads: PyTree = None,
    has_aux: bool = False,
) -> tuple[Any, Any]:
    """``loss.backward()``: adds the gradient of scalar ``fn(params, *args)`` into ``grads``.

    Args:
      fn: ``fn(params, *args)`` returning a scalar (an array with one element), or
        ``(scalar, aux)`` with ``has_aux=True``.
      params: the parameters (PyTorch's leaves with ``requires_grad=True``).
      *args: further arguments (inputs, targets); they get no gradient, as an input with
        ``requires_grad=False`` gets ``.grad = None``.
      grads: the accumulator, as made by `fgrad.zero_grad` or returned by an earlier
        ``backward``: ``None`` at frozen leaves, which stay ``None``. ``None`` (the
        default) starts from zeros for every leaf, as a first ``.backward()`` does.
      has_aux: whether ``fn`` returns ``(scalar, aux)``.

    Returns:
      ``(value, grads)`` (``((value, aux), grads)`` with ``has_aux``): the loss and the
      accumulator with this loss's gradient added.

    Examples:
      The notebook's ``f.backward(retain_graph=True); y.backward()``: grads accumulate.

      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> p, x = fgrad.models.seed_params(), jnp.array([[4.0]])
      >>> y = lambda p, x: fgrad.models.seed_net(p, x)[1]
      >>> f = lambda p, x: fgrad.grad_intermediates(y, "l")(p, x)["l"]
      >>> _, g = fgrad.backward(f, p, x, grads=fgrad.zero_grad(p))
      >>> _, g = fgrad.backward(y, p, x, grads=g)
      >>> g["linear1.weight"], g["linear2.weight"], g["linear2.bias"]
      (Array([[512.]], dtype=float32), Array([[828.]], dtype=float32), Array([64.], dtype=float32))
    """
    caller = "fgrad.backward"
    grads = _grads.prepare_grads(params, grads, caller)
    value, aux, g = _grads.value_and_grad_trainable(fn, params, grads, args, has_aux, caller)
    return ((value, aux) if has_aux else value), _grads.add_into(grads, g)
