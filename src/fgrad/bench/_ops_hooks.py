"""Benchmark operations for `fgrad.with_hooks`, as builders for the bench registry.

``hook_backward``: the parameters' gradient with a gradient-reversal hook (scale -0.5) at
the workload's first tapped intermediate; fgrad's backward hook against a hand-written
``jax.custom_vjp`` inserted at the same place, and PyTorch's ``tensor.register_hook``.
``hook_forward``: the same gradient with the intermediate replaced by half of itself;
fgrad's forward hook against the forward edited by hand, and PyTorch's forward hook
(a replacement returned where the value is produced).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

import fgrad
from fgrad.bench import _jax_ops
from fgrad.bench._workloads import Workload, hidden_names

SCALE = -0.5  # the backward hook's gradient scale (gradient reversal with lambda = 0.5)
FACTOR = 0.5  # the forward hook's replacement: the value times this


def _site(w: Workload) -> str:
    return hidden_names(w)[0]


def _jax_setup(w: Workload):
    params, batch = _jax_ops._data(w)
    loss, _, _ = _jax_ops._losses(w)
    return params, batch, loss


@jax.custom_vjp
def _reverse(h):
    return h


_reverse.defvjp(lambda h: (h, None), lambda _, g: (SCALE * g,))


def _jax_backward(impl: str, w: Workload) -> tuple[Callable, tuple]:
    params, batch, loss = _jax_setup(w)
    site = _site(w)
    if impl == "fgrad":
        tapped = lambda p, b: loss(p, b, fgrad.tap)
        f = fgrad.with_hooks(tapped, backward={site: lambda g: SCALE * g})
    else:  # the custom_vjp written by hand at the same place
        f = lambda p, b: loss(p, b, lambda name, h: _reverse(h) if name == site else h)
    return jax.jit(jax.grad(f)), (params, batch)


def _jax_forward(impl: str, w: Workload) -> tuple[Callable, tuple]:
    params, batch, loss = _jax_setup(w)
    site = _site(w)
    if impl == "fgrad":
        tapped = lambda p, b: loss(p, b, fgrad.tap)
        f = fgrad.with_hooks(tapped, forward={site: lambda h: FACTOR * h})
    else:  # the forward edited by hand
        f = lambda p, b: loss(p, b, lambda name, h: FACTOR * h if name == site else h)
    return jax.jit(jax.grad(f)), (params, batch)


def _torch_build(op: str):
    def build(impl: str, w: Workload, device: str) -> Callable[[], Any]:
        import torch

        from fgrad.bench import _torch_ops
        from fgrad.bench._cases import Unsupported

        if impl != "torch":
            raise Unsupported(f"{op} is measured with eager PyTorch hooks only")
        params, batch = _torch_ops._data(w, device)
        fwd, _, _ = _torch_ops._losses(w)
        site = _site(w)

        def tap(name, h):
            if name != site:
                return h
            if op == "hook_backward":
                h.register_hook(lambda g: SCALE * g)
                return h
            return FACTOR * h  # a forward hook's replacement

        def run():
            _torch_ops._zero(params)
            out = fwd(params, batch["x"], tap)
            if w.kind == "seed":
                loss = out[:, 0].mean()
            else:
                loss = torch.nn.functional.cross_entropy(out, batch["y"])
            loss.backward()
            return {k: t.grad for k, t in params.items()}

        return run

    return build


JAX = {
    "hook_backward": {"fgrad": _jax_backward, "jax": _jax_backward},
    "hook_forward": {"fgrad": _jax_forward, "jax": _jax_forward},
}
TORCH = {
    "hook_backward": {"torch": _torch_build("hook_backward")},
    "hook_forward": {"torch": _torch_build("hook_forward")},
}
APPLIES = {
    "hook_backward": lambda w: w.kind in ("seed", "mlp", "cnn", "transformer"),
    "hook_forward": lambda w: w.kind in ("seed", "mlp", "cnn", "transformer"),
}
