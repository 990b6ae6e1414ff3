"""Curvature estimators for models too large for a dense Hessian.

Every estimator sees the Hessian only through Hessian-vector products (`fgrad.hvp`) of a
loss ``f(params, batch)`` over pytree parameters, so it costs a few gradients per
product and never stores an ``n x n`` matrix. Random probes come from an explicit PRNG
key. Everything is jit-compatible.

References:
  Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines", 1989. Meyer, Musco, Musco, Woodruff, "Hutch++: optimal stochastic
  trace estimation", 2021. Lanczos, 1950; Golub and Meurant, "Matrices, moments and
  quadrature", 1994. Ghorbani, Krishnan, Xiao, "An investigation into neural net
  optimization via Hessian eigenvalue density", 2019 (stochastic Lanczos quadrature).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from fgrad import _checks
from fgrad._ggn import flat_operator
from fgrad._typing import PyTree


class _Op(NamedTuple):
    matvec: Callable[[jax.Array], jax.Array]  # flat vector -> flat H v
    n: int
    dtype: Any  # what the estimator computes in
    unravel: Callable[[jax.Array], Any]  # flat -> a pytree in the parameters' own dtypes
    # the parameters' dtype, what results come back in (None: ``dtype``); a default so that
    # operators built elsewhere with four fields keep working
    out_dtype: Any = None

    @property
    def result_dtype(self) -> Any:
        return self.dtype if self.out_dtype is None else self.out_dtype


def _operator(
    f: Callable,
    params: Any,
    batch: Any,
    caller: str,
    operator: str = "hessian",
    loss_fn: Callable | None = None,
    key: Any = None,
) -> _Op:
    """The curvature operator (the Hessian, the GGN or a Fisher) as a flat operator. ``f``
    always sees the parameters as given; with half-precision parameters (bfloat16,
    float16) the estimator's own linear algebra runs in float32 (QR and eigh have no
    bfloat16 kernels, and Lanczos loses orthogonality at 8 bits), each product taking and
    giving the parameters' dtype; results come back in it."""
    _checks.require_float_tree(params, caller, "params")
    matvec, flat, unravel = flat_operator(operator, f, params, batch, loss_fn, key, caller)
    if flat.size == 0:
        raise ValueError(f"{caller}: params has no entries.")
    given = flat.dtype
    if not _checks.half_precision(given):
        return _Op(matvec, int(flat.size), given, unravel, given)
    work = jnp.dtype(jnp.float32)
    return _Op(
        lambda u: matvec(u.astype(given)).astype(work),
        int(flat.size),
        work,
        lambda u: unravel(u.astype(given)),
        given,
    )


def _require_key(key: Any, caller: str) -> None:
    if key is None:
        raise TypeError(
            f"{caller}: this estimator is random; pass key=jax.random.key(seed) (an explicit "
            "PRNG key, so results are reproducible)."
        )
    _checks.require_prng_key(key, caller)


def _rademacher(key, shape, dtype):
    return jax.random.rademacher(key, shape, dtype=dtype)


_DIAGONAL_CHUNK = 256  # hessian_diagonal's default: bounded memory for large models


class Estimate(NamedTuple):
    """A stochastic estimate and its standard error."""

    value: Any
    stderr: Any


