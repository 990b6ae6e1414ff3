"""PyTorch's ``None``, exactly: untouched leaves, per-parameter optimizer state, optax
wrappers, ``backward(gradient=v)``, complex parameters, precision and errors, each
against PyTorch on the same weights (or a closed form)."""

import functools

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import fgrad
from fgrad._step import StepState, _is_step_count, _param_shaped
from helpers import assert_tree_allclose, from_torch

# --- the Done-when loop: heads used in turns, an unused branch, a frozen layer -------------

HEADS = [(0,), (0, 1), (0,), (1,), (0, 1)]  # which heads each of the 5 steps uses
FROZEN = "trunk.weight"
NAMES = ("trunk", "head0", "head1", "unused")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(4, 6)
        self.head0, self.head1 = torch.nn.Linear(6, 2), torch.nn.Linear(6, 2)
        self.unused = torch.nn.Linear(6, 2)  # a branch this training never takes

    def loss(self, x, y, heads):
        h = torch.tanh(self.trunk(x))
        return sum(((getattr(self, f"head{i}")(h) - y) ** 2).mean() for i in heads)


def jax_loss(p, x, y, heads):
    lin = lambda n, v: v @ p[f"{n}.weight"].T + p[f"{n}.bias"]
    h = jnp.tanh(lin("trunk", x))
    return sum(jnp.mean((lin(f"head{i}", h) - y) ** 2) for i in heads)


def data(t, k):
    r = np.random.default_rng(t)
    return [
        (r.normal(size=(3, 4)).astype(np.float32), r.normal(size=(3, 2)).astype(np.float32))
        for _ in range(k)
    ]


WD = 0.1
is_weight = lambda p: {k: k.endswith("weight") for k in p}
BASE = {  # torch.optim constructor over param groups, optax optimizer
    "sgd": (
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
        lambda: optax.sgd(0.1, momentum=0.9),
    ),
    "adam": (lambda g: torch.optim.Adam(g, lr=0.05), lambda: optax.adam(0.05)),
    "adamw": (
        lambda g: torch.optim.AdamW(g, lr=0.05, weight_decay=WD),
        lambda: optax.adamw(0.05, weight_decay=WD),
    ),
    "rmsprop": (
        lambda g: torch.optim.RMSprop(g, lr=0.01, alpha=0.9),
        lambda: optax.rmsprop(0.01, decay=0.9, eps=1e-8, eps_in_sqrt=False),
    ),
}


class Both:
    """Two torch optimizers over disjoint parameter sets, stepped together."""

    def __init__(self, *opts):
        self.opts, self.state = opts, {}

    def step(self):
        for o in self.opts:
            o.step()
        self.state = {q: st for o in self.opts for q, st in o.state.items()}

    def zero_grad(self, set_to_none):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def optimizers(name, wrapper):
    """(torch optimizer factory over a Net, optax optimizer, clip norm, micro-steps k)."""
    make_torch, make_optax = BASE[name]
    every = lambda net: [{"params": list(net.parameters())}]
    if wrapper == "masked":  # weight decay on weights only: torch param groups
        split = lambda net: [
            {"params": [q for n, q in net.named_parameters() if n.endswith("weight")]},
            {"params": [q for n, q in net.named_parameters() if n.endswith("bias")]},
        ]
        if name == "adamw":
            tgroups = lambda net: [dict(split(net)[0]), {**split(net)[1], "weight_decay": 0.0}]
            opt = optax.adamw(0.05, weight_decay=WD, mask=is_weight)
        else:
            tgroups = lambda net: [{**split(net)[0], "weight_decay": WD}, split(net)[1]]
            opt = optax.chain(optax.masked(optax.add_decayed_weights(WD), is_weight), make_optax())
        return lambda net: make_torch(tgroups(net)), opt, None, 1
    if wrapper == "clip":
        return (
            lambda net: make_torch(every(net)),
            optax.chain(optax.clip_by_global_norm(0.3), make_optax()),
            0.3,
            1,
        )
    if wrapper == "multisteps":
        return lambda net: make_torch(every(net)), optax.MultiSteps(make_optax(), 2), None, 2
    if wrapper == "multi":  # Adam on weights, SGD with momentum on biases
        assert name == "adam"
        labels = lambda p: {k: "w" if k.endswith("weight") else "b" for k in p}
        opt = optax.multi_transform(
            {"w": optax.adam(0.05), "b": optax.sgd(0.1, momentum=0.9)}, labels
        )
        pick = lambda net, end: [q for n, q in net.named_parameters() if n.endswith(end)]
        return (
            lambda net: Both(
                torch.optim.Adam(pick(net, "weight"), lr=0.05),
                torch.optim.SGD(pick(net, "bias"), lr=0.1, momentum=0.9),
            ),
            opt,
            None,
            1,
        )
    if wrapper == "inject":
        assert name == "adam"
        opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.05)
        return lambda net: make_torch(every(net)), opt, None, 1
    return lambda net: make_torch(every(net)), make_optax(), None, 1


