"""The benchmark operations in JAX: each once through fgrad's API ("fgrad") and once
written by hand with plain JAX transforms ("jax"). Both are jit-compiled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import fgrad
from fgrad.bench._workloads import Workload, hidden_names, jax_forward

K_MICRO = 4  # micro-batches of the "microbatch" operation


def _identity_tap(name, h):
    del name
    return h


def _data(w: Workload) -> tuple[dict, dict]:
    params = {k: jnp.asarray(v) for k, v in w.numpy_params().items()}
    batch = {k: jnp.asarray(v) for k, v in w.numpy_batch().items()}
    if w.kind == "cnn":
        batch["x"] = jnp.transpose(batch["x"], (0, 2, 3, 1))  # NCHW -> NHWC, once
    if "y" in batch:
        batch["y"] = batch["y"].astype(jnp.int32)
    return params, batch


def _losses(w: Workload):
    """(loss(params, batch, tap) -> scalar, per_example(params, x, y, tap) -> (n,),
    second(params, batch, tap) -> scalar)."""
    fwd = jax_forward(w)
    if w.kind == "seed":
        per = lambda p, x, y, tap: fwd(p, x, tap)[:, 0]
    else:

        def per(p, x, y, tap):
            logp = jax.nn.log_softmax(fwd(p, x, tap))
            return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

    loss = lambda p, b, tap: jnp.mean(per(p, b["x"], b.get("y"), tap))
    second = lambda p, b, tap: 0.5 * jnp.mean(fwd(p, b["x"], tap) ** 2)
    return loss, per, second


def _perturbed_tap(eps):
    return lambda name, h: h + eps[name]


def _tap_shapes(w, loss, params, batch):
    shapes = {}

    def record(name, h):
        shapes[name] = jax.ShapeDtypeStruct(h.shape, h.dtype)
        return h

    jax.eval_shape(lambda p, b: loss(p, b, record), params, batch)
    return shapes


def build(op: str, impl: str, w: Workload) -> tuple[Callable, tuple]:
    """A jitted function and its arguments for one (operation, implementation, workload)."""
    params, batch = _data(w)
    loss, per, second = _losses(w)
    plain = lambda p, b: loss(p, b, _identity_tap)
    tapped = lambda p, b: loss(p, b, fgrad.tap)
    ours = impl == "fgrad"

    if op == "grad":
        if ours:
            return jax.jit(lambda p, b: fgrad.backward(plain, p, b)[1]), (params, batch)
        return jax.jit(jax.grad(plain)), (params, batch)

    if op == "grad_intermediates":
        if ours:
            f = fgrad.grad_intermediates(tapped, hidden_names(w), argnums=0)
            return jax.jit(f), (params, batch)
        shapes = _tap_shapes(w, loss, params, batch)
        eps = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
        by_hand = lambda p, e, b: loss(p, b, _perturbed_tap(e))
        g = jax.grad(by_hand, argnums=(1, 0))
        return jax.jit(g), (params, eps, batch)

    if op == "backward_accumulate":
        plain2 = lambda p, b: second(p, b, _identity_tap)
        if ours:

            def two(p, b):
                _, g = fgrad.backward(plain, p, b, grads=fgrad.zero_grad(p))
                return fgrad.backward(plain2, p, b, grads=g)[1]

            return jax.jit(two), (params, batch)
        two = lambda p, b: jax.tree.map(jnp.add, jax.grad(plain)(p, b), jax.grad(plain2)(p, b))
        return jax.jit(two), (params, batch)

    if op in ("microbatch", "microbatch_unrolled"):
        unroll = op == "microbatch_unrolled"
        if ours:
            f = lambda p, b: fgrad.accumulate(
                plain, p, b, microbatches=K_MICRO, unroll=True if unroll else "auto"
            )[1]
            return jax.jit(f), (params, batch)

        def scan(p, b):
            chunks = jax.tree.map(lambda x: x.reshape(K_MICRO, -1, *x.shape[1:]), b)

            def body(acc, mb):
                g = jax.grad(plain)(p, mb)
                return jax.tree.map(lambda a, d: a + d / K_MICRO, acc, g), None

            zeros = jax.tree.map(jnp.zeros_like, p)
            return jax.lax.scan(body, zeros, chunks, unroll=unroll or 1)[0]

        return jax.jit(scan), (params, batch)

    if op == "input_gradient":
        per_ex = lambda p, x, y: per(p, x, y, _identity_tap)
        if ours:
            total = lambda p, b: (
                plain(p, b) + fgrad.penalties.input_gradient(per_ex, p, b["x"], b.get("y"))
            )
        else:

            def total(p, b):
                gx = jax.grad(lambda x: jnp.sum(per_ex(p, x, b.get("y"))))(b["x"])
                sq = jnp.sum(gx.reshape(gx.shape[0], -1) ** 2, axis=1)
                return plain(p, b) + jnp.mean(sq)

        return jax.jit(jax.grad(total)), (params, batch)

    if op == "wgan_gp":
        fwd = jax_forward(w)
        critic = lambda p, x: fwd(p, x, _identity_tap)[:, 0]
        fake = batch["x"][::-1] * 0.5
        eps = jax.random.uniform(jax.random.key(0), (batch["x"].shape[0],))
        wass = lambda p, b: jnp.mean(critic(p, fake)) - jnp.mean(critic(p, b["x"]))
        if ours:
            total = lambda p, b: (
                wass(p, b) + fgrad.penalties.wgan_gp(critic, p, b["x"], fake, epsilon=eps)
            )
        else:

            def total(p, b):
                e = eps.reshape((-1,) + (1,) * (b["x"].ndim - 1))
                x_hat = e * b["x"] + (1 - e) * fake
                g = jax.grad(lambda x: jnp.sum(critic(p, x)))(x_hat)
                norm = jnp.sqrt(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) + 1e-30)
                return wass(p, b) + 10.0 * jnp.mean((norm - 1.0) ** 2)

        return jax.jit(jax.grad(total)), (params, batch)

    if op == "hvp":
        v = jax.tree.map(lambda a: jnp.full_like(a, 0.01), params)
        if ours:
            return jax.jit(lambda p, t, b: fgrad.hvp(plain, p, t, b)), (params, v, batch)
        f = lambda p, t, b: jax.jvp(lambda q: jax.grad(plain)(q, b), (p,), (t,))[1]
        return jax.jit(f), (params, v, batch)

    if op == "hessian":
        if ours:
            return jax.jit(fgrad.hessian(plain)), (params, batch)
        return jax.jit(jax.hessian(plain)), (params, batch)

    raise KeyError(op)


def build_scalar(op: str, impl: str) -> tuple[Callable, tuple]:
    """The n-th derivative operation on a scalar function (no workload)."""
    f = lambda x: jnp.sin(jnp.tanh(x) * jnp.exp(x))
    x = jnp.float32(0.3)
    if impl == "fgrad":  # Taylor mode, picked by method="auto"
        return jax.jit(fgrad.derivative(f, 8)), (x,)
    if impl == "fgrad-nested":
        return jax.jit(fgrad.derivative(f, 8, method="nested")), (x,)
    g = f
    for _ in range(8):
        g = jax.grad(g)
    return jax.jit(g), (x,)


def cost(fn: Callable, args: tuple) -> dict[str, Any]:
    """XLA's FLOP count and memory footprint of the compiled program."""
    compiled = fn.lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = float(analysis.get("flops", 0.0)) if analysis else 0.0
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = int(
            mem.temp_size_in_bytes
            + mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        )
    return {"flops": flops or None, "memory_bytes": peak}
