"""_liveness.reaches_output: which inputs the output depends on, as PyTorch's graph decides
whether a leaf's .grad stays None (checked against PyTorch itself)."""

import jax
import jax.numpy as jnp
import pytest
import torch

from fgrad._liveness import reaches_output


def _torch_none(f_torch, names):
    ps = {n: torch.ones(2, requires_grad=True) for n in names}
    f_torch(ps).backward()
    return {n: ps[n].grad is not None for n in names}


CASES = {
    "unused": (lambda p: jnp.sum(p["a"]), lambda p: p["a"].sum()),
    "times_zero": (
        lambda p: jnp.sum(p["a"] + 0.0 * p["b"]),
        lambda p: (p["a"] + 0.0 * p["b"]).sum(),
    ),
    "detached": (
        lambda p: jnp.sum(p["a"] * jax.lax.stop_gradient(p["b"])),
        lambda p: (p["a"] * p["b"].detach()).sum(),
    ),
    "zeros_like": (
        lambda p: jnp.sum(p["a"] + jnp.zeros_like(p["b"])),
        lambda p: (p["a"] + torch.zeros_like(p["b"])).sum(),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_none(case):
    f_jax, f_torch = CASES[case]
    names = ["a", "b"]
    got = reaches_output(f_jax, {n: jnp.ones(2) for n in names})
    assert got == _torch_none(f_torch, names)


def test_scan_cond_and_integer_leaves():
    def f(p):
        def body(c, x):
            return c * p["w"] + x, None

        c, _ = jax.lax.scan(body, jnp.zeros(2), jnp.ones((3, 2)))
        branch = jax.lax.cond(p["n"] > 0, lambda: p["c"], lambda: jnp.zeros(2))
        return jnp.sum(c + branch) + 0.0 * p["n"].astype(jnp.float32)

    p = {"w": jnp.ones(2), "c": jnp.ones(2), "n": jnp.int32(1), "u": jnp.ones(2)}
    assert reaches_output(f, p) == {"w": True, "c": True, "n": False, "u": False}
    # the same answer under jit (traced once there)
    seen = []
    jax.jit(lambda p: seen.append(reaches_output(f, p)))(p)
    assert seen == [{"w": True, "c": True, "n": False, "u": False}]
