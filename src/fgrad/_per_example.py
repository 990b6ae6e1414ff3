"""Per-example gradients, their norms, clipped means and moments (Opacus, BackPACK).

PyTorch: Opacus' ``GradSampleModule`` (``p.grad_sample``), ghost clipping and
``DPOptimizer``; BackPACK's ``BatchGrad``, ``BatchL2Grad``, ``Variance`` and
``SumGradSquared``. Both read each layer's input and output gradient with module hooks.
fgrad reads them from the traced program (`fgrad._layers`), so a layer used twice, a
layer inside ``lax.scan`` or a layer no hook knows about changes nothing.

How it works, for ``loss_fn(params, batch) -> (B,)``: one example's loss is
``loss_fn(params, example[None])[0]``, and everything below runs under ``jax.vmap`` over
the examples (so per-example means exactly what ``vmap(grad)`` means). For one example,
one forward and one backward pass record every layer's input ``a`` and output gradient
``g`` (zero perturbations added at the outputs) and the gradient of every *other*
trainable leaf (biases, norm scales: any leaf that is not used only as a layer weight).
From those:

- a dense layer's weight gradient is ``Σₜ aₜ gₜᵀ`` over shared positions ``t`` (sequence
  positions, scan steps); its squared norm is taken either in Gram form,
  ``Σₜₛ (aₜ·aₛ)(gₜ·gₛ)`` (``T²`` numbers), or from the materialised gradient (``K·N``),
  whichever is smaller, as Opacus decides;
- a row-lookup embedding's is ``Σₜₛ [idₜ = idₛ] (gₜ·gₛ)`` (Gram form) or materialised;
- a convolution's the same way from its input patches (``aₜ`` the patch at output
  position ``t``) where the Gram form is the smaller; otherwise its kernel's per-example
  gradient comes from the backward pass itself (one grouped convolution, as in
  ``vmap(grad)``);
- a 2-D leaf used by several layers (tied embeddings, a module applied twice) in Gram
  form over all its uses, ``Σᵤᵥ Σₜₛ (leftᵤₜ·leftᵥₛ)(rightᵤₜ·rightᵥₛ)`` in the leaf's
  layout, where that is smaller than the leaf (else from its materialised per-example
  gradient), so the norm is that of the *summed* gradient, cross terms included; a
  layer inside ``lax.scan`` sums over the steps, but a leaf stacked over the steps
  (``flax.linen.scan``) has one slice per step, each its own;
- the clipped mean ``(1/B) Σᵢ cᵢ gᵢ`` of a layer weight is one contraction over the
  examples of ``a`` and ``cᵢ g``: no per-example gradient is formed.

``method="vmap"`` is ``vmap(grad)`` (every leaf's per-example gradient from the pass).
``method="ghost"`` refuses a model where a leaf's gradient does not decompose (a layer
weight also used by another operation, a weight computed before its matmul, a matrix
handed to a ``custom_jvp`` function...), naming the operation; ``method="auto"`` takes
those leaves' per-example gradients exactly, as ``"vmap"`` does, and the rest as ghost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fgrad import _checks, _layers
from fgrad._grads import Trainable, trainable_mask

_METHODS = ("auto", "ghost", "vmap")
# Opacus' clip factor: max_norm / (norm + 1e-6), at most 1.
CLIP_EPS = 1e-6


# ----------------------------------------------------------------------------------------
# Checks


def _check_method(method: Any, caller: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"{caller}: method must be one of {_METHODS}, got {method!r}.")


def _check_losses(loss_fn, params, batch, n: int, caller: str) -> None:
    out = jax.eval_shape(loss_fn, params, batch)
    shape = getattr(out, "shape", None)
    if shape == (n,):
        dtype = jnp.dtype(out.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{caller}: loss_fn must return floating-point per-example losses, got "
                f"{dtype.name}: an integer (or complex) loss has no real gradient. Compute the "
                "loss in floating point (e.g. .astype(jnp.float32))."
            )
        return
    if shape == ():
        raise ValueError(
            f"{caller}: loss_fn returned a scalar; it must return the per-example losses, "
            f"shape ({n},) (e.g. drop the final .mean() and return the vector of losses)."
        )
    raise ValueError(
        f"{caller}: loss_fn must return the per-example losses, one per example: shape "
        f"({n},), got {shape if shape is not None else type(out).__name__}."
    )


def _check_scalar(x: Any, what: str, caller: str) -> None:
    if x is not None and jnp.ndim(x) != 0:
        raise ValueError(f"{caller}: {what} must be a scalar, got shape {jnp.shape(x)}.")


def _check_max_norm(max_norm: Any, caller: str) -> None:
    _check_scalar(max_norm, "max_norm", caller)
    try:
        bad = not float(max_norm) > 0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced: cannot be checked here; _clip_factors gives NaN if not positive
    if bad:
        raise ValueError(f"{caller}: max_norm must be positive, got {max_norm!r}.")


def _check_noise(noise_multiplier: Any, caller: str) -> None:
    if noise_multiplier is None:
        raise ValueError(f"{caller}: noise_multiplier must be >= 0, got None.")
    _check_scalar(noise_multiplier, "noise_multiplier", caller)
    try:
        bad = not float(noise_multiplier) >= 0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced: cannot be checked
    if bad:
        raise ValueError(f"{caller}: noise_multiplier must be >= 0, got {noise_multiplier!r}.")


def _nonempty_batch(batch: Any, caller: str) -> int:
    n = _checks.batch_size(batch, caller)
    if n == 0:
        raise ValueError(
            f"{caller}: the batch has no examples (B=0), so the mean over examples is "
            "undefined; pass at least one example."
        )
    return n


# ----------------------------------------------------------------------------------------
# One forward and one backward pass per example, under vmap


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the pass found (static): the layers served by ghost, the other trainable
    leaves (exact per-example gradients), and the leaves' key paths."""

    layers: tuple[_layers.Layer, ...]
    rest: tuple[int, ...]
    train: tuple[bool, ...]
    keys: tuple[str, ...]

    def by_leaf(self) -> dict[int, list[_layers.Layer]]:
        out: dict[int, list[_layers.Layer]] = {}
        for layer in self.layers:
            out.setdefault(layer.leaf, []).append(layer)
        return out


