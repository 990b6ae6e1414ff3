"""The Hessian's positive semi-definite cousins: generalised Gauss-Newton and Fisher.

For a model ``outputs = model_fn(params, x)`` and a batch-mean loss
``L = loss_fn(outputs, y) = (1/N) Σₙ ℓ(outputsₙ, yₙ)``, the Hessian of ``L`` w.r.t.
``params`` splits as ``Jᵀ H_L J + Σ (∂L/∂outputs) ∇² outputs``. Dropping the second term
leaves the generalised Gauss-Newton matrix ``G = Jᵀ H_L J`` (``J`` the Jacobian of the
outputs, ``H_L`` the Hessian of the loss w.r.t. the outputs), positive semi-definite
whenever the loss is convex in the outputs. The Fisher replaces ``H_L`` by outer products
of output gradients: of the observed targets (the empirical Fisher) or of targets drawn
from the model's predictive distribution (the Monte Carlo Fisher, equal to the GGN in
expectation for the losses below). PyTorch: curvlinops' ``GGNLinearOperator``,
``EFLinearOperator``, ``FisherMCLinearOperator``; BackPACK's ``DiagGGNExact`` and
``DiagGGNMC``.

Every product here is a JVP, a product with a small matrix per example in output space,
and a VJP. The forward pass is linearised once, so repeated products (Lanczos) share it;
where a ``jax.custom_vjp`` refuses forward mode, the JVP is the transpose of the VJP.

References:
  Schraudolph, "Fast curvature matrix-vector products for second-order gradient
  descent", 2002. Martens, "New insights and perspectives on the natural gradient
  method", 2020. Kunstner, Hennig, Balles, "Limitations of the empirical Fisher
  approximation for natural gradient descent", 2019. Dangel, Kunstner, Hennig,
  "BackPACK: packing more into backprop", 2020.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fgrad import _checks
from fgrad._hessian import flat_hvp, forward_refused

_KINDS = ("empirical", "mc")
OPERATORS = ("hessian", "ggn", "fisher", "fisher_mc")


# --- losses that know their predictive distribution ----------------------------------------


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """Softmax cross-entropy over the last axis, averaged over the batch (PyTorch's
    ``CrossEntropyLoss()``): ``L = -(1/N) Σₙ Σ_c yₙ_c log softmax(outputsₙ)_c``.

    ``outputs``: logits ``(N, C)``. ``y``: integer class labels ``(N,)`` or class
    probabilities ``(N, C)``. Its predictive distribution is the categorical
    ``softmax(outputs)``, sampled by `sample`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> logits = jnp.array([[0.0, 0.0], [2.0, 0.0]])
      >>> round(float(fgrad.curvature.cross_entropy(logits, jnp.array([0, 0]))), 4)
      0.41
    """

    name: str = "fgrad.curvature.cross_entropy"

    def check(self, outputs: Any, y: Any, caller: str) -> None:
        o, t = tuple(outputs.shape), jnp.shape(y)
        if len(o) != 2:
            raise ValueError(
                f"{caller}: cross_entropy needs logits of shape (batch, classes), got outputs "
                f"of shape {o}. Flatten extra axes into the batch axis first."
            )
        if jnp.issubdtype(jnp.result_type(y), jnp.integer):
            if t != o[:1]:
                raise ValueError(
                    f"{caller}: integer labels for cross_entropy must have shape (batch,) = "
                    f"{o[:1]}, got {t} (outputs {o})."
                )
        elif t != o:
            raise ValueError(
                f"{caller}: probability targets for cross_entropy must have the outputs' "
                f"shape {o}, got {t}. Pass integer labels of shape {o[:1]} or one-hot rows."
            )

    def __call__(self, outputs: jax.Array, y: jax.Array) -> jax.Array:
        self.check(outputs, y, self.name)
        logp = jax.nn.log_softmax(outputs, axis=-1)
        if jnp.issubdtype(jnp.result_type(y), jnp.integer):
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), 1))
        return -jnp.mean(jnp.sum(y.astype(logp.dtype) * logp, axis=-1))

    def sample(self, key: Any, outputs: jax.Array) -> jax.Array:
        """Labels drawn from ``softmax(outputs)``, one per row."""
        return jax.random.categorical(key, outputs, axis=-1)

    def _hessian_sqrt(self, o: jax.Array, t: Any) -> tuple[jax.Array, jax.Array]:
        """One example's loss Hessian ``m (diag p - p pᵀ)`` (``p = softmax(o)``, ``m = Σ t``,
        1 for a label) as ``S diag(signs) Sᵀ``, in closed form: ``S = √|m| (diag √p -
        p √pᵀ)``, since ``(diag √p - p √pᵀ)(diag √p - √p pᵀ) = diag p - p pᵀ`` when
        ``Σ p = 1``. ``o``: one example's logits ``(C,)``."""
        if jnp.ndim(o) != 1:  # internal: `_loss_sqrt` passes one example at a time
            raise ValueError(
                f"cross_entropy's loss Hessian root takes logits (C,), got {jnp.shape(o)}."
            )
        p = jax.nn.softmax(o)
        r = jnp.sqrt(p)
        m = (
            jnp.ones((), o.dtype)
            if jnp.issubdtype(jnp.result_type(t), jnp.integer)
            else jnp.sum(jnp.asarray(t, o.dtype))
        )
        root = jnp.sqrt(jnp.abs(m)) * (jnp.diag(r) - jnp.outer(p, r))
        return root, jnp.full(o.shape, jnp.sign(m), o.dtype)


