"""fgrad.per_example: per-example gradients, norms, clipped means and moments, against
vmap(grad) in float64, Opacus and BackPACK on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgrad import per_example as pe
from helpers import assert_tree_allclose

TOL = {"rtol": 1e-10, "atol": 1e-10}


def _ce(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]


def mlp(p, b):
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    return _ce(h @ p["w2"] + p["b2"], b["y"])


def cnn(p, b):
    h = jax.lax.conv_general_dilated(
        b["x"], p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(h + p["kb"]).mean(axis=(1, 2))
    return _ce(h @ p["w"] + p["b"], b["y"])


def _layer_norm(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * scale + bias


def transformer(p, b):
    """Token inputs, one attention head, an MLP, LayerNorm, output tied to the embedding."""
    e = p["emb"][b["ids"]] + p["pos"]  # (B, T, D)
    h = _layer_norm(e, p["ln_s"], p["ln_b"])
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
    att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 2.0, axis=-1)
    e = e + jnp.einsum("bts,bsd->btd", att, v) @ p["wo"]
    e = e + jnp.tanh(e @ p["m1"] + p["m1b"]) @ p["m2"]
    logits = e @ p["emb"].T  # tied output projection
    return _ce(logits, b["y"]).mean(-1)


def rnn(p, b):
    """An RNN in lax.scan over time: the recurrent weight is used at every step."""

    def step(h, x_t):
        h = jnp.tanh(h @ p["wh"] + x_t @ p["wx"] + p["bh"])
        return h, None

    h0 = jnp.zeros((b["x"].shape[0], p["wh"].shape[0]), b["x"].dtype)
    h, _ = jax.lax.scan(step, h0, jnp.swapaxes(b["x"], 0, 1))
    return _ce(h @ p["wo"], b["y"])


def _normal(rng, shapes):
    return {k: jnp.asarray(rng.normal(size=s) * 0.5) for k, s in shapes.items()}


def _case(name):
    rng = np.random.default_rng(len(name))
    b = 3
    if name == "mlp":
        p = _normal(rng, {"w1": (4, 5), "b1": (5,), "w2": (5, 3), "b2": (3,)})
        batch = {"x": jnp.asarray(rng.normal(size=(b, 4))), "y": jnp.array([0, 2, 1])}
        return mlp, p, batch
    if name == "cnn":
        p = _normal(rng, {"k": (2, 2, 2, 3), "kb": (3,), "w": (3, 2), "b": (2,)})
        batch = {"x": jnp.asarray(rng.normal(size=(b, 4, 4, 2))), "y": jnp.array([0, 1, 1])}
        return cnn, p, batch
    if name == "transformer":
        d, t, v = 4, 3, 6
        shapes = {"emb": (v, d), "pos": (t, d), "ln_s": (d,), "ln_b": (d,), "wq": (d, d)}
        shapes |= {"wk": (d, d), "wv": (d, d), "wo": (d, d), "m1": (d, 8), "m1b": (8,)}
        shapes |= {"m2": (8, d)}
        p = _normal(rng, shapes)
        ids = jnp.asarray(rng.integers(0, v, size=(b, t)))
        ids = ids.at[0, 1].set(ids[0, 0])  # a repeated token: the embedding's Gram cross term
        return transformer, p, {"ids": ids, "y": jnp.asarray(rng.integers(0, v, size=(b, t)))}
    p = _normal(rng, {"wh": (3, 3), "wx": (2, 3), "bh": (3,), "wo": (3, 2)})
    batch = {"x": jnp.asarray(rng.normal(size=(b, 5, 2))), "y": jnp.array([1, 0, 1])}
    return rnn, p, batch


def _reference(loss_fn, p, batch):
    """vmap(grad) written out: per-example gradients, then every statistic from them."""
    one = lambda p, ex: loss_fn(p, jax.tree.map(lambda x: x[None], ex))[0]
    g = jax.vmap(jax.grad(one), in_axes=(None, 0))(p, batch)
    sq = jax.tree.map(lambda x: (x**2).reshape(x.shape[0], -1).sum(1), g)
    norms = jnp.sqrt(sum(jax.tree.leaves(sq)))
    c = jnp.minimum(0.7 / (norms + 1e-6), 1.0)
    clipped = jax.tree.map(lambda x: jnp.tensordot(c, x, axes=1) / x.shape[0], g)
    mean = jax.tree.map(lambda x: x.mean(0), g)
    var = jax.tree.map(lambda x: (x**2).mean(0) - x.mean(0) ** 2, g)
    return g, norms, jax.tree.map(jnp.sqrt, sq), clipped, mean, var


def _ours(loss_fn, p, batch, method):
    g = pe.grads(loss_fn, p, batch, method=method)
    norms, leaf_norms = pe.grad_norms(loss_fn, p, batch, method=method, per_leaf=True)
    clipped = pe.clipped_grad(loss_fn, p, batch, 0.7, method=method)
    mean, var = pe.moments(loss_fn, p, batch, method=method)
    return g, norms, leaf_norms, clipped, mean, var


@pytest.mark.parametrize(
    "name,methods",
    [
        ("mlp", ("ghost", "vmap")),
        ("cnn", ("ghost",)),
        ("transformer", ("ghost",)),
        ("rnn", ("ghost",)),
    ],
)
def test_every_statistic_equals_vmap_grad_in_float64(name, methods):
    with jax.enable_x64(True):
        loss_fn, p, batch = _case(name)
        p = jax.tree.map(lambda x: x.astype(jnp.float64), p)
        batch = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype.kind == "f" else x, batch)
        ref = jax.jit(_reference, static_argnums=0)(loss_fn, p, batch)
        for method in methods:
            got = jax.jit(_ours, static_argnums=(0, 3))(loss_fn, p, batch, method)
            assert_tree_allclose(got, ref, **TOL)
