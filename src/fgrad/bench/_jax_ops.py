"""The built-in benchmark operations in JAX: each once through fgrad's API ("fgrad") and
once written by hand with plain JAX transforms ("jax"), both jit-compiled; one builder
``op(impl, w) -> (jitted_fn, args)`` per operation, registered by the tables at the end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

import fgrad
from fgrad.bench._workloads import Workload, hidden_names, jax_forward

K_MICRO = 4  # micro-batches of the "microbatch" operation
MAX_HESSIAN_PARAMS = 1000  # dense Hessians only on small models
SCALAR = Workload("scalar", "scalar", {}, 1)  # the n-th derivative of sin(tanh(x) e^x)
HESSIAN_MLP = Workload(
    "hessian-mlp", "mlp", {"inputs": 8, "width": 16, "depth": 2, "classes": 3}, 16
)


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


def _setup(w: Workload):
    params, batch = _data(w)
    loss, per, second = _losses(w)
    plain = lambda p, b: loss(p, b, _identity_tap)
    return params, batch, loss, per, second, plain


def grad(impl: str, w: Workload) -> tuple[Callable, tuple]:
    params, batch, _, _, _, plain = _setup(w)
    if impl == "fgrad":
        return jax.jit(lambda p, b: fgrad.backward(plain, p, b)[1]), (params, batch)
    return jax.jit(jax.grad(plain)), (params, batch)


def grad_intermediates(impl: str, w: Workload) -> tuple[Callable, tuple]:
    params, batch, loss, _, _, _ = _setup(w)
    if impl == "fgrad":
        tapped = lambda p, b: loss(p, b, fgrad.tap)
        f = fgrad.grad_intermediates(tapped, hidden_names(w), argnums=0)
        return jax.jit(f), (params, batch)
    shapes = _tap_shapes(w, loss, params, batch)
    eps = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    by_hand = lambda p, e, b: loss(p, b, _perturbed_tap(e))
    g = jax.grad(by_hand, argnums=(1, 0))
    return jax.jit(g), (params, eps, batch)


def backward_accumulate(impl: str, w: Workload) -> tuple[Callable, tuple]:
    params, batch, _, _, second, plain = _setup(w)
    plain2 = lambda p, b: second(p, b, _identity_tap)
    if impl == "fgrad":

        def two(p, b):
            _, g = fgrad.backward(plain, p, b, grads=fgrad.zero_grad(p))
            return fgrad.backward(plain2, p, b, grads=g)[1]

        return jax.jit(two), (params, batch)
    two = lambda p, b: jax.tree.map(jnp.add, jax.grad(plain)(p, b), jax.grad(plain2)(p, b))
    return jax.jit(two), (params, batch)


def _microbatch(impl: str, w: Workload, unroll: bool) -> tuple[Callable, tuple]:
    params, batch, _, _, _, plain = _setup(w)
    if impl == "fgrad":
        # the default loop ("auto"), or unrolled
        how: bool | Literal["auto"] = True if unroll else "auto"
        f = lambda p, b: fgrad.accumulate(plain, p, b, microbatches=K_MICRO, unroll=how)[1]
        return jax.jit(f), (params, batch)

    def scan(p, b):
        chunks = jax.tree.map(lambda x: x.reshape(K_MICRO, -1, *x.shape[1:]), b)

        def body(acc, mb):
            g = jax.grad(plain)(p, mb)
            return jax.tree.map(lambda a, d: a + d / K_MICRO, acc, g), None

        zeros = jax.tree.map(jnp.zeros_like, p)
        return jax.lax.scan(body, zeros, chunks, unroll=unroll or 1)[0]

    return jax.jit(scan), (params, batch)


def microbatch(impl: str, w: Workload) -> tuple[Callable, tuple]:
    return _microbatch(impl, w, unroll=False)


def microbatch_unrolled(impl: str, w: Workload) -> tuple[Callable, tuple]:
    return _microbatch(impl, w, unroll=True)


def input_gradient(impl: str, w: Workload) -> tuple[Callable, tuple]:
    params, batch, _, per, _, plain = _setup(w)
    per_ex = lambda p, x, y: per(p, x, y, _identity_tap)
    if impl == "fgrad":
        total = lambda p, b: (
            plain(p, b) + fgrad.penalties.input_gradient(per_ex, p, b["x"], b.get("y"))
        )
    else:

        def total(p, b):
            gx = jax.grad(lambda x: jnp.sum(per_ex(p, x, b.get("y"))))(b["x"])
            sq = jnp.sum(gx.reshape(gx.shape[0], -1) ** 2, axis=1)
            return plain(p, b) + jnp.mean(sq)

    return jax.jit(jax.grad(total)), (params, batch)


def wgan_gp(impl: str, w: Workload) -> tuple[Callable, tuple]:
    params, batch = _data(w)
    fwd = jax_forward(w)
    critic = lambda p, x: fwd(p, x, _identity_tap)[:, 0]
    fake = batch["x"][::-1] * 0.5
    eps = jax.random.uniform(jax.random.key(0), (batch["x"].shape[0],))
    wass = lambda p, b: jnp.mean(critic(p, fake)) - jnp.mean(critic(p, b["x"]))
    if impl == "fgrad":
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


def hvp(impl: str, w: Workload) -> tuple[Callable, tuple]:
    params, batch, _, _, _, plain = _setup(w)
    v = jax.tree.map(lambda a: jnp.full_like(a, 0.01), params)
    if impl == "fgrad":
        return jax.jit(lambda p, t, b: fgrad.hvp(plain, p, t, b)), (params, v, batch)
    f = lambda p, t, b: jax.jvp(lambda q: jax.grad(plain)(q, b), (p,), (t,))[1]
    return jax.jit(f), (params, v, batch)


def hvp_linearized(impl: str, w: Workload) -> tuple[Callable, tuple]:
    """One product with the Hessian once linearised (`fgrad.linearize_grad`; by hand,
    ``jax.linearize`` of ``jax.grad``): the cost per product of an iterative solver, the
    forward and backward passes computed beforehand and not timed."""
    params, batch, _, _, _, plain = _setup(w)
    v = jax.tree.map(lambda a: jnp.full_like(a, 0.01), params)
    if impl == "fgrad":
        lin = jax.jit(lambda p, b: fgrad.linearize_grad(plain, p, b)[1])(params, batch)
    else:
        by_hand = lambda p, b: jax.linearize(lambda q: jax.grad(plain)(q, b), p)[1]
        lin = jax.jit(by_hand)(params, batch)
    return jax.jit(lambda hv, t: hv(t)), (lin, v)


def hessian(impl: str, w: Workload) -> tuple[Callable, tuple]:
    params, batch, _, _, _, plain = _setup(w)
    if impl == "fgrad":
        return jax.jit(fgrad.hessian(plain)), (params, batch)
    return jax.jit(jax.hessian(plain)), (params, batch)


def derivative8(impl: str, w: Workload) -> tuple[Callable, tuple]:
    """The 8th derivative of a scalar function (the workload is `SCALAR`, no data)."""
    del w
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


def _n_params(w: Workload) -> int:
    return sum(v.size for v in w.numpy_params().values())


# The built-in operations (see fgrad.bench._registry). Their PyTorch builders are in
# _torch_ops; the workloads they apply to are declared here.
_BOTH = ("fgrad", "jax")
JAX: dict[str, dict[str, Callable]] = {
    "grad": dict.fromkeys(_BOTH, grad),
    "grad_intermediates": dict.fromkeys(_BOTH, grad_intermediates),
    "backward_accumulate": dict.fromkeys(_BOTH, backward_accumulate),
    "microbatch": dict.fromkeys(_BOTH, microbatch),
    "microbatch_unrolled": dict.fromkeys(_BOTH, microbatch_unrolled),
    "input_gradient": dict.fromkeys(_BOTH, input_gradient),
    "wgan_gp": dict.fromkeys(_BOTH, wgan_gp),
    "hvp": dict.fromkeys(_BOTH, hvp),
    "hvp_linearized": dict.fromkeys(_BOTH, hvp_linearized),
    "hessian": dict.fromkeys(_BOTH, hessian),
    "derivative8": dict.fromkeys(("fgrad", "fgrad-nested", "jax"), derivative8),
}
_every = lambda w: True
_splits = lambda w: w.batch % K_MICRO == 0  # the batch splits into K_MICRO micro-batches
APPLIES = {
    "grad": _every,
    "grad_intermediates": _every,
    "backward_accumulate": _every,
    "microbatch": _splits,
    "microbatch_unrolled": _splits,
    "input_gradient": _every,
    "wgan_gp": _every,
    "hvp": _every,
    "hvp_linearized": _every,
    "hessian": lambda w: _n_params(w) <= MAX_HESSIAN_PARAMS,  # dense: small models only
    "derivative8": lambda w: False,  # on its own workload only
}
WORKLOADS = {
    # a small MLP that only the dense Hessian runs on (the tiny suite's models are small)
    "hessian": lambda suite: [] if suite == "tiny" else [HESSIAN_MLP],
    "derivative8": lambda suite: [SCALAR],
}


def cost(fn: Any, args: tuple) -> dict[str, Any]:
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
