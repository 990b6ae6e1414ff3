"""K-FAC against curvlinops' KFACLinearOperator and BackPACK's KFLR/KFAC on the same weights
(an MLP, a CNN, a dense layer shared over sequence positions), and against the exact GGN
where K-FAC is exact."""

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.flatten_util import ravel_pytree

from fgrad import curvature
from fgrad.interop.torch import to_jax
from helpers import cpu_data_parallel

CE, MSE = curvature.cross_entropy, curvature.mean_squared_error
_APPROX = ("expand", "reduce")
N = 8


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _conv(x, w, b):
    dn = ("NCHW", "OIHW", "NCHW")
    return (
        jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=dn)
        + b[None, :, None, None]
    )


def mlp_fn(p, x):
    h = jnp.tanh(x @ p["0.weight"].T + p["0.bias"])
    return h @ p["2.weight"].T + p["2.bias"]


def cnn_fn(p, x):
    h = jnp.tanh(_conv(x, p["0.weight"], p["0.bias"]))
    return h.reshape(h.shape[0], -1) @ p["3.weight"].T + p["3.bias"]


class SeqNet(torch.nn.Module):
    """A dense layer shared over 3 sequence positions, tanh, mean over positions, head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Linear(4, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1))


def seq_fn(p, x):
    h = jnp.tanh(jnp.einsum("ntd,ed->nte", x, p["emb.weight"]) + p["emb.bias"])
    return h.mean(1) @ p["head.weight"].T + p["head.bias"]


def _models():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(2, 2, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(18, 3),
    )
    return {
        "mlp": (mlp.double(), mlp_fn, (N, 4)),
        "cnn": (cnn.double(), cnn_fn, (N, 2, 3, 3)),
        "seq": (SeqNet().double(), seq_fn, (N, 3, 4)),
    }


@functools.cache
def _make(name):
    with jax.enable_x64(True):
        module, fn, shape = _models()[name]
        r = np.random.default_rng(1)
        return (
            name,
            module,
            fn,
            to_jax(module),
            jnp.asarray(r.normal(size=shape)),
            jnp.asarray(r.integers(0, 3, N)),
            jnp.asarray(r.normal(size=(N, 3))),
        )


def _random_like(p, seed):
    flat, unravel = ravel_pytree(p)
    return unravel(jnp.asarray(np.random.default_rng(seed).normal(size=flat.size)))


def _flat(t):
    return np.asarray(ravel_pytree(t)[0])


def _curvlinops(module, loss, x, y, **kw):
    from curvlinops import KFACLinearOperator

    lossfn = torch.nn.CrossEntropyLoss() if loss is CE else torch.nn.MSELoss()
    data = [(torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)))]
    return KFACLinearOperator(
        module, lossfn, list(module.parameters()), data, check_deterministic=False, **kw
    )


def _apply(op, module, v):
    out = op @ [torch.from_numpy(np.asarray(v[k])) for k, _ in module.named_parameters()]
    return {k: t.numpy() for (k, _), t in zip(module.named_parameters(), out, strict=True)}


CASES = [
    ("mlp", MSE, "ggn", "expand"),
    ("mlp", CE, "empirical", "expand"),
    ("cnn", CE, "ggn", "expand"),
    ("cnn", MSE, "ggn", "reduce"),
    ("seq", CE, "ggn", "expand"),
    ("seq", CE, "empirical", "reduce"),
]


@pytest.mark.parametrize(
    ("name", "loss", "fisher", "approx"),
    CASES,
    ids=[f"{c[0]}-{'ce' if c[1] is CE else 'mse'}-{c[2]}-{c[3]}" for c in CASES],
)
def test_kfac_equals_curvlinops(name, loss, fisher, approx):
    _, module, fn, p, x, labels, targets = _make(name)
    y = labels if loss is CE else targets
    k = jax.jit(lambda p, x, y: curvature.kfac(fn, loss, p, x, y, fisher=fisher, approx=approx))(
        p, x, y
    )
    assert k.uncovered == ()
    ftype = {"ggn": "type-2", "empirical": "empirical"}[fisher]
    op = _curvlinops(module, loss, x, y, fisher_type=ftype, kfac_approx=approx)
    v = _random_like(p, 2)
    np.testing.assert_allclose(
        _flat(k.matvec(v)), _flat(_apply(op, module, v)), rtol=1e-10, atol=1e-13
    )
    if fisher == "ggn":  # the damped inverse, exact (curvlinops' use_exact_damping)
        from curvlinops import KFACInverseLinearOperator

        inv = KFACInverseLinearOperator(op, damping=0.1, use_exact_damping=True)
        np.testing.assert_allclose(
            _flat(k.solve(v, damping=0.1)), _flat(_apply(inv, module, v)), rtol=1e-9
        )


@pytest.mark.parametrize("name", ["mlp", "cnn"])  # BackPACK's Linear takes 2-d inputs only
def test_kfac_factors_equal_backpack_kflr_and_kfac(name):
    """BackPACK's KFLR (K-FAC of the GGN) factor by factor, and its KFAC (the Monte Carlo
    estimate) within sampling error. For a convolution BackPACK pairs the "reduce" G with
    the "expand" A summed over the T output positions instead of averaged."""
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR

    _, module, fn, p, x, labels, _ = _make(name)
    ext = extend(copy.deepcopy(module))
    lossfn = extend(torch.nn.CrossEntropyLoss())
    with backpack(KFLR(), KFAC(mc_samples=2000)):
        lossfn(ext(torch.from_numpy(np.array(x))), torch.from_numpy(np.array(labels))).backward()
    expand, reduce = jax.jit(
        lambda p, x, y: tuple(curvature.kfac(fn, CE, p, x, y, approx=a) for a in _APPROX)
    )(p, x, labels)
    for pname, q in ext.named_parameters():
        i = expand.paths.index(f"['{pname}']")
        conv = q.dim() == 4 or (
            pname.endswith("bias") and isinstance(ext[int(pname[0])], torch.nn.Conv2d)
        )
        g = reduce.g[i] if conv else expand.g[i]
        np.testing.assert_allclose(q.kflr[0].numpy(), g, rtol=1e-10, atol=1e-14)
        mc = q.kfac[0].numpy()
        assert np.linalg.norm(mc - g) < 0.15 * np.linalg.norm(g)
        if q.dim() > 1:
            t = 9 if conv else 1  # output positions of the 3x3 convolution
            np.testing.assert_allclose(q.kflr[1].numpy(), t * expand.a[i], rtol=1e-10, atol=1e-14)


def test_kfac_is_the_exact_ggn_for_one_linear_layer_one_example():
    r = np.random.default_rng(4)
    p = {"w": jnp.asarray(r.normal(size=(4, 3))), "b": jnp.asarray(r.normal(size=3))}
    x, y = jnp.asarray(r.normal(size=(1, 4))), jnp.asarray(r.normal(size=(1, 3)))
    fn = lambda p, x: x @ p["w"] + p["b"]
    k = jax.jit(lambda p, x, y: curvature.kfac(fn, MSE, p, x, y, bias=False))(p, x, y)
    flat, unravel = ravel_pytree(p)
    jac = jax.jacobian(lambda f: fn(unravel(f), x).reshape(-1))(flat)
    ggn = jac.T @ jax.hessian(lambda o: MSE(o.reshape(1, 3), y))(fn(p, x).reshape(-1)) @ jac
    w_rows = np.r_[3 : 3 + 12]  # ravel order: "b" (3), then "w" (12)
    dense = np.asarray(jax.jit(lambda k: k.dense())(k))
    np.testing.assert_allclose(
        dense[np.ix_(w_rows, w_rows)], ggn[np.ix_(w_rows, w_rows)], rtol=1e-10, atol=1e-13
    )
    assert k.uncovered == ("['b']",)
    np.testing.assert_array_equal(dense[:3], 0)  # outside the operator


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_solve_eigenvalues_and_damping(name):
    _, _, fn, p, x, labels, _ = _make(name)
    v = _random_like(p, 5)

    @jax.jit
    def run(p, x, y, v):
        k = curvature.kfac(fn, CE, p, x, y, damping=0.1)
        return k.dense(), k.solve(v), k.solve(v, damping=0.5), k.eigenvalues(), k.eigenvalues(3)

    dense, s1, s2, eig, eig3 = run(p, x, labels, v)
    dense = np.asarray(dense)
    np.testing.assert_allclose(_flat(s1), np.linalg.solve(dense, _flat(v)), rtol=1e-9)
    np.testing.assert_allclose(
        _flat(s2), np.linalg.solve(dense + 0.4 * np.eye(len(dense)), _flat(v)), rtol=1e-9
    )
    np.testing.assert_allclose(eig, np.linalg.eigvalsh(dense)[::-1], rtol=1e-9)
    np.testing.assert_allclose(eig3, np.linalg.eigvalsh(dense)[::-1][:3], rtol=1e-9)


def test_kfac_is_a_plain_pytree_of_its_blocks():
    """A KFAC's leaves are its attributes' entries, block by block (key paths name them),
    so it is a lax.scan carry that attribute-wise updates keep (a running average of the
    factors); a bias's block holds its weight's G itself, decomposed once by solve."""
    _, _, fn, p, x, labels, _ = _make("mlp")
    k = curvature.kfac(fn, CE, p, x, labels, damping=0.1)
    biases = [i for i, a in enumerate(k.a) if a is None]
    assert biases and all(k.g[i] is k.g[i - 1] for i in biases)
    paths = [jax.tree_util.keystr(q) for q, _ in jax.tree_util.tree_flatten_with_path(k)[0]]
    assert paths.count(".g[1]") == 1
    doubled = jax.tree_util.tree_map_with_path(
        lambda q, a: 2 * a if jax.tree_util.keystr(q) == ".g[1]" else a, k
    )
    np.testing.assert_allclose(doubled.g[1], 2 * k.g[1])
    np.testing.assert_allclose(doubled.g[0], k.g[0])

    def body(run, _):
        g = tuple(0.5 * (a + b) for a, b in zip(run.g, k.g, strict=True))
        return dataclasses.replace(run, g=g), None

    avg, _ = jax.lax.scan(body, k, None, length=3)
    v = _random_like(p, 2)
    np.testing.assert_allclose(_flat(avg.solve(v)), _flat(k.solve(v)), rtol=1e-10)
    back = jax.jit(lambda p, x, y: curvature.kfac(fn, CE, p, x, y, damping=0.1))(p, x, labels)
    np.testing.assert_allclose(_flat(back.solve(v)), _flat(k.solve(v)), rtol=1e-10)


def test_kfac_over_microbatches_sharded_and_chosen_layers():
    module, fn, _ = _models()["mlp"]
    r = np.random.default_rng(6)
    p = to_jax(module)
    x, y = jnp.asarray(r.normal(size=(16, 4))), jnp.asarray(r.integers(0, 3, 16))
    whole = jax.jit(lambda p, x, y: curvature.kfac(fn, CE, p, x, y))(p, x, y)
    shard, replicate = cpu_data_parallel("data")
    scanned = jax.jit(lambda p, x, y: curvature.kfac(fn, CE, p, x, y, microbatches=2))(
        replicate(p), shard(x), shard(y)
    )
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(scanned), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    one = jax.jit(lambda p, x, y: curvature.kfac(fn, CE, p, x, y, layers="*2.weight*"))(p, x, y)
    assert one.paths == ("['2.weight']", "['2.bias']")
    assert one.uncovered == ("['0.bias']", "['0.weight']")
    np.testing.assert_allclose(one.g[0], whole.g[2], rtol=1e-12)


def test_monte_carlo_kfac_within_sampling_error_of_ggn_kfac():
    module, fn, shape = _models()["mlp"]
    p = to_jax(module)
    r = np.random.default_rng(7)
    x, y = jnp.asarray(r.normal(size=shape)), jnp.asarray(r.integers(0, 3, N))
    exact, mc = jax.jit(
        lambda p, x, y: (
            curvature.kfac(fn, CE, p, x, y),
            curvature.kfac(fn, CE, p, x, y, fisher="mc", key=jax.random.key(0), samples=4000),
        )
    )(p, x, y)
    for ge, gm in zip(exact.g, mc.g, strict=True):
        assert np.linalg.norm(gm - ge) < 0.1 * np.linalg.norm(ge)


def test_errors_name_the_function():
    p = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    fn = lambda p, x: x @ p["w"] + p["b"]
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    with pytest.raises(
        ValueError, match=r"fgrad.curvature.kfac: the layer pattern '\*conv\*' matches no"
    ):
        curvature.kfac(fn, MSE, p, x, y, layers="*conv*")
    tied = lambda p, x: x @ p["w"] + p["b"] + jnp.sum(p["w"])
    with pytest.raises(ValueError, match=r"fgrad.curvature.kfac: the weight \['w'\] is also used"):
        curvature.kfac(tied, MSE, p, x, y)
    with pytest.raises(ValueError, match=r"fgrad.curvature.kfac: damping must be a non-negative"):
        curvature.kfac(fn, MSE, p, x, y, damping=-1.0)
    k = curvature.kfac(fn, MSE, p, x, y)
    with pytest.raises(ValueError, match=r"fgrad.curvature.KFAC.solve: damping must be a positive"):
        k.solve(p)
    with pytest.raises(ValueError, match=r"fgrad.curvature.KFAC.solve: damping must be a positive"):
        k.solve(p, damping=-0.5)
    with pytest.raises(ValueError, match=r"fgrad.curvature.kfac: mean_squared_error needs targets"):
        curvature.kfac(fn, MSE, p, x, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"fgrad.curvature.kfac: .*no rule for"):
        curvature.kfac(fn, lambda o, y: jnp.mean((o - y) ** 2), p, x, y, fisher="mc")
    with pytest.raises(ValueError, match=r"fgrad.curvature.KFAC.matvec: v must have"):
        k.matvec({"w": jnp.ones((3, 2))})


def test_bench_builders_agree_on_small_workloads():
    """Each builder of fgrad.bench._ops_curvature runs once; fgrad, hand-written JAX and
    curvlinops give the same numbers (float32)."""
    from fgrad.bench import _ops_curvature as ops
    from fgrad.bench._workloads import Workload

    mlp = Workload("mlp", "mlp", {"inputs": 6, "width": 5, "depth": 2, "classes": 3}, 4)
    cnn = Workload("cnn", "cnn", {"channels": (2, 3), "size": 4, "classes": 3}, 2)
    with jax.enable_x64(False):
        for w in (mlp, cnn):
            if w is mlp:  # (the ggn_vp builders do not depend on the model)
                ggn = {i: b("x", w) for i, b in ops.JAX["ggn_vp"].items()}
                ggn = {i: f(*args) for i, (f, args) in ggn.items()}
                want = ops.TORCH["ggn_vp"]["curvlinops"]("curvlinops", w, "cpu")()
                want = dict(zip(w.numpy_params(), want, strict=True))  # PyTorch's order
                got_tf = ops.TORCH["ggn_vp"]["torch.func"]("torch.func", w, "cpu")()
                got_tf = dict(zip(want, got_tf.values(), strict=True))  # module names differ
                for k, t in want.items():
                    tol = 2e-4 * float(np.abs(t.numpy()).max()) + 1e-7
                    for got in (ggn["fgrad"][k], ggn["jax"][k], got_tf[k]):
                        np.testing.assert_allclose(np.asarray(got), t.numpy(), atol=tol)
            (f1, a1), (f2, a2) = (b("x", w) for b in ops.JAX["kfac_factors"].values())
            (ka, kg), (ja, jg) = f1(*a1), f2(*a2)
            kfac_t = ops.TORCH["kfac_factors"]["curvlinops"]("curvlinops", w, "cpu")
            kfac_t()
            op = kfac_t.__self__
            ta = op._input_covariances.values()  # forward order; gradients keyed alike
            tg = [op._gradient_covariances[m] for m in op._input_covariances]
            assert ops.APPLIES["kfac_factors"](w) and ops.APPLIES["ggn_vp"](w)
            for i, (name, a_t, g_t) in enumerate(zip(ja, ta, tg, strict=True)):
                for got, ref in (
                    (ka[2 * i], a_t),
                    (ja[name], a_t),
                    (kg[i], g_t),  # one G per layer: its bias's block shares it
                    (jg[name], g_t),
                ):
                    ref = ref.numpy()
                    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
            # one sampled label per example: fgrad and the hand-written JAX draw the same
            # labels; curvlinops draws its own, so only its input factors compare
            (f1, a1), (f2, a2) = (b("x", w) for b in ops.JAX["kfac_factors_mc"].values())
            (ka, kg), (ja, jg) = f1(*a1), f2(*a2)
            mc_t = ops.TORCH["kfac_factors_mc"]["curvlinops"]("curvlinops", w, "cpu")
            mc_t()
            ta = mc_t.__self__._input_covariances.values()
            assert ops.APPLIES["kfac_factors_mc"](w)
            for i, (name, a_t) in enumerate(zip(ja, ta, strict=True)):
                tol = 1e-4 * float(np.abs(jg[name]).max())
                np.testing.assert_allclose(kg[i], jg[name], atol=tol)
                for got in (ka[2 * i], ja[name]):
                    np.testing.assert_allclose(got, a_t.numpy(), atol=1e-4 * float(a_t.abs().max()))


def test_kfac_of_a_flax_model_equals_curvlinops():
    """A Flax linen MLP on the torch MLP's weights (kernels transposed): the layers are
    found inside ``model.apply``, biases paired by their module path."""

    import fgrad
    from fgrad.interop.torch import to_linen

    _, module, _, _, x, labels, _ = _make("mlp")
    flax_model = fgrad.models.MLP(widths=(5, 3))
    variables = to_linen(module, rename={"0": "fc1", "2": "fc2"})
    k = jax.jit(lambda v, x, y: curvature.kfac(flax_model.apply, CE, v, x, y))(variables, x, labels)
    assert set(k.paths) == {
        f"['params']['fc{i}']['{n}']" for i in (1, 2) for n in ("kernel", "bias")
    }
    v = _random_like(variables, 7)
    got = k.matvec(v)
    op = _curvlinops(module, CE, x, labels, fisher_type="type-2")
    torch_v = {
        f"{t}.{n}": (lambda a: a.T if n == "weight" else a)(
            v["params"][f"fc{i}"]["kernel" if n == "weight" else "bias"]
        )
        for i, t in ((1, "0"), (2, "2"))
        for n in ("weight", "bias")
    }
    want = _apply(op, module, torch_v)
    for i, t in ((1, "0"), (2, "2")):
        np.testing.assert_allclose(
            got["params"][f"fc{i}"]["kernel"].T, want[f"{t}.weight"], rtol=1e-10, atol=1e-13
        )
        np.testing.assert_allclose(
            got["params"][f"fc{i}"]["bias"], want[f"{t}.bias"], rtol=1e-10, atol=1e-13
        )


def _twice(h, b):
    return h + b + jnp.sin(h)


_BIAS_CASES = {
    "added to the layer": (lambda p, x: x @ p["w"] + p["b"], True),
    "added after tanh": (lambda p, x: jnp.tanh(x @ p["w"]) + p["b"], False),
    "unused": (lambda p, x: x @ p["w"], False),
    "scaled": (lambda p, x: x @ p["w"] + 3 * p["b"], False),
    "used twice": (lambda p, x: (x @ p["w"] + p["b"]) * p["b"], False),
    "layer output used twice": (lambda p, x: _twice(x @ p["w"], p["b"]), False),
    "broadcast along the batch axis": (lambda p, x: x @ p["w"] + p["b"][:, None], False),
}


@pytest.mark.parametrize("case", list(_BIAS_CASES))
def test_bias_gets_g_only_when_added_to_the_layer_output(case):
    """With one example K-FAC is the exact GGN block of a dense layer's weight and of a
    bias added to its output; a bias named like the weight but used otherwise is left
    uncovered (its GGN block is not G), never given G."""
    fn, covered = _BIAS_CASES[case]
    r = np.random.default_rng(7)
    p = {"w": jnp.asarray(r.normal(size=(3, 2))), "b": jnp.asarray(r.normal(size=2))}
    n = 2 if case == "broadcast along the batch axis" else 1  # out (2, 2): batch = features
    x, y = jnp.asarray(r.normal(size=(n, 3))), jnp.asarray(r.normal(size=(n, 2)))
    k = curvature.kfac(fn, MSE, p, x, y)
    assert k.paths == (("['w']", "['b']") if covered else ("['w']",))
    assert k.uncovered == (() if covered else ("['b']",))
    flat, unravel = ravel_pytree(p)  # ravel order: "b" (2), then "w" (6)
    out = fn(p, x)
    jac = jax.jacobian(lambda f: fn(unravel(f), x).reshape(-1))(flat)
    hess = jax.hessian(lambda o: MSE(o.reshape(out.shape), y))(out.reshape(-1))
    ggn, dense = np.asarray(jac.T @ hess @ jac), np.asarray(k.dense())
    b, w = np.r_[0:2], np.r_[2:8]
    if n == 1:  # K-FAC is exact for the weight with one example
        np.testing.assert_allclose(dense[np.ix_(w, w)], ggn[np.ix_(w, w)], atol=1e-12)
    want_b = ggn[np.ix_(b, b)] if covered else np.zeros((2, 2))
    np.testing.assert_allclose(dense[np.ix_(b, b)], want_b, atol=1e-12)
    if not covered:
        assert np.abs(ggn[np.ix_(b, b)]).max() > 1e-3 or case == "unused"
