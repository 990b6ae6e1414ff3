"""Per-convolution roofline of `fgrad bench`'s CNN on the CPU: XLA against PyTorch.

Times each convolution of the CNN's training step on its own (the two forward
convolutions, the two input-gradient and the two kernel-gradient ones), in XLA (JAX, NHWC
as Flax lays images out, or NCHW as PyTorch does) and in PyTorch (NCHW, its
``convolution_backward`` for the gradients), each framework in its own process, and
reports achieved GFLOP/s against the matmul peak each framework measures on the same
machine. Times are the process's CPU time per call (run it with --threads 1: on a machine
shared with other work, CPU time does not count the time the process waited for a core).
This is the evidence behind the README's CPU CNN paragraph; it measures outside loops
(inside them, see jax#12868 and `fgrad._conv_layout`).

    python tools/conv_roofline.py --json benchmarks/results/issue16/cpu-conv-roofline-1.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"conv1": (3, 16), "conv2": (16, 32)}  # (in, out) channels, 3x3, SAME, 32x32
GRAD_STEP = ("conv1.fwd", "conv2.fwd", "conv2.dgrad", "conv1.wgrad", "conv2.wgrad")


def _flops(batch: int, size: int, cin: int, cout: int) -> float:
    return 2.0 * batch * size * size * cin * cout * 9


def _time(fns: dict, rounds: int, min_time: float) -> dict:
    """(median, best) CPU seconds per call of each no-argument function, rounds
    interleaved."""
    calls = {}
    for k, f in fns.items():
        f()
        t0 = time.process_time()
        f()
        calls[k] = max(1, int(min_time / max(time.process_time() - t0, 1e-7)))
    per = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns)
        order = order[r % len(order) :] + order[: r % len(order)]
        for k in order:
            t0 = time.process_time()
            for _ in range(calls[k]):
                fns[k]()
            per[k].append((time.process_time() - t0) / calls[k])
    return {k: (statistics.median(v), min(v)) for k, v in per.items()}


def _jax_fns(batch: int, size: int, layout: str) -> tuple[dict, object]:
    import jax
    import jax.numpy as jnp

    dn = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")
    fns = {}

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn)

    for name, (cin, cout) in SHAPES.items():
        x_shape = (batch, size, size, cin) if layout == "NHWC" else (batch, cin, size, size)
        k_shape = (3, 3, cin, cout) if layout == "NHWC" else (cout, cin, 3, 3)
        x = jnp.ones(x_shape) * 0.1
        k = jnp.ones(k_shape) * 0.1
        g = conv(x, k)
        fwd = jax.jit(conv)
        dgrad = jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0])
        wgrad = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])
        fns[f"{name}.fwd"] = lambda f=fwd, x=x, k=k: f(x, k).block_until_ready()
        fns[f"{name}.dgrad"] = lambda f=dgrad, x=x, k=k, g=g: f(x, k, g).block_until_ready()
        fns[f"{name}.wgrad"] = lambda f=wgrad, x=x, k=k, g=g: f(x, k, g).block_until_ready()
    a = jnp.ones((1024, 1024))
    mm = jax.jit(lambda a: a @ a)
    fns["matmul1024"] = lambda: mm(a).block_until_ready()
    return fns, jax.__version__


def _torch_fns(batch: int, size: int) -> tuple[dict, object]:
    import torch

    torch.set_num_threads(int(os.environ.get("ROOFLINE_THREADS", os.cpu_count() or 1)))
    fns = {}

    def bwd(g, x, k, mask):
        return torch.ops.aten.convolution_backward(
            g, x, k, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
        )

    for name, (cin, cout) in SHAPES.items():
        x = torch.full((batch, cin, size, size), 0.1)
        k = torch.full((cout, cin, 3, 3), 0.1)
        g = torch.nn.functional.conv2d(x, k, padding=1)
        fns[f"{name}.fwd"] = lambda x=x, k=k: torch.nn.functional.conv2d(x, k, padding=1)
        fns[f"{name}.dgrad"] = lambda g=g, x=x, k=k: bwd(g, x, k, [True, False, False])
        fns[f"{name}.wgrad"] = lambda g=g, x=x, k=k: bwd(g, x, k, [False, True, False])
    a = torch.ones(1024, 1024)
    fns["matmul1024"] = lambda: a @ a
    return fns, torch.__version__


def worker(framework: str, layout: str, batch: int, size: int, rounds: int) -> dict:
    if framework == "jax":
        fns, version = _jax_fns(batch, size, layout)
    else:
        fns, version = _torch_fns(batch, size)
    with_grad = __import__("contextlib").nullcontext()
    if framework == "torch":
        import torch

        with_grad = torch.no_grad()
    with with_grad:
        times = _time(fns, rounds, 0.05)
    peak = 2 * 1024**3 / times.pop("matmul1024")[1] / 1e9
    ops = {}
    for op, (median, best) in times.items():
        cin, cout = SHAPES[op.split(".")[0]]
        gflops = _flops(batch, size, cin, cout) / best / 1e9
        ops[op] = {"median_s": median, "best_s": best, "gflops": gflops, "of_peak": gflops / peak}
    label = f"{framework}-{layout}" if framework == "jax" else "torch-NCHW"
    # The convolutions of one training step's gradient (the input's gradient is not needed).
    step = sum(ops[k]["best_s"] for k in GRAD_STEP)
    return {
        "impl": label,
        "version": version,
        "peak_gflops": peak,
        "ops": ops,
        "grad_convs_s": step,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=("jax", "torch"))
    ap.add_argument("--layout", default="NHWC", choices=("NHWC", "NCHW"))
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="per framework; 0: all cores")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.layout, a.batch[0], a.size, a.rounds)))
        return
    results = []
    for batch in a.batch:
        for fw, layout in (("jax", "NHWC"), ("jax", "NCHW"), ("torch", "NCHW")):
            cmd = [sys.executable, __file__, "--worker", fw, "--layout", layout]
            cmd += ["--batch", str(batch), "--size", str(a.size), "--rounds", str(a.rounds)]
            env = {**os.environ, "JAX_PLATFORMS": "cpu"}
            if a.threads:  # as fgrad bench sets them
                env["ROOFLINE_THREADS"] = str(a.threads)
                env["XLA_FLAGS"] = (
                    f"--xla_cpu_multi_thread_eigen={'true' if a.threads > 1 else 'false'} "
                    f"intra_op_parallelism_threads={a.threads}"
                )
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            rec = {"batch": batch, **json.loads(out.stdout.strip().splitlines()[-1])}
            results.append(rec)
            print(
                f"batch {batch:4d} {rec['impl']:10s} peak {rec['peak_gflops']:6.1f} GFLOP/s | "
                + " ".join(
                    f"{k} {v['gflops']:5.1f} ({100 * v['of_peak']:3.0f}%)"
                    for k, v in rec["ops"].items()
                )
                + f" | gradient's convolutions {1e3 * rec['grad_convs_s']:.2f} ms",
                flush=True,
            )
    if a.json:
        meta = {
            "cores": os.cpu_count(),
            "threads": a.threads or os.cpu_count(),
            "size": a.size,
            "channels": SHAPES,
        }
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump({"machine": meta, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
