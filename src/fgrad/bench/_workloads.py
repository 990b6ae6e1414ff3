"""Benchmark workloads: each model written once for JAX and once for PyTorch, on the same
weights (generated with NumPy), with a ``tap`` hook so gradients w.r.t. intermediates can
be taken the fgrad way, by hand in JAX, and with ``retain_grad`` in PyTorch.

Parameters use PyTorch's names and layouts in both frameworks (``x @ W.T + b``, conv
weights ``(out, in, kh, kw)``), so one NumPy dict feeds both.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "seed" | "mlp" | "cnn" | "transformer"
    config: dict
    batch: int

    def numpy_params(self) -> dict[str, np.ndarray]:
        return _PARAMS[self.kind](self.config, np.random.default_rng(0))

    def numpy_batch(self) -> dict[str, np.ndarray]:
        return _BATCH[self.kind](self.config, self.batch, np.random.default_rng(1))


# --- parameters and data -------------------------------------------------------------------


def _dense(rng, n_out, n_in):
    return (rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)


def _seed_params(cfg, rng):
    del cfg, rng
    return {
        "linear1.weight": np.full((1, 1), 3.0, np.float32),
        "linear2.weight": np.full((1, 1), 2.0, np.float32),
        "linear2.bias": np.full((1,), 6.0, np.float32),
    }


def _mlp_params(cfg, rng):
    sizes = [cfg["inputs"], *([cfg["width"]] * cfg["depth"]), cfg["classes"]]
    p = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        p[f"fc{i}.weight"] = _dense(rng, b, a)
        p[f"fc{i}.bias"] = np.zeros(b, np.float32)
    return p


def _kernel(rng, c_out, c_in):
    return (rng.normal(size=(c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)).astype(np.float32)


def _cnn_params(cfg, rng):
    c1, c2 = cfg["channels"]
    p = {"conv1.weight": _kernel(rng, c1, 3), "conv1.bias": np.zeros(c1, np.float32)}
    for i in range(cfg.get("blocks", 0)):  # ResNet-style: residual blocks at c1 channels
        for j in ("a", "b"):
            p[f"block{i}{j}.weight"] = _kernel(rng, c1, c1)
            p[f"block{i}{j}.bias"] = np.zeros(c1, np.float32)
    p["conv2.weight"] = _kernel(rng, c2, c1)
    p["conv2.bias"] = np.zeros(c2, np.float32)
    p["fc.weight"] = _dense(rng, cfg["classes"], c2)
    p["fc.bias"] = np.zeros(cfg["classes"], np.float32)
    return p


def _transformer_params(cfg, rng):
    d, f = cfg["d_model"], cfg["d_ff"]
    p = {}
    for name, (a, b) in {
        "q": (d, d),
        "k": (d, d),
        "v": (d, d),
        "o": (d, d),
        "ff1": (f, d),
        "ff2": (d, f),
        "head": (cfg["classes"], d),
    }.items():
        p[f"{name}.weight"] = _dense(rng, a, b)
        p[f"{name}.bias"] = np.zeros(a, np.float32)
    for ln in ("ln1", "ln2"):
        p[f"{ln}.weight"] = np.ones(d, np.float32)
        p[f"{ln}.bias"] = np.zeros(d, np.float32)
    return p


_PARAMS: dict[str, Callable] = {
    "seed": _seed_params,
    "mlp": _mlp_params,
    "cnn": _cnn_params,
    "transformer": _transformer_params,
}


def _labels(rng, n, classes):
    return rng.integers(0, classes, n).astype(np.int64)


_BATCH: dict[str, Callable] = {
    "seed": lambda cfg, n, rng: {"x": np.full((n, 1), 4.0, np.float32)},
    "mlp": lambda cfg, n, rng: {
        "x": rng.normal(size=(n, cfg["inputs"])).astype(np.float32),
        "y": _labels(rng, n, cfg["classes"]),
    },
    "cnn": lambda cfg, n, rng: {  # NCHW for PyTorch; the JAX side transposes once
        "x": rng.normal(size=(n, 3, cfg["size"], cfg["size"])).astype(np.float32),
        "y": _labels(rng, n, cfg["classes"]),
    },
    "transformer": lambda cfg, n, rng: {
        "x": rng.normal(size=(n, cfg["seq"], cfg["d_model"])).astype(np.float32),
        "y": _labels(rng, n, cfg["classes"]),
    },
}


def workloads(suite: str) -> list[Workload]:
    """The workloads of a suite: ``tiny`` (tests), ``quick``, ``full`` or ``large`` (a
    ResNet-style CNN on 64x64 images and a transformer block of width 1024 on sequences
    of 1024, batches that keep a GPU busy)."""
    seed = Workload("seed", "seed", {}, 1)
    mlp = lambda w, d, n: Workload(
        f"mlp-{w}x{d}", "mlp", {"inputs": 256, "width": w, "depth": d, "classes": 10}, n
    )
    cnn = lambda c, n: Workload(
        f"cnn-{c[0]}-{c[1]}", "cnn", {"channels": c, "size": 32, "classes": 10}, n
    )
    tr = lambda d, s, n: Workload(
        f"transformer-d{d}",
        "transformer",
        {"d_model": d, "d_ff": 4 * d, "heads": 4, "seq": s, "classes": 10},
        n,
    )
    if suite == "tiny":
        return [
            seed,
            Workload("mlp-16x2", "mlp", {"inputs": 8, "width": 16, "depth": 2, "classes": 3}, 4),
        ]
    if suite == "quick":
        return [seed, mlp(256, 3, 128), mlp(1024, 3, 128), cnn((16, 32), 32), tr(128, 64, 8)]
    if suite == "large":  # sized for a GPU: refused on the CPU (fgrad bench says so)
        resnet = Workload(
            "resnet-64-128",
            "cnn",
            {"channels": (64, 128), "blocks": 2, "size": 64, "classes": 10},
            128,
        )
        return [resnet, tr(1024, 1024, 16)]
    if suite == "full":
        return [
            seed,
            mlp(256, 3, 128),
            mlp(256, 8, 128),
            mlp(1024, 3, 128),
            mlp(2048, 3, 256),
            cnn((16, 32), 32),
            cnn((32, 64), 64),
            tr(128, 64, 8),
            tr(256, 128, 8),
        ]
    raise ValueError(f"fgrad bench: unknown suite {suite!r}; use tiny, quick, full or large.")


def hidden_names(w: Workload) -> list[str]:
    """The names of the tapped intermediates of a workload."""
    if w.kind == "seed":
        return ["l"]
    if w.kind == "mlp":
        return [f"h{i}" for i in range(w.config["depth"])]
    if w.kind == "cnn":
        return ["conv1", "conv2"]
    return ["attn", "ff"]


# --- forward passes ------------------------------------------------------------------------


def _linear(p, name, x):
    """PyTorch's Linear, ``x Wᵀ + b``: the same code for JAX arrays and torch tensors."""
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def _seed_forward(p, x, tap):
    """The seed network, the same code for JAX arrays and torch tensors."""
    l = tap("l", x @ p["linear1.weight"].T)
    return (l @ p["linear2.weight"].T + p["linear2.bias"]) ** 2