@dataclasses.dataclass(frozen=True)
class _Pass:
    """Per-example results of the pass, each with a leading example axis."""

    losses: jax.Array
    inputs: dict[str, jax.Array]  # layer name -> input
    out_grads: dict[str, jax.Array]  # layer name -> output gradient
    rest_grads: dict[int, jax.Array]  # leaf index -> per-example gradient
    plan: _Plan
    leaves: list[Any]
    treedef: Any


def _conv_gram_cheaper(layer: _layers.Layer) -> bool:
    """For a convolution: whether its ``P × P`` Gram matrix over output positions is
    smaller than its kernel (Opacus' choice). Where it is not, the kernel's per-example
    gradient is taken in the backward pass itself, as ``vmap(grad)`` does: XLA forms it
    there as one grouped convolution, faster than from recorded patches."""
    if layer.kind != "conv":
        return True
    out_spec = layer.dimension_numbers.out_spec
    o = layer.output.shape[out_spec[1]]
    positions = math.prod(layer.output.shape) // o * math.prod(layer.stack)
    return positions * positions <= math.prod(layer.weight.shape)


def _undecomposable(found: _layers.Found, train, keys) -> dict[str, str]:
    """Trainable leaves whose gradient does not decompose: key -> the operation why."""
    return {keys[i]: why for i, why in found.undecomposable.items() if train[i]}


