"""Review findings on taps: each case against a closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgrad

X2 = jnp.array([0.3, -0.7])


def _two_h(x):
    h1 = fgrad.tap("h", jnp.tanh(x))
    h2 = jnp.sin(x)
    fgrad.tap("h", h2)  # a statement-form tap of another value, same name
    return jnp.sum(h1**2) + jnp.sum(h2**3)


def test_statement_tap_beside_used_tap_of_same_name_counts():
    g0, g1 = 2 * jnp.tanh(X2), 3 * jnp.sin(X2) ** 2
    with pytest.raises(ValueError, match="hit 2 times"):
        fgrad.grad_intermediates(_two_h)(X2)
    with pytest.raises(ValueError, match="hit 2 times"):
        fgrad.intermediates(_two_h)(X2)
    split = fgrad.grad_intermediates(_two_h, on_repeat="split")(X2)
    np.testing.assert_allclose(split["h#0"], g0, rtol=1e-6)
    np.testing.assert_allclose(split["h#1"], g1, rtol=1e-6)
    summed = fgrad.grad_intermediates(_two_h, on_repeat="sum")(X2)
    np.testing.assert_allclose(summed["h"], g0 + g1, rtol=1e-6)
    vals = fgrad.intermediates(_two_h, on_repeat="split")(X2)[1]
    np.testing.assert_allclose(vals["h#0"], jnp.tanh(X2), rtol=1e-6)
    np.testing.assert_allclose(vals["h#1"], jnp.sin(X2), rtol=1e-6)


W23 = jnp.array([[0.3, -0.2, 0.1], [0.5, 0.7, -0.4]])
X43 = jnp.arange(12.0).reshape(4, 3) / 10
C42 = jnp.arange(8.0).reshape(4, 2)


def _vmapped_tap(w, x):
    hs = jax.vmap(lambda xi: fgrad.tap("h", jnp.tanh(w @ xi)))(x)  # (4, 2), as vmap stacks
    return jnp.sum(hs * C42)


def test_tap_under_vmap_inside_fn_is_stacked_as_vmap_returns_it():
    # The gradient w.r.t. hs is C42; hs itself is tanh(x @ w.T), both (4, 2).
    np.testing.assert_allclose(fgrad.grad_intermediates(_vmapped_tap)(W23, X43)["h"], C42)
    vals = fgrad.intermediates(_vmapped_tap)(W23, X43)[1]["h"]
    np.testing.assert_allclose(vals, jnp.tanh(X43 @ W23.T), rtol=1e-6)
    # batched along axis 1 of the input: still stacked on axis 0
    f_t = lambda w, xt: jnp.sum(
        jax.vmap(lambda xi: fgrad.tap("h", jnp.tanh(w @ xi)), in_axes=1)(xt) * C42
    )
    np.testing.assert_allclose(fgrad.grad_intermediates(f_t)(W23, X43.T)["h"], C42)
