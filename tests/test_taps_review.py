"""Review findings on taps: each case against a closed form."""

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
