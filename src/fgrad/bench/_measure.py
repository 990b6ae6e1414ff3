"""Timing: compile (first call) separately from steady state; medians and spread."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable


def measure(
    run: Callable[[], object], sync: Callable[[object], object], *, min_time: float, rounds: int
) -> dict:
    """Times ``run``: the first call (compile and warm-up) on its own, then ``rounds``
    rounds of ``n`` calls each, ``n`` chosen so a round takes at least ``min_time``."""
    t0 = time.perf_counter()
    sync(run())
    first = time.perf_counter() - t0
    singles = []
    for _ in range(3):  # warm-up calls, and the per-call time that sizes a round
        t0 = time.perf_counter()
        sync(run())
        singles.append(time.perf_counter() - t0)
    n = max(1, min(1 << 20, math.ceil(min_time / max(min(singles), 1e-9))))
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            out = run()
        sync(out)
        per_call.append((time.perf_counter() - t0) / n)
    per_call.sort()
    q = lambda f: per_call[min(len(per_call) - 1, int(f * len(per_call)))]
    return {
        "compile_s": first,
        "median_s": statistics.median(per_call),
        "iqr_s": q(0.75) - q(0.25),
        "min_s": per_call[0],
        "calls_per_round": n,
        "rounds": rounds,
    }
