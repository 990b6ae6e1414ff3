"""PyTorch's ``.grad`` as an explicit pytree: the accumulator, its three states, and the
toolkit that `backward`, `accumulate` and `step` share.

In PyTorch ``loss.backward()`` adds into each leaf's ``.grad``, ``zero_grad()`` clears it
(to ``None`` by default since 2.0), and a leaf with ``requires_grad=False`` keeps
``.grad = None``. In fgrad the accumulator is a pytree shaped like the parameters that
the caller threads through; each of its leaves is in one of three states:

- ``None``: a **frozen** leaf (``requires_grad=False``). No loss ever gives it a gradient.
- ``fgrad.NoGrad()``: a **trainable leaf with no gradient yet** (PyTorch's ``.grad is
  None`` on a parameter that requires grad). `backward` and `accumulate` replace it by
  the gradient of the first loss that depends on the leaf; `step` skips it.
- an array: the accumulated gradient.

``NoGrad`` is a pytree node with no children, like ``None``: it is static, so it passes
through ``jit`` (donated or not), ``lax.scan`` and every tree function unchanged. Whether
a loss depends on a leaf is decided from the traced program (`fgrad._liveness`), once per
trace, as PyTorch's graph decides it. Python cannot make two distinct markers both answer
``is None``, so ``g["w"] is None`` reads "frozen"; `fgrad.torch_grads` gives PyTorch's
reading, ``None`` for both.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgrad import _checks
from fgrad._liveness import reaches_output
from fgrad._typing import PyTree

Trainable = Any  # None | bool | pytree of bools | Callable[[path, leaf], bool]


class NoGrad:
    """A trainable accumulator leaf that holds no gradient yet (PyTorch: ``.grad is None``
    on a parameter with ``requires_grad=True``). A pytree node with no children.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> p = {"a": jnp.ones(2), "head": jnp.ones(2)}
      >>> g = fgrad.zero_grad(p)
      >>> g
      {'a': NoGrad(), 'head': NoGrad()}
      >>> _, g = fgrad.backward(lambda p: jnp.sum(p["a"] ** 2), p, grads=g)
      >>> g
      {'a': Array([2., 2.], dtype=float32), 'head': NoGrad()}
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "NoGrad()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoGrad)

    def __hash__(self) -> int:
        return hash(NoGrad)


jax.tree_util.register_pytree_node(NoGrad, lambda _: ((), None), lambda _, __: NoGrad())


def is_none(x: Any) -> bool:
    """A frozen accumulator leaf."""
    return x is None


def is_empty(x: Any) -> bool:
    """A trainable accumulator leaf without a gradient yet."""
    return isinstance(x, NoGrad)


def is_hole(x: Any) -> bool:
    """An accumulator leaf without an array: frozen or empty (`step` skips both)."""
    return x is None or isinstance(x, NoGrad)


def torch_grads(grads: Any) -> Any:
    """The accumulator as PyTorch reads ``.grad``: ``None`` wherever there is no gradient.

    Frozen leaves (``None``) and trainable leaves without a gradient yet (`fgrad.NoGrad`)
    both read ``None``, as ``p.grad`` does for both in PyTorch. For reading and comparing
    only: pass the accumulator itself on to `backward`, `accumulate` and `step`, since
    ``None`` there means frozen.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> p = {"a": jnp.ones(2), "head": jnp.ones(2)}
      >>> _, g = fgrad.backward(lambda p: jnp.sum(p["a"]), p, grads=fgrad.zero_grad(p))
      >>> fgrad.torch_grads(g)["head"] is None
      True
    """
    return jax.tree.map(lambda g: None if is_empty(g) else g, grads, is_leaf=is_hole)


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def trainable_mask(params: Any, trainable: Trainable, caller: str) -> Any:
    """A pytree of Python bools shaped like ``params`` (NumPy bools accepted)."""
    if trainable is None or _is_bool(trainable):
        flag = trainable is None or bool(trainable)
        return jax.tree.map(lambda _: flag, params)
    if callable(trainable):

        def decide(path, leaf):
            keep = trainable(jax.tree_util.keystr(path), leaf)
            if not _is_bool(keep):
                raise TypeError(
                    f"{caller}: the trainable predicate must return a Python bool for each "
                    f"leaf, got {type(keep).__name__} for {jax.tree_util.keystr(path)}."
                )
            return bool(keep)

        return jax.tree_util.tree_map_with_path(decide, params)
    for path, m in jax.tree_util.tree_leaves_with_path(trainable):
        if not _is_bool(m):
            raise TypeError(
                f"{caller}: trainable{jax.tree_util.keystr(path)} must be a Python bool, got "
                f"{type(m).__name__}."
            )
    try:  # broadcast each bool of the (prefix) tree over its subtree of params
        return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), trainable, params)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{caller}: trainable must be None, a bool, a predicate f(path, leaf) -> bool, or "
            f"a pytree of bools with the structure of params (or a prefix of it): {e}"
        ) from None


