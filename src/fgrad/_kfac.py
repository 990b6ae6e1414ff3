"""K-FAC: the GGN (or Fisher) of each dense and convolution layer as a Kronecker product.

For a layer ``s = W a`` (at every shared position ``t``: a sequence step, a pixel of a
convolution), the GGN block of its weight is ``(1/N) Σₙ Σ_c (Σ_t gₙₜ_c aₙₜᵀ)(…)ᵀ`` with
``aₙₜ`` the layer's input and ``gₙₜ_c`` the gradient at its output of one column ``c`` of
a square root of the per-example loss Hessian. K-FAC replaces it with ``A ⊗ G``:

    expand:  A = (1/(N T)) Σₙₜ aₙₜ aₙₜᵀ,     G = (1/N) Σₙₜ_c gₙₜ_c gₙₜ_cᵀ
    reduce:  A = (1/N) Σₙ āₙ āₙᵀ (āₙ = mean_t aₙₜ),   G = (1/N) Σₙ_c ḡₙ_c ḡₙ_cᵀ (ḡ = Σ_t g)

(curvlinops' ``KFACLinearOperator`` normalisation; with one position both are exact for
the layer's inputs and outputs of one example). A bias added to the layer's output gets
the block ``G``. The layers are found in the traced program (`fgrad._layers`): every
``dot_general`` or ``conv_general_dilated`` whose weight is a leaf of ``params``, inside
``jit``, ``scan`` and ``checkpoint`` sub-programs too. Inputs and output gradients come
from one forward pass and one vectorised backward pass per column.

References:
  Martens, Grosse, "Optimizing neural networks with Kronecker-factored approximate
  curvature", 2015. Grosse, Martens, "A Kronecker-factored approximate Fisher matrix for
  convolution layers", 2016. Eschenhagen, Immer, Turner, Schneider, Hennig,
  "Kronecker-factored approximate curvature for modern neural network architectures",
  2023 (expand and reduce).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgrad import _checks, _layers
from fgrad._ggn import (
    _check_batch,
    _check_model,
    _fisher_factors,
    _loss_sqrt,
    _over_batches,
    _sampler,
)

_FISHERS = ("ggn", "empirical", "mc")
_APPROX = ("expand", "reduce")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KFAC:
    """A block-diagonal Kronecker-factored curvature operator over ``params``.

    One block per covered leaf: ``A ⊗ G`` for a weight (``a[i]`` of size ``K``, ``g[i]``
    of size ``N``, the weight seen as a ``(K, N)`` matrix through ``index[i]``), ``G`` for
    a bias (``a[i]`` None). Leaves no block covers (``uncovered``: norms, embeddings...)
    are outside the operator: its products are zero there. ``damping`` ``λ`` adds ``λ I``.

    Attributes:
      a: the input factors ``A`` (``(K, K)``), None for a bias.
      g: the output-gradient factors ``G`` (``(N, N)``).
      index: for a weight, the ``(K, N)`` positions of its entries in the raveled leaf.
      damping: ``λ`` (a float array).
      leaves: the index of each block's leaf in ``jax.tree.leaves(params)``.
      paths: the keystr path of each block's leaf.
      uncovered: paths of leaves without a block.
      treedef: the structure of ``params``.
      shapes: the shape of every leaf of ``params``.
    """

    a: tuple
    g: tuple
    index: tuple
    damping: jax.Array
    leaves: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    paths: tuple[str, ...] = dataclasses.field(metadata={"static": True})
    uncovered: tuple[str, ...] = dataclasses.field(metadata={"static": True})
    treedef: Any = dataclasses.field(metadata={"static": True})
    shapes: tuple = dataclasses.field(metadata={"static": True})

    def _blocks(self, v: Any) -> list[jax.Array]:
        flat = jax.tree.leaves(v)
        out = []
        for leaf, idx in zip(self.leaves, self.index, strict=True):
            x = flat[leaf]
            out.append(x.reshape(-1) if idx is None else x.reshape(-1)[idx])
        return out

    def _tree(self, blocks: Sequence[jax.Array], like: Any) -> Any:
        flat = [jnp.zeros_like(x) for x in jax.tree.leaves(like)]
        for leaf, idx, b in zip(self.leaves, self.index, blocks, strict=True):
            x = flat[leaf].reshape(-1)
            x = b if idx is None else x.at[idx].set(b)
            flat[leaf] = x.reshape(self.shapes[leaf]).astype(flat[leaf].dtype)
        return jax.tree.unflatten(self.treedef, flat)

    def _check(self, v: Any, caller: str) -> None:
        if jax.tree.structure(v) != self.treedef or tuple(
            tuple(jnp.shape(x)) for x in jax.tree.leaves(v)
        ) != tuple(self.shapes):
            raise ValueError(
                f"{caller}: v must have the structure and shapes of the params K-FAC was "
                f"built for ({self.treedef}), got {jax.tree.structure(v)}."
            )

    def matvec(self, v: Any) -> Any:
        """``(⊕ A ⊗ G + λ I) v`` for ``v`` shaped like the parameters."""
        self._check(v, "fgrad.curvature.KFAC.matvec")
        out = []
        for a, g, m in zip(self.a, self.g, self._blocks(v), strict=True):
            y = m @ g if a is None else a @ m @ g
            out.append(y + self.damping.astype(y.dtype) * m)
        return self._tree(out, v)

    def _eigh(self):
        done: dict[int, Any] = {}  # a bias's block holds its weight's G: decomposed once

        def eigh(x):
            if id(x) not in done:
                done[id(x)] = jnp.linalg.eigh(x)
            return done[id(x)]

        return [
            (None if a is None else eigh(a), eigh(g)) for a, g in zip(self.a, self.g, strict=True)
        ]

    def solve(self, v: Any, damping: Any = None, *, power: float = 1.0) -> Any:
        """``(⊕ A ⊗ G + λ I)⁻ᵖ v`` (``p = power``; 1: the inverse, 0.5: the inverse square
        root, which turns white noise into samples of a Laplace posterior), exactly, from
        the factors' eigendecompositions. ``damping``: ``λ``, default the operator's own; it
        must be positive. Factor eigenvalues below zero (round-off) are clipped to zero."""
        caller = "fgrad.curvature.KFAC.solve"
        self._check(v, caller)
        lam = self.damping if damping is None else damping
        _positive_damping(lam, caller)
        out = []
        for (ea, (lg, qg)), m in zip(self._eigh(), self._blocks(v), strict=True):
            lg = jnp.maximum(lg, 0)
            if ea is None:
                out.append(qg @ ((qg.T @ m) / (lg + lam) ** power))
                continue
            la, qa = jnp.maximum(ea[0], 0), ea[1]
            rot = qa.T @ m @ qg
            out.append(qa @ (rot / (la[:, None] * lg[None, :] + lam) ** power) @ qg.T)
        return self._tree(out, v)

    def eigenvalues(self, k: int | None = None) -> jax.Array:
        """Every eigenvalue of the operator (products of the factors' eigenvalues, plus
        ``λ``), largest first; the ``k`` largest when ``k`` is given. Leaves without a block
        are not counted."""
        vals = []
        for ea, (lg, _) in self._eigh():
            vals.append(lg if ea is None else jnp.outer(ea[0], lg).reshape(-1))
        allv = jnp.sort(jnp.concatenate(vals))[::-1] + self.damping
        return allv if k is None else allv[:k]

    def dense(self) -> jax.Array:
        """The operator as an ``(n, n)`` matrix over the raveled parameters
        (``jax.flatten_util.ravel_pytree`` order); for small models and tests."""
        from jax.flatten_util import ravel_pytree

        like = jax.tree.unflatten(
            self.treedef, [jnp.zeros(s, self.g[0].dtype) for s in self.shapes]
        )
        flat, unravel = ravel_pytree(like)
        return jax.vmap(lambda e: ravel_pytree(self.matvec(unravel(e)))[0])(
            jnp.eye(flat.size, dtype=flat.dtype)
        ).T


def _positive_damping(lam: Any, caller: str) -> None:
    if lam is None:
        raise ValueError(f"{caller}: pass a positive damping= (the inverse needs A ⊗ G + λI).")
    if not isinstance(lam, jax.core.Tracer):
        val = np.asarray(lam)
        if val.shape != () or not np.isfinite(val) or val <= 0:
            raise ValueError(
                f"{caller}: damping must be a positive number, got {lam!r}: A ⊗ G is only "
                "positive semi-definite, so its inverse needs a positive λ."
            )


# --- layers: inputs and output gradients as (K, N) matrices ----------------------------------


def _leaf_index(layer: _layers.Layer, shape: tuple[int, ...]) -> np.ndarray:
    """Where each entry of the layer's ``(K, N)`` weight matrix sits in the raveled leaf."""
    with jax.ensure_compile_time_eval():  # constants, also when kfac runs under jit
        w: Any = jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape)
        for prim, params in layer.chain:
            if prim.name != "convert_element_type":
                w = prim.bind(w, **params)
        w = np.asarray(w)
    if layer.kind == "dense":
        (lc, rc), _ = layer.params["dimension_numbers"]
        contracted = list(lc if layer.weight_operand == 0 else rc)
        free = [d for d in range(w.ndim) if d not in contracted]
        k = math.prod(w.shape[d] for d in contracted)
        return np.transpose(w, contracted + free).reshape(k, -1)
    rhs = layer.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
    o, i, *sp = rhs
    return np.transpose(w, [i, *sp, o]).reshape(-1, w.shape[o])