@dataclasses.dataclass(frozen=True)
class MeanSquaredError:
    """The mean of squared errors over every element (PyTorch's ``MSELoss()``):
    ``L = (1/(N D)) Σₙ ‖outputsₙ - yₙ‖²`` with ``D`` elements per example.

    Its Hessian per example is ``(2/D) I``; `sample` draws ``y ~ N(outputs, (D/2) I)``,
    the Gaussian whose gradient outer products have that expectation, so the Monte Carlo
    Fisher equals the GGN in expectation (curvlinops' convention).

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> float(fgrad.curvature.mean_squared_error(jnp.ones((2, 2)), jnp.zeros((2, 2))))
      1.0
    """

    name: str = "fgrad.curvature.mean_squared_error"

    def check(self, outputs: Any, y: Any, caller: str) -> None:
        o, t = tuple(outputs.shape), jnp.shape(y)
        if len(o) < 1 or t != o:
            raise ValueError(
                f"{caller}: mean_squared_error needs targets of the outputs' shape, got "
                f"outputs {o} and targets {t}."
            )

    def __call__(self, outputs: jax.Array, y: jax.Array) -> jax.Array:
        self.check(outputs, y, self.name)
        return jnp.mean((outputs - y.astype(outputs.dtype)) ** 2)

    def sample(self, key: Any, outputs: jax.Array) -> jax.Array:
        """Targets drawn from ``N(outputs, (D/2) I)``, ``D`` elements per example."""
        d = max(1, int(jnp.size(outputs) // max(1, jnp.shape(outputs)[0])))
        noise = jax.random.normal(key, jnp.shape(outputs), outputs.dtype)
        return outputs + jnp.sqrt(jnp.asarray(d / 2, outputs.dtype)) * noise

    def _hessian_sqrt(self, o: jax.Array, t: Any) -> tuple[jax.Array, jax.Array]:
        """One example's loss Hessian ``(2/D) I`` as ``S diag(signs) Sᵀ``: ``S = √(2/D) I``
        over the example's ``D`` flattened outputs."""
        del t
        d = jnp.size(o)
        return jnp.sqrt(jnp.asarray(2 / d, o.dtype)) * jnp.eye(d, dtype=o.dtype), jnp.ones(
            d, o.dtype
        )


cross_entropy = CrossEntropy()
mean_squared_error = MeanSquaredError()
_KNOWN = "fgrad.curvature.cross_entropy, fgrad.curvature.mean_squared_error"


def _sampler(loss_fn: Callable, sampler: Callable | None, caller: str) -> Callable:
    if sampler is not None:
        return sampler
    known = getattr(loss_fn, "sample", None)
    if known is None:
        raise ValueError(
            f"{caller}: the Monte Carlo Fisher needs targets drawn from the model's "
            f"predictive distribution, and there is no rule for loss_fn={loss_fn!r}. Use a "
            f"loss fgrad knows ({_KNOWN}), or pass sampler=lambda key, outputs: y_sampled "
            "(targets drawn from the distribution whose negative log-likelihood loss_fn is)."
        )
    return known


def _check_model(model_fn: Callable, params: Any, x: Any, caller: str) -> jax.ShapeDtypeStruct:
    """The shape of ``model_fn(params, x)``, which must be one floating-point array with a
    non-empty leading batch axis."""
    out = jax.eval_shape(model_fn, params, x)
    if not isinstance(out, jax.ShapeDtypeStruct) or not jnp.issubdtype(out.dtype, jnp.floating):
        got = out.dtype if isinstance(out, jax.ShapeDtypeStruct) else jax.tree.structure(out)
        raise TypeError(
            f"{caller}: model_fn(params, x) must return one floating-point array of outputs "
            f"(a leading batch axis), got {got}. Return the logits/predictions alone, as a "
            "float array."
        )
    _check_nonempty(out.shape, caller)
    return out


def _check_nonempty(shape: tuple[int, ...], caller: str) -> None:
    if shape and shape[0] == 0:
        raise ValueError(
            f"{caller}: the batch is empty (outputs of shape {tuple(shape)}); the curvature "
            "of a mean loss needs at least one example."
        )


def _check_batch(loss_fn: Callable, outputs: Any, y: Any, caller: str) -> None:
    _check_nonempty(tuple(outputs.shape), caller)
    check = getattr(loss_fn, "check", None)
    if check is not None:
        check(outputs, y, caller)
        return
    o, t = tuple(outputs.shape), [jnp.shape(leaf) for leaf in jax.tree.leaves(y)]
    if not o or any(not s or s[0] != o[0] for s in t):
        raise ValueError(
            f"{caller}: outputs and targets must share the leading (batch) axis, got outputs "
            f"{o} and targets {t}."
        )


# --- the linearised model --------------------------------------------------------------------


class _Linearized:
    """``outputs``, ``J v`` and ``Jᵀ u`` of ``model_fn(·, x)`` at ``params``, from one
    linearisation (forward residuals shared by every product)."""

    def __init__(self, model_fn: Callable, params: Any, x: Any, caller: str):
        _check_model(model_fn, params, x, caller)
        f = lambda p: model_fn(p, x)
        jvp_program = jax.make_jaxpr(lambda p: jax.jvp(f, (p,), (p,))[1])(params).jaxpr
        if not forward_refused(jvp_program):  # traced, not run
            out, self.jvp = jax.linearize(f, params)
            self._vjp = jax.linear_transpose(self.jvp, params)
        else:  # a custom_vjp refuses forward mode: the JVP is the transpose of the VJP
            out, self._vjp = jax.vjp(f, params)
            back = jax.linear_transpose(self._vjp, out)
            self.jvp = lambda v: back((v,))[0]
        if not isinstance(out, jax.Array) or not jnp.issubdtype(out.dtype, jnp.floating):
            raise TypeError(
                f"{caller}: model_fn(params, x) must return one floating-point array of "
                f"outputs, got {jax.tree.structure(out)}."
            )
        self.out = out

    def vjp(self, u: jax.Array) -> Any:
        return self._vjp(u.astype(self.out.dtype))[0]


def _cast_like(params: Any, v: Any, caller: str) -> Any:
    diff = _checks.first_structure_difference(params, v)
    if diff is not None:
        raise ValueError(f"{caller}: v must have the structure and shapes of params, but v{diff}.")
    return jax.tree.map(lambda p, t: jnp.asarray(t, jnp.result_type(p)), params, v)


def _per_example(loss_fn: Callable) -> Callable:
    """``ℓ(oₙ, yₙ)``: the loss of a batch of one."""
    return lambda o, t: jnp.reshape(loss_fn(o[None], jax.tree.map(lambda leaf: leaf[None], t)), ())


def _output_grads(loss_fn: Callable, out: jax.Array, y: Any) -> jax.Array:
    """``∇ℓ(oₙ, yₙ)`` w.r.t. ``oₙ`` for every example, shaped like ``out``."""
    return jax.vmap(jax.grad(_per_example(loss_fn)))(out, y)


def _rowdot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)


def _bcast(s: jax.Array, like: jax.Array) -> jax.Array:
    return s.reshape(s.shape + (1,) * (like.ndim - 1))


def _fisher_factors(loss_fn, out, y, kind, key, samples, sampler, caller, arg="kind='mc'"):
    """Output-gradient samples ``(S, N, ...)`` whose outer products, averaged over the
    samples and examples, give the Fisher in output space; ``arg``: the user's argument
    that chose the Monte Carlo Fisher, for the error without a key."""
    if kind == "empirical":
        return _output_grads(loss_fn, out, y)[None]
    draw = _sampler(loss_fn, sampler, caller)
    if key is None:
        raise TypeError(
            f"{caller}: {arg} draws targets; pass key=jax.random.key(seed) (an explicit "
            "PRNG key, so results are reproducible)."
        )
    samples = _checks.positive_int(samples, "samples", caller)
    keys = jax.random.split(key, samples)
    drawn = jax.vmap(lambda k: draw(k, jax.lax.stop_gradient(out)))(keys)
    return jax.vmap(lambda t: _output_grads(loss_fn, out, t))(drawn)


def _check_kind(kind: str, caller: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"{caller}: kind must be 'empirical' or 'mc', got {kind!r}.")


# --- operators as matvec factories -----------------------------------------------------------


def ggn_matvec(model_fn, loss_fn, params, x, y, caller) -> Callable[[Any], Any]:
    """``v -> Jᵀ H_L J v`` at fixed ``params, x, y`` (one linearisation shared)."""
    lin = _Linearized(model_fn, params, x, caller)
    _check_batch(loss_fn, lin.out, y, caller)
    grad_l = jax.grad(lambda o: jnp.reshape(loss_fn(o, y), ()))

    def matvec(v):
        u = lin.jvp(v)
        hu = jax.jvp(grad_l, (lin.out,), (u,))[1]
        return lin.vjp(hu)

    return matvec


def fisher_matvec(
    model_fn, loss_fn, params, x, y, kind, key, samples, sampler, caller, arg="kind='mc'"
):
    """``v -> F v`` at fixed ``params, x, y`` (and, for "mc", fixed drawn targets)."""
    _check_kind(kind, caller)
    lin = _Linearized(model_fn, params, x, caller)
    _check_batch(loss_fn, lin.out, y, caller)
    r = _fisher_factors(loss_fn, lin.out, y, kind, key, samples, sampler, caller, arg)
    scale = 1.0 / (r.shape[0] * r.shape[1])

    def matvec(v):
        u = lin.jvp(v)
        w = jnp.sum(jax.vmap(lambda rs: rs * _bcast(_rowdot(rs, u), rs))(r), axis=0)
        return lin.vjp(w * jnp.asarray(scale, w.dtype))

    return matvec


# --- data sets: a mean over micro-batches in one scan ----------------------------------------


def _over_batches(fn: Callable, x: Any, y: Any, microbatches: int | None, caller: str) -> Any:
    """``fn(x, y, i)`` averaged over ``microbatches`` equal strided micro-batches in one
    ``lax.scan`` (memory of one micro-batch); for batch-mean losses this is the operator of
    the whole batch. ``i`` is the micro-batch's position (None: the whole batch)."""
    if microbatches is None:
        return fn(x, y, None)
    n = _checks.batch_size((x, y), caller)
    k, m = microbatches, _checks.equal_split(n, microbatches, caller)
    split = jax.tree.map(lambda a: jnp.reshape(a, (m, k, *a.shape[1:])), (x, y))

    def body(acc, i):
        xb, yb = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 1, False), split)
        out = fn(xb, yb, i)
        return jax.tree.map(jnp.add, acc, out), None

    shapes = jax.eval_shape(lambda a, b: fn(a, b, 0), *jax.tree.map(lambda a: a[:, 0], split))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, jnp.arange(k))
    return jax.tree.map(lambda t: t / jnp.asarray(k, t.dtype), total)


