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