def require_inexact_tree(tree: Any, caller: str, what: str) -> None:
    """Real or complex floating point; integer and boolean leaves refused, naming the leaf."""
    real = jax.tree.map(lambda x: jnp.real(x) if _is_complex(x) else x, tree)
    _checks.require_float_tree(real, caller, what)


def _is_complex(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.complexfloating)


def zero_grad(
    params: PyTree,
    trainable: Trainable = None,
    *,
    set_to_none: bool = True,
    grads: PyTree = None,
) -> PyTree:
    """A fresh gradient accumulator: ``optimizer.zero_grad(set_to_none=...)``.

    Each leaf is in one of three states (see `fgrad.NoGrad`): ``None`` where frozen
    (``requires_grad=False``: no loss ever fills it), `fgrad.NoGrad` where trainable but
    without a gradient yet (``set_to_none=True``, PyTorch's default), or zeros
    (``set_to_none=False``). `backward` and `accumulate` fill a `NoGrad` leaf only when
    the loss depends on it, and `step` skips every leaf without an array (no update, no
    weight decay, no optimizer-state change), as ``torch.optim`` skips ``.grad is None``.

    ``set_to_none=False`` is as if every trainable ``.grad`` already held zeros: `step`
    then updates every trainable leaf (AdamW decays an unused head). In PyTorch a
    ``.grad`` stays ``None`` until its first gradient even with ``set_to_none=False``
    (``zero_grad`` only zeroes existing tensors); the zeros here match PyTorch from the
    first step on which every trainable parameter has received a gradient.

    Args:
      params: a pytree of real or complex floating-point arrays (``None`` leaves, which
        hold nothing, stay ``None``).
      trainable: which leaves take gradients. ``None`` or ``True``: all. A pytree of
        bools with the structure of ``params`` (or a prefix of it), or a predicate
        ``f(path, leaf) -> bool`` where ``path`` is the leaf's key string, e.g.
        ``"['linear1.weight']"``. NumPy bools are accepted.
      set_to_none: ``True`` (default): trainable leaves start as `fgrad.NoGrad`;
        ``False``: as zeros of the leaf's shape and dtype.
      grads: optionally, the accumulator being cleared, for PyTorch's exact
        ``zero_grad(set_to_none=False)``, which zeroes the ``.grad`` tensors that exist:
        its `NoGrad` leaves stay `NoGrad` and its ``None`` leaves stay frozen.

    Returns:
      A pytree with the structure of ``params``.

    Examples:
      >>> import fgrad
      >>> p = fgrad.models.seed_params()
      >>> g = fgrad.zero_grad(p, trainable=lambda path, _: "linear2" in path)
      >>> g["linear1.weight"] is None, g["linear2.bias"]
      (True, NoGrad())
      >>> fgrad.zero_grad(p, set_to_none=False)["linear2.weight"]
      Array([[0.]], dtype=float32)
    """
    caller = "fgrad.zero_grad"
    if not _is_bool(set_to_none):
        raise TypeError(
            f"{caller}: set_to_none must be True or False, got {set_to_none!r} "
            f"({type(set_to_none).__name__})."
        )
    mask = trainable_mask(params, trainable, caller)
    if grads is not None:
        check_grads(params, grads, caller)
        mask = jax.tree.map(lambda g, m: m and g is not None, grads, mask, is_leaf=is_hole)
        old = jax.tree.map(lambda g: not is_hole(g), grads, is_leaf=is_hole)
    else:
        old = jax.tree.map(lambda _: True, mask)
    trainable_params = jax.tree.map(lambda m, p: p if m else None, mask, params)
    require_inexact_tree(trainable_params, caller, "trainable parameters")

    def fresh(m, had, p):
        if not m:
            return None
        return jnp.zeros_like(p) if had and not set_to_none else NoGrad()

    return jax.tree.map(fresh, mask, old, params)


