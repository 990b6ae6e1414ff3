"""One framework's side of the benchmark, run in its own process.

    python -m fgrad.bench._worker --framework jax --suite quick [--only GLOB] ...

Prints one JSON object per line: first the settings ("meta"), then one per case. The
parent process (`fgrad bench`) starts one worker per framework, so JAX and PyTorch never
share a process (they fight over threads and distort each other's timings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from fgrad.bench._cases import TIMED_WITH, Unsupported, registry
from fgrad.bench._measure import measure_group
from fgrad.bench._registry import Registry


def _setup_jax_env(device: str, threads: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if threads > 0 and "intra_op_parallelism_threads" not in flags:
        flags += f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
        flags += f" intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = flags.strip()
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"


# --precision: what a float32 matmul or convolution computes. JAX's GPU default is
# TensorFloat-32 and PyTorch's matmul default is full float32 (its cuDNN convolutions
# default to TF32), so each framework is set explicitly to do the same work. CPUs have
# no TF32: both compute full float32 there either way.
JAX_PRECISION = {"float32": "float32", "tf32": "tensorfloat32"}
TORCH_PRECISION = {"float32": "ieee", "tf32": "tf32"}


def _set_torch_precision(torch, precision: str) -> None:
    mode = TORCH_PRECISION[precision]
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:  # older PyTorch: the legacy switches (mixing the two APIs is an error)
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _peak_gflops(matmul, sync, n: int) -> float:
    """Measured matmul throughput: the machine's practical peak for this framework."""
    out = matmul()
    sync(out)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(3):
            out = matmul()
        sync(out)
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2 * n**3 / best / 1e9


def _emit_peak(framework: str, gflops: float) -> None:
    """The matmul peak measured again after the cases: on a shared machine one reading
    can come out low, and the parent keeps the higher of the two."""
    _emit({"type": "peak", "framework": framework, "peak_gflops": gflops})


def _fail(rec: dict, e: BaseException) -> None:
    if isinstance(e, Unsupported):
        rec.update(status="unsupported", error=str(e))
    else:
        rec.update(
            status="error",
            error=f"{type(e).__name__}: {e}",
            traceback="".join(traceback.format_exception(e, limit=4)),
        )


def _run_cases(todo, framework: str, build, sync, args, extras=None) -> None:
    """Times the cases, the implementations of one (workload, operation) together with
    their rounds interleaved (`measure_group`), and emits one record per case. Operations
    reported as a ratio to another (`TIMED_WITH`: the HVPs to the gradient) join that
    operation's rounds, so the ratio is not skewed by drift between the two.

    ``build(case) -> (run, info)`` makes the no-argument callable; ``extras(info, run)``
    adds what is measured apart from time (FLOPs, memory). An exception is recorded with
    its case, never fatal."""
    groups: dict[tuple, list] = {}
    for case in todo:
        op = TIMED_WITH.get(case.op, case.op)
        groups.setdefault((case.workload.name, op), []).append(case)
    for group in groups.values():
        recs, runs, infos = {}, {}, {}
        for case in group:
            recs[case.key] = {
                "type": "case",
                "key": case.key,
                "workload": case.workload.name,
                "op": case.op,
                "impl": case.impl,
                "framework": framework,
            }
            try:
                runs[case.key], infos[case.key] = build(case)
            except Exception as e:
                _fail(recs[case.key], e)
        timed = measure_group(runs, sync, min_time=args.min_time, rounds=args.rounds)
        for key, res in timed.items():
            if isinstance(res, Exception):
                _fail(recs[key], res)
                continue
            try:
                recs[key].update(res)
                if extras is not None:
                    recs[key].update(extras(infos[key], runs[key]))
                recs[key]["status"] = "ok"
            except Exception as e:
                _fail(recs[key], e)
        del runs, infos  # free this group's arrays before the next group's
        for case in group:
            _emit(recs[case.key])


def run_jax(args, todo, reg: Registry | None = None) -> None:
    """Runs the JAX cases ``todo`` with the builders of ``reg`` (the default registry)."""
    reg = registry() if reg is None else reg
    _setup_jax_env(args.device, args.threads)
    import jax
    import jax.numpy as jnp

    from fgrad.bench import _jax_ops

    if jax.default_backend() != "cpu":  # the CPU computes full float32 regardless
        jax.config.update("jax_default_matmul_precision", JAX_PRECISION[args.precision])
    sync = jax.block_until_ready
    a = jnp.ones((args.matmul, args.matmul), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    peak = lambda: _peak_gflops(lambda: mm(a), sync, args.matmul)
    _emit(
        {
            "type": "meta",
            "framework": "jax",
            "version": jax.__version__,
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind,
            "precision": args.precision,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "threads": args.threads or os.cpu_count(),
            "peak_gflops": peak(),
        }
    )

    def build(case):
        fn, fargs = reg.builder(case.op, case.impl)(case.impl, case.workload)
        return (lambda: fn(*fargs)), (fn, fargs)

    _run_cases(todo, "jax", build, sync, args, lambda info, run: _jax_ops.cost(*info))
    _emit_peak("jax", peak())


def run_torch(args, todo, reg: Registry | None = None) -> None:
    """Runs the PyTorch cases ``todo`` with the builders of ``reg`` (the default registry)."""
    import torch

    reg = registry() if reg is None else reg

    device = "cuda" if args.device == "gpu" else "cpu"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    _set_torch_precision(torch, args.precision)
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)

    def peak() -> float:  # its matrix is freed on return: cases' peak memory is their own
        a = torch.ones((args.matmul, args.matmul), device=device)
        return _peak_gflops(lambda: a @ a, sync, args.matmul)

    _emit(
        {
            "type": "meta",
            "framework": "torch",
            "version": torch.__version__,
            "backend": device,
            "device_kind": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "precision": args.precision,
            "threads": torch.get_num_threads(),
            "peak_gflops": peak(),
        }
    )

    cuda = device == "cuda"
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)

    def build(case):
        before = allocated()
        run = reg.builder(case.op, case.impl)(case.impl, case.workload, device)
        return run, allocated() - before  # the case's own tensors (parameters, batch)

    def memory(inputs, run):
        """Peak allocated bytes of one call: its own inputs plus what the call adds (the
        other cases of its group are alive too, so their bytes are taken out)."""
        if not cuda:
            return {"memory_bytes": None}  # PyTorch keeps no CPU allocator statistics
        sync(None)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        sync(run())
        return {"memory_bytes": inputs + torch.cuda.max_memory_allocated() - base}

    _run_cases(todo, "torch", build, sync, args, memory)
    _emit_peak("torch", peak())


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--framework", choices=("jax", "torch"), required=True)
    p.add_argument("--suite", default="quick")
    p.add_argument("--only", default=None)
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--min-time", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--matmul", type=int, default=1024)
    p.add_argument("--precision", default="float32", choices=tuple(JAX_PRECISION))
    args = p.parse_args(argv)

    from fgrad.bench._cases import cases

    todo = [c for c in cases(args.suite, args.only) if c.framework == args.framework]
    (run_jax if args.framework == "jax" else run_torch)(args, todo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
