"""fgrad.accumulate: micro-batch gradients equal full-batch ones, flat memory, sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fgrad
from helpers import assert_tree_allclose, cpu_data_parallel

D, W, C = 6, 16, 4


def make(n, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(r.normal(size=(D, W)) / 2, dtype),
        "b1": jnp.zeros(W, dtype),
        "w2": jnp.asarray(r.normal(size=(W, C)) / 4, dtype),
    }
    batch = {
        "x": jnp.asarray(r.normal(size=(n, D)), dtype),
        "y": jnp.asarray(r.integers(0, C, n), jnp.int32),
    }
    return params, batch


def rows(batch, start, stop):
    return jax.tree.map(lambda x: x[start:stop], batch)


def loss_fn(p, b):
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"], b["y"]).mean()


@pytest.fixture(scope="module")
def full():
    params, batch = make(24)
    return params, batch, jax.value_and_grad(loss_fn)(params, batch)


@pytest.mark.parametrize(
    "kw",
    [
        {"microbatches": 1},
        {"microbatches": 4},
        {"microbatch_size": 5},
        {"microbatch_size": 24},
        {"microbatches": 4, "split": "contiguous"},
        {"microbatch_size": 5, "split": "contiguous"},
    ],
)
def test_equals_full_batch_mean_gradient(full, kw):
    params, batch, (value, grad) = full
    got_value, got = jax.jit(lambda p, b: fgrad.accumulate(loss_fn, p, b, **kw))(params, batch)
    assert_tree_allclose(got_value, value)
    assert_tree_allclose(got, grad)


@pytest.mark.parametrize("split", ["strided", "contiguous"])
def test_which_examples_each_microbatch_holds(split):
    """Each micro-batch's loss is the mean of its examples' indices and its weight (count)
    the first index plus one, so the weighted mean tells which examples went where."""
    k, m = 3, 4
    batch = {"i": jnp.arange(k * m, dtype=jnp.float32)}
    fn = lambda p, b: jnp.mean(b["i"]) + 0.0 * p
    count = lambda b: b["i"][0] + 1.0
    value, _ = fgrad.accumulate(
        fn, jnp.float32(0.0), batch, microbatches=k, count=count, split=split
    )
    idx = np.arange(k * m).reshape((m, k) if split == "strided" else (k, m))
    groups = idx.T if split == "strided" else idx
    w = groups[:, 0] + 1.0
    np.testing.assert_allclose(value, np.sum(w * groups.mean(axis=1)) / np.sum(w), rtol=1e-6)


def test_unrolled_loop_gives_the_same_result(full):
    params, batch, (value, grad) = full
    for unroll in (True, 2):
        v, g = fgrad.accumulate(loss_fn, params, batch, microbatches=4, unroll=unroll)
        assert_tree_allclose((v, g), (value, grad))


def test_smaller_last_microbatch_is_weighted_exactly(full):
    """24 = 4 * 5 + 4: the last micro-batch has 4 examples and weight 4/24, not 1/5."""
    params, batch, (value, grad) = full
    v, g = jax.jit(lambda p, b: fgrad.accumulate(loss_fn, p, b, microbatch_size=5))(params, batch)
    assert_tree_allclose((v, g), (value, grad))
    naive = jnp.mean(jnp.stack([loss_fn(params, rows(batch, i, i + 5)) for i in range(0, 24, 5)]))
    assert abs(float(naive) - float(value)) > 1e-4  # equal weights would be wrong


def test_token_count_weighting():
    """A loss averaged over non-padding tokens: micro-batches weighted by token counts give
    the full-batch token mean."""
    r = np.random.default_rng(3)
    n, t = 12, 5
    params = {"e": jnp.asarray(r.normal(size=(7, 3)), jnp.float32)}
    batch = {
        "ids": jnp.asarray(r.integers(0, 7, (n, t)), jnp.int32),
        "mask": jnp.asarray(r.random((n, t)) < 0.6, jnp.float32).at[:, 0].set(1.0),
    }

    def token_loss(p, b):
        per_token = jnp.sum(p["e"][b["ids"]] ** 2, -1)
        return jnp.sum(per_token * b["mask"]) / jnp.sum(b["mask"])

    count = lambda b: jnp.sum(b["mask"])
    v, g = jax.jit(lambda p, b: fgrad.accumulate(token_loss, p, b, microbatches=4, count=count))(
        params, batch
    )
    assert_tree_allclose((v, g), jax.value_and_grad(token_loss)(params, batch))
    v_ex, _ = fgrad.accumulate(token_loss, params, batch, microbatches=4)
    assert abs(float(v_ex) - float(v)) > 1e-4  # weighting by examples differs here


def test_accumulates_into_grads_and_keeps_frozen_none(full):
    params, batch, (_, grad) = full
    g0 = fgrad.zero_grad(params, trainable={"w1": False, "b1": True, "w2": True})
    _, g1 = fgrad.accumulate(loss_fn, params, batch, microbatches=3, grads=g0)
    _, g2 = fgrad.accumulate(loss_fn, params, batch, microbatches=2, grads=g1)
    assert g2["w1"] is None
    assert_tree_allclose({k: g2[k] for k in ("b1", "w2")}, {k: 2 * grad[k] for k in ("b1", "w2")})


def test_float32_accumulation_for_bfloat16_params():
    params, batch = make(256, seed=5)
    ref = jax.grad(loss_fn)(params, batch)  # float32 reference
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    b16 = {"x": batch["x"].astype(jnp.bfloat16), "y": batch["y"]}
    err = {}
    for name, dt in (("f32", jnp.float32), ("bf16", None)):
        f = jax.jit(
            lambda p, b, dt=dt: fgrad.accumulate(loss_fn, p, b, microbatches=64, accum_dtype=dt)
        )
        _, g = f(p16, b16)
        assert g["w1"].dtype == jnp.bfloat16
        err[name] = max(
            float(jnp.max(jnp.abs(g[k].astype(jnp.float32) - ref[k])) / jnp.max(jnp.abs(ref[k])))
            for k in ref
        )
    assert err["f32"] < 0.03  # bfloat16 inputs and activations, float32 sums
    assert err["bf16"] > 1.5 * err["f32"]


def test_each_sum_keeps_its_precision():
    """Scaling each micro-batch's gradient as it is added keeps every running sum's own
    precision: float64 parameters with a float32 loss sum in float64 (exact shares), and a
    float16 sum adds whole micro-batch sums and divides once, in float32 (shares of small
    gradients would fall into float16's subnormals; a batch above float16's range stays
    finite)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, p = jnp.asarray(rng.normal(size=(11, 3))), jnp.asarray(rng.normal(size=3))
        f64 = lambda p, x: jnp.mean((x @ p) ** 2)
        f32 = lambda p, x: f64(p, x).astype(jnp.float32)
        _, g = fgrad.accumulate(f32, p, x, microbatch_size=3)
        np.testing.assert_allclose(g, jax.grad(f64)(p, x), rtol=1e-13)
    lin = lambda p, b: jnp.mean(b @ p)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(256, 64)) * 1e-4, jnp.float16)
    _, g = fgrad.accumulate(lin, jnp.zeros(64, jnp.float16), x, microbatch_size=4, accum_dtype=None)
    want = np.mean(np.asarray(x, np.float64), axis=0)
    assert np.median(np.abs(np.asarray(g, np.float64) - want) / np.abs(want)) < 1e-2
    big = jnp.ones((70000, 1), jnp.float16)
    _, g = fgrad.accumulate(
        lin, jnp.zeros(1, jnp.float16), big, microbatches=7, accum_dtype=jnp.float16
    )
    assert jnp.isfinite(g).all()


