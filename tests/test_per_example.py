"""fgrad.per_example: per-example gradients, norms, clipped means and moments, against
vmap(grad) in float64, Opacus and BackPACK on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fgrad
from fgrad import _per_example
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
    # the weight as the left operand of the matmul: (D, E) x (B, T, D) -> (E, B, T)
    q = jax.lax.dot_general(p["wq"], h, (((0,), (2,)), ((), ()))).transpose(1, 2, 0)
    k, v = h @ p["wk"], h @ p["wv"]
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


def stacked(p, b):
    """Layers stacked on a leading axis and applied by lax.scan over them (the layout of
    flax.linen.scan): step l uses w[l], so the gradient of w stacks the layers'."""

    def layer(h, wb):
        w, bias = wb
        return jnp.tanh(h @ w + bias), None

    h, _ = jax.lax.scan(layer, b["x"], (p["w"], p["b"]))
    return _ce(h @ p["out"], b["y"])


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
        d, t, v = 4, 3, 10  # v·d >= (2t)²: the tied leaf takes the Gram form
        shapes = {"emb": (v, d), "pos": (t, d), "ln_s": (d,), "ln_b": (d,), "wq": (d, d)}
        shapes |= {"wk": (d, d), "wv": (d, d), "wo": (d, d), "m1": (d, 8), "m1b": (8,)}
        shapes |= {"m2": (8, d)}
        p = _normal(rng, shapes)
        ids = jnp.asarray(rng.integers(0, v, size=(b, t)))
        ids = ids.at[0, 1].set(ids[0, 0])  # a repeated token: the embedding's Gram cross term
        return transformer, p, {"ids": ids, "y": jnp.asarray(rng.integers(0, v, size=(b, t)))}
    if name == "stacked":
        p = _normal(rng, {"w": (3, 4, 4), "b": (3, 4), "out": (4, 2)})
        batch = {"x": jnp.asarray(rng.normal(size=(b, 4))), "y": jnp.array([1, 0, 1])}
        return stacked, p, batch
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
        ("stacked", ("ghost",)),
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


# ----------------------------------------------------------------------------------------
# Composition: jit without retrace, micro-batches and fgrad.accumulate, frozen leaves,
# a sharded batch, Flax linen and nnx models.


