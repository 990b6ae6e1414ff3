"""Hessian-vector products and Hessians of scalar functions of pytree parameters.

PyTorch: ``torch.autograd.functional.hvp`` / ``hessian`` (double backward with
``create_graph=True``) or ``torch.func.hvp``. fgrad: forward-over-reverse (one JVP of the
gradient: about the cost of two gradients), falling back to reverse-over-reverse where a
``jax.custom_vjp`` function forbids forward mode; dense Hessians as nested blocks, built
from chunks of HVPs when memory matters.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
from jax.extend import core as jcore
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from fgrad import _checks
from fgrad._typing import P, PyTree, with_params_of

HvpMethod = Literal["auto", "forward_over_reverse", "reverse_over_reverse"]
_HVP_METHODS = ("auto", "forward_over_reverse", "reverse_over_reverse")


def _scalar(f: Callable, caller: str) -> Callable:
    def g(*args):
        y = _checks.scalar_output(f(*args), caller, "The Hessian is defined for scalar f.")
        return jnp.reshape(y, ())

    return g


def _check_tangent(params: Any, v: Any, caller: str) -> None:
    diff = _checks.first_structure_difference(params, v)
    if diff is not None:
        where = f": v{diff}" if diff.strip() and not diff.startswith(" is ") else ""
        hint = (
            " Build v like params, e.g. jax.tree.map(jnp.ones_like, params) or "
            "jnp.asarray(v) for an array."
        )
        raise ValueError(
            f"{caller}: v must have the structure and shapes of params (the primals); "
            f"params is {_checks.describe(params)} but v is {_checks.describe(v)}{where}." + hint
        )
    pairs = zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(v), strict=True)
    for (path, p), t in pairs:
        if jnp.iscomplexobj(t) and not jnp.issubdtype(jnp.result_type(p), jnp.complexfloating):
            raise TypeError(
                f"{caller}: v{jax.tree_util.keystr(path)} is complex but the parameter is "
                "real; H v would drop its imaginary part. Pass the real and the imaginary "
                "part as two products."
            )


def forward_refused(jaxpr) -> bool:
    """Whether forward-mode products through ``jaxpr`` (a JVP or a linearisation, sub-programs
    included) would fail: JAX leaves a ``custom_lin`` where a tangent reaches a
    ``jax.custom_vjp`` function (one that only has a backward rule), and refuses to run it
    forwards. A ``custom_vjp`` that no tangent reaches (applied to data) leaves none."""
    for eqn in jaxpr.eqns:  # a dead one counts too: run eagerly, it still raises
        if eqn.primitive.name == "custom_lin":
            return True
        if any(forward_refused(sub) for sub in jcore.jaxprs_in_params(eqn.params)):
            return True
    return False


def hvp(f: Callable, params: PyTree, v: PyTree, *args: Any, method: HvpMethod = "auto") -> PyTree:
    """The Hessian-vector product ``H v`` of scalar ``f(params, *args)`` w.r.t. ``params``.

    Args:
      f: ``f(params, *args) -> scalar``.
      params: a pytree of floating-point arrays.
      v: the vector, a pytree with the structure and shapes of ``params``.
      *args: further arguments of ``f`` (e.g. a batch), held fixed.
      method: ``"forward_over_reverse"`` (a JVP of the gradient: the fastest),
        ``"reverse_over_reverse"`` (the gradient of ``<grad f, v>``: works through
        ``jax.custom_vjp``), or ``"auto"``: forward-over-reverse, falling back to
        reverse-over-reverse when a ``custom_vjp`` refuses forward mode.

    Returns:
      ``H v``, with the structure of ``params``.

    Each call runs the forward and backward passes again; for many products with one
    Hessian, `fgrad.linearize_grad` runs them once.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> f = lambda p: p["a"] ** 2 * p["b"]
      >>> hv = fgrad.hvp(f, {"a": 3.0, "b": 2.0}, {"a": 1.0, "b": 0.0})  # column 'a' of H
      >>> float(hv["a"]), float(hv["b"])
      (4.0, 6.0)
    """
    caller = "fgrad.hvp"
    if method not in _HVP_METHODS:
        raise ValueError(f"{caller}: method must be one of {_HVP_METHODS}, got {method!r}.")
    _check_tangent(params, v, caller)
    _checks.require_float_tree(params, caller, "params")
    return _hvp(f, params, v, args, method, caller)


def _hvp(f: Callable, params: Any, v: Any, args: tuple, method: str, caller: str) -> Any:
    """`hvp` without its argument checks, for callers that build ``v`` themselves and
    checked ``params`` already; a non-scalar ``f`` is reported as ``caller``'s error."""
    grad = _grad_of(f, args, caller)

    def reverse():
        dot = lambda p: sum(
            jnp.vdot(a, jnp.asarray(b, a.dtype))
            for a, b in zip(jax.tree.leaves(grad(p)), jax.tree.leaves(v), strict=True)
        )
        return jax.grad(dot)(params)

    if method == "reverse_over_reverse":
        return reverse()
    tangent = _cast_like(params, v)
    if _forward_refused_for(grad, params, method, caller):
        return reverse()
    return jax.jvp(grad, (params,), (tangent,))[1]


