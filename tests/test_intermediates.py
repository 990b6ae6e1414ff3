"""Values of and gradients w.r.t. tapped intermediates, checked against PyTorch."""

import copy
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fgrad
from fgrad.models import seed_dy_dl as f_fn  # the notebook's f = dy/dl
from fgrad.models import seed_net, seed_params
from fgrad.models import seed_y as y_fn  # the notebook's y
from helpers import assert_tree_allclose, cpu_data_parallel, from_torch, torch_seed_net

Z = jnp.array([[4.0]])


# --- a random MLP with the same weights in PyTorch and JAX --------------------------------

SIZES = (3, 8, 8, 8, 2)


def make_mlp(seed=0, sizes=SIZES, std=1.0):
    """Random Linear layers (weights N(0, std²), biases N(0, 1)), their JAX parameters,
    and the generator, to draw inputs from after the weights."""
    g = torch.Generator().manual_seed(seed)
    layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    for lin in layers:
        torch.nn.init.normal_(lin.weight, std=std, generator=g)
        torch.nn.init.normal_(lin.bias, generator=g)
    params = [{"w": from_torch(l.weight), "b": from_torch(l.bias)} for l in layers]
    return layers, params, g


def torch_forward(layers, x):
    acts = []
    h = x
    for i, lin in enumerate(layers):
        h = lin(h)
        if i < len(layers) - 1:
            h = torch.tanh(h)
        acts.append(h)
    return ((acts[-1] - 1.0) ** 2).mean(), acts


