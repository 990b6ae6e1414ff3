"""Benchmark operations for `fgrad.per_example`: per-example gradient norms and DP-SGD's
clipped mean gradient, through fgrad (ghost norms from layer statistics), by hand with
``vmap(grad)``, and in PyTorch with Opacus (ghost clipping), BackPACK (``BatchL2Grad``)
and ``torch.func`` (``vmap(grad)``).

Builders follow the bench operation contract: ``build(impl, w) -> (jitted_fn, args)`` for
JAX and ``build(impl, w, device) -> zero-arg callable`` for PyTorch. The tables at the end
(`JAX`, `TORCH`, `APPLIES`) are wired into the registry by the bench's owner.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fgrad.bench._workloads import Workload

MAX_NORM = 1.0  # the clipping norm of the clipped_grad operation


def _identity(name, h):
    del name
    return h


# --- JAX -----------------------------------------------------------------------------------


def _jax_case(w: Workload):
    """(per-example loss(params, batch) -> (n,), params, batch) on the workload."""
    import jax
    import jax.numpy as jnp

    from fgrad.bench._workloads import jax_forward

    params = {k: jnp.asarray(v) for k, v in w.numpy_params().items()}
    batch = {k: jnp.asarray(v) for k, v in w.numpy_batch().items()}
    if w.kind == "cnn":
        batch["x"] = jnp.transpose(batch["x"], (0, 2, 3, 1))  # NCHW -> NHWC, once
    batch["y"] = batch["y"].astype(jnp.int32)
    fwd = jax_forward(w)

    def losses(p, b):
        logp = jax.nn.log_softmax(fwd(p, b["x"], _identity))
        return -jnp.take_along_axis(logp, b["y"][:, None], axis=1)[:, 0]

    return losses, params, batch


def _vmap_grads(losses):
    """Per-example gradients by hand: ``vmap(grad)`` of one example's loss."""
    import jax

    one = lambda p, ex: losses(p, jax.tree.map(lambda x: x[None], ex))[0]
    return jax.vmap(jax.grad(one), in_axes=(None, 0))


def _norms(g):
    import jax
    import jax.numpy as jnp

    sq = [jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1) for x in jax.tree.leaves(g)]
    return jnp.sqrt(sum(sq))


def build_grad_norms(impl: str, w: Workload) -> tuple[Callable, tuple]:
    import jax

    from fgrad import per_example

    losses, params, batch = _jax_case(w)
    if impl == "fgrad":
        return jax.jit(lambda p, b: per_example.grad_norms(losses, p, b)), (params, batch)
    if impl == "vmap":
        g = _vmap_grads(losses)
        return jax.jit(lambda p, b: _norms(g(p, b))), (params, batch)
    raise KeyError(impl)


def build_clipped_grad(impl: str, w: Workload) -> tuple[Callable, tuple]:
    import jax
    import jax.numpy as jnp

    from fgrad import per_example

    losses, params, batch = _jax_case(w)
    if impl == "fgrad":
        f = lambda p, b: per_example.clipped_grad(losses, p, b, MAX_NORM)
        return jax.jit(f), (params, batch)
    if impl == "vmap":
        per = _vmap_grads(losses)

        def f(p, b):
            g = per(p, b)
            c = jnp.minimum(MAX_NORM / (_norms(g) + 1e-6), 1.0)
            return jax.tree.map(lambda x: jnp.tensordot(c, x, axes=1) / x.shape[0], g)

        return jax.jit(f), (params, batch)
    raise KeyError(impl)


# --- PyTorch -------------------------------------------------------------------------------


def _torch_module(w: Workload, device: str):
    """The workload as a ``torch.nn.Module`` (so Opacus' and BackPACK's hooks see its
    layers), with the workload's weights, and its batch."""
    import numpy as np
    import torch
    from torch import nn

    from fgrad.bench._cases import Unsupported

    cfg = w.config
    if w.kind == "mlp":
        mods: list[nn.Module] = []
        sizes = [cfg["inputs"], *([cfg["width"]] * cfg["depth"]), cfg["classes"]]
        for i in range(len(sizes) - 1):
            mods.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < cfg["depth"]:
                mods.append(nn.Tanh())
        net = nn.Sequential(*mods)
        rename = {f"fc{i}": str(2 * i) for i in range(cfg["depth"] + 1)}
    elif w.kind == "cnn":
        c1, c2 = cfg["channels"]
        net = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c2, cfg["classes"]),
        )
        rename = {"conv1": "0", "conv2": "2", "fc": "6"}
    elif w.kind == "transformer":
        net = _block_class()(cfg)  # made on first use: torch is imported lazily
        rename = {}
    else:
        raise Unsupported(f"no per-example operations on the {w.kind} workload")
    state = {}
    for k, v in w.numpy_params().items():
        mod, _, leaf = k.rpartition(".")
        state[f"{rename.get(mod, mod)}.{leaf}"] = torch.from_numpy(np.ascontiguousarray(v))
    net.load_state_dict(state)
    net = net.to(device)
    b = w.numpy_batch()
    x = torch.from_numpy(b["x"]).to(device)
    y = torch.from_numpy(b["y"]).to(device)
    return net, x, y


