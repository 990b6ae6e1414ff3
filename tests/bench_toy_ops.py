"""A toy benchmark operation, registered from outside fgrad the way a new module of
operations is (JAX / TORCH / APPLIES tables): the gradient of the sum of squared
per-example outputs of the seed network, y = ((w1*x)*w2 + b2)^2 per example."""

import jax
import jax.numpy as jnp

from fgrad.bench._workloads import jax_forward, torch_forward


def _jax_data(w):
    params = {k: jnp.asarray(v) for k, v in w.numpy_params().items()}
    return params, jnp.asarray(w.numpy_batch()["x"])


def build_fgrad(impl, w):
    import fgrad

    params, x = _jax_data(w)
    fwd = jax_forward(w)
    loss = lambda p, x: jnp.sum(fwd(p, x, lambda name, h: h) ** 2)
    return jax.jit(lambda p, x: fgrad.backward(loss, p, x)[1]), (params, x)


def build_vmap(impl, w):
    params, x = _jax_data(w)
    fwd = jax_forward(w)
    one = lambda p, xi: jnp.sum(fwd(p, xi[None], lambda name, h: h) ** 2)
    per = jax.vmap(jax.grad(one), in_axes=(None, 0))
    return jax.jit(lambda p, x: jax.tree.map(lambda g: g.sum(0), per(p, x))), (params, x)


def build_torch(impl, w, device):
    import torch

    params = {
        k: torch.from_numpy(v.copy()).to(device).requires_grad_(True)
        for k, v in w.numpy_params().items()
    }
    x = torch.from_numpy(w.numpy_batch()["x"].copy()).to(device)
    fwd = torch_forward(w)

    def run():
        for t in params.values():
            t.grad = None
        (fwd(params, x, lambda name, h: h) ** 2).sum().backward()
        return {k: t.grad for k, t in params.items()}

    return run


JAX = {"toy": {"fgrad": build_fgrad, "vmap": build_vmap}}
TORCH = {"toy": {"torch": build_torch}}
APPLIES = {"toy": lambda w: w.kind == "seed"}
