"""Gradient-norm regularisers: losses that contain a gradient.

Each function returns a scalar to add to the training loss; differentiating it w.r.t. the
parameters is double backprop (PyTorch's ``create_graph=True``), which in fgrad is
always available. The conventions that are easy to get wrong in PyTorch are fixed here:

- Input gradients are **per example**: the critic returns one score per example and the
  inner gradient is taken of their *sum*, so example ``i``'s gradient is
  ``∂D(x_i)/∂x_i`` whatever the batch size (taking it of the *mean* would shrink it by
  the batch size).
- Penalties are **averaged over the batch**, so they do not change when the batch is
  duplicated, and stay comparable across batch sizes.
- Under ``jit`` with a sharded batch, the inner gradient is per example, so no
  cross-device reduction of it is needed (the outer loss is reduced as usual).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Concatenate, Literal

import jax
import jax.numpy as jnp
import numpy as np

from fgrad import _checks
from fgrad._intermediates import grad_intermediates
from fgrad._typing import P, PyTree


def _per_example(out: Any, batch: int, caller: str, what: str = "critic") -> jax.Array:
    """One scalar per example, shape (batch,), from (batch,) or (batch, 1)."""
    shape = jnp.shape(out)
    if shape in ((batch,), (batch, 1)):
        return jnp.reshape(out, (batch,))
    raise ValueError(
        f"{caller}: the {what} must return one score per example, shape ({batch},) or "
        f"({batch}, 1); got {shape}. Reduce other axes inside the {what} (a critic that "
        "returns several scores per example makes the input gradient ambiguous)."
    )


def _no_positional_key(args: tuple, caller: str, fn: str) -> None:
    """Refuses a PRNG key passed positionally where ``key=`` is keyword-only: it would be
    handed to ``fn`` as an extra argument."""
    for a in args:
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"{caller}: key is keyword-only; a PRNG key among the positional arguments "
                f"would be passed to {fn} as an extra argument. Pass key=jax.random.key(seed)."
            )


def _batch_of(x: jax.Array, caller: str, name: str = "x") -> int:
    if not hasattr(x, "shape") or jnp.ndim(x) < 1:
        raise ValueError(f"{caller}: {name} must be an array with a leading batch axis.")
    _checks.require_float_tree(x, caller, name)
    if x.shape[0] == 0:
        raise ValueError(
            f"{caller}: {name} is an empty batch (shape {tuple(x.shape)}); the penalty is a "
            "mean over examples and needs at least one."
        )
    return int(x.shape[0])


def _sq_norm_per_example(g: jax.Array) -> jax.Array:
    return jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1)


def _input_grads(critic, params, x, args, caller):
    n = x.shape[0]
    scores = lambda x_: _per_example(critic(params, x_, *args), n, caller)
    return jax.grad(lambda x_: jnp.sum(scores(x_)))(x)


def _mean_sq_input_grad(critic, params, x, args, caller):
    return jnp.mean(_sq_norm_per_example(_input_grads(critic, params, x, args, caller)))


def input_gradient(fn: Callable, params: PyTree, x: jax.Array, *args: Any) -> jax.Array:
    """Double backprop (Drucker and LeCun 1992): the mean squared norm of per-example input
    gradients, ``mean_i ‖∂fn_i/∂x_i‖²``.

    Args:
      fn: ``fn(params, x, *args)`` returning one value per example (e.g. the
        per-example loss), shape ``(batch,)`` or ``(batch, 1)``.
      params: the parameters (the penalty is differentiated w.r.t. them).
      x: inputs with a leading batch axis.
      *args: further arguments (e.g. labels), not differentiated.

    Returns:
      A scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> fn = lambda w, x: (x @ w) ** 2  # d/dx = 2 (x·w) w
      >>> float(fgrad.penalties.input_gradient(fn, jnp.array([1.0, 2.0]), jnp.ones((3, 2))))
      180.0

    References:
      Drucker and LeCun, "Improving generalization performance using double
      backpropagation", 1992.
    """
    caller = "fgrad.penalties.input_gradient"
    _batch_of(x, caller)
    return _mean_sq_input_grad(fn, params, x, args, caller)


def intermediate_gradient(
    fn: Callable, params: Any, x: jax.Array, names: str | Sequence[str], *args: Any
) -> jax.Array:
    """Double backprop w.r.t. tapped intermediates: ``mean_i Σ_names ‖∂fn_i/∂h_i‖²``.

    The seed notebook's ``f = autograd.grad(y, l, create_graph=True)`` made into a loss:
    the gradient of the output w.r.t. an intermediate value, penalised.

    Args:
      fn: ``fn(params, x, *args)`` returning one value per example; its body taps the
        intermediates with `fgrad.tap` (their leading axis must be the batch).
      params: the parameters.
      x: inputs with a leading batch axis.
      names: the tap name(s).
      *args: further arguments, not differentiated.

    Returns:
      A scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> y = lambda p, x: fgrad.models.seed_net(p, x)[1]
      >>> p = fgrad.models.seed_params()
      >>> float(fgrad.penalties.intermediate_gradient(y, p, jnp.array([[4.0]]), "l"))  # 120²
      14400.0
    """
    caller = "fgrad.penalties.intermediate_gradient"
    n = _batch_of(x, caller)
    many = isinstance(names, (list, tuple))
    if not (isinstance(names, str) or (many and names and all(isinstance(s, str) for s in names))):
        raise TypeError(
            f"{caller}: names must be a tap name (a str given to fgrad.tap) or a non-empty "
            f"list of them, got {names!r}."
        )
    total = lambda p, x_: jnp.sum(_per_example(fn(p, x_, *args), n, caller, "function"))
    try:
        taps = grad_intermediates(total, names)(params, x)
    except (ValueError, TypeError) as e:  # the tap checks, in the words of this function
        msg = str(e)
        for inner in ("fgrad.value_and_grad_intermediates:", "fgrad.grad_intermediates:"):
            if msg.startswith(inner):
                raise type(e)(caller + ":" + msg[len(inner) :]) from e
        raise
    for name, g in taps.items():
        for leaf in jax.tree.leaves(g):
            if jnp.ndim(leaf) < 1 or leaf.shape[0] != n:
                raise ValueError(
                    f"{caller}: tap {name!r} has shape {jnp.shape(leaf)}; its leading axis "
                    f"must be the batch ({n}) to give per-example gradients."
                )
    per = sum(_sq_norm_per_example(leaf) for g in taps.values() for leaf in jax.tree.leaves(g))
    return jnp.mean(per)


def wgan_gp(
    critic: Callable,
    params: PyTree,
    real: jax.Array,
    fake: jax.Array,
    *args: Any,
    key: Any = None,
    weight: float = 10.0,
    epsilon: jax.Array | None = None,
) -> jax.Array:
    """The WGAN-GP gradient penalty (Gulrajani et al. 2017):
    ``weight * mean_i (‖∇D(x̂_i)‖ - 1)²`` at random interpolates
    ``x̂_i = ε_i real_i + (1 - ε_i) fake_i``, ``ε_i ~ U[0, 1]``.

    Args:
      critic: ``critic(params, x, *args)`` returning one score per example.
      params: the critic's parameters.
      real: real samples, leading batch axis.
      fake: generated samples, the same shape as ``real`` (pass them through
        ``jax.lax.stop_gradient`` if the generator must not be trained by the penalty).
      *args: further critic arguments.
      key: PRNG key for ``ε`` (keyword-only).
      weight: λ, 10 in the paper.
      epsilon: the interpolation weights themselves, shape ``(batch,)``, instead of
        ``key`` (e.g. to reproduce a PyTorch run).

    Returns:
      A scalar.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> critic = lambda w, x: x @ w  # gradient w everywhere: penalty 10 (‖w‖ - 1)²
      >>> real, fake = jnp.ones((4, 2)), jnp.zeros((4, 2))
      >>> float(fgrad.penalties.wgan_gp(critic, jnp.array([3.0, 4.0]), real, fake,
      ...                               key=jax.random.key(0)))
      160.0

    References:
      Gulrajani et al., "Improved training of Wasserstein GANs", 2017.
    """
    caller = "fgrad.penalties.wgan_gp"
    if key is None and epsilon is None:
        _no_positional_key(args, caller, "the critic")
    _checks.real_number(weight, "weight", caller)
    n = _batch_of(real, caller, "real")
    _batch_of(fake, caller, "fake")
    if jnp.shape(real) != jnp.shape(fake):
        raise ValueError(
            f"{caller}: real and fake must have the same shape to interpolate between them; "
            f"got {jnp.shape(real)} and {jnp.shape(fake)}."
        )
    if epsilon is None:
        if key is None:
            raise TypeError(
                f"{caller}: pass key=jax.random.key(seed) for the random interpolation "
                "weights (or epsilon= to give them)."
            )
        _checks.require_prng_key(key, caller)
        epsilon = jax.random.uniform(key, (n,), dtype=real.dtype)
    elif jnp.shape(epsilon) != (n,):
        raise ValueError(f"{caller}: epsilon must have shape ({n},), got {jnp.shape(epsilon)}.")
    eps = jnp.reshape(epsilon, (n,) + (1,) * (real.ndim - 1)).astype(real.dtype)
    x_hat = eps * real + (1 - eps) * fake
    g = _input_grads(critic, params, x_hat, args, caller)
    norms = jnp.sqrt(_sq_norm_per_example(g) + jnp.finfo(g.dtype).tiny)
    return weight * jnp.mean((norms - 1.0) ** 2)


def r1(critic: Callable, params: Any, real: jax.Array, *args: Any, gamma: float = 10.0):
    """The R1 penalty (Mescheder et al. 2018): ``γ/2 · mean_i ‖∇D(real_i)‖²`` on real data.

    Args:
      critic: ``critic(params, x, *args)`` returning one score per example.
      params: the critic's parameters.
      real: real samples, leading batch axis.
      *args: further critic arguments.
      gamma: γ.

    Returns:
      A scalar. For StyleGAN2's lazy regularisation, wrap it with `lazy`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> critic = lambda w, x: x @ w
      >>> float(fgrad.penalties.r1(critic, jnp.array([3.0, 4.0]), jnp.ones((4, 2))))  # 5 * 25
      125.0

    References:
      Mescheder, Geiger, Nowozin, "Which training methods for GANs do actually
      converge?", 2018.
    """
    caller = "fgrad.penalties.r1"
    _checks.real_number(gamma, "gamma", caller)
    _batch_of(real, caller, "real")
    return 0.5 * gamma * _mean_sq_input_grad(critic, params, real, args, caller)


def r2(critic: Callable, params: Any, fake: jax.Array, *args: Any, gamma: float = 10.0):
    """The R2 penalty (Mescheder et al. 2018): `r1` on generated samples,
    ``γ/2 · mean_i ‖∇D(fake_i)‖²``."""
    caller = "fgrad.penalties.r2"
    _checks.real_number(gamma, "gamma", caller)
    _batch_of(fake, caller, "fake")
    return 0.5 * gamma * _mean_sq_input_grad(critic, params, fake, args, caller)


def lazy(penalty: Callable[P, Any], every: int) -> Callable[Concatenate[Any, P], jax.Array]:
    """Lazy regularisation (Karras et al. 2020, StyleGAN2): the penalty only on every
    ``every``-th step, multiplied by ``every`` so its average strength is unchanged.

    Args:
      penalty: a penalty function, e.g. ``functools.partial(fgrad.penalties.r1, critic)``.
      every: the interval k (StyleGAN2 uses 16).

    Returns:
      ``f(step, *args, **kwargs)``: ``every * penalty(*args, **kwargs)`` when
      ``step % every == 0``, else 0; under ``jit`` the penalty is only computed on those
      steps (``lax.cond``).

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> critic = lambda w, x: x @ w
      >>> lazy_r1 = fgrad.penalties.lazy(fgrad.penalties.r1, every=4)
      >>> [float(lazy_r1(s, critic, jnp.array([3.0, 4.0]), jnp.ones((2, 2)))) for s in (0, 1)]
      [500.0, 0.0]
    """
    _checks.positive_int(every, "every", "fgrad.penalties.lazy")
    if not callable(penalty):
        raise TypeError(
            "fgrad.penalties.lazy: penalty must be a function, e.g. "
            f"functools.partial(fgrad.penalties.r1, critic); got {type(penalty).__name__}."
        )

    def wrapped(step, *args, **kwargs):
        out = jax.eval_shape(lambda: penalty(*args, **kwargs))
        return jax.lax.cond(
            jnp.asarray(step) % every == 0,
            lambda: (every * penalty(*args, **kwargs)).astype(out.dtype),
            lambda: jnp.zeros((), out.dtype),
        )

    return wrapped


def _widest_float(leaves: list) -> Any:
    """The widest floating dtype among ``leaves`` (float32 for none): the precision the
    caller gave, without relying on implicit promotion (strict mode refuses it)."""
    dts = [jnp.dtype(jnp.result_type(x)) for x in leaves]
    dts = [d for d in dts if jnp.issubdtype(d, jnp.floating)]
    return max(dts, key=lambda d: jnp.finfo(d).bits, default=jnp.dtype(jnp.float32))


def _safe_norm(sq: jax.Array) -> jax.Array:
    """``sqrt(sq)`` whose derivative at ``sq = 0`` is 0 (PyTorch's ``norm`` backward at a
    zero vector), not ``inf * 0 = NaN``."""
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, jnp.ones_like(sq))), jnp.zeros_like(sq))


def _grad_leaves_norm(g: Any) -> jax.Array:
    """The 2-norm of all leaves of ``g``, in their widest dtype (sums of squares of
    half-precision leaves accumulated in float32, then cast back)."""
    leaves = jax.tree.leaves(g)
    out = _widest_float(leaves)
    acc = out if jnp.finfo(out).bits >= 32 else jnp.dtype(jnp.float32)
    sq = sum((jnp.sum(jnp.square(leaf.astype(acc))) for leaf in leaves), jnp.zeros((), acc))
    return _safe_norm(sq).astype(out)


def gradient_norm(
    fn: Callable,
    params: PyTree,
    *batch: Any,
    method: Literal["exact", "finite_difference"] = "exact",
    r: float = 0.01,
) -> jax.Array:
    """The parameter-gradient norm penalty ``‖∇θ L(θ)‖₂`` (Zhao et al. 2022).

    Its gradient is ``H g / ‖g‖`` with ``g = ∇L``. ``method="exact"`` gets it by double
    backprop. ``method="finite_difference"`` uses the paper's two-gradient approximation
    ``(∇L(θ + r g/‖g‖) - ∇L(θ)) / r``: one extra gradient instead of a Hessian-vector
    product. Its error is first order in ``r``: the difference from the exact gradient
    is ``(r/2) ∇³L[ĝ, ĝ] + O(r²)``, so it shrinks linearly with ``r`` until float
    rounding (about ``eps·‖g‖/r``) takes over; ``r = 0.01`` (the paper's choice) is
    within 1% of the exact gradient on the test suite's models in float32.

    Args:
      fn: ``fn(params, *batch) -> scalar`` training loss ``L``.
      params: the parameters.
      *batch: further arguments of ``fn``.
      method: ``"exact"`` or ``"finite_difference"``.
      r: the finite-difference step (``"finite_difference"`` only).

    Returns:
      The scalar ``‖∇L‖``; add ``λ`` times it to the loss.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> loss = lambda w: jnp.sum(w ** 4) / 4  # ∇L = w³
      >>> w = jnp.array([1.0, 2.0])
      >>> round(float(fgrad.penalties.gradient_norm(loss, w)) ** 2, 3)  # 1 + 64
      65.0

    References:
      Zhao, Zhang, Hu, "Penalizing gradient norm for efficiently improving generalization
      in deep learning", ICML 2022.
    """
    caller = "fgrad.penalties.gradient_norm"
    _checks.require_float_tree(params, caller, "params")
    scalar = lambda p: jnp.reshape(
        _checks.scalar_output(fn(p, *batch), caller, "gradient_norm needs the scalar loss."), ()
    )
    if method == "exact":
        return _grad_leaves_norm(jax.grad(scalar)(params))
    if method != "finite_difference":
        raise ValueError(
            f"{caller}: method must be 'exact' or 'finite_difference', got {method!r}."
        )
    if isinstance(r, jax.core.Tracer):
        if not (jnp.ndim(r) == 0 and jnp.issubdtype(jnp.result_type(r), jnp.floating)):
            raise TypeError(
                f"{caller}: r must be a positive float (a scalar), got a traced "
                f"{jnp.result_type(r)} array of shape {jnp.shape(r)}."
            )
    else:
        _checks.real_number(r, "r (the finite-difference step)", caller)
        if not float(r) > 0:
            raise ValueError(f"{caller}: r must be a positive float, got {r!r}.")
    return _fd_norm(scalar, jnp.asarray(r), params)


def _fd_norm(scalar: Callable, r: jax.Array, params: Any) -> jax.Array:
    """The norm, whose custom backward pass is the two-gradient finite difference; ``r``
    may be traced (it gets no gradient)."""

    @jax.custom_vjp
    def norm(p, r):
        return _grad_leaves_norm(jax.grad(scalar)(p))

    def fwd(p, r):
        g = jax.grad(scalar)(p)
        n = _grad_leaves_norm(g)
        return n, (p, g, n, r)

    def bwd(res, ct):
        p, g, n, r = res
        # At a stationary point g = 0 the unit vector is taken as 0: the shifted gradient
        # equals g and the cotangent is 0, PyTorch's norm backward at a zero vector.
        safe_n = jnp.where(n > 0, n, jnp.ones_like(n))
        unit = jax.tree.map(lambda x: x / safe_n.astype(x.dtype), g)
        shifted = jax.tree.map(lambda a, u: a + r.astype(a.dtype) * u, p, unit)
        g2 = jax.grad(scalar)(shifted)
        cts = jax.tree.map(lambda a, b: ct.astype(a.dtype) * (a - b) / r.astype(a.dtype), g2, g)
        return cts, jnp.zeros_like(r)

    norm.defvjp(fwd, bwd)
    return norm(params, r)


def jacobian_norm(
    fn: Callable,
    params: PyTree,
    x: jax.Array,
    *args: Any,
    key: Any = None,
    projections: int = 1,
    vectors: jax.Array | None = None,
) -> jax.Array:
    """Jacobian regularisation (Hoffman et al. 2019): a random-projection estimate of
    ``mean_i ‖J_i‖_F²``, ``J_i = ∂fn(x)_i / ∂x_i``.

    ``‖J‖_F² = C · E_v[‖vᵀJ‖²]`` for ``v`` uniform on the unit sphere of the ``C``
    outputs; each projection costs one vector-Jacobian product.

    Args:
      fn: ``fn(params, x, *args)`` returning per-example outputs, shape ``(batch, C)``.
      params: the parameters.
      x: inputs with a leading batch axis.
      *args: further arguments of ``fn``.
      key: PRNG key for the projections (keyword-only).
      projections: the number of random projections (the paper uses 1).
      vectors: the projection vectors themselves, shape ``(projections, batch, C)``, each
        of unit norm per example, instead of ``key``. Concrete vectors of another norm are
        refused; traced vectors (under ``jit``) cannot be checked and must be unit-norm.

    Returns:
      A scalar: the estimate of the per-example squared Frobenius norm, averaged.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> fn = lambda w, x: x @ w  # J = wᵀ: ‖J‖_F² = 0² + 1² + ... + 5² = 55
      >>> w = jnp.arange(6.0).reshape(3, 2)
      >>> est = fgrad.penalties.jacobian_norm(fn, w, jnp.ones((50, 3)), key=jax.random.key(0),
      ...                                     projections=50)
      >>> 45 < float(est) < 65
      True

    References:
      Hoffman, Roberts, Yaida, "Robust learning with Jacobian regularization", 2019.
    """
    caller = "fgrad.penalties.jacobian_norm"
    if key is None and vectors is None:
        _no_positional_key(args, caller, "fn")
    n = _batch_of(x, caller)
    out, pullback = jax.vjp(lambda x_: fn(params, x_, *args), x)
    if jnp.ndim(out) != 2 or out.shape[0] != n:
        raise ValueError(
            f"{caller}: fn must return per-example outputs of shape ({n}, C), got {jnp.shape(out)}."
        )
    c = out.shape[1]
    if vectors is None:
        if key is None:
            raise TypeError(
                f"{caller}: pass key=jax.random.key(seed) for the random projections (or "
                "vectors= to give them)."
            )
        _checks.require_prng_key(key, caller)
        _checks.positive_int(projections, "projections", caller)
        v = jax.random.normal(key, (projections, n, c), out.dtype)
        vectors = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    elif jnp.shape(vectors)[1:] != (n, c):
        raise ValueError(
            f"{caller}: vectors must have shape (projections, {n}, {c}), got {jnp.shape(vectors)}."
        )
    elif not isinstance(vectors, jax.core.Tracer):
        norms = np.linalg.norm(np.asarray(vectors, np.float64), axis=-1)
        tol = max(1e-5, 10 * float(jnp.finfo(jnp.result_type(vectors, jnp.float32)).eps))
        if norms.size and not np.all(np.abs(norms - 1) <= tol):
            raise ValueError(
                f"{caller}: each vector must have unit norm per example (the estimate scales "
                f"with its squared norm), got norms from {np.min(norms):.6g} to "
                f"{np.max(norms):.6g}. "
                "Divide by jnp.linalg.norm(vectors, axis=-1, keepdims=True)."
            )
    rows = jax.vmap(lambda v: pullback(v.astype(out.dtype))[0])(vectors)  # (P, n, ...)
    per = jax.vmap(_sq_norm_per_example)(rows)  # (P, n)
    return c * jnp.mean(per)