def check_grads(params: Any, grads: Any, caller: str) -> None:
    """``grads`` has the structure and shapes of ``params`` (``None`` or `NoGrad` standing
    for any leaf; ``None`` where ``params`` holds ``None``), and the leaves it trains are
    real or complex floating point."""
    p_tree: Any  # PyTreeDef (its methods are untyped for mypy)
    p_leaves, p_tree = jax.tree.flatten(params, is_leaf=is_none)
    try:
        g_leaves = p_tree.flatten_up_to(grads)
    except (ValueError, TypeError):
        where = _checks.first_structure_difference(params, grads, none_ok=True)
        if where is None:
            where = " has other container types than expected"
        raise ValueError(
            f"{caller}: grads must have the structure and shapes of params (None at frozen "
            f"leaves), but grads{where}: params is {_checks.describe(params)}, grads is "
            f"{_checks.describe(grads)}. Make it with fgrad.zero_grad(params, trainable=...)."
        ) from None
    paths = [
        jax.tree_util.keystr(k)
        for k, _ in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_none)
    ]
    for path, p, g in zip(paths, p_leaves, g_leaves, strict=True):
        if p is None:
            if g is not None:
                raise ValueError(
                    f"{caller}: params{path} is None, so grads{path} must be None too, got "
                    f"{_checks.describe(g)}."
                )
            continue
        if is_hole(g):
            continue
        if not (hasattr(g, "shape") and hasattr(g, "dtype")):
            raise ValueError(
                f"{caller}: grads{path} must be an array, None (frozen) or fgrad.NoGrad() "
                f"(no gradient yet), as params{path} is {_checks.describe(p)}; got "
                f"{_checks.describe(g)}. "
                "Make the accumulator with fgrad.zero_grad(params)."
            )
        if jnp.shape(p) != jnp.shape(g):
            raise ValueError(
                f"{caller}: grads must have the structure and shapes of params (None at "
                f"frozen leaves), but grads{path} has shape {jnp.shape(g)}, expected "
                f"{jnp.shape(p)}. Make it with fgrad.zero_grad(params, trainable=...)."
            )
    require_inexact_tree(split(params, grads)[0], caller, "trainable parameters")


def prepare_grads(params: Any, grads: Any, caller: str) -> Any:
    """``grads`` checked against ``params``; ``None`` means a fresh accumulator
    (`NoGrad` at every leaf), as before PyTorch's first ``.backward()``."""
    if grads is None:
        require_inexact_tree(params, caller, "parameters")
        return jax.tree.map(lambda _: NoGrad(), params)
    check_grads(params, grads, caller)
    return grads


def split(params: Any, grads: Any) -> tuple[Any, Any]:
    """``params`` as (trainable part, frozen part): each ``None`` where the other has the
    leaf; a leaf is frozen where ``grads`` holds ``None``."""
    train = jax.tree.map(lambda g, p: None if g is None else p, grads, params, is_leaf=is_hole)
    frozen = jax.tree.map(lambda g, p: p if g is None else None, grads, params, is_leaf=is_hole)
    return train, frozen


def merge(train: Any, frozen: Any) -> Any:
    return jax.tree.map(lambda t, f: f if t is None else t, train, frozen, is_leaf=is_none)


def _loss_fn(fn, frozen, args, has_aux, gradient, caller):
    """``t -> (output to differentiate, (value, aux))`` for trainable leaves ``t``."""

    def f(t):
        out = fn(merge(t, frozen), *args)
        value, aux = _checks.split_aux(out, caller) if has_aux else (out, None)
        if gradient is not None:
            return value, (value, aux)
        leaves = jax.tree.leaves(value)
        if len(leaves) == 1 and _is_complex(leaves[0]):
            raise TypeError(
                f"{caller}: the loss is complex ({leaves[0].dtype}); a gradient needs a real "
                "loss (PyTorch: 'grad can be implicitly created only for real scalar "
                "outputs'). Return a real loss, e.g. jnp.abs(z) ** 2, or pass gradient= "
                "for a complex output."
            )
        y = _checks.scalar_output(value, caller, "The loss must be a scalar.")
        return jnp.reshape(y, ()), (value, aux)

    return f


def check_gradient(out: Any, gradient: Any, caller: str) -> None:
    """``gradient=`` has the structure, shapes and kind of the output."""
    o_leaves = jax.tree_util.tree_leaves_with_path(out)
    try:
        out_tree: Any = jax.tree.structure(out)
        v_leaves = out_tree.flatten_up_to(gradient)
    except (ValueError, TypeError):
        where = _checks.first_structure_difference(out, gradient)
        raise ValueError(
            f"{caller}: gradient= must have the structure of fn's output (as "
            f"Tensor.backward(gradient=v) needs v shaped like the tensor), but "
            f"gradient{where or ' differs'}: the output is {_checks.describe(out)}, gradient is "
            f"{_checks.describe(gradient)}."
        ) from None
    for (path, o), v in zip(o_leaves, v_leaves, strict=True):
        where = jax.tree_util.keystr(path)
        if not (hasattr(v, "shape") or isinstance(v, (int, float, complex))):
            raise ValueError(
                f"{caller}: gradient{where} must be an array shaped like the output{where} "
                f"({_checks.describe(o)}), got {_checks.describe(v)}."
            )
        if not hasattr(v, "shape") or jnp.shape(v) != jnp.shape(o):
            raise ValueError(
                f"{caller}: gradient{where} has shape {jnp.shape(v)}, but the output{where} "
                f"has shape {jnp.shape(o)}; gradient= must be shaped like fn's output."
            )
        if not jnp.issubdtype(jnp.result_type(v), jnp.inexact):
            raise TypeError(
                f"{caller}: gradient{where} must be floating point, got dtype {jnp.result_type(v)}."
            )


