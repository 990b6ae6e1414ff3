"""`fgrad bench`: fgrad's operations against hand-written JAX, PyTorch eager, torch.func
and torch.compile, each framework in its own process, on CPU or GPU.

This package (like `fgrad.interop.torch`) may import PyTorch; the rest of fgrad never does.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from typing import Any, TextIO

from fgrad._console import torch_available
from fgrad.bench._cases import cases
from fgrad.bench._report import add_derived, plot, ratios, render
from fgrad.bench._worker import JAX_PRECISION

SCHEMA = 1
PRECISIONS = tuple(JAX_PRECISION)  # float32, tf32
SUITE_SETTINGS = {  # min seconds per timing round, rounds, matmul size for the peak
    "tiny": (0.005, 3, 256),
    "quick": (0.05, 7, 1024),
    "full": (0.2, 10, 2048),
    "large": (0.1, 5, 2048),  # GPU only: one step is tens of milliseconds there
}
GPU_MATMUL = 8192  # matmul size for a GPU's peak: milliseconds per product, not launches


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine(device: str, accelerator: str | None = None) -> dict[str, Any]:
    """Describes this machine; ``name`` (the results file's stem) names the accelerator
    when the suite ran on one (``gpu-nvidia-h200``), else the CPU and its core count."""
    model = _cpu_model()
    cores = os.cpu_count() or 1
    if device == "gpu" and accelerator:
        name = f"gpu-{_slug(accelerator)}"
    else:
        name = f"{device}-{_slug(model)}-{cores}c"
    return {
        "name": name[:80],
        "cpu": model,
        "cores": cores,
        "device": device,
        "accelerator": accelerator if device == "gpu" else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


class _Progress:
    def __init__(self, total: int, out: TextIO, enabled: bool):
        self.total, self.done, self.out, self.enabled = total, 0, out, enabled

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        self.out.write(f"\r[{bar}] {self.done}/{self.total} {label[:50]:<50}")
        if self.done == self.total:
            self.out.write("\n")
        self.out.flush()


def _run_worker(
    framework: str, suite: str, only, device, threads, precision, todo_keys, progress, log
) -> tuple:
    min_time, rounds, mm = SUITE_SETTINGS[suite]
    if device == "gpu":  # a 1024 matmul takes tens of microseconds there: launch-bound
        mm = max(mm, GPU_MATMUL)
    cmd = [
        sys.executable,
        "-m",
        "fgrad.bench._worker",
        "--framework",
        framework,
        "--suite",
        suite,
        "--device",
        device,
        "--threads",
        str(threads),
        "--min-time",
        str(min_time),
        "--rounds",
        str(rounds),
        "--matmul",
        str(mm),
        "--precision",
        precision,
    ]
    if only:
        cmd += ["--only", only]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    meta, results = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if log is not None:  # each record as it arrives: an interrupted run keeps them
            log.write(line if line.endswith("\n") else line + "\n")
            log.flush()
        if rec.get("type") == "meta":
            meta = rec
        elif rec.get("type") == "peak" and meta is not None:
            meta["peak_gflops_readings"] = [meta["peak_gflops"], rec["peak_gflops"]]
            meta["peak_gflops"] = max(meta["peak_gflops_readings"])
        elif rec.get("type") == "case":
            results.append(rec)
            progress.step(rec["key"])
    stderr = proc.stderr.read() if proc.stderr else ""
    proc.wait()
    seen = {r["key"] for r in results}
    for key in todo_keys:  # a crashed worker: its remaining cases are errors, not fatal
        if key not in seen:
            w, op, impl = key.split("/")
            tail = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            results.append(
                {
                    "type": "case",
                    "key": key,
                    "workload": w,
                    "op": op,
                    "impl": impl,
                    "framework": framework,
                    "status": "error",
                    "error": f"worker crashed: {tail[0]}",
                }
            )
            progress.step(key)
    if meta is None:
        meta = {"framework": framework, "error": stderr.strip()[-2000:]}
    return meta, results


def run(
    *,
    suite: str = "quick",
    device: str = "cpu",
    only: str | None = None,
    threads: int = 0,
    precision: str = "float32",
    out: TextIO = sys.stderr,
    progress: bool = True,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Runs a suite and returns the report (plain data, the JSON schema).

    ``device="auto"`` is the GPU where JAX sees one, else the CPU. ``precision`` is what
    float32 matmuls and convolutions compute in both frameworks: ``"float32"`` (full
    precision) or ``"tf32"`` (TensorFloat-32 where the GPU has it; no effect on a CPU).
    ``log``, if given, receives every worker record as a JSON line the moment it arrives.
    """
    if suite not in SUITE_SETTINGS:
        raise ValueError(f"fgrad bench: unknown suite {suite!r}; use tiny, quick, full or large.")
    if precision not in PRECISIONS:
        raise ValueError(
            f"fgrad bench: unknown precision {precision!r}; use {' or '.join(PRECISIONS)}."
        )
    if device not in ("cpu", "gpu", "auto"):
        raise ValueError(f"fgrad bench: unknown device {device!r}; use cpu, gpu or auto.")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(
            f"fgrad bench: --threads must be 0 (all cores) or a positive number of threads, "
            f"got {threads!r}."
        )
    gpu = device != "cpu" and _gpu_available()  # one probe (a fresh JAX process)
    if device == "auto":
        device = "gpu" if gpu else "cpu"
    if device == "gpu" and not gpu:
        raise ValueError(
            "fgrad bench: --device gpu, but JAX sees no GPU here (its default backend is "
            "the CPU). Install the CUDA builds of JAX and PyTorch (e.g. pip install "
            "'jax[cuda13]' and a CUDA torch), or use --device cpu (or auto)."
        )
    if suite == "large" and device == "cpu":
        raise ValueError(
            "fgrad bench: --suite large is sized for a GPU (a ResNet-style CNN on 64x64 "
            "images, a transformer block of width 1024 on sequences of 1024): on a CPU one "
            "step takes seconds to minutes. Run it with --device gpu, or use --suite quick "
            "or full on the CPU."
        )
    have_torch = torch_available()
    todo = cases(suite, only, torch=have_torch)
    if not todo:
        raise ValueError(f"fgrad bench: no case matches --only {only!r}.")
    bar = _Progress(len(todo), out, progress)
    frameworks, results = [], []
    for fw in ("jax", "torch") if have_torch else ("jax",):
        keys = [c.key for c in todo if c.framework == fw]
        if keys:
            meta, res = _run_worker(fw, suite, only, device, threads, precision, keys, bar, log)
            frameworks.append(meta)
            results += res
    for r in results:
        r.pop("type", None)
    report = {
        "schema": SCHEMA,
        "suite": suite,
        "only": only,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device, _accelerator(frameworks)),
        "precision": precision,
        "frameworks": frameworks,
        "torch_installed": have_torch,
        "cases": results,
    }
    report["ratios"] = ratios(results)
    add_derived(report)
    return report