# --- public operators ------------------------------------------------------------------------


def ggn_vp(
    model_fn: Callable,
    loss_fn: Callable,
    params: Any,
    x: Any,
    y: Any,
    v: Any,
    *,
    microbatches: int | None = None,
) -> Any:
    """The generalised Gauss-Newton matrix times a vector, ``Jᵀ H_L J v``.

    With ``J = ∂outputs/∂params`` and ``H_L = ∇²_outputs loss_fn(outputs, y)``, this is
    the Hessian of ``loss_fn(model_fn(params, x), y)`` without the term that carries the
    model's own second derivatives: one JVP, one loss-Hessian product in output space and
    one VJP. It is curvlinops' ``GGNLinearOperator`` (the same scalar loss, so the same
    normalisation).

    Args:
      model_fn: ``model_fn(params, x) -> outputs`` (one array).
      loss_fn: ``loss_fn(outputs, y) -> scalar``, the loss whose Hessian `fgrad.hvp` would
        take (a batch mean for ``microbatches``).
      params: a pytree of floating-point arrays.
      x: the inputs (any pytree).
      y: the targets.
      v: a pytree like ``params``.
      microbatches: average the products of this many equal (strided) micro-batches in
        one ``lax.scan``, so memory holds one micro-batch: the GGN of the whole batch's
        mean loss. A batch sharded over devices stays data-parallel.

    Returns:
      ``G v``, shaped like ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> model = lambda p, x: jnp.tanh(x @ p)
      >>> loss = lambda o, y: 0.5 * jnp.sum((o - y) ** 2)
      >>> p, x, y = jnp.zeros((2, 1)), jnp.array([[1.0, 2.0]]), jnp.array([[1.0]])
      >>> fgrad.curvature.ggn_vp(model, loss, p, x, y, jnp.array([[1.0], [0.0]]))
      Array([[1.],
             [2.]], dtype=float32)

    References:
      Schraudolph, 2002; Martens, 2020.
    """
    caller = "fgrad.curvature.ggn_vp"
    _checks.require_float_tree(params, caller, "params")
    v = _cast_like(params, v, caller)
    return _over_batches(
        lambda xb, yb, i: ggn_matvec(model_fn, loss_fn, params, xb, yb, caller)(v),
        x,
        y,
        microbatches,
        caller,
    )