def _conv_patches(layer: _layers.Layer, a: jax.Array) -> jax.Array:
    """The input patches of a convolution, ``(N, T, C * prod(kernel))``."""
    p = layer.params
    dn = p["dimension_numbers"]
    rhs = dn.rhs_spec
    kernel = tuple(layer.weight.shape[d] for d in rhs[2:])
    patches = jax.lax.conv_general_dilated_patches(
        a,
        kernel,
        p["window_strides"],
        p["padding"],
        lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"],
        dimension_numbers=dn,
        precision=jax.lax.Precision.HIGHEST,
    )
    return _to_rows(patches, dn.out_spec)


def _to_rows(x: jax.Array, spec: Sequence[int]) -> jax.Array:
    """``(batch, *spatial, features)`` flattened to ``(batch, T, features)``."""
    b, f, *sp = spec
    x = jnp.transpose(x, [b, *sp, f])
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _rows(layer: _layers.Layer, a: jax.Array, g: jax.Array, n: int, caller: str):
    """Input rows ``(n, T, K)`` and output-gradient rows ``(C, n, T, N)`` of one layer;
    ``g`` has a leading axis of columns ``C``."""
    if layer.stack:
        raise ValueError(
            f"{caller}: layer {layer.param} runs inside a lax.scan; K-FAC over scan steps is "
            "not supported. Pass layers= to leave it out."
        )
    if layer.kind == "conv":
        p = layer.params
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            raise ValueError(
                f"{caller}: layer {layer.param} is a grouped convolution; K-FAC here covers "
                "ungrouped convolutions only. Pass layers= to leave it out."
            )
        spec = p["dimension_numbers"].out_spec
        ga = jax.vmap(lambda gc: _to_rows(gc, spec))(g)
        return _conv_patches(layer, a), ga
    a2, _ = layer.dense_factors(a, g[0])
    g2 = jax.vmap(lambda gc: layer.dense_factors(a, gc)[1])(g)
    if a2.shape[0] % n:
        raise ValueError(
            f"{caller}: layer {layer.param} sees {a2.shape[0]} input rows, not a multiple of "
            f"the batch size {n}; K-FAC needs the batch axis on every layer's input."
        )
    return a2.reshape(n, -1, a2.shape[-1]), g2.reshape(g2.shape[0], n, -1, g2.shape[-1])