def _accelerator(frameworks: list[dict]) -> str | None:
    """The GPU's name as the workers saw it (JAX's device kind, else PyTorch's)."""
    for meta in frameworks:
        kind = meta.get("device_kind")
        if kind and meta.get("backend") not in (None, "cpu"):
            return kind
    return None


def main(
    *,
    suite: str,
    device: str,
    only: str | None,
    json_path: str | None,
    plot_path: str | None,
    threads: int,
    out: TextIO,
    precision: str = "float32",
    log_path: str | None = None,
) -> int:
    log = open(log_path, "a") if log_path else None  # closed below
    try:
        report = run(
            suite=suite,
            device=device,
            only=only,
            threads=threads,
            precision=precision,
            progress=sys.stderr.isatty() or bool(os.environ.get("FGRAD_PROGRESS")),
            log=log,
        )
    finally:
        if log is not None:
            log.close()
    render(report, out)
    if not report["torch_installed"]:
        print(
            "PyTorch is not installed: only fgrad and hand-written JAX were measured "
            "(pip install -c constraints.txt 'fgrad[torch]').",
            file=out,
        )
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {json_path}", file=out)
    if plot_path:
        plot(report, plot_path)
        print(f"wrote {plot_path}", file=out)
    return 0


def _gpu_available() -> bool:
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import jax; print(jax.default_backend())"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return out.stdout.strip() in ("gpu", "cuda", "rocm")
    except (OSError, subprocess.SubprocessError):
        return False