def fisher_vp(
    model_fn: Callable,
    loss_fn: Callable,
    params: Any,
    x: Any,
    y: Any,
    v: Any,
    *,
    kind: str = "empirical",
    key: Any = None,
    samples: int = 1,
    sampler: Callable | None = None,
    microbatches: int | None = None,
) -> Any:
    """The Fisher matrix times a vector: empirical, or Monte Carlo.

    With ``gₙ = ∇_params ℓ(model_fn(params, xₙ), t)`` the gradient of one example's loss
    ``ℓ`` (``loss_fn`` on a batch of one),

        empirical:  F v = (1/N) Σₙ gₙ gₙᵀ v           (t = yₙ, the observed targets)
        mc:         F v = (1/(N S)) Σₙ Σₛ gₙₛ gₙₛᵀ v   (t ~ p(· | outputsₙ), S samples)

    each computed as ``Jᵀ (Σ rᵣ rᵣᵀ) J v`` from output gradients ``r``: one JVP, one VJP.
    For `cross_entropy` and `mean_squared_error` the Monte Carlo Fisher equals the GGN in
    expectation. Normalisation against curvlinops (``reduction="mean"``): for
    cross-entropy, ``EFLinearOperator`` and ``FisherMCLinearOperator`` equal these; for
    mean-squared error with ``D`` outputs per example, curvlinops' empirical Fisher is
    ``D`` times this one (it sums gradient outer products of the ``N D`` squared errors'
    per-row sums of squares and divides by ``N D``), while its Monte Carlo Fisher equals
    this one (both match the GGN in expectation).

    Args:
      model_fn: ``model_fn(params, x) -> outputs`` (one array, a leading batch axis).
      loss_fn: ``loss_fn(outputs, y) -> scalar``, the batch mean of per-example losses.
      params: a pytree of floating-point arrays.
      x: the inputs.
      y: the targets (a leading batch axis).
      v: a pytree like ``params``.
      kind: ``"empirical"`` (observed targets) or ``"mc"`` (sampled targets).
      key: PRNG key (``"mc"``).
      samples: targets drawn per example (``"mc"``).
      sampler: ``sampler(key, outputs) -> y`` drawing targets from the model's
        predictive distribution, for a loss fgrad has no rule for (``"mc"``).
      microbatches: average over this many equal micro-batches in one ``lax.scan``
        (each micro-batch draws from its own fold of ``key``).

    Returns:
      ``F v``, shaped like ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> model = lambda p, x: x @ p
      >>> p, x, y = jnp.zeros((2, 1)), jnp.array([[1.0, 2.0]]), jnp.array([[1.0]])
      >>> fgrad.curvature.fisher_vp(model, fgrad.curvature.mean_squared_error, p, x, y,
      ...                           jnp.array([[1.0], [0.0]]))
      Array([[4.],
             [8.]], dtype=float32)
    """
    caller = "fgrad.curvature.fisher_vp"
    _checks.require_float_tree(params, caller, "params")
    _check_kind(kind, caller)
    if kind == "mc":
        _sampler(loss_fn, sampler, caller)
    v = _cast_like(params, v, caller)

    def one(xb, yb, i):
        kb = None if key is None or i is None else jax.random.fold_in(key, i)
        kb = key if i is None else kb
        mv = fisher_matvec(model_fn, loss_fn, params, xb, yb, kind, kb, samples, sampler, caller)
        return mv(v)

    return _over_batches(one, x, y, microbatches, caller)