def _run_pass(loss_fn, params, batch, method: str, trainable: Trainable, caller: str) -> _Pass:
    n = _checks.batch_size(batch, caller)
    _check_losses(loss_fn, params, batch, n, caller)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = tuple(jax.tree_util.keystr(p) for p, _ in flat)
    leaves = [x for _, x in flat]
    train = tuple(jax.tree.leaves(trainable_mask(params, trainable, caller)))
    for k, t, x in zip(keys, train, leaves, strict=True):
        if t and not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            raise TypeError(
                f"{caller}: params{k} is {jnp.result_type(x)}, which has no gradient; mark it "
                "frozen with trainable=."
            )
    info: dict[str, _Plan] = {}

    def one_loss(p, ex):
        return jnp.reshape(loss_fn(p, jax.tree.map(lambda x: x[None], ex)), ())

    def one(leaves, ex):
        params_ = jax.tree.unflatten(treedef, leaves)
        layers: tuple[_layers.Layer, ...] = ()
        closed = None
        if method != "vmap":
            found, closed = _layers.analyse(one_loss, params_, ex)
            blocked = _undecomposable(found, train, keys)
            if blocked and method == "ghost":
                what = "; ".join(f"params{k} is used by {why}" for k, why in blocked.items())
                raise ValueError(
                    f"{caller}: method='ghost' cannot decompose this model: {what}, so "
                    "that leaf's per-example gradient would have to be materialised. Use "
                    "method='auto' (ghost for the other leaves, that one exactly) or "
                    "'vmap', or mark the leaf frozen with trainable=."
                )
            # "auto": the leaves that do not decompose join the exact per-example ones,
            # and so do convolutions whose kernel is smaller than their Gram matrix
            direct = {l.leaf for l in found.layers if not _conv_gram_cheaper(l)}
            layers = tuple(
                l
                for l in found.layers
                if train[l.leaf]
                and l.exclusive
                and keys[l.leaf] not in blocked
                and l.leaf not in direct
            )
        ghost = {l.leaf for l in layers}
        rest = tuple(i for i in range(len(leaves)) if train[i] and i not in ghost)
        info["plan"] = _Plan(layers, rest, train, keys)
        hooks = _layers._Hooks(layers, taps=False, record=True)

        def f(perturb, rest_vals):
            ls = list(leaves)
            for i, v in zip(rest, rest_vals, strict=True):
                ls[i] = v
            if closed is None:
                return one_loss(jax.tree.unflatten(treedef, ls), ex), {}
            outs, rec = _layers.run(closed, [*ls, *jax.tree.leaves(ex)], hooks, perturb)
            return outs[0], rec

        zeros = _layers.output_zeros(layers)
        loss, pull, rec = jax.vjp(f, zeros, [leaves[i] for i in rest], has_aux=True)
        g_out, g_rest = pull(jnp.ones_like(loss))
        return loss, rec, g_out, dict(zip(rest, g_rest, strict=True))

    losses, inputs, out_grads, rest_grads = jax.vmap(one, in_axes=(None, 0))(leaves, batch)
    return _Pass(losses, inputs, out_grads, rest_grads, info["plan"], leaves, treedef)


# ----------------------------------------------------------------------------------------
# Quantities from the pass


def _vmap_over(fn, n_lead: int):
    for _ in range(n_lead):
        fn = jax.vmap(fn)
    return fn


def _one_step(layer: _layers.Layer) -> _layers.Layer:
    """A sliced layer (its weight stacked over scan steps) seen at one step."""
    return dataclasses.replace(layer, stack=(), sliced=False)


def _layer_leaf_grad(layer: _layers.Layer, leaf, a, g):
    """One example's gradient of the layer's leaf (leaf layout), summed over scan steps
    (stacked over them for a sliced layer)."""
    n = len(layer.stack)
    dw = _vmap_over(lambda a_, g_: layer.weight_grad(a_, g_, leaf), n)(a, g)
    if layer.sliced:
        return dw
    return dw.reshape(-1, *jnp.shape(leaf)).sum(0) if n else dw


def _sq(x) -> jax.Array:
    return jnp.sum(jnp.square(x))


def _layer_sq_norm(layer: _layers.Layer, leaf, a, g) -> jax.Array:
    """One example's squared norm of the layer's weight gradient, Gram form where cheaper."""
    if layer.sliced:  # each step's slice separately: no cross terms between steps
        step = _one_step(layer)
        return jax.vmap(lambda a_, g_: _layer_sq_norm(step, leaf[0], a_, g_))(a, g).sum()
    factors = None
    if layer.kind == "dense":
        factors = layer.dense_factors(a, g)
    elif layer.kind == "conv":
        factors = layer.conv_factors(a, g)
    if factors is not None:
        a2, g2 = factors
        t, k = a2.shape
        nout = g2.shape[1]
        if t * t <= k * nout:  # Gram form: T² numbers instead of K·N
            return jnp.sum((a2 @ a2.T) * (g2 @ g2.T).astype(a2.dtype))
        return _sq(a2.T @ g2.astype(a2.dtype))
    if layer.kind == "embed":
        rows = layer.embed_rows(a)
        if rows is not None:
            rows = rows.reshape(-1)
            g2 = g.reshape(rows.shape[0], -1)
            if rows.shape[0] ** 2 <= math.prod(layer.weight.shape):
                same = (rows[:, None] == rows[None, :]) & (rows[:, None] >= 0)
                return jnp.sum(jnp.where(same, g2 @ g2.T, 0))
    return _sq(_layer_leaf_grad(layer, leaf, a, g))


