"""Two real processes (jax.distributed with a local coordinator, CPU collectives over gloo,
4 CPU devices each) give the single-process results: fgrad.accumulate, grad_intermediates
and penalties.wgan_gp on a global batch built with jax.make_array_from_process_local_data.

The reference is one process with the same 8 devices and the same global sharding; it is
itself checked against the unsharded computation in this process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # each worker sets its own device count
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")]
    )
    return env


def _check(procs, timeout=240):
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker process did not finish in time")
        assert p.returncode == 0, out.decode()[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp")
    run = lambda *a: subprocess.Popen(
        [sys.executable, str(WORKER), *a],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    single = run(str(d / "single.npz"), "single")
    _check([single])
    port = str(_free_port())
    two = [run(str(d / "two.npz"), "multi", str(i), port) for i in range(2)]
    _check(two)
    return dict(np.load(d / "single.npz")), dict(np.load(d / "two.npz"))


def test_two_processes_equal_one(results):
    single, two = results
    assert (
        sorted(single)
        == sorted(two)
        == sorted(["value", "grad_w1", "grad_b1", "grad_w2", "tap_h", "gp"])
    )
    for k in single:
        assert two[k].shape == single[k].shape, k
        np.testing.assert_allclose(two[k], single[k], rtol=2e-6, atol=1e-7, err_msg=k)


def test_single_process_reference_is_the_unsharded_computation(results):
    import jax
    import jax.numpy as jnp

    single, _ = results
    rng = np.random.default_rng(0)
    N, D, H = 16, 3, 5
    p = {
        "w1": jnp.asarray(rng.normal(size=(D, H)), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=(H,)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(H,)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
    fake = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)

    def loss(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] - y) ** 2)

    value, g = jax.value_and_grad(loss)(p, x, y)
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    tap_h = jax.grad(lambda h: jnp.mean((h @ p["w2"] - y) ** 2))(h)
    net = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    eps = jax.random.uniform(jax.random.key(1), (N,))[:, None]
    x_hat = eps * x + (1 - eps) * fake
    dx = jax.vmap(jax.grad(lambda xi: net(p, xi[None])[0]))(x_hat)
    gp = 10.0 * jnp.mean((jnp.linalg.norm(dx, axis=1) - 1.0) ** 2)
    np.testing.assert_allclose(single["value"], value, rtol=2e-6)
    for k in ("w1", "b1", "w2"):
        np.testing.assert_allclose(single[f"grad_{k}"], g[k], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(single["tap_h"], tap_h, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(single["gp"], gp, rtol=2e-5)
