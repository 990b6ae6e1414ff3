"""Finding the dense, convolution and embedding layers of a traced program.

Per-example gradient statistics (ghost norms, Opacus, BackPACK) and K-FAC are built from
two things per layer: the layer's input activation and the gradient at its output.
PyTorch libraries get them from module hooks, and break where a layer is not a module
they know, is used twice, or runs inside a loop. fgrad reads them from the traced
program instead.

A *layer* is one equation of the jaxpr of ``fn(params, *args)``, sub-programs (``jit``,
``lax.scan``, ``jax.checkpoint``) included, that is

- ``dot_general`` (dense; also ``einsum``/``matmul`` with shared axes such as a sequence
  axis) with exactly one operand derived from a leaf of ``params`` and no batch
  dimensions on that operand: kind ``"dense"``;
- ``conv_general_dilated`` whose kernel is derived from a leaf: kind ``"conv"``;
- ``gather`` from an operand derived from a leaf, with indices that are not: an
  embedding lookup (``jnp.take``, ``W[ids]``), kind ``"embed"``. A one-hot matmul is a
  ``"dense"`` layer.

"Derived from a leaf" means the leaf itself or the leaf through layout-only operations
(``reshape``, ``transpose``, ``convert_element_type``, ``squeeze``, ``copy`` and a
``broadcast_in_dim`` that adds only size-1 axes), recorded as the layer's ``chain``.
Every other use of a leaf (an ``add`` of a bias, a ``mul`` by a norm scale, a weight
handed to a ``custom_jvp`` function or ``lax.cond``, returned as an output...) is an
*other use*, reported by `analyse` with the primitive's name; a layer whose leaf has
other uses has ``exclusive=False``.

API: `find_layers` (or `analyse`, which also reports other uses and undecomposable
leaves) and `tap_layers`; `recording` and `output_zeros` give the inputs and output
gradients in one forward and one backward pass without the tap machinery (what
`fgrad.per_example` uses).

`tap_layers` re-evaluates ``fn`` with `fgrad.tap` applied at each layer's input
(``layer.input_tap``) and output (``layer.output_tap``), so the tap machinery
(`fgrad.intermediates`, `fgrad.grad_intermediates`, `fgrad.vjp_intermediates`) delivers
input activations and output gradients, stacked on a leading axis per enclosing
``lax.scan``. A layer is identified by its equation's position in the program, which is
the same every time the same function is traced with arguments of the same shapes:
use `find_layers` and `tap_layers` on arguments of the same shapes.

`Layer.weight_grad(a, g)` forms the gradient with respect to the weight LEAF (in the
leaf's layout) from one hit's input and output gradient: the transpose of the layer's
operation with respect to its weight (dense: the outer product summed over shared axes;
conv: the correlation of input patches with the output gradient; embed: the scatter-add
of output-gradient rows), followed by the transpose of the layout chain. With the
example axis inside ``a`` and ``g`` it gives the summed gradient; under ``jax.vmap``
over examples, per-example gradients. `Layer.dense_factors(a, g)` gives the two
matrices ``A (T, K)`` and ``G (T, N)`` of a dense layer with ``dW = Aᵀ G`` up to a
permutation of its entries (``T`` the shared positions), the input of Gram-form norms;
`Layer.conv_factors` the same for a convolution from its input patches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from fgrad._tap import tap

Path = tuple[int, ...]  # equation index, then (equation, sub-program) index pairs

_LAYOUT = frozenset({"reshape", "transpose", "convert_element_type", "squeeze", "copy", "copy_p"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
_REMATS = frozenset({"remat2", "checkpoint", "remat"})
_SCANS = frozenset({"scan"})
_KINDS = {"dot_general": "dense", "conv_general_dilated": "conv", "gather": "embed"}


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """One dense, convolution or embedding-lookup equation whose weight is a parameter.

    Attributes:
      kind: ``"dense"``, ``"conv"`` or ``"embed"``.
      param: the ``jax.tree_util.keystr`` path of the weight leaf in ``params``.
      leaf: the index of that leaf in ``jax.tree.leaves(params)``.
      path: the equation's position in the traced program.
      name: the layer's name (``"layer{i}"``, in program order); its taps are
        ``input_tap`` and ``output_tap``.
      weight_operand: 0 or 1: which operand of the equation is the weight (the other is
        the input; for ``"embed"`` the input is the integer index array).
      params: the equation's parameters (``dimension_numbers`` and the rest), as bound.
      chain: the layout operations ``(primitive, params)`` from the leaf to the operand.
      input: shape/dtype of the input operand of one hit.
      output: shape/dtype of the output of one hit.
      weight: shape/dtype of the weight operand.
      stack: the lengths of the enclosing ``lax.scan``s, outermost first: the taps stack
        one value per step on leading axes of these sizes.
      exclusive: whether every use of the leaf is a layer (no other use).
      sliced: whether the leaf is stacked over the steps of the (one) enclosing
        ``lax.scan`` (``flax.linen.scan``'s parameters): step ``l`` uses ``leaf[l]``
        (through ``chain``), so the leaf's gradient stacks the steps' gradients instead
        of summing them.
    """

    kind: str
    param: str
    leaf: int
    path: Path
    name: str
    weight_operand: int
    params: dict
    chain: tuple
    input: jax.ShapeDtypeStruct
    output: jax.ShapeDtypeStruct
    weight: jax.ShapeDtypeStruct
    stack: tuple[int, ...]
    exclusive: bool = True
    sliced: bool = False
    primitive: Any = dataclasses.field(default=None, repr=False)

    @property
    def input_tap(self) -> str:
        return f"fgrad.layers/{self.name}/input"

    @property
    def output_tap(self) -> str:
        return f"fgrad.layers/{self.name}/output"

    @property
    def dimension_numbers(self) -> Any:
        """The equation's ``dimension_numbers`` (dot_general: ``((lhs_contract,
        rhs_contract), (lhs_batch, rhs_batch))``; conv: ``ConvDimensionNumbers``; gather:
        ``GatherDimensionNumbers``)."""
        return self.params["dimension_numbers"]

    @property
    def input_axes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """For a dense layer: the input's ``(contracted, shared)`` axes (one hit's shape);
        the shared axes (sequence positions, ...) are summed over in the weight gradient."""
        contracted, free = self._dense_axes()
        return tuple(contracted), tuple(free)

    def apply(self, a: jax.Array, w: jax.Array) -> jax.Array:
        """The layer's operation on input ``a`` and weight operand ``w`` (one hit)."""
        ops = (w, a) if self.weight_operand == 0 else (a, w)
        return self.primitive.bind(*ops, **self.params)

    def weight_from_leaf(self, leaf: jax.Array) -> jax.Array:
        """The weight operand from the leaf, through the layout chain."""
        for prim, params in self.chain:
            leaf = prim.bind(leaf, **params)
        return leaf

    def weight_grad(self, a: jax.Array, g: jax.Array, leaf: jax.Array | None = None) -> jax.Array:
        """The gradient with respect to the weight leaf (leaf layout) from one hit's input
        ``a`` and output gradient ``g`` (no scan axes: vmap over them); for a ``sliced``
        layer, with respect to the step's slice ``leaf[l]``."""
        w = jnp.zeros(self.weight.shape, self.weight.dtype)
        _, pull = jax.vjp(lambda w_: self.apply(a, w_), w)
        (dw,) = pull(g.astype(self.output.dtype))
        if not self.chain:
            return dw
        if leaf is None:
            raise ValueError("Layer.weight_grad: pass the leaf (for its shape) with a chain.")
        shape = leaf.shape[1:] if self.sliced else leaf.shape  # one step's slice
        _, pull_chain = jax.vjp(self.weight_from_leaf, jnp.zeros(shape, leaf.dtype))
        return pull_chain(dw)[0]

    def _dense_axes(self) -> tuple[list[int], list[int]]:
        """(contracted, free) axes of the input operand of a dense layer."""
        if self.kind != "dense":
            raise ValueError(f"Layer.input_axes: {self.name} is a {self.kind} layer.")
        (lc, rc), _ = self.params["dimension_numbers"]
        contracted = list(rc if self.weight_operand == 0 else lc)
        free = [d for d in range(len(self.input.shape)) if d not in contracted]
        return contracted, free

    def dense_factors(self, a: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(A, G)`` of shapes ``(T, K)`` and ``(T, N)`` with ``Aᵀ G`` a permutation of
        the weight operand's gradient; leading axes of ``a``/``g`` beyond one hit's shape
        (scan steps) are shared positions too."""
        if self.kind != "dense":
            raise ValueError(f"Layer.dense_factors: {self.name} is a {self.kind} layer.")
        extra = a.ndim - len(self.input.shape)
        contracted, free = self._dense_axes()
        lead = list(range(extra))
        a = jnp.transpose(a, lead + [extra + d for d in free] + [extra + d for d in contracted])
        k = math.prod(self.input.shape[d] for d in contracted)
        n_free_in = math.prod(self.input.shape[d] for d in free)
        n_out = math.prod(self.output.shape) // max(n_free_in, 1)
        a2 = a.reshape(-1, k)
        # dot_general's output is (batch, lhs free, rhs free); no batch axes here.
        out_nd = len(self.output.shape)
        n_in_free = len(free)
        if self.weight_operand == 0:  # out = (weight free..., input free...)
            w_free = out_nd - n_in_free
            perm = lead + [extra + w_free + i for i in range(n_in_free)]
            perm += [extra + i for i in range(w_free)]
            g = jnp.transpose(g, perm)
        g2 = g.reshape(-1, n_out)
        return a2, g2

    def conv_factors(self, a: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        """``(A, G)`` of shapes ``(P, C·k)`` and ``(P, O)`` for a convolution, from its
        input patches (``P`` output positions, leading scan axes included), with ``Aᵀ G``
        a permutation of the kernel's gradient; None for a grouped convolution."""
        if self.kind != "conv":
            raise ValueError(f"Layer.conv_factors: {self.name} is a {self.kind} layer.")
        p = self.params
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            return None
        dn = p["dimension_numbers"]
        _, rhs_spec, out_spec = dn
        extra = a.ndim - len(self.input.shape)
        window = tuple(self.weight.shape[d] for d in rhs_spec[2:])

        def patches(x):
            return jax.lax.conv_general_dilated_patches(
                x,
                window,
                p["window_strides"],
                p["padding"],
                p["lhs_dilation"],
                p["rhs_dilation"],
                dn,
                precision=jax.lax.Precision.HIGHEST,  # an exact copy of the input
            )

        for _ in range(extra):
            patches = jax.vmap(patches)

        def rows(x):
            x = jnp.moveaxis(x, extra + out_spec[1], -1)
            return x.reshape(-1, x.shape[-1])

        return rows(patches(a)), rows(g)

    def embed_rows(self, ids: jax.Array) -> jax.Array | None:
        """For a row-lookup embedding (``W[ids]`` / ``jnp.take(W, ids, axis=0)``): the row
        each output position reads, ``-1`` where the lookup is dropped; None for any other
        gather."""
        if self.kind != "embed" or self.chain or len(self.weight.shape) != 2:
            return None
        dn = self.params["dimension_numbers"]
        ok = (
            tuple(dn.collapsed_slice_dims) == (0,)
            and tuple(dn.start_index_map) == (0,)
            and tuple(dn.offset_dims) == (len(self.output.shape) - 1,)
            and not dn.operand_batching_dims
            and tuple(self.params["slice_sizes"]) == (1, self.weight.shape[1])
            and self.input.shape[-1:] == (1,)
        )
        if not ok:
            return None
        rows = ids[..., 0]
        v = self.weight.shape[0]
        if "CLIP" in str(self.params.get("mode")):
            return jnp.clip(rows, 0, v - 1)
        # FILL_OR_DROP, and PROMISE_IN_BOUNDS, whose gradient (a scatter) drops an
        # out-of-bounds row although the lookup itself clamps it
        return jnp.where((rows >= 0) & (rows < v), rows, -1)


@dataclasses.dataclass(frozen=True)
class Found:
    """What `analyse` found: the layers; every leaf's other uses (leaf index ->
    primitive names); and the leaves whose gradient does not decompose into layer
    statistics plus a gradient of their own size (leaf index -> the operation why: a
    layer weight also used elsewhere, a weight computed by another operation, a
    matrix handed to a sub-program fgrad cannot see into)."""

    layers: tuple[Layer, ...]
    other_uses: dict[int, tuple[str, ...]]
    undecomposable: dict[int, str] = dataclasses.field(default_factory=dict)


def _open(j):
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, j.consts
    return j, ()


def _sub(eqn):
    p = eqn.params
    return p["jaxpr"] if "jaxpr" in p else p["call_jaxpr"]


def _scan_split(params, n: int) -> tuple[int, int]:
    """(number of consts, number of carries) of a scan with ``n`` operands."""
    if "ft_in" in params:  # JAX 0.11 describes operands as a flat tree
        consts, init, _ = params["ft_in"].update(list(range(n))).unpack()
        return len(consts), len(init)
    return params["num_consts"], params["num_carry"]


def _is_layout(eqn) -> bool:
    name = eqn.primitive.name
    if name in _LAYOUT:
        return True
    if name == "broadcast_in_dim":
        return math.prod(eqn.invars[0].aval.shape) == math.prod(eqn.outvars[0].aval.shape)
    return False


class _Finder:
    def __init__(self, keys: Sequence[str]):
        self.keys = keys
        self.raw: list[dict] = []
        self.other: dict[int, list[str]] = {}
        self.blocked: dict[int, str] = {}

    def other_use(self, leaf: int, what: str) -> None:
        uses = self.other.setdefault(leaf, [])
        if what not in uses:
            uses.append(what)

    def undecomposable(self, leaves, why: str) -> None:
        for leaf in leaves:
            self.blocked.setdefault(leaf, why)

    def walk(self, jaxpr, derived: dict, computed: dict, prefix: Path, stack) -> None:
        """``derived``: var -> (leaf, layout chain, the index in ``stack`` of the scan whose
        steps slice the leaf or None); ``computed``: var -> (leaves, op) for values
        computed from parameters alone by other operations."""

        def d(v):
            return None if isinstance(v, jcore.Literal) else derived.get(v)

        def c(v):
            return None if isinstance(v, jcore.Literal) else computed.get(v)

        for i, eqn in enumerate(jaxpr.eqns):
            path = (*prefix, i)
            ins = [d(v) for v in eqn.invars]
            cins = [c(v) for v in eqn.invars]
            prim = eqn.primitive.name
            if not any(ins) and not any(cins):
                continue
            if ins[0] and _is_layout(eqn) and not any(ins[1:]) and not any(cins):
                leaf, chain, sliced = ins[0]
                chain = (*chain, (eqn.primitive, dict(eqn.params)))
                derived[eqn.outvars[0]] = (leaf, chain, sliced)
                continue
            if prim in _KINDS and not any(cins) and self.layer(eqn, ins, path, stack):
                continue
            if prim in _CALLS or prim in _REMATS or prim in _SCANS:
                sub, _ = _open(_sub(eqn))
                n = len(eqn.invars)
                n_in = _scan_split(eqn.params, n)[0] if prim in _SCANS else n
                pairs = list(zip(sub.invars[:n_in], range(n_in), strict=True))
                inner = {v: ins[j] for v, j in pairs if ins[j]}
                inner_c = {v: cins[j] for v, j in pairs if cins[j]}
                first_xs = n_in + _scan_split(eqn.params, n)[1] if prim in _SCANS else n
                for j in range(n_in, n):
                    if j >= first_xs and ins[j] and not ins[j][1] and ins[j][2] is None:
                        # a leaf stacked over the scan's steps (flax.linen.scan's params):
                        # each step uses its own slice
                        inner[sub.invars[j]] = (ins[j][0], (), len(stack))
                        continue
                    if ins[j]:
                        self.other_use(ins[j][0], "scan (as a carry or a scanned input)")
                    if ins[j] or cins[j]:
                        leaves = {ins[j][0]} if ins[j] else cins[j][0]
                        if len(eqn.invars[j].aval.shape) >= 2:
                            self.undecomposable(leaves, "a lax.scan carry or scanned input")
                inner_stack = (*stack, int(eqn.params["length"])) if prim in _SCANS else stack
                self.walk(sub, inner, inner_c, (*path, 0), inner_stack)
                continue
            for x in ins:
                if x:
                    self.other_use(x[0], prim)
            leaves_in = frozenset(
                {x[0] for x in ins if x} | {leaf for x in cins if x for leaf in x[0]}
            )
            if prim in _KINDS:  # a weight that is not a leaf through layout operations
                ops = sorted({x[1] for x in cins if x})
                how = f" computed by {', '.join(ops)}" if ops else ""
                self.undecomposable(leaves_in, f"{prim} (its weight operand{how})")
                continue
            if list(jcore.jaxprs_in_params(eqn.params)):
                if any(
                    len(v.aval.shape) >= 2
                    for v, x, y in zip(eqn.invars, ins, cins, strict=True)
                    if x or y
                ):
                    self.undecomposable(leaves_in, f"{prim}, which fgrad cannot see into")
                continue
            activations = [
                v
                for v, x, y in zip(eqn.invars, ins, cins, strict=True)
                if not x and not y and not isinstance(v, jcore.Literal)
            ]
            if not activations:  # a function of parameters alone
                op = next((y[1] for y in cins if y), prim)
                for v in eqn.outvars:
                    computed[v] = (leaves_in, op)
        for v in jaxpr.outvars:
            x = d(v)
            if x:
                self.other_use(x[0], "an output of the function or of a sub-program")

    def layer(self, eqn, ins, path: Path, stack) -> bool:
        prim = eqn.primitive.name
        if prim == "dot_general":
            if bool(ins[0]) == bool(ins[1]):
                return False
            w_op = 0 if ins[0] else 1
            _, (lb, rb) = eqn.params["dimension_numbers"]
            if (lb, rb)[w_op]:
                return False
        elif prim == "conv_general_dilated":
            if ins[0] or not ins[1]:
                return False
            w_op = 1
        else:  # gather
            if not ins[0] or ins[1]:
                return False
            w_op = 0
        leaf, chain, sliced = ins[w_op]
        if sliced is not None and len(stack) != 1:
            self.undecomposable(
                [leaf], f"{prim} (its weight is a slice of a stacked leaf inside nested lax.scans)"
            )
            return True
        a, w, z = eqn.invars[1 - w_op], eqn.invars[w_op], eqn.outvars[0]
        sds = lambda v: jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
        self.raw.append(
            dict(
                kind=_KINDS[prim],
                param=self.keys[leaf],
                leaf=leaf,
                path=path,
                weight_operand=w_op,
                params=dict(eqn.params),
                chain=chain,
                input=sds(a),
                output=sds(z),
                weight=sds(w),
                stack=tuple(stack),
                sliced=sliced is not None,
                primitive=eqn.primitive,
            )
        )
        return True


def analyse(fn: Callable, params: Any, *args: Any) -> tuple[Found, Any]:
    """The layers of ``fn(params, *args)`` and the other uses of each leaf; also the
    closed jaxpr it traced (``params`` and ``args`` may be ShapeDtypeStructs)."""
    closed = jax.make_jaxpr(fn)(params, *args)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    keys = [jax.tree_util.keystr(p) for p, _ in flat]
    finder = _Finder(keys)
    derived = {v: (i, (), None) for i, v in enumerate(closed.jaxpr.invars[: len(keys)])}
    finder.walk(closed.jaxpr, derived, {}, (), ())
    layers = tuple(
        Layer(name=f"layer{i}", exclusive=r["leaf"] not in finder.other, **r)
        for i, r in enumerate(finder.raw)
    )
    for layer in layers:  # a layer weight also used elsewhere
        if not layer.exclusive:
            uses = ", ".join(finder.other[layer.leaf])
            finder.undecomposable([layer.leaf], f"{uses} (besides a {layer.kind} layer)")
    other = {k: tuple(v) for k, v in finder.other.items()}
    return Found(layers, other, dict(finder.blocked)), closed


def find_layers(fn: Callable, params: Any, *args: Any) -> tuple[Layer, ...]:
    """The dense, convolution and embedding layers of ``fn(params, *args)``.

    Args:
      fn: a function whose first argument is the parameter pytree.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
      *args: the other arguments (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A tuple of `Layer`, in program order.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad._layers as L
      >>> f = lambda p, x: jnp.tanh(x @ p["w"] + p["b"]).sum()
      >>> p = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> [(l.kind, l.param) for l in L.find_layers(f, p, jnp.ones((4, 3)))]
      [('dense', "['w']")]
    """
    return analyse(fn, params, *args)[0].layers


# ----------------------------------------------------------------------------------------
# Re-evaluation with taps, perturbations and recorded inputs.


def _inside(path: Path, prefix: Path) -> bool:
    return len(path) > len(prefix) and path[: len(prefix)] == prefix


class _Hooks:
    """What `run` does at each layer: tap its input/output, record its input, add a
    perturbation to its output."""

    def __init__(self, layers: Sequence[Layer], *, taps: bool, record: bool):
        self.by_path = {layer.path: layer for layer in layers}
        self.taps, self.record = taps, record

    def enters(self, prefix: Path) -> bool:
        return any(_inside(p, prefix) for p in self.by_path)

    def names_within(self, prefix: Path) -> list[str]:
        return [layer.name for p, layer in self.by_path.items() if _inside(p, prefix)]


def run(
    closed, args: Sequence[Any], hooks: _Hooks, perturb: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Evaluates the closed jaxpr on flat ``args`` with the hooks; returns the flat
    outputs and ``{layer name: input}`` (empty unless recording), stacked per scan."""
    rec: dict[str, Any] = {}
    outs = _run(closed.jaxpr, closed.consts, args, (), hooks, perturb, rec)
    return outs, rec


def _run(jaxpr, consts, args, prefix, hooks: _Hooks, perturb, rec):
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        path = (*prefix, i)
        layer = hooks.by_path.get(path)
        if layer is not None:
            outs = [_run_layer(layer, invals, hooks, perturb, rec)]
        elif hooks.enters(path):
            outs = _run_sub(eqn, invals, path, hooks, perturb, rec)
        else:
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _run_layer(layer: Layer, invals, hooks: _Hooks, perturb, rec):
    a, w = invals[1 - layer.weight_operand], invals[layer.weight_operand]
    if hooks.taps:
        a = tap(layer.input_tap, a)
    if hooks.record:
        rec[layer.name] = a
    z = layer.apply(a, w)
    if layer.name in perturb:
        z = z + perturb[layer.name].astype(z.dtype)
    if hooks.taps:
        z = tap(layer.output_tap, z)
    return z


def _run_sub(eqn, invals, path, hooks: _Hooks, perturb, rec):
    prim = eqn.primitive.name
    sub, sub_consts = _open(_sub(eqn))
    sub_prefix = (*path, 0)
    if prim in _CALLS:
        return _run(sub, sub_consts, invals, sub_prefix, hooks, perturb, rec)
    names = hooks.names_within(sub_prefix)
    sub_perturb = {k: perturb[k] for k in names if k in perturb}
    if prim in _REMATS:

        def body(xs, ps):
            r: dict[str, Any] = {}
            return _run(sub, sub_consts, xs, sub_prefix, hooks, ps, r), r

        outs, r = jax.checkpoint(
            body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy")
        )(list(invals), sub_perturb)
        rec.update(r)
        return outs
    # scan
    params = eqn.params
    n_consts, n_carry = _scan_split(params, len(invals))
    consts, init, xs = (
        invals[:n_consts],
        invals[n_consts : n_consts + n_carry],
        invals[n_consts + n_carry :],
    )

    def step(carry, x):
        x_t, p_t = x
        r: dict[str, Any] = {}
        outs = _run(sub, sub_consts, [*consts, *carry, *x_t], sub_prefix, hooks, p_t, r)
        return outs[:n_carry], (outs[n_carry:], r)

    carry, (ys, r) = jax.lax.scan(
        step,
        list(init),
        (list(xs), sub_perturb),
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    rec.update(r)
    return [*carry, *ys]


def tap_layers(fn: Callable, layers: Sequence[Layer]) -> Callable:
    """``fn`` with `fgrad.tap` at each layer's input (``layer.input_tap``) and output
    (``layer.output_tap``); same signature and result as ``fn``.

    Args:
      fn: the function given to `find_layers`.
      layers: layers from `find_layers` on arguments of the same shapes.

    Returns:
      A function of ``fn``'s positional arguments.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> import fgrad._layers as L
      >>> f = lambda p, x: (x @ p["w"]).sum()
      >>> p, x = {"w": jnp.ones((3, 2))}, jnp.ones((4, 3))
      >>> layers = L.find_layers(f, p, x)
      >>> g = fgrad.grad_intermediates(L.tap_layers(f, layers))(p, x)
      >>> g[layers[0].output_tap].shape
      (4, 2)
    """
    hooks = _Hooks(layers, taps=True, record=False)

    def tapped(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs, _ = run(closed, jax.tree.leaves(args), hooks, {})
        return jax.tree.unflatten(jax.tree.structure(shape), outs)

    return tapped


def recording(fn: Callable, layers: Sequence[Layer]) -> Callable:
    """``fn`` re-evaluated as ``f(perturb, *args) -> (out, {layer name: input})`` with
    ``perturb[name]`` (shaped like the layer's output, stacked per scan) added to each
    listed layer's output: differentiating with respect to ``perturb`` gives the output
    gradients, in the same pass as the forward values of the inputs."""
    hooks = _Hooks(layers, taps=False, record=True)

    def rec_fn(perturb, *args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs, rec = run(closed, jax.tree.leaves(args), hooks, perturb)
        return jax.tree.unflatten(jax.tree.structure(shape), outs), rec

    return rec_fn


def output_zeros(layers: Sequence[Layer]) -> dict[str, jax.Array]:
    """Zero perturbations for `recording`: one per layer, stacked per scan."""
    return {
        layer.name: jnp.zeros((*layer.stack, *layer.output.shape), layer.output.dtype)
        for layer in layers
    }