def hessian_diagonal(
    f: Callable,
    params: PyTree,
    *batch: Any,
    method: Literal["exact", "hutchinson"] = "exact",
    key: Any = None,
    samples: int = 100,
    chunk_size: int | None = None,
    operator: str = "hessian",
    loss_fn: Callable | None = None,
) -> Any:
    """The diagonal of the Hessian of ``f(params, *batch)``, shaped like ``params``.

    Args:
      f: ``f(params, *batch) -> scalar``.
      params: a pytree of floating-point arrays.
      *batch: further arguments of ``f``, held fixed.
      method: ``"exact"``: one HVP per parameter with a unit vector, ``chunk_size`` at a
        time (for small models); ``"hutchinson"``: ``E[z ⊙ Hz]`` over ``samples``
        Rademacher probes ``z``, unbiased, with a standard error.
      key: PRNG key (``"hutchinson"`` only).
      samples: number of probes (``"hutchinson"``).
      chunk_size: unit vectors per vectorised batch of HVPs (``"exact"``). The default,
        ``None``, takes at most 256 at a time, so memory does not grow with the square of
        the parameter count; raise it for speed when memory allows, lower it if the
        HVPs of one chunk do not fit.
      operator: the curvature: ``"hessian"`` of ``f``; or, with ``f = model_fn(params,
        x)``, ``loss_fn=`` and the batch ``(x, y)``, the GGN (``"ggn"``, `ggn_vp`), the
        empirical Fisher (``"fisher"``) or the Monte Carlo Fisher (``"fisher_mc"``: one
        draw from ``key``, fixed for every product; see `fisher_vp`).
      loss_fn: ``loss_fn(outputs, y) -> scalar`` (operators other than the Hessian).

    Returns:
      ``"exact"``: the diagonal as a pytree like ``params``. ``"hutchinson"``: an
      `Estimate` ``(value, stderr)`` of such pytrees.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fgrad
      >>> f = lambda p, x: jnp.sum((p["w"] * x) ** 2)
      >>> fgrad.curvature.hessian_diagonal(f, {"w": jnp.ones(3)}, jnp.arange(3.0))
      {'w': Array([0., 2., 8.], dtype=float32)}
    """
    caller = "fgrad.curvature.hessian_diagonal"
    op = _operator(f, params, batch, caller, operator, loss_fn, key)
    if method == "exact":
        if chunk_size is not None:
            _checks.positive_int(chunk_size, "chunk_size", caller)
        idx = jnp.arange(op.n)

        def entry(i):
            e = jnp.zeros(op.n, op.dtype).at[i].set(1)
            return op.matvec(e)[i]

        chunk = min(_DIAGONAL_CHUNK if chunk_size is None else chunk_size, op.n)
        diag = jax.vmap(entry)(idx) if chunk == op.n else jax.lax.map(entry, idx, batch_size=chunk)
        return op.unravel(diag)
    if method == "hutchinson":
        _require_key(key, caller)
        samples = _checks.positive_int(samples, "samples", caller)
        z = _rademacher(key, (samples, op.n), op.dtype)
        terms = z * jax.vmap(op.matvec)(z)
        stderr = jnp.std(terms, axis=0, ddof=1) / jnp.sqrt(samples) if samples > 1 else None
        return Estimate(op.unravel(terms.mean(0)), None if stderr is None else op.unravel(stderr))
    raise ValueError(f"{caller}: method must be 'exact' or 'hutchinson', got {method!r}.")


def _estimate(value: Any, stderr: Any, op: _Op) -> Estimate:
    """A scalar `Estimate` in the parameters' dtype."""
    cast = lambda a: jnp.asarray(a, op.dtype).astype(op.result_dtype)
    return Estimate(cast(value), cast(stderr))


