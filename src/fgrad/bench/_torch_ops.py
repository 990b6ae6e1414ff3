"""The built-in benchmark operations in PyTorch: eager autograd ("torch"), torch.func
("torch.func") and torch.compile ("torch.compile") where it supports the operation; one
builder ``op(impl, w, device) -> run`` per operation and flavour, registered by the table at
the end. Each imports torch itself, so that registering them does not."""

from __future__ import annotations

from collections.abc import Callable

from fgrad.bench._cases import Unsupported
from fgrad.bench._workloads import Workload, torch_forward

K_MICRO = 4


def _data(w: Workload, device):
    import torch

    params = {
        k: torch.from_numpy(v.copy()).to(device).requires_grad_(True)
        for k, v in w.numpy_params().items()
    }
    batch = {k: torch.from_numpy(v.copy()).to(device) for k, v in w.numpy_batch().items()}
    return params, batch


def _identity(name, h):
    del name
    return h


def _losses(w: Workload):
    import torch.nn.functional as F

    fwd = torch_forward(w)
    if w.kind == "seed":
        per = lambda p, x, y: fwd(p, x, _identity)[:, 0]
    else:
        per = lambda p, x, y: F.cross_entropy(fwd(p, x, _identity), y, reduction="none")
    loss = lambda p, b: per(p, b["x"], b.get("y")).mean()
    return fwd, per, loss


def _zero(params):
    for t in params.values():
        t.grad = None


def _double_backward(impl: str, w: Workload, device: str) -> Callable[[], object]:
    raise Unsupported("torch.compile does not support double backward")


# --- torch.func ------------------------------------------------------------------------------


def _func_setup(w: Workload, device: str):
    params, batch = _data(w, device)
    _, per, loss = _losses(w)
    return {k: v.detach() for k, v in params.items()}, batch, per, loss