def run_torch(name, wrapper, set_to_none):
    make_opt, _, clip, k = optimizers(name, wrapper)
    net = Net()
    net.trunk.weight.requires_grad_(False)
    opt = make_opt(net)
    for t, heads in enumerate(HEADS):
        for x, y in data(t, k):
            (net.loss(torch.from_numpy(x), torch.from_numpy(y), heads) / k).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    return net, opt


def run_fgrad(name, wrapper, set_to_none, params):
    _, opt, _, k = optimizers(name, wrapper)
    trainable = lambda path, _: FROZEN not in path
    grads = fgrad.zero_grad(params, trainable)  # a fresh model: every .grad is None
    state = opt.init(params)
    # eager (op by op, cached across tests), but MultiSteps' lax.cond runs faster compiled
    step = jax.jit(fgrad.step, static_argnums=0) if k > 1 else fgrad.step
    for t, heads in enumerate(HEADS):
        for x, y in data(t, k):  # MultiSteps: one step() per micro-batch
            loss = functools.partial(jax_loss, heads=heads)
            _, grads = fgrad.backward(loss, params, jnp.asarray(x), jnp.asarray(y), grads=grads)
            if k > 1:
                params, state = step(opt, params, state, grads)
                grads = fgrad.zero_grad(params, trainable, set_to_none=set_to_none, grads=grads)
        if k == 1:
            params, state = step(opt, params, state, grads)
            grads = fgrad.zero_grad(params, trainable, set_to_none=set_to_none, grads=grads)
    return params, state


def count_index(state, params):
    """Where Adam's step count sits in each StepState.per_param tuple."""
    shaped = _param_shaped(*reversed(jax.tree.flatten(params)))
    flat, _ = jax.tree_util.tree_flatten_with_path(state.inner, is_leaf=shaped)
    counts = [  # the per-parameter leaves: bias-correction step counts only
        jax.tree_util.keystr(p) for p, e in flat if not shaped(e) and _is_step_count(state.inner, p)
    ]
    return max(range(len(counts)), key=lambda i: len(counts[i]))


SLOTS = {  # fgrad state field -> torch.optim state key
    "sgd": {"trace": "momentum_buffer"},
    "adam": {"mu": "exp_avg", "nu": "exp_avg_sq"},
    "adamw": {"mu": "exp_avg", "nu": "exp_avg_sq"},
    "rmsprop": {"nu": "square_avg"},
}
CASES = [(n, "plain", s) for n in BASE for s in (True, False)] + [
    ("adamw", "masked", True),
    ("adam", "clip", True),
    ("adamw", "multisteps", True),
    ("adam", "inject", True),
    ("adam", "multi", True),
]