def hessian_trace(
    f: Callable,
    params: PyTree,
    *batch: Any,
    key: Any = None,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    samples: int = 99,
    operator: str = "hessian",
    loss_fn: Callable | None = None,
) -> Estimate:
    """A stochastic estimate of the trace of the Hessian of ``f(params, *batch)``.

    Args:
      f: ``f(params, *batch) -> scalar``.
      params: a pytree of floating-point arrays.
      *batch: further arguments of ``f``, held fixed.
      key: PRNG key.
      method: ``"hutchinson"``: the mean of ``zᵀHz`` over Rademacher ``z``;
        ``"hutch++"``: Meyer et al.'s estimator, which takes the trace of the top of the
        spectrum exactly from a sketch and applies Hutchinson only to the rest, so its
        error falls as 1/samples instead of 1/sqrt(samples).
      samples: the number of Hessian-vector products (for Hutch++, split in three).
      operator: the curvature: ``"hessian"`` of ``f``; or, with ``f = model_fn(params,
        x)``, ``loss_fn=`` and the batch ``(x, y)``, the GGN (``"ggn"``, `ggn_vp`), the
        empirical Fisher (``"fisher"``) or the Monte Carlo Fisher (``"fisher_mc"``: one
        draw from ``key``, fixed for every product; see `fisher_vp`).
      loss_fn: ``loss_fn(outputs, y) -> scalar`` (operators other than the Hessian).

    Returns:
      An `Estimate` ``(value, stderr)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> f = lambda p: jnp.sum(jnp.arange(1.0, 5.0) * p ** 2)  # trace 2+4+6+8 = 20
      >>> est = fgrad.curvature.hessian_trace(f, jnp.ones(4), key=jax.random.key(0), samples=12)
      >>> round(float(est.value), 3)
      20.0
    """
    caller = "fgrad.curvature.hessian_trace"
    _require_key(key, caller)
    samples = _checks.positive_int(samples, "samples", caller)
    op = _operator(f, params, batch, caller, operator, loss_fn, key)
    apply = jax.vmap(op.matvec, in_axes=1, out_axes=1)  # H @ (n, k)
    if method == "hutchinson":
        z = _rademacher(key, (op.n, samples), op.dtype)
        terms = jnp.sum(z * apply(z), axis=0)
        stderr = jnp.std(terms, ddof=1) / jnp.sqrt(samples) if samples > 1 else jnp.nan
        return _estimate(terms.mean(), stderr, op)
    if method == "hutch++":
        k = samples // 3
        if k < 1:
            raise ValueError(f"{caller}: Hutch++ needs samples >= 3, got {samples}.")
        k_s, k_g = jax.random.split(key)
        s = _rademacher(k_s, (op.n, k), op.dtype)
        g = _rademacher(k_g, (op.n, k), op.dtype)
        q, _ = jnp.linalg.qr(apply(s))
        top = jnp.trace(q.T @ apply(q))
        g_perp = g - q @ (q.T @ g)
        terms = jnp.sum(g_perp * apply(g_perp), axis=0)
        stderr = jnp.std(terms, ddof=1) / jnp.sqrt(k) if k > 1 else jnp.nan
        return _estimate(top + terms.mean(), stderr, op)
    raise ValueError(f"{caller}: method must be 'hutch++' or 'hutchinson', got {method!r}.")


def _lanczos(matvec, v0, m: int, key):
    """m steps of Lanczos with full reorthogonalisation from ``v0``.

    Returns (alphas (m,), betas (m-1,), V (m, n)). On breakdown (an invariant subspace),
    continues from a fresh random vector orthogonal to V, with a zero off-diagonal, so T
    stays exact for the subspace found.
    """
    n = v0.size
    v0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((m, n), v0.dtype).at[0].set(v0)
    eps = jnp.finfo(v0.dtype).eps

    def orth(w, basis):
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            w = w - basis.T @ (basis @ w)
        return w

    def step(carry, j):
        basis, alphas, betas = carry
        v = basis[j]
        w = matvec(v)
        alpha = jnp.vdot(v, w)
        w = orth(w, basis)
        beta = jnp.linalg.norm(w)
        broke = beta <= 1e3 * eps * jnp.maximum(jnp.abs(alpha), 1.0)

        def restart():  # only on breakdown: a fresh random direction orthogonal to V
            fresh = orth(jax.random.normal(jax.random.fold_in(key, j), (n,), v.dtype), basis)
            return fresh / jnp.linalg.norm(fresh)

        nxt = jax.lax.cond(broke, restart, lambda: w / beta)
        basis = basis.at[j + 1].set(nxt, mode="drop")  # the last step has no next vector
        alphas = alphas.at[j].set(alpha)
        betas = betas.at[j].set(jnp.where(broke, 0.0, beta))
        return (basis, alphas, betas), None

    init = (basis, jnp.zeros(m, v0.dtype), jnp.zeros(m, v0.dtype))
    (basis, alphas, betas), _ = jax.lax.scan(step, init, jnp.arange(m))
    return alphas, betas[:-1], basis


def _tridiagonal_eigh(alphas, betas):
    t = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    return jnp.linalg.eigh(t)


class Eigen(NamedTuple):
    """Eigenvalues, and eigenvectors as pytrees shaped like the parameters (a leading
    axis of length k on every leaf), or None."""

    values: jax.Array
    vectors: Any


