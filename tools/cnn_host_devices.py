"""The bench CNN's gradient on one CPU device against its batch split over two host
devices (``--xla_force_host_platform_device_count=2``, batch sharded, data-parallel),
wall clock, interleaved rounds: XLA:CPU runs this CNN's convolutions on one core whatever
the thread count, so a second device is how a second core is put to work.

    python tools/cnn_host_devices.py
"""

from __future__ import annotations

import os
import statistics
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fgrad.bench import _jax_ops
from fgrad.bench._workloads import workloads


def main(rounds: int = 30) -> None:
    (w,) = [x for x in workloads("quick") if x.name == "cnn-16-32"]
    params, batch = _jax_ops._data(w)
    loss = _jax_ops._losses(w)[0]
    grad = jax.jit(jax.grad(lambda p, b: loss(p, b, _jax_ops._identity_tap)))
    mesh = jax.make_mesh((2,), ("batch",))
    one = jax.device_put((params, batch), jax.devices()[0])
    two = (
        jax.device_put(params, NamedSharding(mesh, P())),
        jax.device_put(batch, NamedSharding(mesh, P("batch"))),
    )
    runs = {"one device": one, "batch over two devices": two}
    for args in runs.values():
        jax.block_until_ready(grad(*args))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, args in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(grad(*args))
            times[k].append(time.perf_counter() - t0)
    for k, ts in times.items():
        print(f"{w.name} gradient, {k}: {1e3 * statistics.median(ts):.2f} ms (median)")


if __name__ == "__main__":
    main()