def _per_example_leaf_sq_norms(p: _Pass) -> dict[int, jax.Array]:
    """Leaf index -> (B,) squared norms of the per-example gradients (trainable only)."""
    out: dict[int, jax.Array] = {i: jax.vmap(_sq)(g) for i, g in p.rest_grads.items()}
    for leaf_i, layers in p.plan.by_leaf().items():
        leaf = p.leaves[leaf_i]
        if len(layers) == 1:
            (l,) = layers
            out[leaf_i] = jax.vmap(lambda a, g, l=l, w=leaf: _layer_sq_norm(l, w, a, g))(
                p.inputs[l.name], p.out_grads[l.name]
            )
        else:  # the norm of the summed gradient, cross terms included

            def summed(ins, outs, layers=layers, leaf=leaf):
                shared = _shared_gram_sq_norm(layers, leaf, ins, outs)
                if shared is not None:
                    return shared
                return _sq(
                    sum(
                        _layer_leaf_grad(l, leaf, ins[l.name], outs[l.name]).astype(leaf.dtype)
                        for l in layers
                    )
                )

            names = [l.name for l in layers]
            out[leaf_i] = jax.vmap(summed)(
                {k: p.inputs[k] for k in names}, {k: p.out_grads[k] for k in names}
            )
    return out


def _leaf_factors(layer: _layers.Layer, leaf, a, g):
    """One use of a 2-D leaf as ``(left, right)`` with the leaf's gradient
    ``Σₜ leftₜ ⊗ rightₜ`` in the leaf's own layout: ``left`` is ``("ids", rows)`` for a
    row lookup or ``("dense", X)``, ``right`` a ``(T, columns)`` matrix; None if the use
    has no such form (a chain other than a transpose, a conv, a sliced leaf...)."""
    if jnp.ndim(leaf) != 2 or layer.sliced:
        return None
    if layer.kind == "embed":
        rows = layer.embed_rows(a)
        if rows is None:
            return None
        rows = rows.reshape(-1)
        return ("ids", rows), g.reshape(rows.shape[0], -1)
    if layer.kind != "dense" or len(layer.weight.shape) != 2:
        return None
    chain = [prim.name for prim, _ in layer.chain]
    if chain not in ([], ["transpose"]):
        return None
    (lc, rc), _ = layer.dimension_numbers
    contracted = (rc if layer.weight_operand == 1 else lc)[0]
    a2, g2 = layer.dense_factors(a, g)  # operand gradient: a2ᵀ g2 (contracted axis 0)
    first, second = (a2, g2) if contracted == 0 else (g2, a2)  # operand axis 0, axis 1
    if chain:  # the leaf is the operand transposed
        first, second = second, first
    return ("dense", first), second


def _left_gram(x, y):
    (kx, vx), (ky, vy) = x, y
    if kx == "ids" and ky == "ids":
        return ((vx[:, None] == vy[None, :]) & (vx[:, None] >= 0)).astype(jnp.float32)
    if kx == "ids":  # onehot(id) · v = v[id]
        return jnp.where(vx[:, None] >= 0, jnp.take(vy, jnp.maximum(vx, 0), axis=1).T, 0)
    if ky == "ids":
        return _left_gram(y, x).T
    return vx @ vy.T


def _shared_gram_sq_norm(layers, leaf, ins, outs):
    """``‖Σᵤ Σₜ leftᵤₜ ⊗ rightᵤₜ‖²`` over every use ``u`` of a 2-D leaf (tied embeddings,
    a layer applied twice) in Gram form, ``Σᵤᵥ Σₜₛ (leftᵤₜ·leftᵥₛ)(rightᵤₜ·rightᵥₛ)``, where
    every use has that form and the Gram matrix is smaller than the leaf; else None."""
    factors = [_leaf_factors(l, leaf, ins[l.name], outs[l.name]) for l in layers]
    if any(f is None for f in factors):
        return None
    positions = sum(r.shape[0] for _, r in factors)
    if positions * positions > math.prod(jnp.shape(leaf)):
        return None
    dt = jnp.result_type(*[r.dtype for _, r in factors])
    total = jnp.zeros((), dt)
    for lu, ru in factors:
        for lv, rv in factors:
            total = total + jnp.sum(_left_gram(lu, lv).astype(dt) * (ru @ rv.T).astype(dt))
    return total


def _per_example_leaf_grads(p: _Pass) -> dict[int, jax.Array]:
    out = dict(p.rest_grads)
    for leaf_i, layers in p.plan.by_leaf().items():
        leaf = p.leaves[leaf_i]
        total = _per_example_leaf_grads_for(p, leaf_i, layers, leaf)
        out[leaf_i] = total.astype(jnp.result_type(leaf))
    return out