def hessian_eigenvalues(
    f: Callable,
    params: PyTree,
    *batch: Any,
    key: Any = None,
    k: int = 1,
    which: Literal["largest", "smallest"] = "largest",
    iterations: int | None = None,
    return_vectors: bool = False,
    operator: str = "hessian",
    loss_fn: Callable | None = None,
) -> Eigen:
    """The k largest (or smallest) eigenvalues of the Hessian, by Lanczos.

    Lanczos with full reorthogonalisation builds an ``iterations``-dimensional Krylov
    subspace from one random start (``iterations`` HVPs) and returns the extreme Ritz
    values, which converge first. With ``iterations`` equal to the number of parameters
    they are the exact eigenvalues.

    Args:
      f: ``f(params, *batch) -> scalar``.
      params: a pytree of floating-point arrays.
      *batch: further arguments of ``f``, held fixed.
      key: PRNG key for the starting vector.
      k: how many eigenvalues.
      which: ``"largest"`` (algebraically largest first) or ``"smallest"``.
      iterations: Krylov dimension, ``k <= iterations <= n``; default
        ``min(n, max(2k + 20, 40))``.
      return_vectors: also return the eigenvectors (as parameter-shaped pytrees).
      operator: the curvature: ``"hessian"`` of ``f``; or, with ``f = model_fn(params,
        x)``, ``loss_fn=`` and the batch ``(x, y)``, the GGN (``"ggn"``, `ggn_vp`), the
        empirical Fisher (``"fisher"``) or the Monte Carlo Fisher (``"fisher_mc"``: one
        draw from ``key``, fixed for every product; see `fisher_vp`).
      loss_fn: ``loss_fn(outputs, y) -> scalar`` (operators other than the Hessian).

    Returns:
      An `Eigen` ``(values, vectors)``; ``values`` has shape ``(k,)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> f = lambda p: jnp.sum(jnp.arange(1.0, 7.0) * p ** 2)  # eigenvalues 2, 4, ..., 12
      >>> ev = fgrad.curvature.hessian_eigenvalues(f, jnp.ones(6), key=jax.random.key(0), k=2)
      >>> ev.values.round(4)
      Array([12., 10.], dtype=float32)
    """
    caller = "fgrad.curvature.hessian_eigenvalues"
    _require_key(key, caller)
    op = _operator(f, params, batch, caller, operator, loss_fn, key)
    k = _checks.positive_int(k, "k", caller)
    if k > op.n:
        raise ValueError(
            f"{caller}: k={k} is larger than the number of parameters ({op.n}): the Hessian "
            f"has only {op.n} eigenvalues."
        )
    if which not in ("largest", "smallest"):
        raise ValueError(f"{caller}: which must be 'largest' or 'smallest', got {which!r}.")
    m = min(op.n, max(2 * k + 20, 40)) if iterations is None else iterations
    m = _checks.positive_int(m, "iterations", caller)
    if not k <= m <= op.n:
        raise ValueError(
            f"{caller}: iterations must lie between k={k} and the number of parameters "
            f"{op.n}, got {m}."
        )
    k_start, k_restart = jax.random.split(key)
    v0 = jax.random.normal(k_start, (op.n,), op.dtype)
    alphas, betas, basis = _lanczos(op.matvec, v0, m, k_restart)
    theta, y = _tridiagonal_eigh(alphas, betas)  # ascending
    order = jnp.arange(m - 1, m - 1 - k, -1) if which == "largest" else jnp.arange(k)
    values = theta[order]
    vectors = None
    if return_vectors:
        flat = (basis.T @ y[:, order]).T  # (k, n)
        vectors = jax.vmap(op.unravel)(flat)
    return Eigen(values.astype(op.result_dtype), vectors)