@pytest.mark.parametrize(("name", "wrapper", "set_to_none"), CASES)
def test_pytorch_loop_ports_line_by_line(name, wrapper, set_to_none):
    """Heads used in turns, an unused branch, a frozen layer: after 5 steps the same
    parameters, the same per-parameter optimizer state and step counts as torch.optim."""
    from fgrad.interop.torch import to_jax

    params = to_jax(Net())
    start = params
    net, topt = run_torch(name, wrapper, set_to_none)
    got, state = run_fgrad(name, wrapper, set_to_none, params)
    assert_tree_allclose(got, to_jax(net), rtol=2e-5, atol=1e-5)
    for n in ("trunk.weight", "unused.weight", "unused.bias"):  # skipped bit for bit
        assert np.array_equal(got[n], start[n]), n
    torch_state = {n: topt.state.get(q, {}) for n, q in net.named_parameters()}
    # optax's own state comes back for optimizers without bias-correction counts
    inner = state.inner if isinstance(state, StepState) else state
    for field, key in SLOTS[name].items():
        slots = optax.tree_utils.tree_get(inner, field)
        for n, ts in torch_state.items():
            if isinstance(slots[n], optax.MaskedNode):  # another optimizer's leaf
                continue
            want = ts.get(key, torch.zeros_like(net.get_parameter(n)))
            assert_tree_allclose(slots[n], want, rtol=1e-4, atol=1e-7)
    if name in ("adam", "adamw"):  # torch.optim's per-parameter step
        i = count_index(state, params)
        mu = optax.tree_utils.tree_get(inner, "mu")
        steps = {  # the parameters Adam updates (multi_transform: the weights)
            n: int(ts.get("step", 0))
            for n, ts in torch_state.items()
            if not isinstance(mu[n], optax.MaskedNode)
        }
        assert {n: int(state.per_param[n][i]) for n in steps} == steps
        if set_to_none:
            assert steps["head1.weight"] == 3 and steps["head0.weight"] == 4
            assert steps["unused.weight"] == 0


# --- NoGrad: what backward and accumulate fill --------------------------------------------


def test_nograd_states_under_jit_scan_donation_and_cond():
    p = {"a": jnp.ones(2), "b": jnp.full(2, 2.0), "c": jnp.ones(2), "s": jnp.ones(2)}
    g0 = fgrad.zero_grad(p, trainable={"a": True, "b": True, "c": True, "s": False})
    assert g0 == {"a": fgrad.NoGrad(), "b": fgrad.NoGrad(), "c": fgrad.NoGrad(), "s": None}

    def loss(q, x, pick):  # "c" only in the branch that does not run; "s" frozen
        branch = jax.lax.cond(pick, lambda: jnp.sum(q["b"] * x), lambda: jnp.sum(q["c"]))
        return jnp.sum(q["a"] * x) + branch + jnp.sum(jax.lax.stop_gradient(q["b"]) * q["s"])

    bw = jax.jit(functools.partial(fgrad.backward, loss), donate_argnames="grads")
    x = jnp.array([1.0, 3.0])
    _, g1 = bw(p, x, True, grads=g0)
    # a in the loss, b in the branch taken; c is in the untaken branch of the program:
    # it counts as used and gets zeros (documented); s stays frozen.
    assert_tree_allclose(g1, {"a": x, "b": x, "c": jnp.zeros(2), "s": None})
    only_a = lambda q, x: jnp.sum(q["a"] * x) + 0 * jax.lax.stop_gradient(q["b"])[0]
    _, g2 = jax.jit(functools.partial(fgrad.backward, only_a))(p, x, grads=g0)
    assert g2["b"] == fgrad.NoGrad() and g2["c"] == fgrad.NoGrad() and g2["s"] is None
    assert fgrad.torch_grads(g2) == {"a": g2["a"], "b": None, "c": None, "s": None}
    # a later loss that touches the frozen leaf still gives it nothing
    _, g3 = fgrad.backward(lambda q: jnp.sum(q["s"] * q["c"]), p, grads=g2)
    assert g3["s"] is None and g3["b"] == fgrad.NoGrad()
    assert_tree_allclose(g3["c"], p["s"])

    # accumulate: the scan carries only what the loss reaches; a donated accumulator
    batch = {"x": jnp.arange(12.0).reshape(6, 2)}
    acc_loss = lambda q, b: jnp.mean(b["x"] @ q["a"]) + jnp.sum(q["s"])
    acc = jax.jit(
        lambda q, b, grads: fgrad.accumulate(acc_loss, q, b, microbatches=3, grads=grads),
        donate_argnames="grads",
    )
    _, ga = acc(p, batch, g0)
    assert ga["b"] == fgrad.NoGrad() and ga["c"] == fgrad.NoGrad() and ga["s"] is None
    assert_tree_allclose(ga["a"], jnp.mean(batch["x"], axis=0))
    _, gb = acc(p, batch, ga)
    assert ga["a"].is_deleted()
    assert_tree_allclose(gb["a"], 2 * jnp.mean(batch["x"], axis=0))