def _weighted_leaf_sums(p: _Pass, weights: jax.Array, square: bool = False) -> dict[int, Any]:
    """Leaf index -> Σᵢ wᵢ gᵢ (or Σᵢ wᵢ gᵢ² with ``square``) over the examples, without
    per-example gradients of layer weights where the layer allows."""
    out: dict[int, Any] = {}
    for i, g in p.rest_grads.items():
        gi = jnp.square(g) if square else g
        out[i] = jnp.tensordot(weights.astype(gi.dtype), gi, axes=1)
    for leaf_i, layers in p.plan.by_leaf().items():
        leaf = p.leaves[leaf_i]
        if square and not _single_position_dense(layers):
            g_all = _per_example_leaf_grads_for(p, leaf_i, layers, leaf)
            out[leaf_i] = jnp.tensordot(weights.astype(g_all.dtype), jnp.square(g_all), axes=1)
            continue
        total: Any = 0
        for l in layers:
            a, g = p.inputs[l.name], p.out_grads[l.name]
            w = weights.astype(g.dtype).reshape(-1, *([1] * (g.ndim - 1)))
            if square:  # one position: (a gᵀ)² = a² (g²)ᵀ
                a, g = jnp.square(a), jnp.square(g)
            total = total + _summed_weight_grad(l, leaf, a, g * w)
        out[leaf_i] = total.astype(jnp.result_type(leaf))
    return out


def _single_position_dense(layers) -> bool:
    """One dense layer with no shared positions: its per-example gradient is one outer
    product, so Σᵢ gᵢ² needs no per-example gradient."""
    if len(layers) != 1 or layers[0].kind != "dense" or layers[0].stack:
        return False
    l = layers[0]
    _, free = l._dense_axes()
    return math.prod(l.input.shape[d] for d in free) == 1


def _per_example_leaf_grads_for(p: _Pass, leaf_i, layers, leaf):
    total = 0
    for l in layers:
        total = total + jax.vmap(lambda a, g, l=l: _layer_leaf_grad(l, leaf, a, g))(
            p.inputs[l.name], p.out_grads[l.name]
        )
    return total


def _summed_weight_grad(layer: _layers.Layer, leaf, a, g):
    """Σ over the leading (example, scan-step) axes of the layer's leaf gradient, as one
    transposed layer operation: no per-example gradient is formed."""
    if layer.sliced:  # stacked over the steps (axis 1, after the examples)
        step = _one_step(layer)
        one = lambda a_, g_: _summed_weight_grad(step, leaf[0], a_, g_)
        return jax.vmap(one, in_axes=(1, 1))(a, g)
    n = a.ndim - len(layer.input.shape)

    def batched(w):
        return _vmap_over(lambda a_: layer.apply(a_, w), n)(a)

    w0 = jnp.zeros(layer.weight.shape, layer.weight.dtype)
    _, pull = jax.vjp(batched, w0)
    (dw,) = pull(g.astype(layer.output.dtype))
    if not layer.chain:
        return dw
    _, pull_chain = jax.vjp(layer.weight_from_leaf, jnp.zeros(jnp.shape(leaf), leaf.dtype))
    return pull_chain(dw)[0]


def _unflatten(p: _Pass, by_leaf: dict[int, Any]) -> Any:
    return jax.tree.unflatten(p.treedef, [by_leaf.get(i) for i in range(len(p.leaves))])


def _total_norms(p: _Pass, sq: dict[int, jax.Array]) -> jax.Array:
    n = p.losses.shape[0]
    total = jnp.zeros((n,), p.losses.dtype)
    for v in sq.values():
        total = total + v.astype(total.dtype)
    return jnp.sqrt(total)


# ----------------------------------------------------------------------------------------
# Micro-batches


def _microbatched(fn, batch, microbatches: int | None, caller: str, *, reduce: bool | str):
    """``fn(batch)`` over ``microbatches`` contiguous micro-batches in one ``lax.map`` /
    ``lax.scan``: per-example results concatenate (``reduce=False``), sums add up
    (``reduce=True``), or ``fn`` returns ``(sums, per_example)`` (``reduce="first"``)."""
    if microbatches is None:
        return fn(batch)
    n = _checks.batch_size(batch, caller)
    m = _checks.equal_split(n, microbatches, caller)
    split = jax.tree.map(lambda x: x.reshape(microbatches, m, *x.shape[1:]), batch)
    if not reduce:
        out = jax.lax.map(fn, split)
        return jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), out)
    first = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], split))
    both = reduce == "first"
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first[0] if both else first)

    def body(acc, mb):
        out = fn(mb)
        if both:
            return jax.tree.map(jnp.add, acc, out[0]), out[1]
        return jax.tree.map(jnp.add, acc, out), None

    sums, per = jax.lax.scan(body, init, split)
    if both:
        return sums, jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), per)
    return sums