class Spectrum(NamedTuple):
    """A stochastic Lanczos quadrature estimate of the Hessian's eigenvalue density.

    ``nodes`` and ``weights`` (shape ``(runs, iterations)``) are the Gauss quadrature
    rule of each run: for any smooth ``g``, ``tr(g(H)) / n ≈ mean over runs of
    Σ weights * g(nodes)``. ``density`` is that rule smoothed by a Gaussian of width
    ``sigma`` and evaluated on ``grid``; it integrates to one.
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array
    sigma: jax.Array

    def moment(self, g: Callable[[jax.Array], jax.Array] = lambda t: t) -> jax.Array:
        """The estimate of ``tr(g(H)) / n`` (default ``g(t) = t``: the mean eigenvalue)."""
        return jnp.mean(jnp.sum(self.weights * g(self.nodes), axis=1))


def hessian_spectrum(
    f: Callable,
    params: PyTree,
    *batch: Any,
    key: Any = None,
    iterations: int = 64,
    runs: int = 8,
    grid_size: int = 512,
    sigma: float | None = None,
    operator: str = "hessian",
    loss_fn: Callable | None = None,
) -> Spectrum:
    """The Hessian's eigenvalue density, by stochastic Lanczos quadrature (SLQ).

    Each of ``runs`` Lanczos runs from a random unit vector gives a Gauss quadrature rule
    (Ritz values as nodes, squared first components of their eigenvectors as weights)
    for the spectral measure seen from that vector; their average, smoothed, estimates the
    density. Costs ``runs * iterations`` HVPs.

    Args:
      f: ``f(params, *batch) -> scalar``.
      params: a pytree of floating-point arrays.
      *batch: further arguments of ``f``, held fixed.
      key: PRNG key.
      iterations: Lanczos steps per run (at most the number of parameters).
      runs: independent starting vectors.
      grid_size: points of the returned density grid.
      sigma: Gaussian smoothing width, a positive number; default (``None``) 1% of the
        spectral range.
      operator: the curvature: ``"hessian"`` of ``f``; or, with ``f = model_fn(params,
        x)``, ``loss_fn=`` and the batch ``(x, y)``, the GGN (``"ggn"``, `ggn_vp`), the
        empirical Fisher (``"fisher"``) or the Monte Carlo Fisher (``"fisher_mc"``: one
        draw from ``key``, fixed for every product; see `fisher_vp`).
      loss_fn: ``loss_fn(outputs, y) -> scalar`` (operators other than the Hessian).

    Returns:
      A `Spectrum`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> f = lambda p: jnp.sum(jnp.arange(1.0, 9.0) * p ** 2)  # eigenvalues 2, ..., 16
      >>> s = fgrad.curvature.hessian_spectrum(f, jnp.ones(8), key=jax.random.key(0),
      ...                                      iterations=8, runs=4)
      >>> s.nodes.shape, round(float(s.density.sum() * (s.grid[1] - s.grid[0])), 3)
      ((4, 8), 1.0)
    """
    caller = "fgrad.curvature.hessian_spectrum"
    _require_key(key, caller)
    op = _operator(f, params, batch, caller, operator, loss_fn, key)
    runs = _checks.positive_int(runs, "runs", caller)
    grid_size = _checks.positive_int(grid_size, "grid_size", caller)
    m = _checks.positive_int(iterations, "iterations", caller)
    if sigma is not None and not isinstance(sigma, jax.core.Tracer):
        _checks.real_number(sigma, "sigma", caller)
        if not 0 < float(sigma) < jnp.inf:
            raise ValueError(
                f"{caller}: sigma, the width of the Gaussian that smooths the density, must "
                f"be a positive finite number, got {sigma!r} (None: 1% of the spectral range)."
            )
    if m > op.n:
        raise ValueError(
            f"{caller}: iterations={m} exceeds the number of parameters ({op.n}); use at "
            f"most {op.n}."
        )

    def one(run_key):
        k_start, k_restart = jax.random.split(run_key)
        v0 = _rademacher(k_start, (op.n,), op.dtype)
        alphas, betas, _ = _lanczos(op.matvec, v0, m, k_restart)
        theta, y = _tridiagonal_eigh(alphas, betas)
        return theta, y[0] ** 2

    nodes, weights = jax.lax.map(one, jax.random.split(key, runs))
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    span = jnp.maximum(hi - lo, jnp.finfo(op.dtype).eps * jnp.maximum(jnp.abs(hi), 1.0))
    width = 0.01 * span if sigma is None else jnp.asarray(sigma).astype(op.dtype)
    grid = jnp.linspace(lo - 5 * width, hi + 5 * width, grid_size, dtype=op.dtype)
    gauss = jnp.exp(-0.5 * ((grid[:, None, None] - nodes) / width) ** 2)
    density = jnp.sum(gauss * weights, axis=(1, 2)) / (runs * width * jnp.sqrt(2 * jnp.pi))
    out = lambda a: a.astype(op.result_dtype)
    return Spectrum(out(grid), out(density), out(nodes), out(weights), out(width))
