"""Ratios, the summary table and the plot of a benchmark run."""

from __future__ import annotations

from typing import Any, TextIO

from fgrad._console import print_table

REFERENCES = ("jax", "torch", "torch.func", "torch.compile")


def _time(rows: dict, impl: str) -> float | None:
    r = rows.get(impl)
    return r["median_s"] if r and r.get("status") == "ok" else None


def _by_op(cases: list[dict]) -> dict[tuple, dict]:
    """Cases grouped as {(workload, op): {impl: case}}, in the order they came."""
    by: dict[tuple, dict] = {}
    for c in cases:
        by.setdefault((c["workload"], c["op"]), {})[c["impl"]] = c
    return by


def ratios(cases: list[dict]) -> list[dict]:
    """fgrad's median time over each reference implementation's, per (workload, op)."""
    out = []
    for (workload, op), rows in _by_op(cases).items():
        ours = _time(rows, "fgrad")
        row: dict[str, Any] = {"workload": workload, "op": op}
        for ref in (*REFERENCES, "fgrad-nested"):
            t = _time(rows, ref)
            row[f"fgrad/{ref}"] = ours / t if ours and t else None
        out.append(row)
    return out


def add_derived(report: dict) -> None:
    """Achieved fraction of the measured matmul peak (from XLA's FLOP count of the same
    computation) for every case, and HVP/gradient ratios."""
    peaks = {m["framework"]: m.get("peak_gflops") for m in report["frameworks"]}
    flops = {}
    for c in report["cases"]:
        if c.get("flops"):
            flops[(c["workload"], c["op"])] = c["flops"]
    for c in report["cases"]:
        f = flops.get((c["workload"], c["op"]))
        peak = peaks.get(c["framework"])
        c["achieved_fraction"] = (
            f / c["median_s"] / (peak * 1e9)
            if f and peak and c.get("status") == "ok" and c.get("median_s")
            else None
        )
    times = {
        (c["workload"], c["op"], c["impl"]): c.get("median_s")
        for c in report["cases"]
        if c.get("status") == "ok"
    }
    for op, key in (("hvp", "hvp_over_grad"), ("hvp_linearized", "hvp_linearized_over_grad")):
        report[key] = {
            f"{w}/{impl}": times[(w, op, impl)] / times[(w, "grad", impl)]
            for (w, o, impl) in times
            if o == op and (w, "grad", impl) in times
        }


def _fmt_time(c: dict | None) -> str:
    if c is None:
        return ""
    if c.get("status") == "unsupported":
        return "unsupported"
    if c.get("status") != "ok":
        return "ERROR"
    t = c["median_s"]
    return f"{t * 1e6:.0f}us" if t < 1e-3 else f"{t * 1e3:.2f}ms"


def _fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def render(report: dict, out: TextIO) -> None:
    by = _by_op(report["cases"])
    rat = {(r["workload"], r["op"]): r for r in report["ratios"]}
    head = (
        "workload",
        "op",
        "fgrad",
        "jax",
        "torch",
        "torch.func",
        "torch.compile",
        "/jax",
        "/torch",
        "/t.func",
        "% peak",
    )
    rows = []
    for (w, op), impls in by.items():
        r = rat.get((w, op), {})
        frac = (impls.get("fgrad") or {}).get("achieved_fraction")
        rows.append(
            (
                w,
                op,
                _fmt_time(impls.get("fgrad")),
                _fmt_time(impls.get("jax")),
                _fmt_time(impls.get("torch")),
                _fmt_time(impls.get("torch.func")),
                _fmt_time(impls.get("torch.compile")),
                _fmt_ratio(r.get("fgrad/jax")),
                _fmt_ratio(r.get("fgrad/torch")),
                _fmt_ratio(r.get("fgrad/torch.func")),
                "" if frac is None else f"{100 * frac:.1f}",
            )
        )
    print_table(head, rows, out, right=range(2, len(head)))
    fw = {m["framework"]: m for m in report["frameworks"]}
    print(file=out)
    for name, m in fw.items():
        print(
            f"{name} {m.get('version')} on {m.get('backend')}: {m.get('threads')} threads, "
            f"matmul peak {m.get('peak_gflops', 0):.1f} GFLOP/s"
            + (f", XLA_FLAGS={m.get('xla_flags')!r}" if name == "jax" else ""),
            file=out,
        )
    errors = [c for c in report["cases"] if c.get("status") == "error"]
    if errors:
        print(f"\n{len(errors)} case(s) failed (reported, not fatal):", file=out)
        for c in errors:
            print(f"  {c['key']}: {c.get('error')}", file=out)
    print(
        "\nTimes are medians over rounds (first call, i.e. compilation, timed separately); "
        "ratios below 1 mean fgrad is faster.",
        file=out,
    )


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["ratios"] if r.get("fgrad/torch") or r.get("fgrad/jax")]
    labels = [f"{r['workload']} {r['op']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.5))
    ys = range(len(rows))
    for off, ref, color in ((-0.2, "torch", "tab:orange"), (0.2, "jax", "tab:blue")):
        vals = [r.get(f"fgrad/{ref}") or float("nan") for r in rows]
        ax.barh(
            [y + off for y in ys],
            vals,
            height=0.4,
            color=color,
            label=f"fgrad time / {'PyTorch eager' if ref == 'torch' else 'hand-written JAX'}",
        )
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time ratio (below 1: fgrad faster)")
    ax.set_title(f"fgrad bench, {report['suite']} suite, {report['machine']['name']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
