"""fgrad.step against references for the cases a review found: optimizers whose
per-parameter state is not shaped like the parameters, global schedule/MultiSteps counts
(torch keeps them per optimizer), injected hyperparameters, donation, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fgrad

P0 = {"a": jnp.arange(12.0).reshape(3, 4) / 10 - 0.5, "b": jnp.array([1.0, -2.0, 3.0, 0.5])}
GA = [jnp.cos(jnp.arange(12.0).reshape(3, 4) + t) for t in range(3)]

FACTORED = {
    "adafactor": lambda: optax.adafactor(0.1, min_dim_size_to_factor=2),
    "novograd": lambda: optax.novograd(0.1),
    "sm3": lambda: optax.sm3(0.1),
    "zero_nans": lambda: optax.chain(optax.zero_nans(), optax.sgd(0.1, momentum=0.9)),
}


@pytest.mark.parametrize("hole", ["frozen", "nograd"])
@pytest.mark.parametrize("name", sorted(FACTORED))
def test_state_not_shaped_like_params(name, hole):
    """adafactor's factored moments, novograd's per-leaf scalars, sm3's per-axis lists and
    zero_nans' per-leaf flags are per-parameter state: a leaf without a gradient keeps
    them, and the others move as optax on the sub-tree of leaves with gradients."""
    opt = FACTORED[name]()
    state0 = opt.init(P0)
    p, st = P0, state0
    ref_p, ref_st = {"a": P0["a"]}, opt.init({"a": P0["a"]})
    for g in GA:
        b = None if hole == "frozen" else fgrad.NoGrad()
        p, st = fgrad.step(opt, p, st, {"a": g, "b": b})
        u, ref_st = opt.update({"a": g}, ref_st, ref_p)
        ref_p = optax.apply_updates(ref_p, u)
    np.testing.assert_array_equal(p["b"], P0["b"])
    np.testing.assert_allclose(p["a"], ref_p["a"], rtol=1e-6, atol=1e-7)
    inner = st.inner if isinstance(st, fgrad._step.StepState) else st
    # the left-out leaf's state: bit for bit its initial value; a's: optax's
    is_b = lambda x: isinstance(x, dict) and set(x) == {"a", "b"}
    got = jax.tree.leaves(inner, is_leaf=is_b)
    start = jax.tree.leaves(state0, is_leaf=is_b)
    ref = jax.tree.leaves(ref_st, is_leaf=lambda x: isinstance(x, dict) and set(x) == {"a"})
    n = 0
    for x, x0, r in zip(got, start, ref, strict=True):
        if is_b(x):
            n += 1
            for u, v in zip(jax.tree.leaves(x["b"]), jax.tree.leaves(x0["b"]), strict=True):
                np.testing.assert_array_equal(u, v)
            for u, v in zip(jax.tree.leaves(x["a"]), jax.tree.leaves(r["a"]), strict=True):
                np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    assert n > 0


def test_state_can_be_donated():
    """The StepState an eager step returns holds no buffer twice, so a jitted step can
    donate it, step after step; the result equals the undonated steps."""
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
    g = {"a": GA[0], "b": fgrad.NoGrad()}
    p, st = fgrad.step(opt, P0, opt.init(P0), g)
    leaves = jax.tree.leaves(st)
    assert len({id(x) for x in leaves}) == len(leaves)
    stepj = jax.jit(fgrad.step, static_argnums=0, donate_argnums=2)
    ref_p, ref_st = p, jax.tree.map(jnp.copy, st)
    for t in range(2):
        gt = {"a": GA[t + 1], "b": jnp.ones(4) if t else fgrad.NoGrad()}
        p, st = stepj(opt, p, st, gt)
        ref_p, ref_st = fgrad.step(opt, ref_p, ref_st, gt)
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    jax.tree.map(close, p, ref_p)
    jax.tree.map(close, st, ref_st)


def _lockstep(opt, torch_opt, lr_lambda, uses_h, rtol):
    """``w`` and a head ``h`` (used at the steps where ``uses_h(t)``) stepped four times by
    ``fgrad.step(opt)`` and by ``torch_opt`` with ``LambdaLR(lr_lambda)`` on the same loss;
    the parameters must agree. Returns fgrad's optimizer state."""
    import torch

    w0, h0 = np.array([1.0, -0.5], np.float32), np.array([2.0], np.float32)
    p = {"w": jnp.asarray(w0), "h": jnp.asarray(h0)}
    st = opt.init(p)
    tw = torch.tensor(w0, requires_grad=True)
    th = torch.tensor(h0, requires_grad=True)
    topt = torch_opt([tw, th], lr=0.1)
    tsch = torch.optim.lr_scheduler.LambdaLR(topt, lr_lambda)
    for t in range(4):
        use_h = uses_h(t)
        f = lambda q, use_h=use_h: jnp.sum(q["w"] ** 2) + (jnp.sum(q["h"] ** 3) if use_h else 0.0)
        _, g = fgrad.backward(f, p, grads=fgrad.zero_grad(p))
        p, st = fgrad.step(opt, p, st, g)
        loss = (tw**2).sum() + ((th**3).sum() if use_h else 0.0)
        loss.backward()
        topt.step()
        topt.zero_grad()
        tsch.step()
    np.testing.assert_allclose(p["w"], tw.detach().numpy(), rtol=rtol)
    np.testing.assert_allclose(p["h"], th.detach().numpy(), rtol=rtol)
    return st


