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


def _abc(x):
    a = fgrad.tap("a", jnp.sin(x))
    b = fgrad.tap("b", jnp.cos(x))
    return jnp.sum(a) + jnp.sum(jax.lax.stop_gradient(b))


def test_materialize_grads_implies_allow_unused():
    with pytest.raises(ValueError, match=r"fgrad\.grad_intermediates: materialize_grads=True"):
        fgrad.grad_intermediates(_abc, "b", allow_unused=False, materialize_grads=True)
    with pytest.raises(ValueError, match=r"fgrad\.vjp_intermediates: materialize_grads=True"):
        fgrad.vjp_intermediates(_abc, allow_unused=False, materialize_grads=True)
    # names=None: every tap, zeros for the unused one (d sum(sin x)/d a = 1, b unused)
    got = fgrad.grad_intermediates(_abc, materialize_grads=True)(X2)
    assert sorted(got) == ["a", "b"]
    np.testing.assert_array_equal(got["a"], jnp.ones(2))
    np.testing.assert_array_equal(got["b"], jnp.zeros(2))
    assert sorted(fgrad.grad_intermediates(_abc)(X2)) == ["a"]  # default: used taps only


def test_has_aux_error_describes_the_users_output():
    with pytest.raises(TypeError, match=r"returned an array of shape \(\) and dtype float32"):
        fgrad.grad_intermediates(lambda x: jnp.sum(fgrad.tap("h", x)), has_aux=True)(X2)
    with pytest.raises(TypeError, match="returned a tuple of length 3"):
        fgrad.grad_intermediates(lambda x: (jnp.sum(x), x, x), has_aux=True)(X2)


def test_python_numbers_in_aux_come_back_as_python_numbers():
    def f(w, x):
        return jnp.sum(fgrad.tap("h", w * x) ** 2), {"n": 3, "s": 1.5, "ok": True}

    w = jnp.array(2.0)
    (_, ref_aux), _ = jax.value_and_grad(f, has_aux=True)(w, X2)
    (_, aux), grads = fgrad.value_and_grad_intermediates(f, has_aux=True)(w, X2)
    assert aux == ref_aux == {"n": 3, "s": 1.5, "ok": True}
    assert [type(aux[k]) for k in ("n", "s", "ok")] == [int, float, bool]
    np.testing.assert_allclose(grads["h"], 2 * w * X2, rtol=1e-6)
    _, aux2 = fgrad.grad_intermediates(f, has_aux=True)(w, X2)
    assert type(aux2["n"]) is int


def test_vjp_pullback_names_a_wrong_cotangent_dtype():
    out, pb = fgrad.vjp_intermediates(lambda x: fgrad.tap("h", x) * 2)(X2)
    for ct, dt in ((jnp.ones(2, jnp.int32), "int32"), (jnp.ones(2, jnp.complex64), "complex64")):
        with pytest.raises(TypeError, match=f"fgrad.vjp_intermediates: .*dtype {dt}"):
            pb(ct)
    np.testing.assert_array_equal(pb(jnp.ones_like(out))["h"], 2 * jnp.ones(2))


# --- taps inside shard_map sharded along a non-leading axis ------------------------------

W34 = jnp.arange(12.0).reshape(3, 4) / 10
X83 = jnp.arange(24.0).reshape(8, 3) / 10
SCALE = jnp.arange(4.0)[:, None]


def _mesh():
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices("cpu")), ("d",))


def test_shard_map_taps_join_blocks_along_the_sharded_axis():
    from jax.sharding import PartitionSpec as P

    mesh = _mesh()

    def body(w, x):  # batch on axis 0 of x, on axis 1 of the tapped hT
        ht = fgrad.tap("hT", jnp.tanh(x @ w).T)
        return jax.lax.psum(jnp.sum(ht**2 * SCALE), "d")

    def body2(w, xt):  # batch on axis 1 of the input itself
        return jax.lax.psum(jnp.sum(fgrad.tap("h", jnp.tanh(w.T @ xt)) ** 2 * SCALE), "d")

    s1 = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d")), out_specs=P())
    s2 = jax.shard_map(body2, mesh=mesh, in_specs=(P(), P(None, "d")), out_specs=P())
    ht = jnp.tanh(X83 @ W34).T  # (4, 8): the plain values, and 2 ht * SCALE their gradient
    for f, name, xin in ((s1, "hT", X83), (s2, "h", X83.T)):
        g = jax.jit(fgrad.grad_intermediates(f))(W34, xin)[name]
        np.testing.assert_allclose(g, 2 * ht * SCALE, rtol=1e-5)
        np.testing.assert_allclose(fgrad.intermediates(f)(W34, xin)[1][name], ht, rtol=1e-5)


def test_shard_map_tap_with_an_unfollowed_layout_is_refused():
    from jax.sharding import PartitionSpec as P

    def body(x):  # a reshape: fgrad does not follow the sharded axis through it
        return jax.lax.psum(jnp.sum(fgrad.tap("r", x.reshape(1, -1)) ** 2), "d")

    f = jax.shard_map(body, mesh=_mesh(), in_specs=P(None, "d"), out_specs=P())
    with pytest.raises(
        ValueError, match=r"^fgrad\.grad_intermediates: tap 'r' cannot be served: .*which of"
    ):
        fgrad.grad_intermediates(f)(X83.T)
    with pytest.raises(ValueError, match=r"^fgrad\.intermediates: tap 'r' .*local value"):
        fgrad.intermediates(f)(X83.T)