# --- diagonals -----------------------------------------------------------------------------


def _loss_sqrt(loss_fn: Callable, o: jax.Array, t: Any) -> tuple[jax.Array, jax.Array]:
    """``(S, s)``: one example's loss Hessian in output space as ``∇²ℓ = S diag(s) Sᵀ``,
    ``S`` (``(D, D)``) its eigenvectors scaled by ``√|eigenvalue|`` and ``s`` the
    eigenvalues' signs (all ``+1`` or ``0`` for a loss convex in its outputs, such as
    cross-entropy and mean-squared error; kept, not clipped, for any other loss, so the
    GGN stays exactly ``Jᵀ ∇²ℓ J``). Any ``S`` with these products gives the same GGN, its
    diagonal and K-FAC factors: fgrad's losses give theirs in closed form, any other loss
    by an eigendecomposition of its Hessian."""
    # closed forms for fgrad's own losses; not for a subclass, which may compute another
    if type(loss_fn) is CrossEntropy or type(loss_fn) is MeanSquaredError:
        return loss_fn._hessian_sqrt(o, t)
    flat, unravel = ravel_pytree(o)
    h = jax.hessian(lambda f: _per_example(loss_fn)(unravel(f), t))(flat)
    w, u = jnp.linalg.eigh(h)
    return u * jnp.sqrt(jnp.abs(w)), jnp.sign(w)


