"""HVP against gradient on `fgrad bench`'s workloads: XLA's FLOP counts of the three ways
to compose an exact Hessian-vector product, and their times in interleaved rounds.

    forward-over-reverse  jvp of grad            (fgrad.hvp's default)
    reverse-over-reverse  grad of <grad f, v>
    reverse-over-forward  grad of jvp(f)(v)
    linearized            one product of fgrad.linearize_grad's hvp (the forward and
                          backward passes done beforehand: the cost per product when
                          many products share one Hessian)

Times are the process's CPU time (run it single-threaded: the machine may be shared).
Evidence for the README's HVP paragraph: the FLOP ratio HVP / gradient is what no choice
of composition goes below.

    python tools/hvp_flops.py --json benchmarks/results/issue16/cpu-hvp-compositions.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

import fgrad
from fgrad.bench import _jax_ops
from fgrad.bench._workloads import workloads


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def compositions(w):
    params, batch = _jax_ops._data(w)
    loss = _jax_ops._losses(w)[0]
    f = lambda p, b: loss(p, b, _jax_ops._identity_tap)
    v = jax.tree.map(lambda a: jnp.full_like(a, 0.01), params)
    hvp_lin = jax.jit(lambda p, b: fgrad.linearize_grad(f, p, b)[1])(params, batch)
    fns = {
        "grad": lambda p, t, b: jax.grad(f)(p, b),
        "forward_over_reverse": lambda p, t, b: jax.jvp(lambda q: jax.grad(f)(q, b), (p,), (t,))[1],
        "reverse_over_reverse": lambda p, t, b: jax.grad(lambda q: _vdot(jax.grad(f)(q, b), t))(p),
        "reverse_over_forward": lambda p, t, b: jax.grad(
            lambda q: jax.jvp(lambda r: f(r, b), (q,), (t,))[1]
        )(p),
    }
    args = (params, v, batch)
    out = {k: (jax.jit(g), args) for k, g in fns.items()}
    out["linearized"] = (jax.jit(lambda hv, t: hv(t)), (hvp_lin, v))
    return out


def measure(w, rounds: int) -> dict:
    fns = compositions(w)
    out = {}
    for k, (fn, args) in fns.items():
        c = fn.lower(*args).compile()
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        jax.block_until_ready(c(*args))
        out[k] = {"flops": float(cost.get("flops", 0.0)), "times": []}
    for r in range(rounds):
        order = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
        for k in order:
            fn, args = fns[k]
            t0 = time.process_time()
            for _ in range(3):
                res = fn(*args)
            jax.block_until_ready(res)
            out[k]["times"].append((time.process_time() - t0) / 3)
    g_flops, g_times = out["grad"]["flops"], list(out["grad"]["times"])
    for rec in out.values():
        ratios = [t / tg for t, tg in zip(rec.pop("times"), g_times, strict=True)]
        rec["over_grad_flops"] = rec["flops"] / g_flops
        rec["over_grad_time_median"] = statistics.median(ratios)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="transformer-d128,mlp-1024x3,cnn-16-32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json")
    a = ap.parse_args()
    names = a.only.split(",")
    res = {}
    for w in workloads("quick"):
        if w.name in names:
            res[w.name] = measure(w, a.rounds)
            for k, rec in res[w.name].items():
                print(
                    f"{w.name:18s} {k:22s} {rec['flops'] / 1e9:7.3f} GFLOP  "
                    f"/grad: FLOPs {rec['over_grad_flops']:.2f}, "
                    f"time {rec['over_grad_time_median']:.2f}",
                    flush=True,
                )
    if a.json:
        from fgrad.bench import machine

        meta = {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "machine": machine(jax.default_backend()),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "timer": "process CPU time per call",
            "rounds": a.rounds,
        }
        with open(a.json, "w") as fh:
            json.dump({"meta": meta, "workloads": res}, fh, indent=1)


if __name__ == "__main__":
    main()