def test_schedule_is_global_as_torch_lr_scheduler():
    """A learning-rate schedule counts optimizer steps, as a torch LR scheduler does: a
    head first used at step 3 gets step 3's learning rate (SGD + LambdaLR)."""
    import torch

    opt = optax.sgd(optax.linear_schedule(0.1, 0.0, 4))
    _lockstep(opt, torch.optim.SGD, lambda t: max(0.0, 1 - t / 4), lambda t: t >= 2, 1e-6)


def test_adam_count_per_parameter_schedule_global():
    """Adam's bias-correction count stays per parameter (torch's state[p]["step"]) while
    its learning-rate schedule is global (torch's scheduler), in one optimizer."""
    import torch

    opt = optax.adam(optax.linear_schedule(0.1, 0.02, 4))
    lr = lambda t: 1 - 0.8 * min(t, 4) / 4
    st = _lockstep(opt, torch.optim.Adam, lr, lambda t: t in (1, 3), 1e-5)
    assert [
        int(c[0]) for c in jax.tree.leaves(st.per_param, is_leaf=lambda x: isinstance(x, tuple))
    ] == [2, 4]


def _torch_window_run(sched, k):
    import torch

    tw = torch.tensor([1.0, 2.0], requires_grad=True)
    th = torch.tensor([0.5, -1.0], requires_grad=True)
    topt = torch.optim.SGD([tw, th], lr=0.1, momentum=0.9)
    for i, use_h in enumerate(sched):
        loss = (tw**2).sum() + ((th**3 * tw).sum() if use_h else 0.0)
        (loss / k).backward()
        if i % k == k - 1:
            topt.step()
            topt.zero_grad()
    return tw.detach().numpy(), th.detach().numpy()


def _fgrad_window_run(sched, k):
    p = {"w": jnp.array([1.0, 2.0]), "h": jnp.array([0.5, -1.0])}
    ms = optax.MultiSteps(optax.sgd(0.1, momentum=0.9), every_k_schedule=k)
    st = ms.init(p)
    for use_h in sched:
        f = lambda q, use_h=use_h: (
            jnp.sum(q["w"] ** 2) + (jnp.sum(q["h"] ** 3 * q["w"]) if use_h else 0.0)
        )
        _, g = fgrad.backward(f, p, grads=fgrad.zero_grad(p))
        p, st = fgrad.step(ms, p, st, g)
    return p, st


def test_multisteps_counts_globally_as_torch_accumulation():
    """MultiSteps' window counts every micro-step (torch's loop with (loss / k).backward()
    steps every k iterations): a head used in a later micro-step of the window, or absent
    for whole windows, matches torch."""
    sched = [False, True, False, False, True, True]
    p, _ = _fgrad_window_run(sched, 2)
    tw, th = _torch_window_run(sched, 2)
    np.testing.assert_allclose(p["w"], tw, rtol=1e-5)
    np.testing.assert_allclose(p["h"], th, rtol=1e-5)


def test_multisteps_partial_window_refused():
    """A parameter with a gradient in an earlier micro-step of the window and none later
    is refused (torch would apply its partial sum; fgrad.step cannot)."""
    with pytest.raises(ValueError, match=r"fgrad.step: under optax.MultiSteps, params\['h'\]"):
        _fgrad_window_run([True, False], 2)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_injected_hyperparameter_edit_takes_effect(base):
    """optax's idiom to change a hyperparameter, ``state.hyperparams[name] = value`` on
    the state step returned (``state.inner`` for a StepState), takes effect."""
    opt = optax.inject_hyperparams(getattr(optax, base))(learning_rate=0.1)
    p, st = fgrad.step(opt, P0, opt.init(P0), {"a": GA[0], "b": fgrad.NoGrad()})
    inner = st.inner if isinstance(st, fgrad._step.StepState) else st
    inner.hyperparams["learning_rate"] = jnp.asarray(0.0)
    p2, st = fgrad.step(opt, p, st, {"a": GA[1], "b": jnp.ones(4)})
    jax.tree.map(np.testing.assert_array_equal, p2, p)  # learning rate 0: no move
    inner = st.inner if isinstance(st, fgrad._step.StepState) else st
    inner.hyperparams["learning_rate"] = jnp.asarray(0.05)
    p3, _ = fgrad.step(opt, p2, st, {"a": GA[2], "b": fgrad.NoGrad()})
    np.testing.assert_array_equal(p3["b"], p2["b"])
    if base == "sgd":  # closed form: p - 0.05 g
        np.testing.assert_allclose(p3["a"], p2["a"] - 0.05 * GA[2], rtol=1e-6)
    else:  # Adam's step is at most about the learning rate, and not zero
        step_size = np.abs(np.asarray(p3["a"] - p2["a"]))
        assert 0 < step_size.max() <= 0.05 * 1.01


