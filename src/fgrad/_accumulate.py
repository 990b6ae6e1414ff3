"""Micro-batch gradient accumulation in one compiled ``lax.scan``.

PyTorch: a Python loop of ``(loss / k).backward()`` over micro-batches, then
``optimizer.step()``. fgrad: `accumulate` scans ``value_and_grad`` over the micro-batches,
weighting each exactly, so the result equals the full-batch gradient of the mean loss
while only one micro-batch's activations are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from fgrad import _checks
from fgrad._conv_layout import canonical_convs
from fgrad._grads import (
    add_into,
    is_hole,
    live_leaves,
    prepare_grads,
    value_and_grad_trainable,
)
from fgrad._typing import PyTree

Count = Callable[[Any], Any] | None


def _wider(a: Any, b: Any) -> Any:
    """The dtype both ``a`` and ``b`` fit in. Asked under standard promotion: choosing an
    accumulator dtype is not an implicit promotion of values, so a caller's strict
    ``jax_numpy_dtype_promotion`` (which refuses bfloat16 with float32) does not apply."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(a, b)


def _plan(n: int, microbatches: int | None, microbatch_size: int | None, caller: str):
    """(number of equal micro-batches k, their size m, size of a smaller last one r)."""
    if (microbatches is None) == (microbatch_size is None):
        raise TypeError(f"{caller}: pass exactly one of microbatches= or microbatch_size=.")
    if microbatches is not None:
        hint = (
            ", or pass microbatch_size= (the last micro-batch is then smaller, and weighted "
            "exactly)"
        )
        return microbatches, _checks.equal_split(n, microbatches, caller, hint), 0
    m = microbatch_size
    if not _checks.is_int(m) or not 1 <= m <= n:
        raise ValueError(
            f"{caller}: microbatch_size must be an int between 1 and the batch size {n}, got {m!r}."
        )
    return n // m, m, n % m


def _loop_plan(unroll: Any, caller: str) -> tuple[int | bool, bool]:
    """``(lax.scan's unroll, whether to rewrite the body's convolutions)`` for ``unroll``.

    ``"auto"`` keeps the loop rolled and rewrites convolutions on the CPU backend only:
    elsewhere XLA runs them well inside loops (see `fgrad._conv_layout`)."""
    if unroll == "auto":
        return 1, jax.default_backend() == "cpu"
    if isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1):
        return unroll, False
    raise ValueError(
        f"{caller}: unroll must be 'auto', True, False or a positive int, got {unroll!r}."
    )