# ----------------------------------------------------------------------------------------
# Public functions


def grads(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    method: str = "auto",
    trainable: Trainable = None,
    microbatches: int | None = None,
) -> Any:
    """Per-example gradients: BackPACK's ``BatchGrad``, Opacus' ``p.grad_sample``.

    For ``loss_fn(params, batch) -> (B,)``, the gradient of each example's loss
    ``∇ℓᵢ = ∇ loss_fn(params, batch)[i]`` (computed as if the example were alone in its
    batch, as ``vmap(grad)`` does).

    Args:
      loss_fn: ``loss_fn(params, batch)`` returning the per-example losses, shape ``(B,)``;
        the example axis is the leading axis of every leaf of ``batch``.
      params: the parameters (a pytree).
      batch: a pytree of arrays sharing a leading example axis.
      method: ``"ghost"`` (from layer inputs and output gradients found in the traced
        program), ``"vmap"`` (``vmap(grad)``) or ``"auto"`` (ghost, with exact
        per-example gradients for the leaves ghost cannot decompose).
        All give the same numbers.
      trainable: which leaves take gradients, as for `fgrad.zero_grad`; frozen leaves
        give ``None``.
      microbatches: compute over this many equal contiguous micro-batches (one at a time,
        in one ``lax.map``); the per-example results concatenate.

    Returns:
      A pytree shaped like ``params``: each trainable leaf with a leading ``B`` axis,
      ``None`` at frozen leaves.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> loss = lambda w, b: (b["x"] @ w - b["y"]) ** 2
      >>> b = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "y": jnp.array([1.0, 0.0])}
      >>> fgrad.per_example.grads(loss, jnp.array([2.0, 1.0]), b)
      Array([[2., 0.],
             [0., 8.]], dtype=float32)
    """
    caller = "fgrad.per_example.grads"
    _check_method(method, caller)

    def fn(b):
        p = _run_pass(loss_fn, params, b, method, trainable, caller)
        return _unflatten(p, _per_example_leaf_grads(p))

    return _microbatched(fn, batch, microbatches, caller, reduce=False)


def grad_norms(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    method: str = "auto",
    per_leaf: bool = False,
    trainable: Trainable = None,
    microbatches: int | None = None,
) -> Any:
    """Per-example gradient L2 norms: BackPACK's ``BatchL2Grad``, Opacus' per-sample norms.

    ``‖∇ℓᵢ‖₂`` over all trainable leaves together (frozen leaves excluded, as Opacus
    excludes ``requires_grad=False`` parameters). With ``method="ghost"`` no
    per-example gradient of a dense or embedding weight is formed: for a layer with input
    ``aₜ`` and output gradient ``gₜ`` at shared positions ``t``,
    ``‖Σₜ gₜ aₜᵀ‖² = Σₜₛ (gₜ·gₛ)(aₜ·aₛ)`` where that is cheaper than the ``K×N``
    gradient. A parameter used more than once gets the norm of its summed gradient.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      params: the parameters.
      batch: a pytree of arrays sharing a leading example axis.
      method: ``"auto"``, ``"ghost"`` or ``"vmap"`` (see `grads`).
      per_leaf: also return each leaf's per-example norms.
      trainable: which leaves count, as for `fgrad.zero_grad`.
      microbatches: compute over this many equal contiguous micro-batches.

    Returns:
      The norms, shape ``(B,)``; with ``per_leaf``, ``(norms, leaf_norms)`` where
      ``leaf_norms`` is shaped like ``params`` with ``(B,)`` norms (``None`` at frozen
      leaves).

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> loss = lambda w, b: (b["x"] @ w - b["y"]) ** 2
      >>> b = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "y": jnp.array([1.0, 0.0])}
      >>> fgrad.per_example.grad_norms(loss, jnp.array([2.0, 1.0]), b)
      Array([2., 8.], dtype=float32)

    References:
      Goodfellow, "Efficient per-example gradient computations", 2015;
      Li et al., "Large language models can be strong differentially private learners",
      2022 (ghost clipping).
    """
    caller = "fgrad.per_example.grad_norms"
    _check_method(method, caller)

    def fn(b):
        p = _run_pass(loss_fn, params, b, method, trainable, caller)
        sq = _per_example_leaf_sq_norms(p)
        total = _total_norms(p, sq)
        if not per_leaf:
            return total
        return total, _unflatten(p, {i: jnp.sqrt(v) for i, v in sq.items()})

    return _microbatched(fn, batch, microbatches, caller, reduce=False)


