"""accumulate's default loop on a CNN: which program it builds (convolutions in XLA:CPU's
canonical layout inside a rolled loop), its numbers against PyTorch, and flat memory.
The speed itself is measured by `fgrad bench`, never asserted here."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fgrad
from fgrad._conv_layout import canonical_convs
from helpers import assert_tree_allclose, from_torch

CANONICAL = re.compile(r"dim_labels=(b0f_0io->b0f|b01f_01io->b01f|b012f_012io->b012f)\b")


def cnn_params(c1=4, c2=6, seed=0):
    r = np.random.default_rng(seed)
    return {
        "conv1.weight": r.normal(size=(c1, 3, 3, 3)).astype(np.float32) / 5,
        "conv1.bias": r.normal(size=c1).astype(np.float32) / 10,
        "conv2.weight": r.normal(size=(c2, c1, 3, 3)).astype(np.float32) / 6,
        "conv2.bias": np.zeros(c2, np.float32),
        "fc.weight": r.normal(size=(5, c2)).astype(np.float32) / 3,
        "fc.bias": np.zeros(5, np.float32),
    }


def jax_loss(p, b):  # PyTorch's layouts: NCHW images, OIHW kernels
    conv = lambda x, k, s: jax.lax.conv_general_dilated(x, k, (s, s), ((1, 1), (1, 1)))
    h = jax.nn.relu(conv(b["x"], p["conv1.weight"], 1) + p["conv1.bias"][:, None, None])
    h = jax.nn.relu(conv(h, p["conv2.weight"], 2) + p["conv2.bias"][:, None, None])
    logits = h.mean(axis=(2, 3)) @ p["fc.weight"].T + p["fc.bias"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], axis=1))


def torch_loss(p, b):
    h = F.relu(F.conv2d(b["x"], p["conv1.weight"], p["conv1.bias"], padding=1))
    h = F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"], stride=2, padding=1))
    return F.cross_entropy(F.linear(h.mean(dim=(2, 3)), p["fc.weight"], p["fc.bias"]), b["y"])


def batch_of(n, seed=1):
    r = np.random.default_rng(seed)
    return {
        "x": r.normal(size=(n, 3, 8, 8)).astype(np.float32),
        "y": r.integers(0, 5, n).astype(np.int64),
    }


def jax_tree(tree):
    return {
        k: jnp.asarray(v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in tree.items()
    }


@pytest.fixture(scope="module")
def cnn():
    params, batch = cnn_params(), batch_of(16)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    torch_loss(tp, {k: torch.tensor(v) for k, v in batch.items()}).backward()
    return jax_tree(params), jax_tree(batch), {k: from_torch(v.grad) for k, v in tp.items()}


def conv_labels(compiled_text):
    return re.findall(r"dim_labels=([^,\s]+)", compiled_text)


def test_unroll_values_refused():
    for bad in ("yes", 0, -1, 1.5):
        with pytest.raises(ValueError, match=r"fgrad\.accumulate: unroll must be"):
            fgrad.accumulate(jax_loss, {}, {"x": jnp.ones((2, 1))}, microbatches=1, unroll=bad)


def test_default_loop_is_rolled_with_canonical_convolutions(cnn):
    """The program the default builds: one while loop (no unrolled copies), and on CPU
    every convolution in it, the backward's included, in XLA:CPU's canonical layout,
    where ``unroll=1`` leaves the backward's convolutions non-canonical."""
    params, batch, _ = cnn
    text = {
        u: jax.jit(lambda p, b, u=u: fgrad.accumulate(jax_loss, p, b, microbatches=4, unroll=u))
        .lower(params, batch)
        .compile()
        .as_text()
        for u in ("auto", 1)
    }
    for t in text.values():
        assert len(conv_labels(t)) == 5  # 2 forward, 1 input-gradient, 2 kernel-gradient
        assert " while(" in t
    canonical = [bool(CANONICAL.search("dim_labels=" + d)) for d in conv_labels(text["auto"])]
    assert all(canonical) == (jax.default_backend() == "cpu"), conv_labels(text["auto"])
    assert not all(CANONICAL.search("dim_labels=" + d) for d in conv_labels(text[1]))


