"""``loss.backward()``: add a loss's gradient into the explicit ``.grad`` pytree.

The accumulator comes from `fgrad.zero_grad` (``None`` at frozen leaves, `fgrad.NoGrad`
where a trainable leaf has no gradient yet); `backward` differentiates only the trainable
leaves and adds into it, as PyTorch's ``loss.backward()`` adds into ``.grad``.
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
    gradient: Any = None,
) -> tuple[Any, Any]:
    """``loss.backward()``: adds the gradient of scalar ``fn(params, *args)`` into ``grads``.

    With ``y = fn(params, *args)`` and ``v = gradient`` (default: ``1`` for a scalar
    ``y``), every trainable leaf ``θ`` gets ``grads[θ] += vᵀ ∂y/∂θ``, PyTorch's
    ``y.backward(gradient=v)``. A leaf whose accumulator entry is `fgrad.NoGrad` (no
    gradient yet) receives one only if ``y`` depends on it, as PyTorch fills ``.grad``
    only for leaves its graph reaches; otherwise it stays `NoGrad`. "Depends" is read
    from the traced program once per trace: a leaf used only under
    ``lax.stop_gradient``, or not at all, gets nothing, while ``0 * w`` gets a zero
    gradient (as in PyTorch). Both branches of a ``lax.cond`` / ``lax.switch`` are in
    the program, so a leaf used in either branch counts as used whichever branch runs
    (and receives zeros when the other one ran); use a Python ``if`` outside ``jit`` for
    PyTorch's data-dependent ``None``.

    Complex parameters get PyTorch's ``.grad``: for a real loss the conjugate of
    ``jax.grad``'s (jax#9110), ``∂L/∂Re θ + i ∂L/∂Im θ``, so that an optax SGD step
    equals ``torch.optim.SGD``'s.

    Args:
      fn: ``fn(params, *args)`` returning a real scalar (an array with one element), or
        ``(output, aux)`` with ``has_aux=True``; with ``gradient=``, any pytree of arrays.
      params: the parameters (PyTorch's leaves with ``requires_grad=True``).
      *args: further arguments (inputs, targets); they get no gradient, as an input with
        ``requires_grad=False`` gets ``.grad = None``.
      grads: the accumulator, as made by `fgrad.zero_grad` or returned by an earlier
        ``backward``: ``None`` at frozen leaves (which stay ``None``), `fgrad.NoGrad` or
        an array at trainable ones. ``None`` (the default) is a fresh accumulator,
        ``fgrad.zero_grad(params)``, as before a first ``.backward()``.
      has_aux: whether ``fn`` returns ``(output, aux)``.
      gradient: ``v`` of ``Tensor.backward(gradient=v)``, for a non-scalar (or pytree)
        output: the same structure, shapes and kind (real or complex) as the output.

    Returns:
      ``(value, grads)`` (``((value, aux), grads)`` with ``has_aux``): the output and the
      accumulator with this output's gradient added.

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

      ``y.backward(gradient=v)`` for a vector output:

      >>> w, v = jnp.array([1.0, 2.0]), jnp.array([1.0, 0.5])
      >>> _, g = fgrad.backward(lambda w: w * w, w, gradient=v)
      >>> g
      Array([2., 2.], dtype=float32)
    """
    caller = "fgrad.backward"
    grads = _grads.prepare_grads(params, grads, caller)
    live = _grads.live_leaves(fn, params, grads, args, has_aux, caller, gradient)
    value, aux, g = _grads.value_and_grad_trainable(
        fn, params, grads, args, has_aux, caller, gradient
    )
    out = (value, aux) if has_aux else value
    return out, _grads.add_into(grads, g, live=live, like=params)