def ggn_diagonal(
    model_fn: Callable,
    loss_fn: Callable,
    params: Any,
    x: Any,
    y: Any,
    *,
    method: str = "exact",
    key: Any = None,
    samples: int = 1,
    sampler: Callable | None = None,
    microbatches: int | None = None,
) -> Any:
    """The diagonal of the GGN, exactly or by Monte Carlo (BackPACK's ``DiagGGNExact``,
    ``DiagGGNMC``).

    With the loss a batch mean of per-example losses ``ℓₙ`` and ``∇²ℓₙ = Sₙ Sₙᵀ`` in
    output space,

        exact:  diag G = (1/N) Σₙ Σ_c (Jₙᵀ Sₙ[:, c])²
        mc:     diag G ≈ (1/(N S)) Σₙ Σₛ (Jₙᵀ rₙₛ)²,  rₙₛ = ∇ℓ(outputsₙ, ỹₙₛ), ỹ ~ p(· | outputsₙ)

    ``Jₙᵀ`` is the per-example VJP (the model evaluated on one example at a time, so it
    must treat examples independently, e.g. no batch norm in training mode); "exact" costs
    one VJP per output per example.

    Args:
      model_fn: ``model_fn(params, x) -> outputs`` (a leading batch axis).
      loss_fn: ``loss_fn(outputs, y) -> scalar``, the batch mean of per-example losses.
      params: a pytree of floating-point arrays.
      x: the inputs.
      y: the targets.
      method: ``"exact"`` or ``"mc"``.
      key: PRNG key (``"mc"``).
      samples: targets drawn per example (``"mc"``).
      sampler: ``sampler(key, outputs) -> y`` for a loss fgrad has no rule for (``"mc"``).
      microbatches: average over this many equal micro-batches in one ``lax.scan``.

    Returns:
      The diagonal, shaped like ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> model = lambda p, x: x @ p
      >>> p, x, y = jnp.zeros((2, 1)), jnp.array([[1.0, 2.0]]), jnp.array([[1.0]])
      >>> fgrad.curvature.ggn_diagonal(model, fgrad.curvature.mean_squared_error, p, x, y).round(4)
      Array([[2.],
             [8.]], dtype=float32)
    """
    caller = "fgrad.curvature.ggn_diagonal"
    _checks.require_float_tree(params, caller, "params")
    if method not in ("exact", "mc"):
        raise ValueError(f"{caller}: method must be 'exact' or 'mc', got {method!r}.")
    if method == "mc":
        _sampler(loss_fn, sampler, caller)
        if key is None:
            raise TypeError(f"{caller}: method='mc' draws targets; pass key=jax.random.key(seed).")
        samples = _checks.positive_int(samples, "samples", caller)

    def one(xb, yb, i):
        out = _check_model(model_fn, params, xb, caller)
        _check_batch(loss_fn, out, yb, caller)

        def example(xn, yn, kn):
            lin = _Linearized(model_fn, params, jax.tree.map(lambda a: a[None], xn), caller)
            on = lin.out[0]
            if method == "exact":
                root, signs = _loss_sqrt(loss_fn, on, yn)
                cols = root.T.reshape(root.shape[1], *on.shape)  # rows: the columns of S
            else:
                draw = _sampler(loss_fn, sampler, caller)
                t = jax.vmap(lambda k: draw(k, jax.lax.stop_gradient(lin.out)))(
                    jax.random.split(kn, samples)
                )
                cols = jax.vmap(lambda ts: jax.grad(_per_example(loss_fn))(on, ts[0]))(t)
                cols = cols / jnp.sqrt(jnp.asarray(samples, cols.dtype))
                signs = jnp.ones(cols.shape[0], cols.dtype)
            sq = jax.vmap(lambda c: jax.tree.map(jnp.square, lin.vjp(c[None])))(cols)
            return jax.tree.map(lambda a: jnp.tensordot(signs.astype(a.dtype), a, axes=1), sq)

        n = jax.tree.leaves(xb)[0].shape[0]
        kb = (
            jax.random.key(0)
            if method != "mc"
            else key
            if i is None
            else jax.random.fold_in(key, i)
        )
        per = jax.vmap(example)(xb, yb, jax.random.split(kb, n))
        return jax.tree.map(lambda a: jnp.mean(a, axis=0), per)

    return _over_batches(one, x, y, microbatches, caller)