def test_peak_memory_does_not_grow_with_microbatches():
    """XLA's compiled memory analysis at a fixed micro-batch size of 512: the working
    memory of K=64 is within 1.25x of K=1 (the extra is one gradient-sized buffer, the
    micro-batch gradient before it is added), and K=2 to K=64 are flat."""
    m = 512
    params, _ = make(1)
    params = {"w1": jnp.ones((D, 128)), "b1": jnp.zeros(128), "w2": jnp.ones((128, C))}

    def temp(k):
        _, batch = make(k * m)
        f = jax.jit(lambda p, b: fgrad.accumulate(loss_fn, p, b, microbatches=k))
        return f.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    t1, t2, t64 = temp(1), temp(2), temp(64)
    _, big = make(64 * m)
    full = jax.jit(jax.value_and_grad(loss_fn)).lower(params, big).compile()
    assert t64 <= 1.25 * t1, (t1, t64)
    assert t64 <= 1.01 * t2, (t2, t64)
    assert full.memory_analysis().temp_size_in_bytes > 20 * t64


def test_batch_sharded_over_eight_devices(full):
    shard, replicate = cpu_data_parallel("data")
    params, batch, (value, grad) = full
    sharded = shard(batch)
    f = jax.jit(lambda p, b: fgrad.accumulate(loss_fn, p, b, microbatches=3))
    v, g = f(replicate(params), sharded)
    assert len(sharded["x"].sharding.device_set) == 8
    assert_tree_allclose((v, g), (value, grad))
    cpu0 = jax.devices("cpu")[0]
    assert_tree_allclose((v, g), f(jax.device_put(params, cpu0), jax.device_put(batch, cpu0)))