def _mlp_forward(depth: int, tanh: Callable) -> Callable:
    def mlp(p, x, tap):
        for i in range(depth):
            x = tap(f"h{i}", tanh(_linear(p, f"fc{i}", x)))
        return _linear(p, f"fc{depth}", x)

    return mlp


def jax_forward(w: Workload) -> Callable[[Any, Any, Callable], Any]:
    """``forward(params, x, tap) -> outputs`` in JAX; ``tap(name, h)`` wraps each hidden
    value (identity, fgrad.tap, or an explicit perturbation)."""
    import jax
    import jax.numpy as jnp

    if w.kind == "seed":
        return _seed_forward
    if w.kind == "mlp":
        return _mlp_forward(w.config["depth"], jnp.tanh)
    if w.kind == "cnn":

        def conv(x, k, b):  # NHWC activations, PyTorch OIHW kernels
            y = jax.lax.conv_general_dilated(
                x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC")
            )
            return y + b

        blocks = w.config.get("blocks", 0)

        def cnn(p, x, tap):
            h = tap("conv1", jax.nn.relu(conv(x, p["conv1.weight"], p["conv1.bias"])))
            for i in range(blocks):
                r = jax.nn.relu(conv(h, p[f"block{i}a.weight"], p[f"block{i}a.bias"]))
                h = jax.nn.relu(h + conv(r, p[f"block{i}b.weight"], p[f"block{i}b.bias"]))
            h = tap("conv2", jax.nn.relu(conv(h, p["conv2.weight"], p["conv2.bias"])))
            return _linear(p, "fc", h.mean(axis=(1, 2)))

        return cnn

    heads = w.config["heads"]
    lin = _linear

    def ln(p, name, x):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-5) * p[f"{name}.weight"] + p[f"{name}.bias"]

    def block(p, x, tap):
        n, s, d = x.shape
        h = ln(p, "ln1", x)
        split = lambda t: t.reshape(n, s, heads, d // heads).transpose(0, 2, 1, 3)
        q, k, v = (split(lin(p, m, h)) for m in ("q", "k", "v"))
        att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(d // heads), axis=-1)
        a = (att @ v).transpose(0, 2, 1, 3).reshape(n, s, d)
        x = x + tap("attn", lin(p, "o", a))
        f = lin(p, "ff2", jax.nn.gelu(lin(p, "ff1", ln(p, "ln2", x)), approximate=False))
        x = x + tap("ff", f)
        return lin(p, "head", x.mean(axis=1))

    return block


def torch_forward(w: Workload) -> Callable[[Any, Any, Callable], Any]:
    """The same forward in PyTorch (NCHW images); ``tap(name, h)`` may call retain_grad."""
    import torch
    import torch.nn.functional as F

    if w.kind == "seed":
        return _seed_forward
    if w.kind == "mlp":
        return _mlp_forward(w.config["depth"], torch.tanh)
    if w.kind == "cnn":
        blocks = w.config.get("blocks", 0)
        conv = lambda p, h, name: F.conv2d(h, p[f"{name}.weight"], p[f"{name}.bias"], padding=1)

        def cnn(p, x, tap):
            h = tap("conv1", F.relu(conv(p, x, "conv1")))
            for i in range(blocks):
                h = F.relu(h + conv(p, F.relu(conv(p, h, f"block{i}a")), f"block{i}b"))
            h = tap("conv2", F.relu(conv(p, h, "conv2")))
            return _linear(p, "fc", h.mean(dim=(2, 3)))

        return cnn

    heads = w.config["heads"]
    lin = _linear

    def block(p, x, tap):
        n, s, d = x.shape
        h = F.layer_norm(x, (d,), p["ln1.weight"], p["ln1.bias"], 1e-5)
        split = lambda t: t.reshape(n, s, heads, d // heads).transpose(1, 2)
        q, k, v = (split(lin(p, m, h)) for m in ("q", "k", "v"))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
        a = (att @ v).transpose(1, 2).reshape(n, s, d)
        x = x + tap("attn", lin(p, "o", a))
        f2 = F.layer_norm(x, (d,), p["ln2.weight"], p["ln2.bias"], 1e-5)
        x = x + tap("ff", lin(p, "ff2", F.gelu(lin(p, "ff1", f2))))
        return lin(p, "head", x.mean(dim=1))

    return block
