"""One process of the two-process test (tests/test_multiprocess.py), or the single-process
reference run with the same 8 devices.

    python multiprocess_worker.py OUT single
    python multiprocess_worker.py OUT PROCESS_ID PORT   (two of these, ids 0 and 1)

Each process has 4 CPU devices (8 in the single run), builds the global batch of 16
examples sharded over all 8 devices with jax.make_array_from_process_local_data (each
process passes only its own half), and computes under jax.jit: fgrad.accumulate's loss and
gradient, fgrad.grad_intermediates at every tap (per-example gradients, gathered), and
penalties.wgan_gp. Process 0 (or the single run) writes the results to OUT as .npz.
"""

import os
import sys


def main(out: str, mode: str, *rest: str) -> None:
    single = mode == "single"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 if single else 4}"

    import jax

    jax.config.update("jax_platforms", "cpu")
    if not single:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{rest[1]}", num_processes=2, process_id=int(rest[0])
        )

    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import fgrad

    N, D, H = 16, 3, 5
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(D, H)), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=(H,)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(H,)), jnp.float32),
    }
    x_all = rng.normal(size=(N, D)).astype(np.float32)
    y_all = rng.normal(size=(N,)).astype(np.float32)
    fake_all = rng.normal(size=(N, D)).astype(np.float32)

    def net(p, x):
        h = fgrad.tap("h", jnp.tanh(x @ p["w1"] + p["b1"]))
        return h @ p["w2"]

    def loss(p, b):
        return jnp.mean((net(p, b["x"]) - b["y"]) ** 2)

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    assert mesh.size == 8, mesh
    sharded = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    pid, nproc = jax.process_index(), jax.process_count()
    half = slice(pid * N // nproc, (pid + 1) * N // nproc)
    glob = lambda a: jax.make_array_from_process_local_data(sharded, a[half])
    batch = {"x": glob(x_all), "y": glob(y_all)}
    fake = glob(fake_all)
    p_rep = jax.device_put(params, replicated)

    @jax.jit
    def everything(p, b, fake):
        value, g = fgrad.accumulate(loss, p, b, microbatches=2)
        taps = fgrad.grad_intermediates(loss)(p, b)
        gp = fgrad.penalties.wgan_gp(net, p, b["x"], fake, key=jax.random.key(1))
        grads = {f"grad_{k}": v for k, v in g.items()}
        return {"value": value, **grads, "tap_h": taps["h"], "gp": gp}

    res = everything(p_rep, batch, fake)
    res = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in res.items()}
    if pid == 0:
        np.savez(out, **res)
    if not single:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
