"""Timing: compile (first call) separately from steady state; medians and spread.

Implementations of one computation (fgrad, hand-written JAX, ...) are timed together,
their rounds interleaved (A B C, B C A, C A B, ...): drift on a shared machine or a GPU
whose host is busy then hits every implementation alike, and their ratio is a paired one.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable


def _prepare(run: Callable[[], object], sync: Callable[[object], object], min_time: float):
    """First call (compile and warm-up) timed on its own, three warm-up calls, and the
    number of calls ``n`` that makes a round last at least ``min_time``."""
    t0 = time.perf_counter()
    sync(run())
    first = time.perf_counter() - t0
    singles = []
    for _ in range(3):
        t0 = time.perf_counter()
        sync(run())
        singles.append(time.perf_counter() - t0)
    n = max(1, min(1 << 20, math.ceil(min_time / max(min(singles), 1e-9))))
    return first, n


def _round(run: Callable[[], object], sync: Callable[[object], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        out = run()
    sync(out)
    return (time.perf_counter() - t0) / n


def _stats(first: float, n: int, per_call: list[float]) -> dict:
    per_call = sorted(per_call)
    q = lambda f: per_call[min(len(per_call) - 1, int(f * len(per_call)))]
    return {
        "compile_s": first,
        "median_s": statistics.median(per_call),
        "iqr_s": q(0.75) - q(0.25),
        "min_s": per_call[0],
        "calls_per_round": n,
        "rounds": len(per_call),
    }


def measure_group(
    runs: dict[str, Callable[[], object]],
    sync: Callable[[object], object],
    *,
    min_time: float,
    rounds: int,
) -> dict[str, dict | Exception]:
    """Times each of ``runs`` (key -> no-argument callable): its first call on its own,
    then ``rounds`` rounds of ``n`` calls, the implementations' rounds interleaved and
    their order rotated each round. An implementation that raises gets its exception as
    its result; the others go on."""
    out: dict[str, dict | Exception] = {}
    ready: dict[str, tuple[float, int]] = {}
    for key, run in runs.items():
        try:
            ready[key] = _prepare(run, sync, min_time)
        except Exception as e:  # reported by the caller, never fatal
            out[key] = e
    per_call: dict[str, list[float]] = {key: [] for key in ready}
    order = list(ready)
    for r in range(rounds if order else 0):
        shift = r % len(order)
        for key in order[shift:] + order[:shift]:
            if key in out:
                continue
            try:
                per_call[key].append(_round(runs[key], sync, ready[key][1]))
            except Exception as e:
                out[key] = e
    for key, (first, n) in ready.items():
        if key not in out:
            out[key] = _stats(first, n, per_call[key])
    return {key: out[key] for key in runs}