def accumulate(
    fn: Callable,
    params: PyTree,
    batch: PyTree,
    *args: Any,
    microbatches: int | None = None,
    microbatch_size: int | None = None,
    count: Count = None,
    grads: PyTree = None,
    accum_dtype: Any = jnp.float32,
    unroll: int | bool | Literal["auto"] = "auto",
    split: Literal["strided", "contiguous"] = "strided",
) -> tuple[jax.Array, Any]:
    """Full-batch mean-loss gradient, computed over micro-batches in one ``lax.scan``.

    ``fn(params, microbatch, *args)`` returns the mean loss over one micro-batch. With
    micro-batch ``i`` holding ``n_i`` of the batch's ``N`` examples (or, with ``count``,
    ``n_i = count(microbatch_i)`` tokens), the result is

        value = Σᵢ nᵢ fnᵢ / Σᵢ nᵢ,    grads += Σᵢ nᵢ ∇fnᵢ / Σᵢ nᵢ,

    which is the full-batch mean loss and its gradient: a smaller last micro-batch is
    weighted exactly. Only one micro-batch's activations are alive at a time, so peak
    memory does not grow with the number of micro-batches.

    By default the ``k`` equal micro-batches are strided (micro-batch ``i`` holds examples
    ``i, i+k, i+2k, ...``; see ``split``), so when the batch is sharded over devices
    along its first axis every micro-batch is spread over all devices, and XLA adds the
    all-reduce: data parallelism with no code change. Across several hosts, start each
    with ``jax.distributed.initialize()``, build the global batch with
    ``jax.make_array_from_process_local_data`` over a mesh of all devices, and call
    ``accumulate`` under ``jax.jit`` exactly as on one host.

    Args:
      fn: ``fn(params, microbatch, *args) -> scalar`` mean loss over the micro-batch.
      params: the parameters.
      batch: a pytree of arrays sharing a leading batch axis.
      *args: passed to every ``fn`` call unchanged (not split).
      microbatches: split the batch into this many equal micro-batches (it must divide
        the batch size).
      microbatch_size: or: micro-batches of this size, the last one smaller if needed.
      count: weight micro-batches by ``count(microbatch)`` (e.g. the number of
        non-padding tokens, when ``fn`` averages over tokens) instead of their size.
      grads: the accumulator to add into, as for `fgrad.backward`: ``None`` at frozen
        leaves (neither differentiated nor changed), `fgrad.NoGrad` where a trainable
        leaf has no gradient yet (filled only if the loss depends on it, read once per
        trace from the first micro-batch's program; a leaf used in either branch of a
        ``lax.cond`` counts as used). Default: ``fgrad.zero_grad(params)``.
      accum_dtype: dtype of the running sums (default float32, so bfloat16 or float16
        parameters accumulate without losing precision; float64 and complex leaves keep
        their own precision); the result is cast to each accumulator leaf's dtype.
        ``None``: the accumulator's own dtype. The loss value is summed in the wider of
        the loss's dtype and this one (float64 for a float64 loss).
      unroll: ``"auto"`` (default): a rolled loop, so peak memory stays flat in the
        number of micro-batches; on the CPU backend, every convolution of the loop body
        (the backward pass's included) is first rewritten into the layout XLA:CPU runs
        fast, as XLA itself does outside loops but not inside them (jax#12868: without
        it, a CNN's loop runs far slower than the same loop unrolled). The result is the
        same; the rewrite adds a few transposes. An int or ``True``:
        passed to ``lax.scan`` as is, with no rewrite (``True`` unrolls the loop, which
        gives up the flat memory: XLA may then hold several micro-batches' activations
        at once).
      split: how the ``k`` equal micro-batches are cut from the batch. ``"strided"``
        (default): micro-batch ``i`` holds examples ``i, i+k, i+2k, ...``, so a batch
        sharded over devices gives every micro-batch a share of every device.
        ``"contiguous"``: micro-batch ``i`` holds examples ``i*m`` to ``i*m + m - 1``, the
        layout of a hand-written ``reshape(k, m, ...)`` loop; on one device it can be
        faster (XLA's CPU convolutions read a strided micro-batch more slowly), but on a
        sharded batch each micro-batch then sits on a fraction of the devices. The
        result is the same either way.

    Returns:
      ``(value, grads)``: the full-batch mean loss and the accumulator with its gradient
      added.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
      >>> w = jnp.ones(3)
      >>> batch = {"x": jnp.arange(30.0).reshape(10, 3) / 10, "y": jnp.arange(10.0)}
      >>> value, g = jax.jit(lambda w, b: fgrad.accumulate(loss, w, b, microbatch_size=4))(w, batch)
      >>> bool(jnp.allclose(g, jax.grad(loss)(w, batch), rtol=1e-6))
      True
    """
    caller = "fgrad.accumulate"
    if split not in ("strided", "contiguous"):
        raise ValueError(f"{caller}: split must be 'strided' or 'contiguous', got {split!r}.")
    scan_unroll, rewrite_convs = _loop_plan(unroll, caller)
    grads = prepare_grads(params, grads, caller)
    n = _checks.batch_size(batch, caller)
    k, m, r = _plan(n, microbatches, microbatch_size, caller)
    acc_dt = lambda leaf: leaf.dtype if accum_dtype is None else _wider(leaf.dtype, accum_dtype)

    # Equal micro-batches: reshape (k*m, ...) -> (m, k, ...) (strided) or (k, m, ...)
    # (contiguous) is free, and a dynamic index along the k axis reads one micro-batch
    # without copying the batch.
    head = batch if r == 0 else jax.tree.map(lambda x: x[: k * m], batch)
    axis, shape = (1, (m, k)) if split == "strided" else (0, (k, m))
    split_batch = jax.tree.map(lambda x: jnp.reshape(x, (*shape, *x.shape[1:])), head)
    index = lambda i: jax.tree.map(
        lambda x: jax.lax.dynamic_index_in_dim(x, i, axis, keepdims=False), split_batch
    )

    # Which NoGrad leaves the loss reaches: read once, from the first micro-batch's
    # program (every micro-batch runs the same one).
    live = live_leaves(fn, params, grads, (index(0), *args), False, caller)
    sums = jax.tree.map(
        lambda g, p, lv: g if is_hole(g) and not lv else jnp.zeros(p.shape, acc_dt(p)),
        grads,
        params,
        live,
        is_leaf=is_hole,
    )
    # The loss keeps its precision: float64 sums for a float64 loss (float32 at least).
    out = jax.tree.leaves(jax.eval_shape(lambda: fn(params, index(0), *args)))
    loss_dt = out[0].dtype if len(out) == 1 else jnp.float32
    value_dt = _wider(loss_dt, jnp.float32 if accum_dtype is None else accum_dtype)

    def weighted(mb, size):
        """(weight, weight * loss, gradient) of one micro-batch."""
        value, _, g = value_and_grad_trainable(fn, params, grads, (mb, *args), False, caller)
        w = jnp.asarray(size if count is None else count(mb), value_dt)
        if jnp.ndim(w):
            raise TypeError(f"{caller}: count(microbatch) must return a scalar, got {w.shape}.")
        return w, jnp.reshape(value, ()).astype(value_dt) * w, g

    # Every example counting once (no count=), the total weight is the batch size, known
    # now: a 32- or 64-bit running sum takes each micro-batch's gradient scaled by its
    # share as it is added (PyTorch's (loss / k).backward()), which fuses into the loop's
    # sum, instead of one division per leaf after the loop (one more kernel per parameter
    # on a GPU). A half-precision sum adds micro-batch mean gradients unscaled (shares of
    # small gradients would fall into float16's subnormals, size-weighted sums overflow
    # its range) and is divided by the number of micro-batches once, in float32.
    known_total = n if count is None else None

    def share(w: Any, size: int) -> Any:
        """The scale of a micro-batch's gradient, per running sum's dtype."""
        if known_total is None:
            return w
        return lambda dt: size / m if _checks.half_precision(dt) else size / known_total

    def body(carry, i):
        total_w, total_v, acc = carry
        mb = index(i)
        one = lambda mb: weighted(mb, m)
        w, v, g = (canonical_convs(one) if rewrite_convs else one)(mb)
        return (total_w + w, total_v + v, add_into(acc, g, share(w, m))), None

    zero = jnp.zeros((), value_dt)
    (total_w, total_v, sums), _ = jax.lax.scan(
        body, (zero, zero, sums), jnp.arange(k), unroll=scan_unroll
    )
    if r:
        w, v, g = weighted(jax.tree.map(lambda x: x[k * m :], batch), r)
        total_w, total_v, sums = total_w + w, total_v + v, add_into(sums, g, share(w, r))

    def mean(s):
        if is_hole(s) or (known_total is not None and not _checks.half_precision(s.dtype)):
            return s
        # in float32 at least: the total may exceed float16's range
        wide = jnp.float32 if _checks.half_precision(s.dtype) else s.dtype
        total = total_w.astype(wide) if known_total is None else known_total / m
        return (s.astype(wide) / total).astype(s.dtype)

    means = jax.tree.map(mean, sums, is_leaf=is_hole)
    # Summed in value_dt (float32 at least), returned in the loss's own dtype.
    value = (total_v / total_w).astype(loss_dt)
    return value, add_into(grads, means, live=live, like=params)