def _clip_factors(norms: jax.Array, max_norm: Any) -> jax.Array:
    m = jnp.asarray(max_norm, norms.dtype)
    c = jnp.minimum(m / (norms + jnp.asarray(CLIP_EPS, norms.dtype)), 1)
    # A max_norm traced under jit cannot be checked when called: a non-positive one gives
    # NaN rather than sign-flipped (or zero) clipped gradients.
    return jnp.where(m > 0, c, jnp.nan)


def clipped_grad(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    max_norm: float,
    *,
    key: jax.Array | None = None,
    noise_multiplier: float = 0.0,
    method: str = "auto",
    trainable: Trainable = None,
    microbatches: int | None = None,
    with_norms: bool = False,
) -> Any:
    """DP-SGD's gradient: the mean of per-example gradients clipped in L2, plus noise.

    With per-example gradients ``gᵢ`` and norms ``‖gᵢ‖``, Opacus' clip factors
    ``cᵢ = min(1, C / (‖gᵢ‖ + 10⁻⁶))`` and ``σ = noise_multiplier``::

        (1/B) (Σᵢ cᵢ gᵢ + 𝒩(0, σ² C² I)),

    the gradient ``DPOptimizer`` leaves in ``.grad`` (Poisson sampling aside: ``B`` is the
    batch given). With ``method="ghost"`` the sum is one contraction per layer of inputs
    and clip-weighted output gradients from the same backward pass that gave the norms:
    no per-example weight gradient is formed and no second backward pass runs.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      params: the parameters.
      batch: a pytree of arrays sharing a leading example axis.
      max_norm: the clipping norm ``C``: a positive scalar (refused otherwise; one
        traced under jit that is not positive gives NaN).
      key: a PRNG key for the noise (required when ``noise_multiplier > 0``); each
        trainable leaf draws from its own fold of it.
      noise_multiplier: ``σ``, a scalar >= 0; 0 (default) adds no noise.
      method: ``"auto"``, ``"ghost"`` or ``"vmap"`` (see `grads`).
      trainable: which leaves are trained, as for `fgrad.zero_grad` (frozen: ``None``,
        excluded from the norms).
      microbatches: compute over this many equal contiguous micro-batches, summing the
        clipped gradients (one micro-batch's activations alive at a time).
      with_norms: also return the per-example norms (before clipping).

    Returns:
      A pytree shaped like ``params`` (``None`` at frozen leaves); with ``with_norms``,
      ``(grads, norms)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> loss = lambda w, b: (b["x"] @ w - b["y"]) ** 2
      >>> b = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "y": jnp.array([1.0, 0.0])}
      >>> g = fgrad.per_example.clipped_grad(loss, jnp.array([2.0, 1.0]), b, max_norm=1.0)
      >>> [round(float(v), 4) for v in g]  # (1/2) ([1, 0] + [0, 1])
      [0.5, 0.5]

    References:
      Abadi et al., "Deep learning with differential privacy", 2016.
    """
    caller = "fgrad.per_example.clipped_grad"
    _check_method(method, caller)
    _check_max_norm(max_norm, caller)
    _check_noise(noise_multiplier, caller)
    noisy = isinstance(noise_multiplier, jax.Array) or noise_multiplier > 0
    if noisy and key is None:
        raise ValueError(f"{caller}: noise_multiplier > 0 needs a PRNG key: pass key=.")
    n = _nonempty_batch(batch, caller)
    meta: dict[str, Any] = {}

    def fn(b):
        p = _run_pass(loss_fn, params, b, method, trainable, caller)
        norms = _total_norms(p, _per_example_leaf_sq_norms(p))
        sums = _weighted_leaf_sums(p, _clip_factors(norms, max_norm))
        meta["p"] = p
        return [sums.get(i) for i in range(len(p.leaves))], norms

    sums, norms = _microbatched(fn, batch, microbatches, caller, reduce="first")
    p = meta["p"]
    out = {}
    for i, s in enumerate(sums):
        if s is None:
            continue
        if noisy:
            assert key is not None  # checked with noise_multiplier above
            k = jax.random.fold_in(key, i)
            std = jnp.asarray(noise_multiplier, s.dtype) * jnp.asarray(max_norm, s.dtype)
            s = s + std * jax.random.normal(k, s.shape, s.dtype)
        out[i] = s / jnp.asarray(n, s.dtype)
    result = _unflatten(p, out)
    if with_norms:
        if norms is None:
            norms = grad_norms(
                loss_fn,
                params,
                batch,
                method=method,
                trainable=trainable,
                microbatches=microbatches,
            )
        return result, norms
    return result


