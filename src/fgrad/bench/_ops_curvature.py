"""Benchmark builders for the GGN and K-FAC operations (bench_contract.md): ``ggn_vp`` (one
GGN-vector product of the cross-entropy loss), ``kfac_factors`` (the Kronecker factors
of every dense and convolution layer, K-FAC of the GGN, "expand": one backward pass per
class) and ``kfac_factors_mc`` (the same with one sampled label per example: one backward
pass, curvlinops' default), each through fgrad,
written by hand in JAX, and through curvlinops in PyTorch (``torch.func`` by hand for
``ggn_vp``). The tables at the end are wired into the registry by the lead."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fgrad.bench._cases import Unsupported
from fgrad.bench._workloads import Workload, jax_forward, torch_forward


def _identity(name, h):
    del name
    return h


def _jax_data(w: Workload):
    from fgrad.bench._jax_ops import _data

    return _data(w)


def _ce(o, y):
    logp = jax.nn.log_softmax(o)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _v(params):
    return jax.tree.map(lambda a: jnp.full_like(a, 0.01), params)


# --- ggn_vp -----------------------------------------------------------------------------------


def ggn_vp_fgrad(impl: str, w: Workload) -> tuple[Callable, tuple]:
    del impl
    import fgrad

    params, batch = _jax_data(w)
    fwd = jax_forward(w)
    model = lambda p, x: fwd(p, x, _identity)
    loss = fgrad.curvature.cross_entropy
    f = lambda p, v, b: fgrad.curvature.ggn_vp(model, loss, p, b["x"], b["y"], v)
    return jax.jit(f), (params, _v(params), batch)


def ggn_vp_jax(impl: str, w: Workload) -> tuple[Callable, tuple]:
    del impl
    params, batch = _jax_data(w)
    fwd = jax_forward(w)

    def f(p, v, b):
        out, jvp = jax.linearize(lambda q: fwd(q, b["x"], _identity), p)
        hu = jax.jvp(jax.grad(lambda o: _ce(o, b["y"])), (out,), (jvp(v),))[1]
        return jax.linear_transpose(jvp, p)(hu)[0]

    return jax.jit(f), (params, _v(params), batch)


# --- kfac_factors ----------------------------------------------------------------------------


def _kfac_fgrad(w: Workload, fisher: str) -> tuple[Callable, tuple]:
    import fgrad

    params, batch = _jax_data(w)
    fwd = jax_forward(w)
    model = lambda p, x: fwd(p, x, _identity)
    loss = fgrad.curvature.cross_entropy
    key = jax.random.key(0)

    def f(p, b):
        k = fgrad.curvature.kfac(model, loss, p, b["x"], b["y"], fisher=fisher, key=key)
        # the factors, as the hand-written version returns them: a bias's block is its
        # weight's G itself, returned once
        return k.a, tuple({id(g): g for g in k.g}.values())

    return jax.jit(f), (params, batch)


def kfac_fgrad(impl: str, w: Workload) -> tuple[Callable, tuple]:
    del impl
    return _kfac_fgrad(w, "ggn")


def kfac_mc_fgrad(impl: str, w: Workload) -> tuple[Callable, tuple]:
    del impl
    return _kfac_fgrad(w, "mc")


def _sampled_grad(o):
    """One label per example drawn from softmax(o) (the key fgrad's sampler uses) and the
    loss gradient at it, ``softmax - onehot``: ``(1, N, C)``."""
    k0 = jax.random.split(jax.random.key(0), 1)[0]
    y = jax.random.categorical(k0, o, axis=-1)
    return (jax.nn.softmax(o) - jax.nn.one_hot(y, o.shape[-1], dtype=o.dtype))[None]


def _softmax_sqrt(o):
    """Columns c of S with S Sᵀ = diag(p) - p pᵀ, per example: ``(C, N, C)``."""
    p = jax.nn.softmax(o)
    s = jax.vmap(lambda q: jnp.diag(jnp.sqrt(q)) - jnp.outer(q, jnp.sqrt(q)))(p)
    return jnp.moveaxis(s, 2, 0)


def kfac_jax(impl: str, w: Workload, columns: Callable | None = None) -> tuple[Callable, tuple]:
    """K-FAC factors written by hand: the forward pass rewritten with explicit
    perturbations at each layer output, inputs recorded, one VJP per output column
    (``columns(outputs)``: the loss Hessian's square-root columns by default)."""
    del impl
    columns = _softmax_sqrt if columns is None else columns
    if w.kind not in ("mlp", "cnn"):
        raise Unsupported("hand-written K-FAC factors for the MLP and the CNN only")
    params, batch = _jax_data(w)

    def conv(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC")
        )

    if w.kind == "mlp":
        depth = w.config["depth"]
        names = [f"fc{i}" for i in range(depth + 1)]

        def forward(p, eps, x):
            ins = {}
            for i, nm in enumerate(names):
                ins[nm] = x
                x = x @ p[f"{nm}.weight"].T + eps[nm] + p[f"{nm}.bias"]
                if i < depth:
                    x = jnp.tanh(x)
            return x, ins

    else:
        names = ["conv1", "conv2", "fc"]

        def forward(p, eps, x):
            ins = {"conv1": x}
            h = jax.nn.relu(conv(x, p["conv1.weight"]) + eps["conv1"] + p["conv1.bias"])
            ins["conv2"] = h
            h = jax.nn.relu(conv(h, p["conv2.weight"]) + eps["conv2"] + p["conv2.bias"])
            ins["fc"] = h = h.mean(axis=(1, 2))
            return h @ p["fc.weight"].T + eps["fc"] + p["fc.bias"], ins

    def rows(nm, a, p):
        if nm.startswith("conv"):
            k = p[f"{nm}.weight"]
            pt = jax.lax.conv_general_dilated_patches(
                a, k.shape[2:], (1, 1), "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC")
            )
            return pt.reshape(-1, pt.shape[-1])
        return a

    def f(p, b):
        x = b["x"]
        eps = _zeros_eps(p, x, forward, names)
        out, pull, ins = jax.vjp(lambda e: forward(p, e, x), eps, has_aux=True)
        n = out.shape[0]
        grads = jax.vmap(lambda c: pull(c)[0])(columns(out))
        a_f, g_f = {}, {}
        for nm in names:
            a2 = rows(nm, ins[nm], p)
            g2 = grads[nm].reshape(-1, grads[nm].shape[-1])
            a_f[nm] = a2.T @ a2 / a2.shape[0]
            g_f[nm] = g2.T @ g2 / n
        return a_f, g_f

    return jax.jit(f), (params, batch)


def kfac_mc_jax(impl: str, w: Workload) -> tuple[Callable, tuple]:
    return kfac_jax(impl, w, _sampled_grad)


def _zeros_eps(p, x, forward, names):
    """Zero perturbations shaped like each layer's output: the input's shape (from a
    shape-only trace with scalar perturbations) with the weight's output features."""
    _, ins = jax.eval_shape(lambda: forward(p, {nm: jnp.zeros((), x.dtype) for nm in names}, x))
    return {
        nm: jnp.zeros((*ins[nm].shape[:-1], p[f"{nm}.weight"].shape[0]), x.dtype) for nm in names
    }


# --- PyTorch: curvlinops, and torch.func by hand ---------------------------------------------


def _torch_module(w: Workload, device: str):
    """The workload as an ``nn.Module`` (real Linear/Conv2d layers for the MLP and the CNN,
    so curvlinops' K-FAC finds them; the functional forward otherwise) on its weights."""
    import torch
    from torch import nn

    raw = {k: torch.from_numpy(v.copy()) for k, v in w.numpy_params().items()}
    if w.kind == "mlp":
        depth = w.config["depth"]
        layers: list[nn.Module] = []
        for i in range(depth + 1):
            wt = raw[f"fc{i}.weight"]
            lin = nn.Linear(wt.shape[1], wt.shape[0])
            lin.weight.data, lin.bias.data = wt, raw[f"fc{i}.bias"]
            layers += [lin] + ([nn.Tanh()] if i < depth else [])
        return nn.Sequential(*layers).to(device)
    if w.kind == "cnn":

        class CNN(nn.Module):
            def __init__(self):
                super().__init__()
                c1, c2 = w.config["channels"]
                self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
                self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
                self.fc = nn.Linear(c2, w.config["classes"])

            def forward(self, x):
                h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
                return self.fc(h.mean(dim=(2, 3)))

        m = CNN()
        m.load_state_dict(raw)
        return m.to(device)
    fwd = torch_forward(w)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.ParameterDict(
                {k.replace(".", "_"): nn.Parameter(v) for k, v in raw.items()}
            )

        def forward(self, x):
            return fwd({k: self.p[k.replace(".", "_")] for k in raw}, x, _identity)

    return Functional().to(device)


def _torch_batch(w: Workload, device: str):
    import torch

    b = w.numpy_batch()
    return torch.from_numpy(b["x"].copy()).to(device), torch.from_numpy(b["y"].copy()).to(device)


def ggn_vp_curvlinops(impl: str, w: Workload, device: str) -> Callable[[], Any]:
    del impl
    import torch
    from curvlinops import GGNLinearOperator

    module = _torch_module(w, device)
    x, y = _torch_batch(w, device)
    params = [p for p in module.parameters()]
    op = GGNLinearOperator(
        module, torch.nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False
    )
    v = [torch.full_like(p, 0.01) for p in params]
    return lambda: op @ v


def ggn_vp_torch_func(impl: str, w: Workload, device: str) -> Callable[[], Any]:
    del impl
    import torch
    import torch.func as tf

    module = _torch_module(w, device)
    x, y = _torch_batch(w, device)
    params = {k: p.detach() for k, p in module.named_parameters()}
    v = {k: torch.full_like(p, 0.01) for k, p in params.items()}
    model = lambda p: tf.functional_call(module, p, (x,))
    loss = lambda o: torch.nn.functional.cross_entropy(o, y)

    def run():
        out, jv = tf.jvp(model, (params,), (v,))
        hu = tf.jvp(tf.grad(loss), (out,), (jv,))[1]
        _, pull = tf.vjp(model, params)
        return pull(hu)[0]

    return run


def _kfac_curvlinops(w: Workload, device: str, fisher_type: str) -> Callable[[], Any]:
    import torch
    from curvlinops import KFACLinearOperator

    if w.kind not in ("mlp", "cnn"):
        raise Unsupported("curvlinops' K-FAC needs Linear/Conv2d modules")
    module = _torch_module(w, device)
    x, y = _torch_batch(w, device)
    op = KFACLinearOperator(
        module,
        torch.nn.CrossEntropyLoss(),
        list(module.parameters()),
        [(x, y)],
        check_deterministic=False,
        fisher_type=fisher_type,
    )
    return op.compute_kronecker_factors


def kfac_curvlinops(impl: str, w: Workload, device: str) -> Callable[[], Any]:
    del impl
    return _kfac_curvlinops(w, device, "type-2")


def kfac_mc_curvlinops(impl: str, w: Workload, device: str) -> Callable[[], Any]:
    del impl
    return _kfac_curvlinops(w, device, "mc")


JAX = {
    "ggn_vp": {"fgrad": ggn_vp_fgrad, "jax": ggn_vp_jax},
    "kfac_factors": {"fgrad": kfac_fgrad, "jax": kfac_jax},
    "kfac_factors_mc": {"fgrad": kfac_mc_fgrad, "jax": kfac_mc_jax},
}
TORCH = {
    "ggn_vp": {"curvlinops": ggn_vp_curvlinops, "torch.func": ggn_vp_torch_func},
    "kfac_factors": {"curvlinops": kfac_curvlinops},
    "kfac_factors_mc": {"curvlinops": kfac_mc_curvlinops},
}
APPLIES = {
    "ggn_vp": lambda w: w.kind in ("mlp", "cnn", "transformer"),
    "kfac_factors": lambda w: w.kind in ("mlp", "cnn", "transformer"),
    "kfac_factors_mc": lambda w: w.kind in ("mlp", "cnn", "transformer"),
}
