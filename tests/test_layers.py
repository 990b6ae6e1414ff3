"""The shared layer finder (fgrad._layers): which equations are layers, and that their
taps give back the exact weight gradients (float64, against jax.grad)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgrad
from fgrad import _layers as L
from helpers import assert_tree_allclose


def _model(p, ids, img):
    """Embedding (tied with the output projection), dense in a jit, an RNN in lax.scan,
    a checkpointed conv, a bias, a norm scale."""
    e = p["emb"][ids]  # (T, D)
    h = jax.jit(lambda e: jnp.tanh(e @ p["w"] + p["b"]))(e)

    def body(c, xt):
        return jnp.tanh(c @ p["u"] + xt), c

    c, _ = jax.lax.scan(body, h[0], h)
    logits = (h * p["scale"]) @ p["emb"].T
    conv = jax.checkpoint(
        lambda x: jax.lax.conv_general_dilated(
            x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )(img)
    return jnp.sum(logits**2) + jnp.sum(c**3) + jnp.sum(jnp.sin(conv))


@pytest.fixture(scope="module")
def case():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        shapes = {
            "emb": (7, 3),
            "w": (3, 3),
            "b": (3,),
            "u": (3, 3),
            "scale": (3,),
            "k": (2, 2, 2, 3),
        }
        p = {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}
        ids = jnp.array([1, 2, 2, 5])
        img = jnp.asarray(rng.normal(size=(2, 4, 4, 2)))
        found, _ = L.analyse(_model, p, ids, img)
        yield p, ids, img, found


def test_finds_every_layer_with_its_leaf_kind_and_scan_stack(case):
    p, _, _, found = case
    got = [(l.kind, l.param, l.stack, len(l.chain)) for l in found.layers]
    assert got == [
        ("embed", "['emb']", (), 0),
        ("dense", "['w']", (), 0),
        ("dense", "['u']", (4,), 0),
        ("dense", "['emb']", (), 1),  # the tied projection reads emb through a transpose
        ("conv", "['k']", (), 0),
    ]
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(p)]
    other = {names[i]: uses for i, uses in found.other_uses.items()}
    assert other == {"['b']": ("add",), "['scale']": ("mul",)}
    assert all(l.exclusive for l in found.layers)
    # the tied projection h @ emb.T: h's last axis is contracted, its position axis shared
    assert found.layers[3].input_axes == ((1,), (0,))
    assert found.layers[3].dimension_numbers == (((1,), (0,)), ((), ()))
    # an out-of-bounds id reads a clamped row but its gradient row is dropped: -1
    assert found.layers[0].embed_rows(jnp.array([[1], [9]])).tolist() == [1, -1]


def test_tapped_inputs_and_output_gradients_give_the_weight_gradients(case):
    p, ids, img, found = case
    with jax.enable_x64(True):
        tapped = L.tap_layers(_model, found.layers)
        assert float(tapped(p, ids, img)) == pytest.approx(float(_model(p, ids, img)), rel=1e-14)

        @jax.jit
        def from_taps(p, ids, img):
            grads = fgrad.grad_intermediates(tapped)(p, ids, img)
            _, values = fgrad.intermediates(tapped)(p, ids, img)
            leaves = jax.tree.leaves(p)
            total = collections.defaultdict(float)
            for l in found.layers:
                a, g = values[l.input_tap], grads[l.output_tap]
                assert g.shape == (*l.stack, *l.output.shape)
                one = lambda a, g, l=l: l.weight_grad(a, g, leaves[l.leaf])
                for _ in l.stack:
                    one = jax.vmap(one)
                dw = one(a, g)
                total[l.param] = total[l.param] + dw.reshape(-1, *leaves[l.leaf].shape).sum(0)
            # Gram factors: A^T G is the weight operand's gradient
            w = found.layers[1]
            a2, g2 = w.dense_factors(values[w.input_tap], grads[w.output_tap])
            return dict(total), a2.T @ g2

        total, w_from_factors = from_taps(p, ids, img)
        ref = jax.jit(jax.grad(_model))(p, ids, img)
        assert_tree_allclose(total, {k: ref[k.strip("[]'")] for k in total})
        assert_tree_allclose(w_from_factors, ref["w"])


def test_recording_gives_inputs_and_output_gradients_in_one_pass(case):
    p, ids, img, found = case
    with jax.enable_x64(True):
        tapped = L.tap_layers(_model, found.layers)
        rec_fn = L.recording(_model, found.layers)

        @jax.jit
        def both(p, ids, img):
            grads = fgrad.grad_intermediates(tapped)(p, ids, img)
            _, values = fgrad.intermediates(tapped)(p, ids, img)
            zeros = L.output_zeros(found.layers)
            (_, rec), vjp_fn = jax.vjp(lambda z: rec_fn(z, p, ids, img), zeros)
            (g_out,) = vjp_fn((jnp.ones(()), jax.tree.map(jnp.zeros_like, rec)))
            return grads, values, rec, g_out

        grads, values, rec, g_out = both(p, ids, img)
        for l in found.layers:
            assert_tree_allclose(rec[l.name], values[l.input_tap])
            assert_tree_allclose(g_out[l.name], grads[l.output_tap])


def test_undecomposable_names_the_operation():
    p = {"w": jnp.ones((3, 2)), "v": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    x = jnp.ones((4, 3))

    def f(p, x):
        h = x @ (2.0 * p["w"]) + p["b"]  # w reaches its matmul through a mul
        return jnp.sum(h @ p["v"]) + jnp.sum(p["v"] ** 2)  # v: a layer weight used again

    found, _ = L.analyse(f, p, x)
    keys = ["['b']", "['v']", "['w']"]  # leaf order
    why = {keys[i]: s for i, s in found.undecomposable.items()}
    assert set(why) == {"['v']", "['w']"}  # the bias is fine: its own gradient is cheap
    assert "dot_general" in why["['w']"] and "mul" in why["['w']"]
    assert "integer_pow" in why["['v']"] and "dense" in why["['v']"]
    assert [(l.param, l.exclusive) for l in found.layers] == [("['v']", False)]


def test_a_leaf_stacked_over_scan_steps_is_sliced_per_step():
    """flax.linen.scan's layout: w (L, K, N) scanned over, step l uses w[l]."""

    def f(p, x):
        step = lambda h, w: (jnp.tanh(h @ w), None)
        return jnp.sum(jax.lax.scan(step, x, p["w"])[0] ** 2)

    p, x = {"w": jnp.ones((3, 2, 2)) * 0.3}, jnp.array([[1.0, -2.0]])
    found, _ = L.analyse(f, p, x)
    (layer,) = found.layers
    assert (layer.sliced, layer.stack, found.undecomposable) == (True, (3,), {})
    tapped = L.tap_layers(f, found.layers)
    g = fgrad.grad_intermediates(tapped)(p, x)[layer.output_tap]
    a = fgrad.intermediates(tapped)(p, x)[1][layer.input_tap]
    dw = jax.vmap(lambda a, g: layer.weight_grad(a, g, p["w"]))(a, g)
    assert_tree_allclose(dw, jax.grad(f)(p, x)["w"])
