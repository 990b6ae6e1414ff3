"""The seed notebook's network, ``y = ((w1*x)*w2 + b2)^2``, three ways.

As a pure function on a dict keyed like PyTorch's ``state_dict`` (`seed_params`,
`seed_net`), as a Flax linen module (`SeedNet`) and as a Flax nnx module
(`SeedNetNNX`). All three tap ``l = w1*x`` as ``"l"`` and give identical numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from fgrad._tap import tap

W1, W2, B2 = 3.0, 2.0, 6.0  # the notebook's weights


def seed_params(dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """The notebook's weights, named and laid out as PyTorch's ``Net().state_dict()``.

    ``linear1.weight`` is ``[[3.]]`` (``nn.Linear(1, 1, bias=False)``), ``linear2.weight``
    ``[[2.]]`` and ``linear2.bias`` ``[6.]`` (``nn.Linear(1, 1)``); PyTorch's Linear
    weights are ``(out_features, in_features)``.

    Examples:
      >>> import fgrad
      >>> fgrad.models.seed_params()["linear1.weight"]
      Array([[3.]], dtype=float32)
    """
    return {
        "linear1.weight": jnp.full((1, 1), W1, dtype),
        "linear2.weight": jnp.full((1, 1), W2, dtype),
        "linear2.bias": jnp.full((1,), B2, dtype),
    }


_SEED_SHAPES = {"linear1.weight": (1, 1), "linear2.weight": (1, 1), "linear2.bias": (1,)}


def _check_params(params: Any) -> None:
    if not isinstance(params, dict) or set(params) != set(_SEED_SHAPES):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(
            f"fgrad.models.seed_net: params must be a dict with keys {sorted(_SEED_SHAPES)} "
            f"(as made by fgrad.models.seed_params()), got {got}."
        )
    for k, shape in _SEED_SHAPES.items():
        if jnp.shape(params[k]) != shape:
            raise ValueError(
                f"fgrad.models.seed_net: params[{k!r}] must have shape {shape} (PyTorch's "
                f"layout), got {jnp.shape(params[k])}."
            )


def _check_input(x: Any, who: str) -> None:
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != 1:
        raise ValueError(
            f"{who}: x must have a last axis of size 1 (in_features=1), e.g. "
            f"jnp.array([[4.0]]); got shape {jnp.shape(x)}."
        )


def seed_net(params: dict[str, jax.Array], x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The notebook's ``Net.forward``: returns ``(l, y)`` with ``l = x W1ᵀ`` tapped as "l".

    Args:
      params: as made by `seed_params` (PyTorch names and layouts).
      x: inputs of shape ``(..., 1)``, e.g. ``jnp.array([[4.0]])``.

    Returns:
      ``(l, y)``, ``l = x W1ᵀ`` and ``y = (l W2ᵀ + b2)²``, each shaped like ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> fgrad.models.seed_net(fgrad.models.seed_params(), jnp.array([[4.0]]))
      (Array([[12.]], dtype=float32), Array([[900.]], dtype=float32))
    """
    _check_params(params)
    _check_input(x, "fgrad.models.seed_net")
    l = tap("l", x @ params["linear1.weight"].T)
    y = (l @ params["linear2.weight"].T + params["linear2.bias"]) ** 2
    return l, y


def seed_y(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """The notebook's output ``y`` as a function of the parameters: ``seed_net(...)[1]``.

    Args:
      params: as made by `seed_params`.
      x: inputs of shape ``(..., 1)``.

    Returns:
      ``y = ((x W1ᵀ) W2ᵀ + b2)²``, shaped like ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> fgrad.models.seed_y(fgrad.models.seed_params(), jnp.array([[4.0]]))
      Array([[900.]], dtype=float32)
    """
    return seed_net(params, x)[1]


def seed_dy_dl(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """The notebook's ``autograd.grad(y, l, create_graph=True)``, differentiable.

    ``dy/dl = 2 (l w2 + b2) w2`` at the tapped ``l = x W1ᵀ``, computed by
    `fgrad.grad_intermediates`.

    Args:
      params: as made by `seed_params`.
      x: inputs of shape ``(..., 1)``.

    Returns:
      ``dy/dl``, shaped like ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> fgrad.models.seed_dy_dl(fgrad.models.seed_params(), jnp.array([[4.0]]))
      Array([[120.]], dtype=float32)
    """
    from fgrad._intermediates import grad_intermediates  # fgrad imports this module first

    return grad_intermediates(seed_y, "l")(params, x)["l"]


class SeedNet(nn.Module):
    """The seed network as a Flax linen module; ``l`` is tapped as "l".

    Build its variables from PyTorch-layout weights with `seed_linen_variables`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> net = fgrad.models.SeedNet()
      >>> net.apply(fgrad.models.seed_linen_variables(), jnp.array([[4.0]]))
      (Array([[12.]], dtype=float32), Array([[900.]], dtype=float32))
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        _check_input(x, "fgrad.models.SeedNet")
        l = tap("l", nn.Dense(1, use_bias=False, name="linear1")(x))
        y = nn.Dense(1, name="linear2")(l) ** 2
        return l, y


def seed_linen_variables(params: dict[str, jax.Array] | None = None) -> dict[str, Any]:
    """Linen variables for `SeedNet` from PyTorch-layout ``params`` (default: the
    notebook's). Linen's ``Dense`` kernel is ``(in, out)``, the transpose of PyTorch's."""
    p = seed_params() if params is None else params
    _check_params(p)
    return {
        "params": {
            "linear1": {"kernel": p["linear1.weight"].T},
            "linear2": {"kernel": p["linear2.weight"].T, "bias": p["linear2.bias"]},
        }
    }


class SeedNetNNX(nnx.Module):
    """The seed network as a Flax nnx module; ``l`` is tapped as "l".

    Args:
      params: PyTorch-layout weights (default: the notebook's, `seed_params`).

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> fgrad.models.SeedNetNNX()(jnp.array([[4.0]]))
      (Array([[12.]], dtype=float32), Array([[900.]], dtype=float32))
    """

    def __init__(self, params: dict[str, jax.Array] | None = None):
        p = seed_params() if params is None else params
        _check_params(p)
        rngs = nnx.Rngs(0)  # replaced below: the weights are given, not drawn
        self.linear1 = nnx.Linear(1, 1, use_bias=False, rngs=rngs)
        self.linear2 = nnx.Linear(1, 1, rngs=rngs)
        self.linear1.kernel[...] = p["linear1.weight"].T
        self.linear2.kernel[...] = p["linear2.weight"].T
        self.linear2.bias[...] = p["linear2.bias"]  # type: ignore[index]  # use_bias=True

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        _check_input(x, "fgrad.models.SeedNetNNX")
        l = tap("l", self.linear1(x))
        return l, self.linear2(l) ** 2