@pytest.fixture(scope="module")
def mlp6():
    rng = np.random.default_rng(1)
    p = _normal(rng, {"w1": (4, 5), "b1": (5,), "w2": (5, 3), "b2": (3,)})
    batch = {"x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "y": jnp.arange(8) % 3}
    p = jax.tree.map(lambda x: x.astype(jnp.float32), p)
    return p, batch, jax.jit(_reference, static_argnums=0)(mlp, p, batch)


def test_under_jit_traces_once(mlp6):
    p, batch, ref = mlp6
    calls = []

    def loss(p, b):
        calls.append(1)
        return mlp(p, b)

    f = jax.jit(lambda p, b: pe.clipped_grad(loss, p, b, 0.7, with_norms=True))
    g, norms = f(p, batch)
    n = len(calls)
    f(jax.tree.map(lambda x: x + 1, p), jax.tree.map(lambda x: x[::-1], batch))
    assert len(calls) == n  # the second call reuses the compiled program
    assert_tree_allclose(g, ref[3], rtol=1e-5, atol=1e-6)
    assert_tree_allclose(norms, ref[1], rtol=1e-5)


def test_microbatches_concatenate_and_accumulate(mlp6):
    p, batch, ref = mlp6

    @jax.jit
    def run(p, b):
        return (
            pe.grads(mlp, p, b, microbatches=4),
            pe.grad_norms(mlp, p, b, microbatches=2),
            pe.clipped_grad(mlp, p, b, 0.7, microbatches=2, with_norms=True),
            pe.moments(mlp, p, b, microbatches=4),
            # fgrad.accumulate over micro-batches of the clipped surrogate loss
            fgrad.accumulate(pe.clipped_loss(mlp, 0.7), p, b, microbatch_size=3)[1],
        )

    g, norms, (clipped, norms2), (mean, var), accumulated = run(p, batch)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    assert_tree_allclose((g, norms, clipped, mean, var), (ref[0], ref[1], *ref[3:]), **tol)
    assert_tree_allclose(norms2, ref[1], **tol)
    assert_tree_allclose(accumulated, ref[3], **tol)


def test_frozen_leaves_are_excluded_from_norms_and_get_none(mlp6):
    p, batch, ref = mlp6
    trainable = {"w1": False, "b1": False, "w2": True, "b2": True}
    norms, leaf = pe.grad_norms(mlp, p, batch, trainable=trainable, per_leaf=True)
    clipped = pe.clipped_grad(mlp, p, batch, 0.7, trainable=trainable)
    g = ref[0]
    expected = jnp.sqrt(ref[2]["w2"] ** 2 + ref[2]["b2"] ** 2)
    assert leaf["w1"] is None and clipped["b1"] is None
    assert_tree_allclose(norms, expected, rtol=1e-5)
    c = jnp.minimum(0.7 / (expected + 1e-6), 1.0)
    assert_tree_allclose(clipped["w2"], jnp.tensordot(c, g["w2"], axes=1) / 8, rtol=1e-5)


def test_batch_sharded_over_eight_devices(mlp6):
    from helpers import cpu_data_parallel

    p, batch, ref = mlp6
    shard, replicate = cpu_data_parallel("data")
    f = jax.jit(lambda p, b: (pe.grad_norms(mlp, p, b), pe.clipped_grad(mlp, p, b, 0.7)))
    norms, clipped = f(replicate(p), shard(batch))
    assert len(norms.sharding.device_set) == 8
    assert_tree_allclose((norms, clipped), (ref[1], ref[3]), rtol=1e-5, atol=1e-6)


def _flax_batch():
    rng = np.random.default_rng(2)
    return {"ids": jnp.asarray(rng.integers(0, 7, size=(3, 4))), "y": jnp.array([0, 1, 2])}


def _check_norms(loss, params, batch):
    """Ghost norms per leaf against vmap(grad), in one compiled program."""

    @jax.jit
    def both(p, b):
        one = lambda p, ex: loss(p, jax.tree.map(lambda x: x[None], ex))[0]
        g = jax.vmap(jax.grad(one), in_axes=(None, 0))(p, b)
        ref = jax.tree.map(lambda x: jnp.sqrt((x**2).reshape(x.shape[0], -1).sum(1)), g)
        return pe.grad_norms(loss, p, b, method="ghost", per_leaf=True)[1], ref

    got, ref = both(params, batch)
    assert_tree_allclose(got, ref, rtol=2e-4, atol=1e-6)


def test_unmodified_flax_linen_model():
    import flax.linen as nn

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return h + jnp.tanh(nn.Dense(8)(h)), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(7, 8)(ids)
            h = nn.LayerNorm()(h)
            h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
            # two layers stacked by nn.scan: their kernels are one (2, 8, 8) leaf
            scan = nn.scan(Cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            h, _ = scan()(h, None)
            h = nn.relu(nn.Conv(6, (2,))(h))
            return nn.Dense(3)(h.mean(1))

    net = Net()
    batch = _flax_batch()
    params = jax.jit(net.init)(jax.random.key(0), batch["ids"])["params"]
    loss = lambda p, b: _ce(net.apply({"params": p}, b["ids"]), b["y"])
    _check_norms(loss, params, batch)


def test_unmodified_flax_nnx_model():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(7, 8, rngs=rngs)
            self.ln = nnx.LayerNorm(8, rngs=rngs)
            self.att = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)
            self.conv = nnx.Conv(8, 6, (2,), rngs=rngs)
            self.out = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, ids):
            h = self.ln(self.emb(ids))
            h = h + self.att(h)
            return self.out(nnx.relu(self.conv(h)).mean(1))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    batch = _flax_batch()
    loss = lambda s, b: _ce(nnx.merge(graphdef, s)(b["ids"]), b["y"])
    _check_norms(loss, state, batch)


# ----------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_function_and_the_fix(mlp6):
    p, batch, _ = mlp6
    with pytest.raises(ValueError, match=r"grad_norms: loss_fn returned a scalar.*per-example"):
        pe.grad_norms(lambda p, b: mlp(p, b).mean(), p, batch)
    bad = {"x": batch["x"], "y": batch["y"][:5]}
    with pytest.raises(ValueError, match=r"per_example.grads: .*same leading"):
        pe.grads(mlp, p, bad)
    for m in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"clipped_grad: max_norm must be positive"):
            pe.clipped_grad(mlp, p, batch, m)
    with pytest.raises(ValueError, match="method must be one of"):
        pe.moments(mlp, p, batch, method="fast")