def live_leaves(fn, params, grads, args, has_aux, caller, gradient=None) -> Any:
    """A pytree shaped like ``grads`` (``None``/`NoGrad` as leaves) of Python bools: which
    trainable leaves the loss depends on, decided from the traced program. Leaves that
    already hold an array count as live (adding a zero changes nothing)."""
    g_leaves, g_tree = jax.tree.flatten(grads, is_leaf=is_hole)
    if not any(is_empty(g) for g in g_leaves):
        return jax.tree.unflatten(g_tree, [g is not None for g in g_leaves])
    train, frozen = split(params, grads)
    f = _loss_fn(fn, frozen, args, has_aux, gradient, caller)
    # Complex leaves as (real, imaginary) pairs: liveness is asked of real inputs.
    t_leaves, t_tree = jax.tree.flatten(train, is_leaf=is_none)
    parts = [(jnp.real(x), jnp.imag(x)) if _is_complex(x) else x for x in t_leaves]

    def of_parts(ps):
        leaves = [
            jax.lax.complex(*q) if _is_complex(x) else q for x, q in zip(t_leaves, ps, strict=True)
        ]
        return f(jax.tree.unflatten(t_tree, leaves))[0]

    live = reaches_output(of_parts, parts)
    flat = [any(jax.tree.leaves(x)) if isinstance(x, tuple) else bool(x) for x in live]
    return jax.tree.unflatten(
        g_tree, [g is not None and b for g, b in zip(g_leaves, flat, strict=True)]
    )


def value_and_grad_trainable(fn, params, grads, args, has_aux, caller, gradient=None):
    """``(value, aux, g)``: ``fn(params, *args)`` and the gradient of the scalar loss (or
    the vector-Jacobian product with ``gradient``) w.r.t. the trainable leaves only
    (``None`` at frozen ones, which are not differentiated). Complex leaves get PyTorch's
    ``.grad``, the conjugate of ``jax.grad``'s."""
    train, frozen = split(params, grads)
    f = _loss_fn(fn, frozen, args, has_aux, gradient, caller)
    if gradient is None:
        (_, (value, aux)), g = jax.value_and_grad(f, has_aux=True)(train)
    else:
        out, pullback, (value, aux) = jax.vjp(f, train, has_aux=True)
        check_gradient(out, gradient, caller)
        v = jax.tree.map(lambda o, c: jnp.asarray(c, o.dtype), out, gradient)
        # PyTorch's backward(gradient=v) on a complex output is the conjugate of JAX's
        # pullback of conj(v), as for a real loss.
        (g,) = pullback(jax.tree.map(jnp.conj, v))
    g = jax.tree.map(lambda d: jnp.conj(d) if _is_complex(d) else d, g)
    return value, aux, g


def add_into(grads: Any, g: Any, scale: Any = None, *, live: Any = None, like: Any = None) -> Any:
    """``grads + scale * g`` leafwise in the accumulator's dtype (``scale``: a number, or
    ``scale(dtype)`` giving one per accumulator dtype); ``None`` stays ``None``;
    a `NoGrad` leaf becomes ``scale * g`` (in ``like``'s dtype, the parameters' or the
    running sums') where ``live`` says the loss reached it, else stays `NoGrad`."""
    if live is None:
        live = jax.tree.map(lambda a: not is_hole(a), grads, is_leaf=is_hole)
    if like is None:
        like = jax.tree.map(lambda a: None if is_hole(a) else a, grads, is_leaf=is_hole)

    def _scale_for(dtype):
        return scale(dtype) if callable(scale) else scale

    def add(acc, d, lv, ref):
        if acc is None:
            return None
        if is_empty(acc):
            if not lv:
                return acc
            d = d.astype(ref.dtype)
            return d if scale is None else d * jnp.asarray(_scale_for(ref.dtype), ref.dtype)
        d = d.astype(acc.dtype)
        return acc + (d if scale is None else d * jnp.asarray(_scale_for(acc.dtype), acc.dtype))

    return jax.tree.map(add, grads, g, live, like, is_leaf=is_hole)