def test_accumulate_then_step_matches_optax_multisteps():
    """k micro-batches accumulated then one step == optax.MultiSteps(every_k_schedule=k)
    fed the same micro-batches one at a time."""
    k, steps = 4, 3
    params, batch = make(k * 8 * steps, seed=7)
    opt = optax.adam(1e-2)
    ms = optax.MultiSteps(opt, every_k_schedule=k)

    @jax.jit
    def ms_step(p, s, mb):
        # optax's internals mix Python floats with int32 step counts: strict promotion
        # (the suite's setting) refuses them. fgrad.step runs optax under standard itself.
        with jax.numpy_dtype_promotion("standard"):
            u, s = ms.update(jax.grad(loss_fn)(p, mb), s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def fg_step(p, s, chunk):
        _, g = fgrad.accumulate(loss_fn, p, chunk, microbatches=k)
        return fgrad.step(opt, p, s, g)

    p_ms, s_ms = params, ms.init(params)
    p_fg, s_fg = params, opt.init(params)
    for s in range(steps):
        chunk = rows(batch, s * k * 8, (s + 1) * k * 8)
        strided = jax.tree.map(lambda x: x.reshape(8, k, *x.shape[1:]), chunk)
        for i in range(k):  # accumulate's micro-batch i: examples i, i+k, ...
            mb = jax.tree.map(lambda x, i=i: x[:, i], strided)
            p_ms, s_ms = ms_step(p_ms, s_ms, mb)
        p_fg, s_fg = fg_step(p_fg, s_fg, chunk)
    assert_tree_allclose(p_fg, p_ms)


def test_errors(full):
    params, batch, _ = full
    with pytest.raises(ValueError, match="split must be 'strided' or 'contiguous', got 'rows'"):
        fgrad.accumulate(loss_fn, params, batch, microbatches=2, split="rows")
    with pytest.raises(ValueError, match="cannot be split into 5 equal micro-batches"):
        fgrad.accumulate(loss_fn, params, batch, microbatches=5)
    with pytest.raises(TypeError, match="exactly one of microbatches= or microbatch_size="):
        fgrad.accumulate(loss_fn, params, batch)
    with pytest.raises(ValueError, match="microbatch_size must be an int between 1 and"):
        fgrad.accumulate(loss_fn, params, batch, microbatch_size=25)
    with pytest.raises(ValueError, match="same leading"):
        fgrad.accumulate(loss_fn, params, {**batch, "y": batch["y"][:5]}, microbatches=2)
    with pytest.raises(TypeError, match=r"must return a scalar .*shape \(12,\)"):
        fgrad.accumulate(lambda p, b: b["x"][:, 0] * p["b1"][0], params, batch, microbatches=2)
    with pytest.raises(ValueError, match=r"grads\['w2'\] is missing"):
        fgrad.accumulate(loss_fn, params, batch, microbatches=2, grads={"w1": None, "b1": None})
    with pytest.raises(TypeError, match=r"count\(microbatch\) must return a scalar"):
        fgrad.accumulate(loss_fn, params, batch, microbatches=2, count=lambda b: b["x"][:, 0])