@pytest.mark.parametrize("unroll", ["auto", 1])
def test_default_matches_pytorch_full_batch(cnn, unroll):
    params, batch, ref = cnn
    f = jax.jit(lambda p, b: fgrad.accumulate(jax_loss, p, b, microbatches=4, unroll=unroll))
    _, g = f(params, batch)
    assert_tree_allclose(g, ref, rtol=2e-5, atol=2e-6)


def test_peak_memory_flat_in_microbatches_for_a_cnn():
    """XLA's memory analysis at a fixed micro-batch size of 8: K=6 needs no more working
    memory than K=2 under the default, while unrolling grows with K."""
    params = jax_tree(cnn_params(16, 32))

    def temp(k, unroll="auto"):
        f = jax.jit(lambda p, b: fgrad.accumulate(jax_loss, p, b, microbatches=k, unroll=unroll))
        return f.lower(params, jax_tree(batch_of(8 * k))).compile().memory_analysis()

    t2, t6 = temp(2).temp_size_in_bytes, temp(6).temp_size_in_bytes
    assert t6 <= 1.02 * t2, (t2, t6)
    assert temp(6, True).temp_size_in_bytes > 2 * t6


CONVS = {  # (lhs shape, rhs shape, keyword arguments of conv_general_dilated)
    "nchw-stride-pad": (
        (2, 3, 9, 7),
        (4, 3, 3, 2),
        dict(window_strides=(2, 1), padding=((1, 0), (2, 1))),
    ),
    "nhwc-oihw-dilated": (
        (2, 9, 9, 3),
        (4, 3, 3, 3),
        dict(
            window_strides=(1, 1),
            padding="SAME",
            rhs_dilation=(2, 1),
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
        ),
    ),
    "transposed": (
        (2, 3, 5, 5),
        (4, 3, 3, 3),
        dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=(2, 2)),
    ),
    "1d-ncw": ((2, 3, 11), (4, 3, 3), dict(window_strides=(1,), padding="SAME")),
    "3d-ncdhw": ((1, 2, 5, 4, 4), (3, 2, 2, 2, 2), dict(window_strides=(1, 1, 1), padding="SAME")),
    "grouped": (
        (2, 4, 6, 6),
        (6, 2, 3, 3),
        dict(window_strides=(1, 1), padding="SAME", feature_group_count=2),
    ),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_rewrite_gives_the_same_convolution_and_gradients(name):
    """The rewrite against the unrewritten convolution, values and both gradients, in
    float64; and against PyTorch's conv2d for the NCHW case."""
    lhs_shape, rhs_shape, kw = CONVS[name]
    with jax.enable_x64(True):
        r = np.random.default_rng(2)
        x, k = jnp.asarray(r.normal(size=lhs_shape)), jnp.asarray(r.normal(size=rhs_shape))
        conv = lambda x, k: jax.lax.conv_general_dilated(x, k, **kw)
        loss = lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
        both = jax.value_and_grad(loss, argnums=(0, 1))
        assert_tree_allclose(canonical_convs(conv)(x, k), conv(x, k))
        assert_tree_allclose(jax.jit(canonical_convs(both))(x, k), both(x, k))
        # differentiable itself (fgrad's results are): the gradient through the rewrite
        through = jax.grad(lambda x, k: canonical_convs(loss)(x, k), argnums=(0, 1))
        assert_tree_allclose(through(x, k), both(x, k)[1])
        if name == "nchw-stride-pad":
            xt, kt = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(k))
            want = F.conv2d(F.pad(xt, (2, 1, 1, 0)), kt, stride=(2, 1))
            assert_tree_allclose(canonical_convs(conv)(x, k), want)


def test_default_under_vmap_and_differentiated(cnn):
    """The rewritten loop under vmap (two parameter sets) and differentiated itself (a
    loss of the accumulated gradient), against the full-batch gradient."""
    params, batch, _ = cnn
    acc = lambda p: fgrad.accumulate(jax_loss, p, batch, microbatches=2)[1]
    full = lambda p: jax.grad(jax_loss)(p, batch)
    two = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
    assert_tree_allclose(jax.jit(jax.vmap(acc))(two), jax.vmap(full)(two), rtol=2e-5, atol=2e-6)
    norm = lambda g: sum(jnp.sum(x**2) for x in jax.tree.leaves(g))
    assert_tree_allclose(
        jax.jit(jax.grad(lambda p: norm(acc(p))))(params),
        jax.grad(lambda p: norm(full(p)))(params),
        rtol=1e-4,
        atol=1e-6,
    )