def _factors(a_rows, g_rows, approx: str, samples: int, signs=None):
    """``(A, G)`` from input rows ``(n, T, K)`` and output-gradient rows ``(C, n, T, N)``;
    ``signs`` ``(C, n)`` weights each column's contribution to ``G`` (the signs of the loss
    Hessian's eigenvalues; None: all +1)."""
    n = a_rows.shape[0]
    w = None if signs is None else signs.astype(g_rows.dtype)
    if approx == "expand":
        t = a_rows.shape[1]
        a2 = a_rows.reshape(-1, a_rows.shape[-1])
        g2 = g_rows.reshape(-1, g_rows.shape[-1])
        gw = g2 if w is None else (g_rows * w[:, :, None, None]).reshape(g2.shape)
        return a2.T @ a2 / (n * t), gw.T @ g2 / (n * samples)
    am = jnp.mean(a_rows, axis=1)
    gs3 = jnp.sum(g_rows, axis=2)  # (C, n, N)
    gs = gs3.reshape(-1, g_rows.shape[-1])
    gw = gs if w is None else (gs3 * w[:, :, None]).reshape(gs.shape)
    return am.T @ am / n, gw.T @ gs / (n * samples)


def _bias_leaf(layer, keys, shapes, n_out) -> int | None:
    """The leaf of a bias named like the layer's weight (``weight``/``kernel`` ->
    ``bias``) and shaped ``(N,)``, if any."""
    path = layer.param
    for w in ("'weight'", "'kernel'", ".weight'", "'w'"):
        if path.endswith(w + "]"):
            cand = (
                path[: -len(w) - 1]
                + w.replace("weight", "bias").replace("kernel", "bias").replace("'w'", "'b'")
                + "]"
            )
            if cand in keys and tuple(shapes[keys.index(cand)]) == (n_out,):
                return keys.index(cand)
    return None