def test_ghost_refuses_what_it_cannot_decompose_and_auto_falls_back(mlp6):
    p, batch, _ = mlp6
    # w1 reaches its matmul through a multiplication: not a layer weight
    scaled = lambda p, b: mlp({**p, "w1": p["w1"] * 2.0}, b)
    with pytest.raises(ValueError, match=r"grad_norms: method='ghost'.*\['w1'\].*dot_general.*mul"):
        pe.grad_norms(scaled, p, batch, method="ghost")
    # w2 is a layer weight also used by a penalty inside the per-example loss
    penal = lambda p, b: mlp(p, b) + jnp.sum(p["w2"] ** 2)
    with pytest.raises(ValueError, match=r"\['w2'\] is used by integer_pow"):
        pe.grad_norms(penal, p, batch, method="ghost")
    for fn, odd in ((scaled, "['w1']"), (penal, "['w2']")):
        auto = pe.grad_norms(fn, p, batch, method="auto")
        assert_tree_allclose(auto, _reference(fn, p, batch)[1], rtol=1e-5)
        # auto keeps ghost for the other weight and takes the odd one exactly
        plan = _per_example._run_pass(fn, p, batch, "auto", None, "test").plan
        ghost = {plan.keys[l.leaf] for l in plan.layers}
        assert ghost == {"['w1']", "['w2']"} - {odd}


# ----------------------------------------------------------------------------------------
# Opacus and BackPACK on the same weights (fgrad.interop.torch)


def _torch_cnn():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(27, 3)
    )
    x = torch.randn(4, 2, 4, 4)
    y = torch.tensor([0, 2, 1, 2])
    return net, x, y