def jax_forward(params, x):
    h = x
    for i, p in enumerate(params):
        h = h @ p["w"].T + p["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
        h = fgrad.tap(f"act{i}", h)
    return jnp.mean((h - 1.0) ** 2)


X = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
NAMES = [f"act{i}" for i in range(len(SIZES) - 1)]


@pytest.fixture(scope="module")
def mlp():
    return make_mlp()[:2]


# --- the notebook --------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_seed_dy_dl_matches_torch_and_notebook(jit):
    net = torch_seed_net()
    l, y = net(torch.tensor([[4.0]]))
    (expected,) = torch.autograd.grad(y, l)
    g = fgrad.grad_intermediates(y_fn, "l")
    got = (jax.jit(g) if jit else g)(seed_params(), Z)
    assert_tree_allclose(got, {"l": from_torch(expected)})
    assert float(got["l"][0, 0]) == 120.0


@pytest.mark.parametrize("jit", [False, True])
def test_create_graph_gradient_of_a_gradient(jit):
    """In[36]-[40]: f = dy/dl with create_graph=True; f.backward() -> 32, 108, 4."""
    net = torch_seed_net()
    l, y = net(torch.tensor([[4.0]]))
    (f,) = torch.autograd.grad(y, l, create_graph=True)
    f.backward()
    expected = {
        "linear1.weight": net.linear1.weight.grad,
        "linear2.weight": net.linear2.weight.grad,
        "linear2.bias": net.linear2.bias.grad,
    }
    f_of_params = lambda p: jnp.sum(f_fn(p, Z))
    g = jax.grad(f_of_params)
    got = (jax.jit(g) if jit else g)(seed_params())
    assert_tree_allclose(got, expected)
    assert_tree_allclose(
        got, {"linear1.weight": [[32.0]], "linear2.weight": [[108.0]], "linear2.bias": [4.0]}
    )


# --- parity on a random MLP ----------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_mlp_activation_grads_match_torch_autograd_grad(mlp, jit):
    layers, params = mlp
    loss, acts = torch_forward(layers, torch.from_numpy(X))
    expected = torch.autograd.grad(loss, acts)
    g = fgrad.grad_intermediates(jax_forward)
    got = (jax.jit(g) if jit else g)(params, jnp.asarray(X))
    assert list(got) == NAMES
    assert_tree_allclose(got, dict(zip(NAMES, expected, strict=True)))


@pytest.mark.parametrize(
    ("seed", "sizes", "batch"), [(1, (5, 16, 3), 2), (2, (4, 32, 32, 32, 32, 1), 9)]
)
def test_random_mlps_every_activation(seed, sizes, batch):
    layers, params, g = make_mlp(seed, sizes, std=0.5)
    x = torch.randn(batch, sizes[0], generator=g)
    loss, acts = torch_forward(layers, x)
    expected = torch.autograd.grad(loss, acts)
    got = jax.jit(fgrad.grad_intermediates(jax_forward))(params, from_torch(x))
    assert_tree_allclose(got, {f"act{i}": e for i, e in enumerate(expected)})


def test_mlp_retain_grad_and_backward_in_one_pass(mlp):
    """l.retain_grad(); loss.backward(): activation and parameter grads together."""
    layers, params = mlp
    loss, acts = torch_forward(layers, torch.from_numpy(X))
    for a in acts:
        a.retain_grad()
    loss.backward()
    (value, (taps, pgrads)) = jax.jit(
        fgrad.value_and_grad_intermediates(jax_forward, NAMES[1:3], argnums=0)
    )(params, jnp.asarray(X))
    assert_tree_allclose(value, loss)
    assert_tree_allclose(taps, {n: acts[i].grad for i, n in enumerate(NAMES) if n in NAMES[1:3]})
    assert_tree_allclose(pgrads, [{"w": l.weight.grad, "b": l.bias.grad} for l in layers])


def test_mlp_intermediates_match_torch_forward(mlp):
    layers, params = mlp
    loss, acts = torch_forward(layers, torch.from_numpy(X))
    out, taps = jax.jit(fgrad.intermediates(jax_forward))(params, jnp.asarray(X))
    assert_tree_allclose(out, loss)
    assert_tree_allclose(taps, dict(zip(NAMES, acts, strict=True)))


def test_vmap_gives_per_example_activation_grads(mlp):
    """Per-example activation gradients by vmap equal a PyTorch loop over examples. In
    float64: with these N(0, 1) weights tanh saturates, and float32 rounding alone moves
    some of these gradients by 2e-5 relative in either framework (against float64)."""
    layers = [copy.deepcopy(lin).double() for lin in mlp[0]]
    expected = []
    for i in range(len(X)):
        loss, acts = torch_forward(layers, torch.from_numpy(X[i : i + 1]).double())
        expected.append(torch.autograd.grad(loss, acts))
    with jax.enable_x64(True):
        params = [{"w": from_torch(lin.weight), "b": from_torch(lin.bias)} for lin in layers]
        per_ex = lambda x: fgrad.grad_intermediates(jax_forward)(params, x[None])
        got = jax.jit(jax.vmap(per_ex))(jnp.asarray(X, jnp.float64))
        for j, n in enumerate(NAMES):
            assert got[n].dtype == jnp.float64
            assert_tree_allclose(got[n], np.stack([e[j].numpy() for e in expected]))


# --- transforms ----------------------------------------------------------------------------


def test_batch_sharded_over_eight_devices(mlp):
    """Activation gradients of a batch sharded over 8 devices equal the one-device ones."""
    shard, replicate = cpu_data_parallel("batch")
    _, params = mlp
    x = np.random.default_rng(4).normal(size=(16, 3)).astype(np.float32)
    xs = shard(x)
    g = jax.jit(fgrad.grad_intermediates(jax_forward))
    cpu0 = jax.devices("cpu")[0]
    sharded = g(replicate(params), xs)
    single = g(jax.device_put(params, cpu0), jax.device_put(x, cpu0))
    assert_tree_allclose(sharded, single)
    assert len(xs.sharding.device_set) == 8
    assert sharded["act0"].sharding.is_equivalent_to(xs.sharding, 2)


def test_jit_traces_once():
    traces = []

    def f(p, z):
        traces.append(1)
        return y_fn(p, z)

    g = jax.jit(fgrad.grad_intermediates(f))
    g(seed_params(), Z)
    g(seed_params(), Z + 1.0)
    assert len(traces) == 1


def rnn(w, xs):
    def step(h, x):
        h = fgrad.tap("h", jnp.tanh(h * w + x))
        return h, h

    h, _ = jax.lax.scan(step, jnp.zeros(xs.shape[1:]), xs)
    return jnp.sum(h**2)


def test_scan_gives_per_step_grads_matching_torch():
    xs = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
    w = torch.tensor(0.7, requires_grad=True)
    h = torch.zeros(3)
    hs = []
    for x in torch.from_numpy(xs):
        h = torch.tanh(h * w + x)
        h.retain_grad()
        hs.append(h)
    (h**2).sum().backward()
    got = jax.jit(fgrad.grad_intermediates(rnn))(jnp.float32(0.7), jnp.asarray(xs))
    assert got["h"].shape == (5, 3)
    assert_tree_allclose(got["h"], np.stack([t.grad.numpy() for t in hs]))
    _, taps = fgrad.intermediates(rnn)(jnp.float32(0.7), jnp.asarray(xs))
    assert_tree_allclose(taps["h"], np.stack([t.detach().numpy() for t in hs]))


def test_checkpoint_and_inner_jit_serve_taps():
    def f(w, x):
        h = jax.checkpoint(lambda v: fgrad.tap("c", jnp.sin(w * v)))(x)
        h = jax.jit(lambda v: fgrad.tap("j", v * 3.0))(h)
        return jnp.sum(h**2)

    x = jnp.array([0.1, 0.2])
    got = jax.jit(fgrad.grad_intermediates(f))(jnp.float32(2.0), x)
    j = 3.0 * jnp.sin(2.0 * x)
    assert_tree_allclose(got, {"c": 2 * j * 3.0, "j": 2 * j})


def test_all_taps_cost_one_forward_and_one_backward():
    """Ten taps on a ten-layer MLP: the program holds each layer's tanh once, as jax.grad's
    does; a per-tap forward would hold it ten times."""
    ws = [jnp.full((4, 4), 0.1 * (i + 1), jnp.float32) for i in range(10)]

    def net(ws, x):
        for i, w in enumerate(ws):
            x = fgrad.tap(f"h{i}", jnp.tanh(x @ w))
        return jnp.sum(x)

    x = jnp.ones((2, 4))
    count = lambda j: sum(e.primitive.name == "tanh" for e in j.jaxpr.eqns)
    ours = jax.make_jaxpr(fgrad.grad_intermediates(net, argnums=0))(ws, x)
    plain = jax.make_jaxpr(jax.grad(net))(ws, x)
    assert count(ours) == count(plain) == 10
    dots = lambda j: sum(e.primitive.name == "dot_general" for e in j.jaxpr.eqns)
    assert dots(ours) == dots(plain)


def test_flax_linen_and_nnx_taps():
    v = fgrad.models.seed_linen_variables()
    linen = lambda v, z: fgrad.models.SeedNet().apply(v, z)[1]
    taps, vg = fgrad.grad_intermediates(linen, argnums=0)(v, Z)
    assert_tree_allclose(taps, {"l": [[120.0]]})
    assert_tree_allclose(vg["params"]["linear1"]["kernel"], [[480.0]])
    net = fgrad.models.SeedNetNNX()
    assert_tree_allclose(fgrad.grad_intermediates(lambda z: net(z)[1])(Z), {"l": [[120.0]]})


def test_vjp_pullback_is_reusable_and_takes_a_cotangent(mlp):
    layers, params = mlp

    def acts_out(params, x):  # non-scalar output
        h = x
        for p in params:
            h = fgrad.tap("h", jnp.tanh(h @ p["w"].T + p["b"])) if p is params[0] else h @ p["w"].T
        return h

    ct = np.random.default_rng(3).normal(size=(6, 2)).astype(np.float32)
    out, pullback = fgrad.vjp_intermediates(acts_out, "h")(params, jnp.asarray(X))
    first, second = pullback(jnp.asarray(ct)), pullback(2.0 * jnp.asarray(ct))
    h = torch.tanh(layers[0](torch.from_numpy(X)))
    t = h
    for lin in layers[1:]:
        t = t @ lin.weight.T
    (expected,) = torch.autograd.grad(t, h, grad_outputs=torch.from_numpy(ct))
    assert_tree_allclose(out, t)
    assert_tree_allclose(first, {"h": expected})
    assert_tree_allclose(second, {"h": 2.0 * expected})


def test_has_aux():
    def f(p, z):
        l, y = seed_net(p, z)
        return jnp.sum(y), {"l": l}

    grads, aux = fgrad.grad_intermediates(f, has_aux=True)(seed_params(), Z)
    assert_tree_allclose((grads, aux), ({"l": [[120.0]]}, {"l": [[12.0]]}))
    (value, aux2), grads2 = fgrad.value_and_grad_intermediates(f, has_aux=True)(seed_params(), Z)
    assert float(value) == 900.0
    assert_tree_allclose((grads2, aux2), (grads, aux))
    out, pullback, aux3 = fgrad.vjp_intermediates(f, has_aux=True)(seed_params(), Z)
    assert float(out) == 900.0
    assert_tree_allclose((pullback(jnp.float32(1.0)), aux3), (grads, aux))


# --- errors --------------------------------------------------------------------------------


def test_non_scalar_output():
    with pytest.raises(
        TypeError, match=r"must return a scalar .*shape \(2, 1\).*vjp_intermediates"
    ):
        fgrad.grad_intermediates(y_fn)(seed_params(), jnp.ones((2, 1)))


def test_unknown_tap_lists_known_ones():
    with pytest.raises(ValueError, match=r"no tap named 'h'.*its taps are: 'l'"):
        fgrad.grad_intermediates(y_fn, "h")(seed_params(), Z)


def test_integer_tap_has_no_gradient():
    def f(x):
        fgrad.tap("ids", jnp.arange(3))
        return jnp.sum(fgrad.tap("x", x) ** 2)

    with pytest.raises(TypeError, match="tap 'ids' holds int32 values"):
        fgrad.grad_intermediates(f, "ids")(jnp.ones(3))
    assert list(fgrad.grad_intermediates(f)(jnp.ones(3))) == ["x"]  # None: float taps only
    assert list(fgrad.intermediates(f)(jnp.ones(3))[1]) == ["ids", "x"]


def test_tap_inside_while_loop_or_pmap_is_refused():
    def in_while(x):
        return jax.lax.while_loop(
            lambda c: c[0] < 3, lambda c: (c[0] + 1, fgrad.tap("w", c[1] * 2)), (0, x)
        )[1]

    def in_pmap(x):
        return jax.pmap(lambda v: fgrad.tap("p", v * 2))(x[None])[0]

    for f, name, where in ((in_while, "w", "while_loop"), (in_pmap, "p", r"jax\.pmap")):
        for names in (None, name):
            with pytest.raises(ValueError, match=rf"tap '{name}' cannot be served.*{where}"):
                fgrad.grad_intermediates(f, names)(jnp.float32(1.0))
    with pytest.raises(ValueError, match="shard_map"):
        fgrad.grad_intermediates(in_pmap)(jnp.float32(1.0))
    # A tap in a while loop that is not asked for does not get in the way.
    g = lambda x: jnp.sum(fgrad.tap("top", x + 0.0) * in_while(x))
    assert_tree_allclose(fgrad.grad_intermediates(g, "top")(jnp.float32(1.0)), {"top": 8.0})


def test_tap_inside_custom_vjp_is_refused():
    @jax.custom_vjp
    def f(x):
        return fgrad.tap("in", x) * 2.0

    f.defvjp(lambda x: (f(x), None), lambda _, ct: (ct * 2.0,))
    with pytest.raises(ValueError, match="custom_vjp"):
        fgrad.grad_intermediates(f)(jnp.float32(1.0))


def test_repeated_tap_name_is_an_error_by_default():
    def f(x):
        return fgrad.tap("h", x) * fgrad.tap("h", x * 2.0)

    with pytest.raises(ValueError, match=r"tap 'h' is hit 2 times.*on_repeat='split'"):
        fgrad.grad_intermediates(f)(jnp.float32(1.0))
    with pytest.raises(ValueError, match="on_repeat must be one of"):
        fgrad.grad_intermediates(f, on_repeat="mean")(jnp.float32(1.0))


def test_layer_applied_twice_split_and_sum_match_torch(mlp):
    """A shared layer (also jitted, so both hits come from one sub-program) applied twice:
    'split' gives each application's gradient, as retain_grad on each output does; 'sum'
    gives their sum."""
    layers, params = mlp
    lin_t = layers[1]
    x = torch.from_numpy(X[:, :1].repeat(8, axis=1))
    h1 = torch.tanh(lin_t(x))
    h2 = torch.tanh(lin_t(h1))
    h1.retain_grad()
    h2.retain_grad()
    (h2**2).sum().backward()

    layer = jax.jit(lambda p, v: fgrad.tap("layer", jnp.tanh(v @ p["w"].T + p["b"])))

    def f(p, v):
        return jnp.sum(layer(p, layer(p, v)) ** 2)

    args = (params[1], from_torch(x))
    split = jax.jit(fgrad.grad_intermediates(f, on_repeat="split"))(*args)
    assert_tree_allclose(split, {"layer#0": h1.grad, "layer#1": h2.grad})
    summed = fgrad.grad_intermediates(f, "layer", on_repeat="sum")(*args)
    assert_tree_allclose(summed, {"layer": h1.grad + h2.grad})
    _, values = fgrad.intermediates(f, on_repeat="split")(*args)
    assert_tree_allclose(values, {"layer#0": h1, "layer#1": h2})
    _, values = fgrad.intermediates(f, on_repeat="sum")(*args)
    assert_tree_allclose(values, {"layer": h1 + h2})


def test_sum_needs_equal_shapes():
    f = lambda x: jnp.sum(fgrad.tap("h", x)) + jnp.sum(fgrad.tap("h", x[:1]))
    dtypes = r"same structure, shapes and dtypes, got \[float32\[2\]\], \[float32\[1\]\]"
    with pytest.raises(ValueError, match=dtypes):
        fgrad.grad_intermediates(f, on_repeat="sum")(jnp.ones(2))
    assert list(fgrad.grad_intermediates(f, on_repeat="split")(jnp.ones(2))) == ["h#0", "h#1"]


def test_bad_names_and_has_aux_and_cotangent_and_argnums():
    p = seed_params()
    with pytest.raises(TypeError, match=r"names must be a tap name .*got 1 \(int\)"):
        fgrad.grad_intermediates(y_fn, [1])
    with pytest.raises(TypeError, match=r"fgrad.intermediates: names must be a tap name .*got 3"):
        fgrad.intermediates(y_fn, 3)
    with pytest.raises(ValueError, match="lists a tap twice"):
        fgrad.grad_intermediates(y_fn, ["l", "l"])(p, Z)
    with pytest.raises(TypeError, match="must return a pair"):
        fgrad.grad_intermediates(y_fn, has_aux=True)(p, Z)
    _, pullback = fgrad.vjp_intermediates(y_fn)(p, Z)
    with pytest.raises(ValueError, match=r"cotangent has shape \(2,\), expected \(1, 1\)"):
        pullback(jnp.ones(2))
    with pytest.raises(ValueError, match="refers to argument 2"):
        fgrad.grad_intermediates(y_fn, argnums=2)(p, Z)
    with pytest.raises(TypeError, match="must be floating point"):
        fgrad.grad_intermediates(lambda p, n: y_fn(p, Z) * n, argnums=1)(p, 3)