# --- the operator behind every estimator -------------------------------------------------


def flat_operator(
    operator: str,
    f: Callable,
    params: Any,
    batch: tuple,
    loss_fn: Callable | None,
    key: Any,
    caller: str,
):
    """``(matvec, flat, unravel)`` over the raveled parameters for the chosen curvature:
    ``"hessian"`` of ``f(params, *batch)``; ``"ggn"``, ``"fisher"`` (empirical) or
    ``"fisher_mc"`` of ``model_fn=f`` with ``loss_fn`` and ``batch=(x, y)``."""
    if operator == "hessian":
        if loss_fn is not None:
            raise TypeError(
                f"{caller}: loss_fn= is for operator='ggn', 'fisher' or 'fisher_mc' (then f is "
                "model_fn(params, x)); for the Hessian, f is the loss itself."
            )
        return flat_hvp(f, params, batch, caller)
    if operator not in OPERATORS:
        raise ValueError(f"{caller}: operator must be one of {OPERATORS}, got {operator!r}.")
    if loss_fn is None:
        raise TypeError(
            f"{caller}: operator={operator!r} needs loss_fn=loss_fn(outputs, y) -> scalar, with "
            "f = model_fn(params, x) and the batch (x, y)."
        )
    if len(batch) != 2:
        raise TypeError(
            f"{caller}: operator={operator!r} takes the batch as two arguments (x, y), got "
            f"{len(batch)}."
        )
    x, y = batch
    flat, unravel = ravel_pytree(params)
    if operator == "ggn":
        mv = ggn_matvec(f, loss_fn, params, x, y, caller)
    else:
        kind = "empirical" if operator == "fisher" else "mc"
        if kind == "mc" and key is not None:
            key = jax.random.fold_in(key, 0x5EED)
        mv = fisher_matvec(
            f, loss_fn, params, x, y, kind, key, 1, None, caller, "operator='fisher_mc'"
        )

    def matvec(u):
        return ravel_pytree(mv(unravel(u)))[0]

    return matvec, flat, unravel
