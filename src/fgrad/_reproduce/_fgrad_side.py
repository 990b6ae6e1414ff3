"""Every quantity of the seed notebook, computed the fgrad way (pure functions)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import fgrad
from fgrad.models import seed_dy_dl as f_fn  # the notebook's f = autograd.grad(y, l, ...)
from fgrad.models import seed_net, seed_params
from fgrad.models import seed_y as y_fn  # the notebook's y as a function of the parameters

W1, W2, B2 = "linear1.weight", "linear2.weight", "linear2.bias"


def _put(out: dict[str, Any], prefix: str, grads: dict[str, Any]) -> None:
    for short, name in (("w1", W1), ("w2", W2), ("b2", B2)):
        out[f"{prefix}.{short}"] = grads[name]


def cells(params: dict[str, jax.Array], z: jax.Array) -> dict[str, Any]:
    """Every quantity keyed as in ``_notebook.QUANTITIES``; a pure, jit-able function.

    ``None`` stands where PyTorch's ``.grad`` is ``None``.
    """
    out: dict[str, Any] = {}

    # In[7]: forward.
    out["l"], out["y"] = seed_net(params, z)

    # In[10]: autograd.grad(outputs=y, inputs=l).
    out["dy_dl"] = f_fn(params, z)

    # In[16]-[18]: y.backward() fills .grad of every leaf; z has requires_grad=False.
    leaves = {"net": params, "z": z}
    acc = fgrad.zero_grad(leaves, trainable={"net": True, "z": False})
    _, acc = fgrad.backward(lambda lv: y_fn(lv["net"], lv["z"]), leaves, grads=acc)
    out["backward.z"] = acc["z"]
    _put(out, "backward", acc["net"])

    # In[21]-[23]: autograd.grad(y, w1) returns the gradient and fills no accumulator.
    grads = None  # PyTorch's .grad before any backward()
    out["grad_w1"] = jax.grad(lambda p: jnp.sum(y_fn(p, z)))(params)[W1]
    out["grad_w1.acc"] = grads

    # In[31]-[33]: one forward, a pullback used three times (retain_graph=True, always).
    y, pullback = fgrad.vjp_intermediates(y_fn, names=(), argnums=0)(params, z)
    out["retain.w1"] = pullback(jnp.ones_like(y))[1][W1]
    out["retain.w2"] = pullback(jnp.ones_like(y))[1][W2]
    _, acc = fgrad.backward(y_fn, params, z, grads=fgrad.zero_grad(params))
    _put(out, "retain.backward", acc)

    # In[36]-[40]: f = dy/dl with create_graph=True, then f.backward().
    out["f"] = f_fn(params, z)
    _, acc = fgrad.backward(f_fn, params, z)
    _put(out, "f.backward", acc)

    # In[43]: first and second derivative of y w.r.t. w1.
    def y_of_w1(w1):
        return y_fn({**params, W1: w1}, z)

    out["d1_w1"] = fgrad.derivative(y_of_w1, 1)(params[W1])
    out["d2_w1"] = fgrad.derivative(y_of_w1, 2)(params[W1])

    # In[46]: f.backward(retain_graph=True); y.backward(): .grad accumulates.
    _, acc = fgrad.backward(f_fn, params, z, grads=fgrad.zero_grad(params))
    _, acc = fgrad.backward(y_fn, params, z, grads=acc)
    _put(out, "acc", acc)
    return out


def compute(*, jit: bool = True) -> dict[str, float | None]:
    """The quantities as Python floats (None where the notebook has None)."""
    params, z = seed_params(), jnp.array([[4.0]])
    fn = jax.jit(cells) if jit else cells
    values = fn(params, z)
    return {k: None if v is None else float(jnp.reshape(v, ())) for k, v in values.items()}