@functools.cache
def _block_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        """The transformer workload's block, as modules (same maths as torch_forward)."""

        def __init__(self, cfg):
            super().__init__()
            d, f = cfg["d_model"], cfg["d_ff"]
            self.heads = cfg["heads"]
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.ff1, self.ff2 = nn.Linear(d, f), nn.Linear(f, d)
            self.head = nn.Linear(d, cfg["classes"])

        def forward(self, x):
            n, s, d = x.shape
            h = self.ln1(x)
            split = lambda t: t.reshape(n, s, self.heads, d // self.heads).transpose(1, 2)
            q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            x = x + self.o((att @ v).transpose(1, 2).reshape(n, s, d))
            x = x + self.ff2(F.gelu(self.ff1(self.ln2(x))))
            return self.head(x.mean(dim=1))

    return Block


def _opacus_ghost(net, batch_size: int):
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(
        net, max_grad_norm=MAX_NORM, use_ghost_clipping=True, loss_reduction="mean"
    )
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=MAX_NORM,
        expected_batch_size=batch_size,
        loss_reduction="mean",
    )
    crit = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss(), "mean")
    return gsm, opt, crit


def _torch_func_grads(net, x, y):
    import torch.func as tf
    import torch.nn.functional as F

    params = {k: v.detach() for k, v in net.named_parameters()}

    def one(p, xi, yi):
        out = tf.functional_call(net, p, (xi[None],))
        return F.cross_entropy(out, yi[None])

    g = tf.vmap(tf.grad(one), in_dims=(None, 0, 0))
    return lambda: g(params, x, y)


def _torch_norms(grads: dict) -> Any:
    import torch

    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))


def build_torch_grad_norms(impl: str, w: Workload, device: str) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F

    from fgrad.bench._cases import Unsupported

    net, x, y = _torch_module(w, device)
    if impl == "torch.func":
        g = _torch_func_grads(net, x, y)
        return lambda: _torch_norms(g())
    if impl == "opacus":
        gsm, opt, _ = _opacus_ghost(net, x.shape[0])

        def run():
            opt.zero_grad()
            F.cross_entropy(gsm(x), y).backward()  # the norm pass of ghost clipping
            return gsm.get_norm_sample()

        return run
    if impl == "backpack":
        if w.kind == "transformer":
            raise Unsupported("BackPACK has no extension for LayerNorm or attention")
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad

        net = extend(net)
        crit = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

        def run():
            net.zero_grad()
            with backpack(BatchL2Grad()):
                crit(net(x), y).backward()
            return torch.sqrt(sum(p.batch_l2 for p in net.parameters()))

        return run
    raise Unsupported(f"grad_norms has no {impl} implementation")


def build_torch_clipped_grad(impl: str, w: Workload, device: str) -> Callable[[], Any]:
    import torch

    from fgrad.bench._cases import Unsupported

    net, x, y = _torch_module(w, device)
    if impl == "torch.func":
        g = _torch_func_grads(net, x, y)

        def run():
            grads = g()
            c = (MAX_NORM / (_torch_norms(grads) + 1e-6)).clamp(max=1.0)
            return {k: torch.tensordot(c, v, dims=1) / x.shape[0] for k, v in grads.items()}

        return run
    if impl == "opacus":
        gsm, opt, crit = _opacus_ghost(net, x.shape[0])

        def run():
            opt.zero_grad()
            crit(gsm(x), y).backward()  # norms, then the clip-weighted second backward
            opt.pre_step()  # sum, (zero) noise, divide by the batch size
            return {k: p.grad for k, p in net.named_parameters()}

        return run
    raise Unsupported(f"clipped_grad has no {impl} implementation")


JAX = {
    "grad_norms": {"fgrad": build_grad_norms, "vmap": build_grad_norms},
    "clipped_grad": {"fgrad": build_clipped_grad, "vmap": build_clipped_grad},
}
TORCH = {
    "grad_norms": {
        "opacus": build_torch_grad_norms,
        "backpack": build_torch_grad_norms,
        "torch.func": build_torch_grad_norms,
    },
    "clipped_grad": {"opacus": build_torch_clipped_grad, "torch.func": build_torch_clipped_grad},
}
APPLIES = {
    "grad_norms": lambda w: w.kind in ("mlp", "cnn", "transformer"),
    "clipped_grad": lambda w: w.kind in ("mlp", "cnn", "transformer"),
}
