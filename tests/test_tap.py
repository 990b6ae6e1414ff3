"""fgrad.tap: an identity that is free outside fgrad and transparent to every transform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import jet

import fgrad
from helpers import assert_tree_allclose


def mlp(w, x, tapped=True):
    t = fgrad.tap if tapped else (lambda name, v: v)
    h = t("h", jnp.tanh(x @ w))
    return jnp.sum(t("o", jnp.sin(h)) ** 2)


W = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
X = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)


def test_identity_on_arrays_and_pytrees():
    tree = {"a": jnp.arange(3.0), "b": (jnp.ones((2, 2)), 2.0)}
    out = fgrad.tap("t", tree)
    assert_tree_allclose(out, tree)
    assert fgrad.tap("empty", {}) == {}


def test_compiles_to_the_same_program_as_no_tap():
    tapped = jax.jit(jax.grad(mlp)).lower(W, X).as_text()
    plain = jax.jit(jax.grad(lambda w, x: mlp(w, x, tapped=False))).lower(W, X).as_text()
    strip = lambda s: [l for l in s.splitlines() if "fgrad" not in l and "loc(" not in l]
    assert "fgrad_tap" not in tapped
    assert len(strip(tapped)) == len(strip(plain))


def test_transparent_to_grad_vmap_jet():
    plain = lambda w, x: mlp(w, x, tapped=False)
    assert_tree_allclose(jax.grad(mlp)(W, X), jax.grad(plain)(W, X))
    assert_tree_allclose(jax.jit(jax.hessian(mlp))(W, X), jax.hessian(plain)(W, X))
    per_ex = jax.vmap(jax.grad(mlp), (None, 0))(W, X)
    assert_tree_allclose(per_ex, jax.vmap(jax.grad(plain), (None, 0))(W, X))
    f = lambda s: fgrad.tap("s", jnp.sin(s))
    _, series = jet.jet(f, (0.3,), ((1.0, 0.0, 0.0),))
    assert_tree_allclose(series, [jnp.cos(0.3), -jnp.sin(0.3), -jnp.cos(0.3)])


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_name(name):
    with pytest.raises(TypeError, match="name must be a non-empty string"):
        fgrad.tap(name, jnp.ones(2))


def test_non_array_leaf():
    with pytest.raises(TypeError, match="every leaf must be an array"):
        fgrad.tap("s", {"a": "text"})