def test_torch_leaves_untouched_grads_none_like_fgrad():
    """The same check in PyTorch: a head the loss does not use keeps .grad None, and
    stop_gradient (detach) leaves None too; 0 * w gives a zero gradient in both."""
    w = {n: torch.ones(2, requires_grad=True) for n in ("a", "b", "c")}
    (torch.sum(w["a"]) + 0 * w["c"].sum() + w["b"].detach().sum()).backward()
    p = {n: jnp.ones(2) for n in w}
    loss = lambda q: jnp.sum(q["a"]) + 0 * jnp.sum(q["c"]) + jnp.sum(jax.lax.stop_gradient(q["b"]))
    _, g = fgrad.backward(loss, p)
    assert fgrad.torch_grads(g)["b"] is None and w["b"].grad is None
    assert_tree_allclose({k: g[k] for k in "ac"}, {k: w[k].grad for k in "ac"})


# --- backward(gradient=v) --------------------------------------------------------------


def test_backward_gradient_matches_tensor_backward():
    torch.manual_seed(1)
    lin = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    v1, v2 = torch.randn(5, 4), torch.randn(5)
    y = torch.tanh(lin(x))
    torch.autograd.backward([y, y.sum(1) ** 2], [v1, v2], retain_graph=True)  # a pytree
    y.backward(v1)  # then a second backward adds, as into .grad
    p = {"w": from_torch(lin.weight), "b": from_torch(lin.bias)}

    def fn(q, x):
        y = jnp.tanh(x @ q["w"].T + q["b"])
        return {"y": y, "s": jnp.sum(y, 1) ** 2}

    v = {"y": from_torch(v1), "s": from_torch(v2)}
    out, g = jax.jit(functools.partial(fgrad.backward, fn))(p, from_torch(x), gradient=v)
    yonly = lambda q, x: fn(q, x)["y"]
    _, g = fgrad.backward(yonly, p, from_torch(x), grads=g, gradient=v["y"])
    assert_tree_allclose(g, {"w": lin.weight.grad, "b": lin.bias.grad})
    assert_tree_allclose(out["y"], y)


# --- complex parameters -------------------------------------------------------------------

A = np.array([[1.0 + 2.0j, 0.5 - 1.0j], [-1.0 + 0.5j, 2.0 + 0.0j], [0.3j, 1.0]], np.complex64)
B = np.array([1.0 - 1.0j, 0.5j, 2.0], np.complex64)
Z0 = np.array([0.2 + 0.1j, -0.3 + 0.4j], np.complex64)


def complex_loss(p, a):
    r = a @ p["z"] - jnp.asarray(B)
    return jnp.sum(jnp.real(r * jnp.conj(r))) + jnp.sum(p["x"] ** 2)