_Z_LAYOUT = frozenset({"reshape", "transpose", "convert_element_type", "squeeze", "copy", "copy_p"})


class _BiasUses:
    """Every use of the candidate bias leaves and of the chosen layers' outputs in a traced
    program: a bias gets the block ``G`` of a layer only if its one use is an ``add`` to
    that layer's output (through layout operations and broadcasts) and that output is used
    nowhere else, so the gradient at the sum is the gradient at the layer's output."""

    def __init__(self, layers, candidates: dict[int, int]):
        self.by_path = {layer.path: layer for layer in layers}
        self.bvars: dict = {}  # var -> (leaf, chain)
        self.zvars: dict = {}  # var -> (layer path, chain)
        self.leaf_uses: dict[int, list] = {b: [] for b in candidates}
        self.z_uses: dict = {layer.path: 0 for layer in layers}

    def run(self, closed) -> None:
        for b in self.leaf_uses:
            self.bvars[closed.jaxpr.invars[b]] = (b, ())
        self.walk(closed.jaxpr, ())

    def _other(self, bins, zins) -> None:
        for b in bins:
            if b:
                self.leaf_uses[b[0]].append(None)
        for z in zins:
            if z:
                self.z_uses[z[0]] += 2  # never the one allowed use

    def walk(self, jaxpr, prefix) -> None:
        for i, eqn in enumerate(jaxpr.eqns):
            path = (*prefix, i)
            bins = [
                None if isinstance(v, _layers.jcore.Literal) else self.bvars.get(v)
                for v in eqn.invars
            ]
            zins = [
                None if isinstance(v, _layers.jcore.Literal) else self.zvars.get(v)
                for v in eqn.invars
            ]
            prim = eqn.primitive.name
            if path in self.by_path:
                self.zvars[eqn.outvars[0]] = (path, ())
            if not any(bins) and not any(zins):
                continue
            op = (eqn.primitive, dict(eqn.params))
            if (
                len(eqn.invars) == 1
                and bins[0]
                and (prim in _Z_LAYOUT or prim == "broadcast_in_dim")
            ):
                self.bvars[eqn.outvars[0]] = (bins[0][0], (*bins[0][1], op))
                continue
            if len(eqn.invars) == 1 and zins[0] and prim in _Z_LAYOUT:
                self.zvars[eqn.outvars[0]] = (zins[0][0], (*zins[0][1], op))
                continue
            if prim in _layers._CALLS or prim in _layers._REMATS:
                sub, _ = _layers._open(_layers._sub(eqn))
                for v, b, z in zip(sub.invars, bins, zins, strict=True):
                    if b:
                        self.bvars[v] = b
                    if z:
                        self.zvars[v] = z
                self.walk(sub, (*path, 0))
                for v, w in zip(sub.outvars, eqn.outvars, strict=True):
                    if isinstance(v, _layers.jcore.Literal):
                        continue
                    if v in self.bvars:
                        self.bvars[w] = self.bvars[v]
                    if v in self.zvars:
                        self.zvars[w] = self.zvars[v]
                continue
            if (
                prim == "add"
                and len(eqn.invars) == 2
                and ((bins[0] and zins[1]) or (bins[1] and zins[0]))
            ):
                j = 0 if (bins[0] and zins[1]) else 1
                b, z = bins[j], zins[1 - j]
                if (
                    b is not None
                    and z is not None
                    and not bins[1 - j]
                    and not zins[j]
                    and (tuple(eqn.outvars[0].aval.shape) == tuple(eqn.invars[1 - j].aval.shape))
                ):
                    self.leaf_uses[b[0]].append((z[0], z[1], b[1], eqn.outvars[0].aval.shape))
                    self.z_uses[z[0]] += 1
                    continue
            self._other(bins, zins)
        if not prefix:
            outs = [v for v in jaxpr.outvars if not isinstance(v, _layers.jcore.Literal)]
            self._other([self.bvars.get(v) for v in outs], [self.zvars.get(v) for v in outs])