def torch_layout_cnn(p, b):
    """The PyTorch Sequential above, on its own weights (PyTorch names and layouts)."""
    h = jax.lax.conv_general_dilated(
        b["x"], p["0.weight"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    h = jax.nn.relu(h + p["0.bias"][:, None, None]).reshape(h.shape[0], -1)
    return _ce(h @ p["3.weight"].T + p["3.bias"], b["y"])


@pytest.fixture(scope="module")
def torch_case():
    from fgrad.interop.torch import to_jax
    from helpers import from_torch

    net, x, y = _torch_cnn()
    p, batch = to_jax(net), {"x": from_torch(x), "y": from_torch(y)}
    del net

    @jax.jit
    def ours(p, b):
        return (
            pe.grads(torch_layout_cnn, p, b, method="ghost"),
            pe.grad_norms(torch_layout_cnn, p, b, method="ghost", per_leaf=True),
            pe.clipped_grad(torch_layout_cnn, p, b, 0.5, method="ghost"),
            pe.moments(torch_layout_cnn, p, b, method="ghost"),
        )

    return ours(p, batch)


TORCH_TOL = {"rtol": 2e-4, "atol": 1e-6}
# Opacus' and BackPACK's hooks fire on models whose inputs need no gradient; PyTorch warns.
HOOK_WARNING = "ignore:Full backward hook is firing"


@pytest.mark.filterwarnings(HOOK_WARNING)
def test_opacus_grad_sample_and_ghost_clipping(torch_case):
    import torch
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    g, (norms, _), clipped, _ = torch_case
    net, x, y = _torch_cnn()
    gsm = GradSampleModule(net, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    grad_sample = {n: p.grad_sample for n, p in gsm._module.named_parameters()}
    assert_tree_allclose(g, grad_sample, **TORCH_TOL)
    gsm._close()

    net, x, y = _torch_cnn()
    ghost = GradSampleModuleFastGradientClipping(
        net, max_grad_norm=0.5, use_ghost_clipping=True, loss_reduction="mean"
    )
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(ghost.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        expected_batch_size=4,
        loss_reduction="mean",
    )
    crit = DPLossFastGradientClipping(ghost, opt, torch.nn.CrossEntropyLoss(), "mean")
    opt.zero_grad()
    crit(ghost(x), y).backward()
    assert_tree_allclose(norms, ghost.get_norm_sample(), **TORCH_TOL)
    opt.step()
    assert_tree_allclose(clipped, {n: p.grad for n, p in net.named_parameters()}, **TORCH_TOL)


@pytest.mark.filterwarnings(HOOK_WARNING)
def test_backpack_batch_grad_l2_variance_sum_grad_squared(torch_case):
    import torch
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, BatchL2Grad, SumGradSquared, Variance

    g, (_, leaf_norms), _, (mean, var) = torch_case
    net, x, y = _torch_cnn()  # fresh: the same weights, no .grad from another test
    net = extend(net)
    loss = extend(torch.nn.CrossEntropyLoss(reduction="sum"))(net(x), y)
    with backpack(BatchGrad(), BatchL2Grad(), Variance(), SumGradSquared()):
        loss.backward()
    named = dict(net.named_parameters())
    get = lambda attr: {n: getattr(p, attr) for n, p in named.items()}
    assert_tree_allclose(g, get("grad_batch"), **TORCH_TOL)
    assert_tree_allclose(jax.tree.map(jnp.square, leaf_norms), get("batch_l2"), **TORCH_TOL)
    assert_tree_allclose(var, get("variance"), **TORCH_TOL)
    assert_tree_allclose(mean, {n: p.grad / 4 for n, p in named.items()}, **TORCH_TOL)
    sgs = jax.tree.map(lambda v, m: 4 * (v + m**2), var, mean)
    assert_tree_allclose(sgs, get("sum_grad_squared"), **TORCH_TOL)


# ----------------------------------------------------------------------------------------
# Benchmark builders: each runs once on a tiny workload and agrees with the others


@pytest.mark.filterwarnings(HOOK_WARNING)
def test_bench_builders_agree_across_frameworks():
    from fgrad.bench import _ops_per_example as ops
    from fgrad.bench._workloads import Workload

    mlp_w = Workload("mlp", "mlp", {"inputs": 5, "width": 6, "depth": 2, "classes": 3}, 4)
    cnn_w = Workload("cnn", "cnn", {"channels": (2, 3), "size": 5, "classes": 3}, 3)
    tr_cfg = {"d_model": 8, "d_ff": 16, "heads": 2, "seq": 3, "classes": 3}
    tr_w = Workload("tr", "transformer", tr_cfg, 3)
    tol = {"rtol": 2e-4, "atol": 1e-6}

    def jax_run(op, impl, w):
        fn, args = ops.JAX[op][impl](impl, w)
        return fn(*args)

    def torch_run(op, impl, w):
        return ops.TORCH[op][impl](impl, w, "cpu")()

    for w in (mlp_w, cnn_w):
        assert ops.APPLIES["grad_norms"](w)
        norms = jax_run("grad_norms", "fgrad", w)
        for impl in ("opacus", "backpack", "torch.func"):
            assert_tree_allclose(norms, torch_run("grad_norms", impl, w), **tol)
    assert_tree_allclose(
        jax_run("grad_norms", "vmap", tr_w), torch_run("grad_norms", "opacus", tr_w), **tol
    )
    clipped = jax_run("clipped_grad", "fgrad", tr_w)
    assert_tree_allclose(clipped, jax_run("clipped_grad", "vmap", tr_w), **tol)
    assert_tree_allclose(clipped, torch_run("clipped_grad", "opacus", tr_w), **tol)
    assert_tree_allclose(clipped, torch_run("clipped_grad", "torch.func", tr_w), **tol)


@pytest.mark.filterwarnings(HOOK_WARNING)
def test_opacus_on_a_layer_applied_twice():
    """A shared weight: Opacus sums the per-example gradients of both uses; fgrad's ghost
    norm is the norm of that sum (cross terms included), not a sum of per-use norms."""
    import torch
    from opacus.grad_sample import GradSampleModule

    from fgrad.interop.torch import to_jax
    from helpers import from_torch

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    torch.manual_seed(0)
    net, x, y = Twice(), torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    p, batch = to_jax(net), {"x": from_torch(x), "y": from_torch(y)}

    def losses(p, b):
        lin = lambda h: h @ p["lin.weight"].T + p["lin.bias"]
        return _ce(
            jnp.tanh(lin(jnp.tanh(lin(b["x"])))) @ p["head.weight"].T + p["head.bias"], b["y"]
        )

    g, norms = jax.jit(
        lambda p, b: (
            pe.grads(losses, p, b, method="ghost"),
            pe.grad_norms(losses, p, b, method="ghost"),
        )
    )(p, batch)
    gsm = GradSampleModule(net, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    grad_sample = {n: q.grad_sample for n, q in net.named_parameters()}
    assert_tree_allclose(g, grad_sample, **TORCH_TOL)
    expected = torch.sqrt(sum(s.flatten(1).pow(2).sum(1) for s in grad_sample.values()))
    assert_tree_allclose(norms, expected, **TORCH_TOL)


@pytest.mark.parametrize("mode", ["fill", "clip", None])
def test_embedding_gram_with_out_of_range_ids(mode):
    """The Gram form follows the lookup's gradient: dropped or clamped rows as JAX's."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        p = {"emb": jnp.asarray(rng.normal(size=(5, 3)))}
        batch = {"ids": jnp.array([[0, 7, 2], [4, 4, -1], [1, 2, 9]])}

        def losses(p, b):
            if mode is None:
                t = p["emb"][b["ids"]]
            else:
                t = jnp.take(p["emb"], b["ids"], axis=0, mode=mode, fill_value=0.0)
            return jnp.sin(t).sum((1, 2)) ** 2

        got = pe.grad_norms(losses, p, batch, method="ghost")
        assert_tree_allclose(got, _reference(losses, p, batch)[1], **TOL)


# --------------------------------------------------------------------------------------
# Bad inputs a review found silently wrong


_LSQ = lambda w, b: (b["x"] @ w - b["y"]) ** 2
_W = jnp.array([2.0, 1.0])
_B = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "y": jnp.array([1.0, 0.0])}


def test_integer_loss_is_refused():
    """An integer-valued loss has no gradient (jax.vmap(jax.grad) raises); it used to give
    zeros."""
    int_loss = lambda w, b: jnp.round(_LSQ(w, b)).astype(jnp.int32)
    with pytest.raises(TypeError):
        one = lambda w, ex: int_loss(w, jax.tree.map(lambda a: a[None], ex))[0]
        jax.vmap(jax.grad(one), in_axes=(None, 0))(_W, _B)
    for fn in (pe.grads, pe.grad_norms, pe.moments):
        name = fn.__name__
        with pytest.raises(TypeError, match=rf"fgrad.per_example.{name}: .*floating-point"):
            fn(int_loss, _W, _B)
    with pytest.raises(TypeError, match=r"fgrad.per_example.clipped_grad: .*floating-point"):
        pe.clipped_grad(int_loss, _W, _B, max_norm=1.0)


def test_empty_batch_is_refused_where_a_mean_is_taken():
    empty = jax.tree.map(lambda a: a[:0], _B)
    with pytest.raises(ValueError, match=r"fgrad.per_example.clipped_grad: .*B=0"):
        pe.clipped_grad(_LSQ, _W, empty, max_norm=1.0)
    with pytest.raises(ValueError, match=r"fgrad.per_example.moments: .*B=0"):
        pe.moments(_LSQ, _W, empty)
    with pytest.raises(ValueError, match=r"fgrad.per_example.clipped_loss: .*B=0"):
        pe.clipped_loss(_LSQ, 1.0)(_W, empty)


def test_max_norm_and_noise_multiplier_checks():
    # The docstring example: clipped per-example gradients [1, 0] and [0, 1], mean 0.5.
    ok = pe.clipped_grad(_LSQ, _W, _B, max_norm=1.0)
    np.testing.assert_allclose(ok, [0.5, 0.5], rtol=1e-5)
    with pytest.raises(
        ValueError, match=r"fgrad.per_example.clipped_grad: max_norm must be a scalar"
    ):
        pe.clipped_grad(_LSQ, _W, _B, max_norm=jnp.array([1.0, 2.0]))
    with pytest.raises(
        ValueError, match=r"fgrad.per_example.clipped_grad: noise_multiplier must be >= 0"
    ):
        pe.clipped_grad(_LSQ, _W, _B, 1.0, key=jax.random.key(0), noise_multiplier=jnp.array(-1.0))
    with pytest.raises(
        ValueError, match=r"fgrad.per_example.clipped_grad: noise_multiplier must be >= 0"
    ):
        pe.clipped_grad(_LSQ, _W, _B, 1.0, key=jax.random.key(0), noise_multiplier=-1.0)
    # Traced under jit a negative max_norm cannot be refused: NaN, not a sign-flipped gradient.
    jitted = jax.jit(lambda c: pe.clipped_grad(_LSQ, _W, _B, max_norm=c))
    assert bool(jnp.all(jnp.isnan(jitted(-1.0))))
    np.testing.assert_allclose(jitted(1.0), [0.5, 0.5], rtol=1e-5)