def test_complex_grad_and_sgd_match_torch():
    z = torch.tensor(Z0, requires_grad=True)
    xt = torch.tensor([0.5, -1.0], requires_grad=True)
    topt = torch.optim.SGD([z, xt], lr=0.05, momentum=0.9)
    p = {"z": jnp.asarray(Z0), "x": jnp.array([0.5, -1.0])}
    opt = optax.sgd(0.05, momentum=0.9)
    state = opt.init(p)
    for _ in range(3):
        topt.zero_grad()
        r = torch.tensor(A) @ z - torch.tensor(B)
        ((r * r.conj()).real.sum() + (xt**2).sum()).backward()
        topt.step()
        _, g = fgrad.backward(complex_loss, p, jnp.asarray(A))
        assert g["z"].dtype == jnp.complex64
        p, state = fgrad.step(opt, p, state, g)
    assert_tree_allclose(g["z"], z.grad.numpy())  # the last step's .grad
    assert_tree_allclose(p, {"z": z.detach().numpy(), "x": xt.detach().numpy()})
    # accumulate takes complex leaves too, with the same convention
    batch = {"a": jnp.stack([jnp.asarray(A)] * 4)}
    _, ga = fgrad.accumulate(lambda q, b: complex_loss(q, b["a"][0]), p, batch, microbatches=2)
    assert_tree_allclose(ga["z"], fgrad.backward(complex_loss, p, jnp.asarray(A))[1]["z"])


def test_complex_adam_differs_between_the_frameworks_as_documented():
    """torch.optim.Adam on a complex tensor = Adam on its real and imaginary parts;
    optax's second moment is |g|^2 per complex entry. One step from zero state."""
    g = np.array([3.0 + 0.1j], np.complex64)
    z = torch.tensor([0.0j], dtype=torch.complex64, requires_grad=True)
    topt = torch.optim.Adam([z], lr=0.1)
    z.grad = torch.tensor(g)
    topt.step()
    # torch: each part moves by lr * sign: the per-part first Adam step
    np.testing.assert_allclose(z.detach().numpy(), [-0.1 - 0.1j], rtol=1e-5)
    p, state = (
        fgrad.step(optax.adam(0.1), {"z": jnp.zeros(1, jnp.complex64)}, None, None)
        if 0
        else (None, None)
    )
    opt = optax.adam(0.1)
    p = {"z": jnp.zeros(1, jnp.complex64)}
    p, state = fgrad.step(opt, p, opt.init(p), {"z": jnp.asarray(g)})
    # optax: g / |g| per entry: the direction of g, not of each part
    np.testing.assert_allclose(np.asarray(p["z"]), -0.1 * g / np.abs(g), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state[0].nu["z"]), 0.001 * np.abs(g) ** 2, rtol=1e-5)


def test_backward_gradient_on_a_complex_output_matches_torch():
    z = torch.tensor(Z0, requires_grad=True)
    v = np.array([1.0 - 0.5j, 0.25 + 2.0j, -1.0j], np.complex64)
    (torch.tensor(A) @ (z * z)).backward(torch.tensor(v))
    _, g = fgrad.backward(lambda q: jnp.asarray(A) @ (q * q), jnp.asarray(Z0), gradient=v)
    assert_tree_allclose(g, z.grad.numpy())


# --- precision: every function keeps the dtype it is given -----------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_backward_accumulate_step_keep_float32_and_float64(dtype):
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        r = np.random.default_rng(0)
        w = r.normal(size=(3,))
        xs = r.normal(size=(8, 3))
        p = {"w": jnp.asarray(w, dt), "head": jnp.ones(2, dt)}
        loss = lambda q, b: jnp.mean(jnp.sin(b["x"] @ q["w"]) ** 2)
        batch = {"x": jnp.asarray(xs, dt)}
        value, g = fgrad.backward(loss, p, batch)
        v_acc, g_acc = jax.jit(lambda q, b: fgrad.accumulate(loss, q, b, microbatches=4))(p, batch)
        opt = optax.adam(0.1)
        new, state = fgrad.step(opt, p, opt.init(p), g_acc)
        assert value.dtype == v_acc.dtype == g["w"].dtype == g_acc["w"].dtype == dt
        assert new["w"].dtype == state.inner[0].mu["w"].dtype == dt
        # against PyTorch in the same precision
        tw = torch.tensor(w, dtype=getattr(torch, dtype), requires_grad=True)
        tl = torch.mean(torch.sin(torch.tensor(xs, dtype=tw.dtype) @ tw) ** 2)
        tl.backward()
        tol = 1e-12 if dtype == "float64" else 1e-6
        np.testing.assert_allclose(float(v_acc), tl.item(), rtol=tol)
        np.testing.assert_allclose(np.asarray(g_acc["w"]), tw.grad.numpy(), rtol=tol, atol=tol)
        assert g_acc["head"] == fgrad.NoGrad()