def moments(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    method: str = "auto",
    trainable: Trainable = None,
    microbatches: int | None = None,
) -> tuple[Any, Any]:
    """Mean and variance of the per-example gradients: BackPACK's ``Variance`` and
    ``SumGradSquared``.

    ``mean = (1/B) Σᵢ gᵢ`` and ``variance = (1/B) Σᵢ gᵢ² − mean²`` elementwise (the
    population variance). With ``method="ghost"`` the mean is one contraction per layer,
    and ``Σᵢ gᵢ²`` of a dense layer applied at one position is ``Σᵢ aᵢ² (gᵢ²)ᵀ``: no
    per-example gradient is formed; elsewhere they are.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      params: the parameters.
      batch: a pytree of arrays sharing a leading example axis.
      method: ``"auto"``, ``"ghost"`` or ``"vmap"`` (see `grads`).
      trainable: which leaves are trained (``None`` at frozen leaves).
      microbatches: accumulate the sums over this many equal contiguous micro-batches.

    Returns:
      ``(mean, variance)``, each shaped like ``params`` (``None`` at frozen leaves).

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> loss = lambda w, b: (b["x"] @ w - b["y"]) ** 2
      >>> b = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "y": jnp.array([1.0, 0.0])}
      >>> mean, var = fgrad.per_example.moments(loss, jnp.array([2.0, 1.0]), b)
      >>> mean, var
      (Array([1., 4.], dtype=float32), Array([ 1., 16.], dtype=float32))
    """
    caller = "fgrad.per_example.moments"
    _check_method(method, caller)
    n = _nonempty_batch(batch, caller)
    meta: dict[str, Any] = {}

    def fn(b):
        p = _run_pass(loss_fn, params, b, method, trainable, caller)
        meta["p"] = p
        ones = jnp.ones(p.losses.shape, p.losses.dtype)
        s1 = _weighted_leaf_sums(p, ones)
        s2 = _weighted_leaf_sums(p, ones, square=True)
        return [s1.get(i) for i in range(len(p.leaves))], [s2.get(i) for i in range(len(p.leaves))]

    s1, s2 = _microbatched(fn, batch, microbatches, caller, reduce=microbatches is not None)
    p = meta["p"]
    mean, var = {}, {}
    for i, (a, b) in enumerate(zip(s1, s2, strict=True)):
        if a is None:
            continue
        mean[i] = a / jnp.asarray(n, a.dtype)
        var[i] = b / jnp.asarray(n, b.dtype) - jnp.square(mean[i])
    return _unflatten(p, mean), _unflatten(p, var)


def clipped_loss(
    loss_fn: Callable,
    max_norm: float,
    *,
    method: str = "auto",
    trainable: Trainable = None,
) -> Callable:
    """A scalar loss whose gradient is the noise-free `clipped_grad`, for `fgrad.accumulate`.

    ``clipped_loss(loss_fn, C)(params, batch) = (1/B) Σᵢ sg(cᵢ) ℓᵢ`` with the clip
    factors ``cᵢ`` held constant (``sg``: stop-gradient), so its gradient is
    ``(1/B) Σᵢ cᵢ gᵢ``: Opacus' two-pass ghost clipping. `fgrad.accumulate` over
    micro-batches weighs each micro-batch by its size, so it returns the full-batch mean
    of the clipped gradients; add the noise once to the result.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses.
      max_norm: the clipping norm ``C``: a positive scalar (refused otherwise; one
        traced under jit that is not positive gives NaN).
      method: how the norms are computed (see `grads`).
      trainable: which leaves count in the norms.

    Returns:
      ``fn(params, batch) -> scalar``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> loss = lambda w, b: (b["x"] @ w - b["y"]) ** 2
      >>> b = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "y": jnp.array([1.0, 0.0])}
      >>> w = jnp.array([2.0, 1.0])
      >>> _, g = fgrad.accumulate(fgrad.per_example.clipped_loss(loss, 1.0), w, b, microbatches=2)
      >>> [round(float(v), 4) for v in g]
      [0.5, 0.5]
    """
    caller = "fgrad.per_example.clipped_loss"
    _check_method(method, caller)
    _check_max_norm(max_norm, caller)

    def fn(params, batch):
        _nonempty_batch(batch, caller)
        norms = grad_norms(
            loss_fn,
            jax.lax.stop_gradient(params),
            batch,
            method=method,
            trainable=trainable,
        )
        c = jax.lax.stop_gradient(_clip_factors(norms, max_norm))
        losses = loss_fn(params, batch)
        return jnp.mean(c.astype(losses.dtype) * losses)

    return fn