def _feature_index(layer: _layers.Layer) -> np.ndarray:
    """For each entry of the layer's output, the column of ``G`` it belongs to."""
    shape = tuple(layer.output.shape)
    if layer.kind == "conv":
        f = layer.params["dimension_numbers"].out_spec[1]
        idx = np.arange(shape[f]).reshape([-1 if d == f else 1 for d in range(len(shape))])
        return np.broadcast_to(idx, shape)
    _, free = layer._dense_axes()
    n_w = len(shape) - len(free)  # the weight's free axes
    if layer.weight_operand == 1:  # (input free..., weight free...)
        w_shape = shape[len(free) :]
        idx = np.arange(math.prod(w_shape)).reshape((1,) * len(free) + w_shape)
    else:  # (weight free..., input free...)
        w_shape = shape[:n_w]
        idx = np.arange(math.prod(w_shape)).reshape(w_shape + (1,) * len(free))
    return np.broadcast_to(idx, shape)


def _apply_chain(x: np.ndarray, chain) -> np.ndarray:
    with jax.ensure_compile_time_eval():
        y: Any = jnp.asarray(x, jnp.int32)
        for prim, params in chain:
            if prim.name != "convert_element_type":
                y = prim.bind(y, **params)
        return np.asarray(y)


def _added_bias(layer, b: int, n_out: int, uses: _BiasUses) -> bool:
    """Whether leaf ``b`` is added, entry ``j`` to column ``j`` of ``G``, to the layer's
    output and used nowhere else, and that output has no other use."""
    found = uses.leaf_uses.get(b, [])
    if len(found) != 1 or found[0] is None or uses.z_uses.get(layer.path) != 1:
        return False
    zpath, zchain, bchain, shape = found[0]
    if zpath != layer.path:
        return False
    want = _apply_chain(_feature_index(layer), zchain)
    got = _apply_chain(np.arange(n_out), bchain)
    try:
        got = np.broadcast_to(got, tuple(shape))
    except ValueError:
        return False
    return want.shape == got.shape and bool(np.array_equal(want, got))


def _select(layers, patterns, caller):
    found = [layer for layer in layers if layer.kind in ("dense", "conv")]
    if patterns is None:
        return found
    pats = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    chosen = []
    for pat in pats:
        hit = [layer for layer in found if fnmatch.fnmatchcase(layer.param, pat)]
        if not hit:
            raise ValueError(
                f"{caller}: the layer pattern {pat!r} matches no dense or convolution layer. "
                f"Found: {[layer.param for layer in found]} (patterns are globs on these "
                "keystr paths of the weights, e.g. \"*['fc1']*\")."
            )
        chosen += [layer for layer in hit if layer not in chosen]
    return [layer for layer in found if layer in chosen]