def test_bfloat16_params_stay_bfloat16():
    p = {"w": jnp.ones(3, jnp.bfloat16)}
    loss = lambda q, b: jnp.mean((b @ q["w"]).astype(jnp.float32) ** 2)
    b = jnp.ones((4, 3), jnp.bfloat16)
    _, g = fgrad.backward(loss, p, b)
    _, ga = fgrad.accumulate(loss, p, b, microbatches=2)
    new, _ = fgrad.step(optax.sgd(0.5), p, optax.sgd(0.5).init(p), ga)
    assert g["w"].dtype == ga["w"].dtype == new["w"].dtype == jnp.bfloat16
    assert_tree_allclose(new["w"].astype(jnp.float32), jnp.full(3, -2.0))  # 1 - 0.5 * 6


# --- errors ------------------------------------------------------------------------------


def test_errors_say_what_was_given():
    p = {"a": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(TypeError, match=r"zero_grad: set_to_none must be True or False, got 1"):
        fgrad.zero_grad(p, set_to_none=1)
    vec = lambda q: {"u": q["a"], "v": q["b"] * 2}
    with pytest.raises(
        ValueError,
        match=r"backward: gradient\['v'\] has shape \(3,\), but the output\['v'\] has shape \(2,\)",
    ):
        fgrad.backward(vec, p, gradient={"u": jnp.ones(2), "v": jnp.ones(3)})
    with pytest.raises(
        ValueError, match=r"gradient\['v'\] is missing: the output is a dict with keys \['u', 'v'\]"
    ):
        fgrad.backward(vec, p, gradient={"u": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"backward: the loss is complex \(complex64\)"):
        fgrad.backward(lambda q: jnp.sum(q["a"].astype(jnp.complex64)), p)
    with pytest.raises(TypeError, match=r"got the function optax.adam itself. Call it first"):
        fgrad.step(optax.adam, p, None, p)
    with pytest.raises(
        ValueError, match=r"opt_state does not belong .* opt_state\[0\].count is missing"
    ):
        fgrad.step(optax.adam(0.1), p, optax.sgd(0.1, momentum=0.9).init(p), p)
    other = optax.adam(0.1).init({"a": jnp.ones(2), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"mu\['b'\] has shape \(3,\), expected \(2,\)"):
        fgrad.step(optax.adam(0.1), p, other, p)
    with pytest.raises(
        ValueError,
        match=r"params is an array of shape \(3,\) and dtype float32; got a dict with keys",
    ):
        fgrad.backward(jnp.sum, jnp.ones(3), grads={"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"params\['b'\] is None, so grads\['b'\] must be None"):
        fgrad.backward(
            lambda q: jnp.sum(q["w"]),
            {"w": jnp.ones(2), "b": None},
            grads={"w": None, "b": jnp.ones(1)},
        )


def test_none_param_leaves_and_numpy_bool_masks_are_accepted():
    pn = {"w": jnp.ones(2), "b": None}  # a layer without bias
    _, g = fgrad.backward(lambda q: jnp.sum(q["w"] ** 2), pn, grads=fgrad.zero_grad(pn))
    assert g["b"] is None
    assert_tree_allclose(g["w"], 2 * pn["w"])
    new, _ = fgrad.step(optax.sgd(0.5), pn, optax.sgd(0.5).init(pn), g)
    assert new["b"] is None
    assert_tree_allclose(new["w"], jnp.zeros(2))
    mask = {"w": np.bool_(True), "b": np.bool_(False)}
    assert fgrad.zero_grad({"w": jnp.ones(2), "b": jnp.ones(1)}, trainable=mask)["b"] is None
    keep = lambda path, _: np.bool_("w" in path)
    assert fgrad.zero_grad({"w": jnp.ones(2), "b": jnp.ones(1)}, trainable=keep)["b"] is None


def test_under_vmap_and_a_scan_over_steps():
    """vmap of backward gives per-example accumulators (NoGrad stays NoGrad); a lax.scan
    over training steps with a frozen leaf carries optax's own state and equals the
    Python loop."""
    p = {"a": jnp.ones(2), "b": jnp.ones(2), "f": jnp.ones(2)}
    mask = {"a": True, "b": True, "f": False}
    xs = jnp.arange(6.0).reshape(3, 2)
    g0 = fgrad.zero_grad(p, trainable=mask)
    _, g = jax.vmap(lambda x: fgrad.backward(lambda q, x: jnp.sum(q["a"] * x), p, x, grads=g0))(xs)
    assert g["b"] == fgrad.NoGrad() and g["f"] is None
    assert_tree_allclose(g["a"], xs)

    opt = optax.adamw(0.1, weight_decay=0.5)
    loss = lambda q, x: jnp.sum(q["a"] * x) + jnp.sum(q["b"] ** 2)

    def one(q, s, x):
        _, gq = fgrad.backward(loss, q, x, grads=fgrad.zero_grad(q, trainable=mask))
        return fgrad.step(opt, q, s, gq)

    (q_scan, s_scan), _ = jax.lax.scan(lambda c, x: (one(*c, x), None), (p, opt.init(p)), xs)
    q, s = p, opt.init(p)
    for x in xs:
        q, s = one(q, s, x)
    assert_tree_allclose(q_scan, q)
    assert np.array_equal(q_scan["f"], p["f"]) and int(s_scan[0].count) == 3


@pytest.mark.parametrize("wrap", ["masked", "multi_transform", "clip"])
def test_a_trained_then_frozen_leaf_keeps_its_state_under_wrappers(wrap):
    """The issue's probe: under optax.masked a frozen leaf's Adam mu moved 0.1 -> 0.09.
    Now its slots stay bit for bit, and the clip measures only the gradients given
    (equal to optax run on the sub-tree that has gradients)."""
    adam = optax.adam(0.1)
    opt = {
        "masked": optax.masked(adam, {"a": True, "b": True}),
        "multi_transform": optax.multi_transform({"x": adam}, {"a": "x", "b": "x"}),
        "clip": optax.chain(optax.clip_by_global_norm(0.5), adam),
    }[wrap]
    p = {"a": jnp.ones(2), "b": jnp.ones(2)}
    p, s = fgrad.step(opt, p, opt.init(p), {"a": jnp.ones(2), "b": jnp.full(2, 2.0)})
    mu = lambda s: optax.tree_utils.tree_get(s, "mu")
    before = mu(s)["a"]
    q, s2 = fgrad.step(opt, p, s, {"a": None, "b": jnp.full(2, 3.0)})
    assert np.array_equal(mu(s2)["a"], before) and np.array_equal(q["a"], p["a"])
    # b alone, as optax alone would move it on the sub-tree {"b"}
    sub = optax.chain(optax.clip_by_global_norm(0.5), adam) if wrap == "clip" else adam
    s_sub = sub.init({"b": p["b"]})
    full = optax.tree_utils.tree_get(s, "mu")["b"], optax.tree_utils.tree_get(s, "nu")["b"]
    s_sub = optax.tree_utils.tree_set(s_sub, mu={"b": full[0]}, nu={"b": full[1]}, count=1)
    with jax.numpy_dtype_promotion("standard"):
        u, _ = sub.update({"b": jnp.full(2, 3.0)}, s_sub, {"b": p["b"]})
    assert_tree_allclose(q["b"], p["b"] + u["b"])