def _grad_of(f: Callable, args: tuple, caller: str) -> Callable:
    g = _scalar(f, caller)
    return jax.grad(lambda p: g(p, *args))


def _forward_refused_for(grad: Callable, params: Any, method: str, caller: str) -> bool:
    """Whether forward mode is refused through ``grad`` at ``params`` (`forward_refused`
    of its JVP's program, traced, not run): then ``"auto"`` goes reverse (True), and an
    explicit ``"forward_over_reverse"`` is an error that says what to do (JAX itself would
    only fail when a product runs)."""
    jvp = lambda p: jax.jvp(grad, (p,), (p,))[1]
    if not forward_refused(jax.make_jaxpr(jvp)(params).jaxpr):
        return False
    if method == "auto":
        return True
    raise TypeError(
        f"{caller}: method='forward_over_reverse' cannot differentiate the gradient of f: a "
        "tangent reaches a jax.custom_vjp function in it (e.g. one called by another's "
        "backward rule), and JAX can't apply forward-mode autodiff (jvp) to a custom_vjp "
        "function. Use method='auto' or 'reverse_over_reverse'."
    )


def _cast_like(params: Any, v: Any) -> Any:
    return jax.tree.map(lambda p, t: jnp.asarray(t, jnp.result_type(p)), params, v)


def _linearized(f: Callable, params: Any, args: tuple, method: str, caller: str):
    """``(grads, lin)``: the gradient at ``params`` and ``lin(v) = H v`` from the one
    linearisation of the gradient (forward-over-reverse: ``jax.linearize``; reverse: the
    gradient's VJP, ``Hᵀ v = H v``), both unchecked."""
    grad = _grad_of(f, args, caller)
    if method == "reverse_over_reverse" or _forward_refused_for(grad, params, method, caller):
        grads, pull = jax.vjp(grad, params)
        return grads, Partial(_first, pull)
    return jax.linearize(grad, params)


def _first(pull: Callable, v: Any) -> Any:
    return pull(v)[0]


class _Checked:
    """``hvp(v)`` of `linearize_grad`: checks ``v`` against the parameters' structure and
    shapes and casts it to their dtypes, which it holds as static data (compared by value,
    and the parameters are not carried as arguments). The linearisation itself carries
    its program in its structure: ``hvp``s made by one jitted function share a structure,
    ``hvp``s made eagerly each have their own."""

    def __init__(self, params: Any):
        leaves, self.tree = jax.tree.flatten(params)
        self.avals = tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves)

    def _key(self) -> tuple:
        return (self.tree, self.avals)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Checked) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, lin: Callable, *v: Any) -> Any:
        caller = "fgrad.linearize_grad: hvp(v)"
        if len(v) != 1:
            raise TypeError(f"{caller} takes one argument v shaped like params, got {len(v)}.")
        like = jax.tree.unflatten(self.tree, [jax.ShapeDtypeStruct(*a) for a in self.avals])
        _check_tangent(like, v[0], caller)
        return lin(_cast_like(like, v[0]))