def kfac(
    model_fn: Callable,
    loss_fn: Callable,
    params: Any,
    x: Any,
    y: Any,
    *,
    layers: str | Sequence[str] | None = None,
    fisher: str = "ggn",
    approx: str = "expand",
    damping: float = 0.0,
    key: Any = None,
    samples: int = 1,
    sampler: Callable | None = None,
    bias: bool = True,
    microbatches: int | None = None,
) -> KFAC:
    """Kronecker-factored curvature of every dense and convolution layer (K-FAC).

    Finds the layers in the traced program of ``model_fn(params, x)`` (a weight that is a
    leaf of ``params``, through reshapes and transposes, in any sub-program), reads each
    layer's inputs and the gradients at its output, and returns the factors ``A`` (inputs)
    and ``G`` (output gradients) as a `KFAC` operator with ``matvec``, ``solve`` (the
    damped inverse), ``eigenvalues`` and ``dense``.

    ``G`` comes from output-space vectors ``r`` backpropagated through the model, per
    ``fisher``: ``"ggn"``, the columns of a square root of each example's loss Hessian
    (K-FAC of the GGN; curvlinops' ``type-2``); ``"mc"``, gradients at targets drawn from
    the predictive distribution (``samples`` per example); ``"empirical"``, gradients at
    the observed targets.

    Args:
      model_fn: ``model_fn(params, x) -> outputs`` (a leading batch axis).
      loss_fn: ``loss_fn(outputs, y) -> scalar``, the batch mean of per-example losses.
      params: a pytree of floating-point arrays.
      x: the inputs.
      y: the targets.
      layers: globs on the weights' keystr paths choosing the layers (default: all).
      fisher: ``"ggn"``, ``"mc"`` or ``"empirical"``.
      approx: ``"expand"`` or ``"reduce"``, for weights shared over positions (sequence
        steps, pixels); the same for a layer applied once per example.
      damping: ``λ`` added to the operator (``λ I``); ``solve`` needs it positive.
      key: PRNG key (``fisher="mc"``).
      samples: targets drawn per example (``fisher="mc"``).
      sampler: ``sampler(key, outputs) -> y`` for a loss fgrad has no rule for.
      bias: give a bias named like a layer's weight (``…weight``/``…kernel`` ->
        ``…bias``, shape ``(N,)``) the block ``G``, when the traced program adds it
        (through reshapes and broadcasts) to that layer's output, uses it nowhere else,
        and uses the layer's output only in that sum; any other bias is left
        ``uncovered`` (its block would not be ``G``).
      microbatches: average the factors of this many equal micro-batches in one
        ``lax.scan`` (memory of one micro-batch; a sharded batch stays data-parallel).

    Returns:
      A `KFAC`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> model = lambda p, x: x @ p["w"]
      >>> p = {"w": jnp.ones((3, 2))}
      >>> x, y = jnp.eye(3)[:1], jnp.zeros((1, 2))
      >>> k = fgrad.curvature.kfac(model, fgrad.curvature.mean_squared_error, p, x, y)
      >>> k.a[0], k.g[0]
      (Array([[1., 0., 0.],
             [0., 0., 0.],
             [0., 0., 0.]], dtype=float32), Array([[1., 0.],
             [0., 1.]], dtype=float32))

    References:
      Martens and Grosse, 2015; Grosse and Martens, 2016; Eschenhagen et al., 2023.
    """
    caller = "fgrad.curvature.kfac"
    _checks.require_float_tree(params, caller, "params")
    if fisher not in _FISHERS:
        raise ValueError(f"{caller}: fisher must be one of {_FISHERS}, got {fisher!r}.")
    if approx not in _APPROX:
        raise ValueError(f"{caller}: approx must be 'expand' or 'reduce', got {approx!r}.")
    if not isinstance(damping, jax.core.Tracer):
        d = np.asarray(damping)
        if d.shape != () or not np.isfinite(d) or d < 0:
            raise ValueError(
                f"{caller}: damping must be a non-negative number (λ in A ⊗ G + λI), got "
                f"{damping!r}."
            )
    if fisher == "mc":
        _sampler(loss_fn, sampler, caller)
        samples = _checks.positive_int(samples, "samples", caller)
    n_cols = samples if fisher == "mc" else 1

    flat_params, treedef = jax.tree.flatten(params)
    keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    shapes = tuple(tuple(jnp.shape(p)) for p in flat_params)

    def plan(xb):
        found, closed = _layers.analyse(model_fn, params, xb)
        return _select(found.layers, layers, caller), found.other_uses, closed

    def one(xb, yb, i):
        chosen, _, _ = plan(xb)
        if not chosen:
            raise ValueError(f"{caller}: model_fn has no dense or convolution layer on params.")
        n = jax.tree.leaves(xb)[0].shape[0]
        rec = _layers.recording(model_fn, chosen)
        zeros = _layers.output_zeros(chosen)
        out, pull, inputs = jax.vjp(lambda pt: rec(pt, params, xb), zeros, has_aux=True)
        _check_batch(loss_fn, out, yb, caller)
        signs = None
        if fisher == "ggn":
            sq, sg = jax.vmap(lambda o, t: _loss_sqrt(loss_fn, o, t))(out, yb)  # (n, D, D)
            cols = jnp.moveaxis(sq, 2, 0).reshape(sq.shape[2], *out.shape)
            signs = jnp.moveaxis(sg, 1, 0)  # (D, n): +1 for a loss convex in its outputs
            norm = 1
        else:
            kb = key if i is None or key is None else jax.random.fold_in(key, i)
            r = _fisher_factors(
                loss_fn, out, yb, fisher, kb, samples, sampler, caller, "fisher='mc'"
            )
            cols, norm = r, n_cols
        grads = jax.vmap(lambda c: pull(c.astype(out.dtype))[0])(cols)
        result = []
        for layer in chosen:
            a_rows, g_rows = _rows(layer, inputs[layer.name], grads[layer.name], n, caller)
            result.append(_factors(a_rows, g_rows, approx, norm, signs))
        return result

    x_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), x)
    _check_batch(loss_fn, _check_model(model_fn, params, x_shapes, caller), y, caller)
    chosen, others, closed = plan(x_shapes)
    facs = _over_batches(one, x, y, microbatches, caller)
    cands: dict[int, int] = {}  # layer position -> its named bias leaf
    for j, (layer, (_, g_f)) in enumerate(zip(chosen, facs, strict=True)):
        b = _bias_leaf(layer, keys, shapes, g_f.shape[0]) if bias else None
        if b is not None:
            cands[j] = b
    uses = _BiasUses(chosen, {b: j for j, b in cands.items()})
    if cands:
        uses.run(closed)
    a_s: list[Any] = []  # None where a bias has no input factor
    g_s: list[Any] = []
    idx_s: list[Any] = []
    leaves: list[int] = []
    paths: list[str] = []
    for j, (layer, (a_f, g_f)) in enumerate(zip(chosen, facs, strict=True)):
        if not layer.exclusive:
            raise ValueError(
                f"{caller}: the weight {layer.param} is also used outside its layer "
                f"({', '.join(others.get(layer.leaf, ()))}), so its GGN block is not A ⊗ G. "
                "Pass layers= to leave it out."
            )
        if layer.leaf in leaves:
            raise ValueError(
                f"{caller}: the weight {layer.param} is used by more than one layer; K-FAC "
                "needs one block per weight. Pass layers= to choose the layers."
            )
        a_s.append(a_f)
        g_s.append(g_f)
        idx_s.append(jnp.asarray(_leaf_index(layer, shapes[layer.leaf])))
        leaves.append(layer.leaf)
        paths.append(layer.param)
        b = cands.get(j)
        if b is not None and b not in leaves and _added_bias(layer, b, g_f.shape[0], uses):
            a_s.append(None)
            g_s.append(g_f)
            idx_s.append(None)
            leaves.append(b)
            paths.append(keys[b])
    uncovered = tuple(k for i, k in enumerate(keys) if i not in leaves)
    dt = g_s[0].dtype
    return KFAC(
        tuple(a_s),
        tuple(g_s),
        tuple(idx_s),
        jnp.asarray(damping, dt),
        tuple(leaves),
        tuple(paths),
        uncovered,
        treedef,
        shapes,
    )