def test_update_kwargs_reach_the_optimizer():
    """optax.polyak_sgd's update needs value=: step passes its extra keyword arguments on
    (equal to optax on the sub-tree with gradients), and without them says what to do."""
    opt = optax.polyak_sgd(max_learning_rate=1.0)
    g = {"a": GA[0], "b": fgrad.NoGrad()}
    p, _ = fgrad.step(opt, P0, opt.init(P0), g, value=jnp.asarray(0.7))
    u, _ = opt.update({"a": GA[0]}, opt.init({"a": P0["a"]}), {"a": P0["a"]}, value=0.7)
    np.testing.assert_allclose(p["a"], P0["a"] + u["a"], rtol=1e-6)
    np.testing.assert_array_equal(p["b"], P0["b"])
    with pytest.raises(TypeError, match=r"fgrad.step: .*value=loss"):
        fgrad.step(opt, P0, opt.init(P0), g)


def test_scan_from_init_without_step_counts():
    """An optimizer without bias-correction counts (SGD with momentum and a schedule)
    gives optax's own state back even with a NoGrad leaf, so a lax.scan can start from
    optimizer.init; it equals the eager steps."""
    opt = optax.sgd(optax.linear_schedule(0.1, 0.0, 4), momentum=0.9)
    g = {"a": GA[0], "b": fgrad.NoGrad()}

    def body(carry, _):
        return fgrad.step(opt, *carry, g), None

    (p, st), _ = jax.lax.scan(body, (P0, opt.init(P0)), None, length=3)
    q, sq = P0, opt.init(P0)
    for _ in range(3):
        q, sq = fgrad.step(opt, q, sq, g)
    np.testing.assert_allclose(p["a"], q["a"], rtol=1e-6)
    np.testing.assert_array_equal(p["b"], P0["b"])
    assert jax.tree.structure(st) == jax.tree.structure(opt.init(P0))


LATE = {
    # no update clipping or parameter scaling, which would hide the decay rate
    "adafactor": lambda: optax.adafactor(
        0.1, clipping_threshold=None, multiply_by_parameter_scale=False
    ),
    "novograd": lambda: optax.novograd(0.1),
}


@pytest.mark.parametrize("name", sorted(LATE))
def test_late_head_gets_its_first_step(name):
    """Adafactor's decay-rate count and novograd's bias-correction count are per
    parameter (torch.optim.Adafactor's state[p]["step"]): a head first used at step 3
    moves as the optimizer's first step on it alone."""
    opt = LATE[name]()
    p, st = P0, opt.init(P0)
    for t in range(2):
        p, st = fgrad.step(opt, p, st, {"a": GA[t], "b": fgrad.NoGrad()})
    gb = jnp.array([0.3, -1.0, 2.0, 0.1])
    p, st = fgrad.step(opt, p, st, {"a": GA[2], "b": gb})
    u, _ = opt.update({"b": gb}, opt.init({"b": P0["b"]}), {"b": P0["b"]})
    np.testing.assert_allclose(p["b"], P0["b"] + u["b"], rtol=1e-6)


def test_multisteps_under_jit():
    """Under jit the window check runs with the step: a head left out from the first
    micro-step on, or losing its gradient at a window's start, is accepted (equal to
    torch's loop); losing it mid-window raises the refusal."""
    ms = optax.MultiSteps(optax.sgd(0.1, momentum=0.9), every_k_schedule=2)
    stepj = jax.jit(fgrad.step, static_argnums=0)
    sched = [False, False, True, True, False, False]
    p = {"w": jnp.array([1.0, 2.0]), "h": jnp.array([0.5, -1.0])}
    st = ms.init(p)
    for use_h in sched:
        f = lambda q, use_h=use_h: (
            jnp.sum(q["w"] ** 2) + (jnp.sum(q["h"] ** 3 * q["w"]) if use_h else 0.0)
        )
        _, g = fgrad.backward(f, p, grads=fgrad.zero_grad(p))
        p, st = stepj(ms, p, st, g)
    tw, th = _torch_window_run(sched, 2)
    np.testing.assert_allclose(p["w"], tw, rtol=1e-5)
    np.testing.assert_allclose(p["h"], th, rtol=1e-5)
    g = {"w": jnp.ones(2), "h": jnp.ones(2)}
    p, st = stepj(ms, p, st, g)  # first micro-step of a window
    with pytest.raises(Exception, match=r"under optax.MultiSteps, params\['h'\]"):
        jax.block_until_ready(stepj(ms, p, st, {"w": jnp.ones(2), "h": fgrad.NoGrad()}))