def func_grad(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch.func as tf

    flat, batch, _, loss = _func_setup(w, device)
    g = tf.grad(loss)
    return lambda: g(flat, batch)


def func_hvp(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch
    import torch.func as tf

    flat, batch, _, loss = _func_setup(w, device)
    v = {k: torch.full_like(t, 0.01) for k, t in flat.items()}
    g = tf.grad(loss)
    return lambda: tf.jvp(lambda q: g(q, batch), (flat,), (v,))[1]


def func_hessian(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch.func as tf

    flat, batch, _, loss = _func_setup(w, device)
    h = tf.hessian(loss)
    return lambda: h(flat, batch)


def func_input_gradient(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch.func as tf

    flat, batch, per, loss = _func_setup(w, device)

    def total(p, b):
        gx = tf.grad(lambda x: per(p, x, b.get("y")).sum())(b["x"])
        return loss(p, b) + (gx.flatten(1) ** 2).sum(1).mean()

    g = tf.grad(total)
    return lambda: g(flat, batch)


# --- eager autograd (and torch.compile on the plain gradient) --------------------------------


def grad(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch

    params, batch = _data(w, device)
    _, _, loss = _losses(w)
    names = list(params)
    compute = torch.compile(loss) if impl == "torch.compile" else loss

    def run():
        _zero(params)
        compute(params, batch).backward()
        return [params[k].grad for k in names]

    return run


def grad_intermediates(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch.nn.functional as F

    params, batch = _data(w, device)
    fwd, _, _ = _losses(w)
    names = list(params)

    def run():
        _zero(params)
        kept = []

        def keep(name, h):
            h.retain_grad()
            kept.append(h)
            return h

        out = fwd(params, batch["x"], keep)
        if w.kind == "seed":
            value = out[:, 0].mean()
        else:
            value = F.cross_entropy(out, batch["y"])
        value.backward()
        return [h.grad for h in kept] + [params[k].grad for k in names]

    return run


def backward_accumulate(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch.nn.functional as F

    params, batch = _data(w, device)
    fwd, _, _ = _losses(w)
    names = list(params)

    def run():
        _zero(params)
        out = fwd(params, batch["x"], _identity)
        first = out[:, 0].mean() if w.kind == "seed" else F.cross_entropy(out, batch["y"])
        first.backward(retain_graph=True)
        (0.5 * (out**2).mean()).backward()
        return [params[k].grad for k in names]

    return run


def microbatch(impl: str, w: Workload, device: str) -> Callable[[], object]:
    """A Python loop over the micro-batches (for "microbatch" and "microbatch_unrolled")."""
    params, batch = _data(w, device)
    _, _, loss = _losses(w)
    names = list(params)

    def run():
        _zero(params)
        chunks = {k: v.chunk(K_MICRO) for k, v in batch.items()}
        for i in range(K_MICRO):
            (loss(params, {k: c[i] for k, c in chunks.items()}) / K_MICRO).backward()
        return [params[k].grad for k in names]

    return run


def input_gradient(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch

    params, batch = _data(w, device)
    _, per, loss = _losses(w)
    names = list(params)

    def run():
        _zero(params)
        x = batch["x"].clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(per(params, x, batch.get("y")).sum(), x, create_graph=True)
        (loss(params, batch) + (gx.flatten(1) ** 2).sum(1).mean()).backward()
        return [params[k].grad for k in names]

    return run


def wgan_gp(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch

    params, batch = _data(w, device)
    fwd, _, _ = _losses(w)
    names = list(params)
    x = batch["x"]
    fake = x.flip(0) * 0.5
    gen = torch.Generator(device="cpu").manual_seed(0)
    eps = torch.rand(x.shape[0], generator=gen).to(device)
    eps = eps.reshape((-1,) + (1,) * (x.dim() - 1))
    critic = lambda p, v: fwd(p, v, _identity)[:, 0]

    def run():
        _zero(params)
        x_hat = (eps * x + (1 - eps) * fake).requires_grad_(True)
        (g,) = torch.autograd.grad(critic(params, x_hat).sum(), x_hat, create_graph=True)
        gp = 10.0 * ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
        (critic(params, fake).mean() - critic(params, x).mean() + gp).backward()
        return [params[k].grad for k in names]

    return run


def hvp(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch

    params, batch = _data(w, device)
    _, _, loss = _losses(w)
    names = list(params)
    v = tuple(torch.full_like(params[k], 0.01) for k in names)
    f = lambda *ps: loss(dict(zip(names, ps, strict=True)), batch)
    ps = tuple(params[k].detach() for k in names)
    return lambda: torch.autograd.functional.hvp(f, ps, v)[1]


def hessian(impl: str, w: Workload, device: str) -> Callable[[], object]:
    import torch

    params, batch = _data(w, device)
    _, _, loss = _losses(w)
    names = list(params)
    f = lambda *ps: loss(dict(zip(names, ps, strict=True)), batch)
    ps = tuple(params[k].detach() for k in names)
    return lambda: torch.autograd.functional.hessian(f, ps)


def derivative8(impl: str, w: Workload, device: str) -> Callable[[], object]:
    """The n-th derivative operation: 8 nested autograd.grad calls with create_graph."""
    import torch

    del w
    x = torch.tensor(0.3, device=device, requires_grad=True)

    def run():
        y = torch.sin(torch.tanh(x) * torch.exp(x))
        for _ in range(8):
            (y,) = torch.autograd.grad(y, x, create_graph=True)
        return y

    return run


# The built-in operations' PyTorch implementations (which workloads: _jax_ops.APPLIES).
# torch.compile is measured on the plain gradient; on the double-backward operations it is
# listed and reported as unsupported.
TORCH: dict[str, dict[str, Callable]] = {
    "grad": {"torch": grad, "torch.func": func_grad, "torch.compile": grad},
    "grad_intermediates": {"torch": grad_intermediates},
    "backward_accumulate": {"torch": backward_accumulate},
    "microbatch": {"torch": microbatch},
    "microbatch_unrolled": {"torch": microbatch},
    "input_gradient": {
        "torch": input_gradient,
        "torch.func": func_input_gradient,
        "torch.compile": _double_backward,
    },
    "wgan_gp": {"torch": wgan_gp, "torch.compile": _double_backward},
    "hvp": {"torch": hvp, "torch.func": func_hvp, "torch.compile": _double_backward},
    "hessian": {"torch": hessian, "torch.func": func_hessian, "torch.compile": _double_backward},
    "derivative8": {"torch": derivative8, "torch.compile": _double_backward},
}
