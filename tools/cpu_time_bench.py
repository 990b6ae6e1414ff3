"""`fgrad bench` cases timed in CPU time, single-threaded: comparisons that survive a
machine shared with other work.

On a 2-core machine shared by several busy processes, a process gets a varying fraction
of a core, so wall-clock medians taken in two processes (JAX and PyTorch must not share
one) at two different moments do not compare. The CPU time a single-threaded process
spends on a call does not depend on how often it was descheduled. This tool builds the
same cases as `fgrad bench` (its builders), runs each framework in its own process on one
thread, and times each case by the process's CPU time per call, the implementations'
rounds interleaved.

    python tools/cpu_time_bench.py --only 'cnn-16-32/microbatch,cnn-16-32/grad' \
        --json benchmarks/results/issue16/cpu-time-1.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _worker(framework: str, only: str, rounds: int, min_cpu: float) -> list[dict]:
    from fgrad.bench._cases import cases

    todo = [c for c in cases("quick", only) if c.framework == framework]
    runs = {}
    if framework == "jax":
        import jax

        from fgrad.bench import _jax_ops

        for c in todo:
            fn, args = _jax_ops.build(c.op, c.impl, c.workload)
            runs[c.key] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    else:
        import torch

        from fgrad.bench import _torch_ops
        from fgrad.bench._cases import Unsupported

        torch.set_num_threads(1)
        for c in todo:
            try:
                runs[c.key] = _torch_ops.build(c.op, c.impl, c.workload, "cpu")
            except Unsupported:
                continue
    calls = {}
    for k, run in runs.items():
        run()
        t0 = time.process_time()
        run()
        calls[k] = max(1, int(min_cpu / max(time.process_time() - t0, 1e-6)))
    per = {k: [] for k in runs}
    order = list(runs)
    for r in range(rounds):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            t0 = time.process_time()
            for _ in range(calls[k]):
                runs[k]()
            per[k].append((time.process_time() - t0) / calls[k])
    return [
        {"key": k, "cpu_s_median": statistics.median(v), "cpu_s_min": min(v), "rounds": rounds}
        for k, v in per.items()
    ]


def _report(only: str, results: list[dict], ratios: dict) -> dict:
    import datetime

    from fgrad.bench import machine

    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("cpu"),
        "only": only,
        "threads": 1,
        "timer": "process CPU time per call",
        "cases": results,
        "ratios": ratios,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", required=True)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--min-cpu", type=float, default=0.1)
    ap.add_argument("--worker", choices=("jax", "torch"))
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(_worker(a.worker, a.only, a.rounds, a.min_cpu)))
        return
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        "OMP_NUM_THREADS": "1",
    }
    results = []
    for fw in ("jax", "torch"):
        cmd = [sys.executable, __file__, "--worker", fw, "--only", a.only]
        cmd += ["--rounds", str(a.rounds), "--min-cpu", str(a.min_cpu)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results += json.loads(out.stdout.strip().splitlines()[-1])
    by = {r["key"]: r["cpu_s_median"] for r in results}
    ratios = {}
    for key, t in by.items():
        w, op, impl = key.split("/")
        if impl == "fgrad":
            for other in ("jax", "torch"):
                if f"{w}/{op}/{other}" in by:
                    ratios[f"{w}/{op}/fgrad/{other}"] = t / by[f"{w}/{op}/{other}"]
    for r in results:
        print(
            f"{r['key']:40s} {1e3 * r['cpu_s_median']:9.2f} ms CPU (min {1e3 * r['cpu_s_min']:.2f})"
        )
    for k, v in ratios.items():
        print(f"{k:40s} {v:6.2f}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(
                {"only": a.only, "threads": 1, "cases": results, "ratios": ratios}, fh, indent=1
            )


if __name__ == "__main__":
    main()