def linearize_grad(
    f: Callable, params: PyTree, *args: Any, method: HvpMethod = "auto"
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """The gradient of scalar ``f(params, *args)`` w.r.t. ``params``, and the Hessian there
    as a function: ``grads, hvp = linearize_grad(f, params, *args)``, ``hvp(v) = H v``.

    `fgrad.hvp` runs the forward and backward passes again for every product. Here they
    run once, and each ``hvp(v)`` runs only the part that depends on ``v``: for the many
    products of one Hessian (conjugate gradients, Lanczos, Hutchinson probes; fgrad's
    curvature estimators use it), each costs about 2x a gradient's FLOPs instead of 2.6x
    (XLA's count on ``fgrad bench``'s transformer block, whose dense layers set the
    ratio). The price is memory: ``hvp`` holds the intermediates of the forward and
    backward passes (about those of one gradient, twice) for as long as it lives. As
    ``jax.linearize`` for the gradient; PyTorch keeps the double-backward graph alive
    (``create_graph=True``) for the same purpose.

    Args:
      f: ``f(params, *args) -> scalar``.
      params: a pytree of floating-point arrays.
      *args: further arguments of ``f`` (e.g. a batch), held fixed.
      method: as in `fgrad.hvp`: ``"forward_over_reverse"``, ``"reverse_over_reverse"``
        (through ``jax.custom_vjp``), or ``"auto"`` (forward, reverse where a
        ``custom_vjp`` refuses forward mode).

    Returns:
      ``(grads, hvp)``: the gradient, with the structure of ``params``, and ``hvp(v)``,
      which takes ``v`` shaped like ``params``. ``hvp`` is a ``jax.tree_util.Partial``,
      a pytree: return it from a jitted function and pass it to others, or close over it
      in ``lax`` loops. Its structure includes the linearised program, so make it inside
      ``jit`` (``hvp``s made by one jitted function share a structure; each made eagerly
      has its own, and a jitted function taking it compiles again).

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> f = lambda p, x: jnp.sum(p["w"] ** 3 * x)
      >>> g, hvp = fgrad.linearize_grad(f, {"w": jnp.array([1.0, 2.0])}, 2.0)
      >>> g["w"].tolist(), hvp({"w": jnp.array([1.0, 0.0])})["w"].tolist()  # H = diag(12w)
      ([6.0, 24.0], [12.0, 0.0])
    """
    caller = "fgrad.linearize_grad"
    if method not in _HVP_METHODS:
        raise ValueError(f"{caller}: method must be one of {_HVP_METHODS}, got {method!r}.")
    _checks.require_float_tree(params, caller, "params")
    grads, lin = _linearized(f, params, args, method, caller)
    return grads, Partial(_Checked(params), lin)


def flat_hvp(f: Callable, params: Any, args: tuple, caller: str):
    """``(matvec, flat, unravel)``: ``matvec(u) = H u`` over the raveled parameters, from
    one linearisation of the gradient (every product shares its forward and backward
    passes), and ``jax.flatten_util.ravel_pytree(params)``. Checks nothing but that ``f``
    is scalar (as ``caller``): the caller checks ``params``."""
    flat, unravel = ravel_pytree(params)
    _, lin = _linearized(f, params, args, "auto", caller)

    def matvec(u):
        return ravel_pytree(lin(_cast_like(params, unravel(u))))[0]

    return matvec, flat, unravel


def _blocks(dense: jax.Array, params: Any) -> Any:
    """A dense (n, n) Hessian of raveled ``params`` as nested blocks, like jax.hessian."""
    leaves, tree = jax.tree.flatten(params)
    sizes = [jnp.size(x) for x in leaves]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    rows = []
    for li, oi, si in zip(leaves, offsets, sizes, strict=True):
        cols = [
            dense[oi : oi + si, oj : oj + sj].reshape(jnp.shape(li) + jnp.shape(lj))
            for lj, oj, sj in zip(leaves, offsets, sizes, strict=True)
        ]
        rows.append(jax.tree.unflatten(tree, cols))
    return jax.tree.unflatten(tree, rows)


def dense_hessian(
    f: Callable, params: Any, *args: Any, chunk_size: int | None = None, caller: str
) -> jax.Array:
    """The Hessian of scalar ``f(params, *args)`` as one (n, n) matrix over the raveled
    parameters (``jax.flatten_util.ravel_pytree`` order), from HVPs with the unit vectors
    in chunks of ``chunk_size`` (None: all at once)."""
    column, flat, _ = flat_hvp(f, params, args, caller)
    n = flat.size
    eye = jnp.eye(n, dtype=flat.dtype)
    if chunk_size is None:
        return jax.vmap(column)(eye).T
    return jax.lax.map(column, eye, batch_size=min(chunk_size, n)).T


def hessian(
    f: Callable[P, Any], argnums: int = 0, *, chunk_size: int | None = None
) -> Callable[P, PyTree]:
    """Transforms scalar ``f`` into its Hessian w.r.t. one (pytree) argument, as nested blocks.

    ``hessian(f)(params)[a][b]`` is the block ∂²f/∂params[a]∂params[b], shaped
    ``params[a].shape + params[b].shape``: the layout of ``jax.hessian`` and of
    ``torch.autograd.functional.hessian`` on a tuple of inputs.

    Args:
      f: a function returning a scalar.
      argnums: which positional argument; the others are held fixed.
      chunk_size: build the Hessian from HVPs with ``chunk_size`` unit vectors at a time,
        bounding memory by ``chunk_size`` HVPs instead of ``n`` (``None``: one
        vectorised pass, like ``jax.hessian``).

    Returns:
      A function with ``f``'s arguments returning the nested blocks.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> f = lambda p: p["a"] ** 2 * p["b"]
      >>> h = fgrad.hessian(f)({"a": 3.0, "b": 2.0})
      >>> [[float(h[r][c]) for c in ("a", "b")] for r in ("a", "b")]
      [[4.0, 6.0], [6.0, 0.0]]
    """
    caller = "fgrad.hessian"
    if not _checks.is_int(argnums):
        raise TypeError(f"{caller}: argnums must be one int, got {argnums!r}.")
    if chunk_size is not None:
        _checks.positive_int(chunk_size, "chunk_size", caller)

    @functools.wraps(f)
    def wrapped(*args: Any):
        (i,) = _checks.normalize_argnums(argnums, len(args), caller)
        params = args[i]
        _checks.require_float_tree(params, caller, f"argument {i}")
        g = lambda p, *rest: cast(Callable[..., Any], f)(*rest[:i], p, *rest[i:])
        rest = (*args[:i], *args[i + 1 :])
        dense = dense_hessian(g, params, *rest, chunk_size=chunk_size, caller=caller)
        return _blocks(dense, params)

    return with_params_of(f, wrapped)
