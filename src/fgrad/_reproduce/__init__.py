"""`fgrad reproduce`: the seed notebook, cell by cell, in PyTorch and in fgrad.

Each quantity the notebook prints is computed three ways: read from the notebook, by the
notebook's own PyTorch code (when torch is installed), and by fgrad (jit-compiled, and
checked against an eager run). A row matches when every value present agrees.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import textwrap
from typing import Any, TextIO

import jax

from fgrad._console import print_table, torch_available
from fgrad._reproduce._notebook import QUANTITIES, SECOND_BACKWARD_ERROR

RTOL = 1e-6
_FREED = "RuntimeError: Trying to backward through the graph a second time"
TORCH_HINT = (
    "PyTorch is not installed, so only fgrad and the notebook's printed values were "
    "compared. Add the PyTorch column with: pip install -c constraints.txt 'fgrad[torch]' "
    "(constraints.txt pins the CPU build, torch==2.13.0)."
)
SKIPPED_HINT = "The PyTorch column was skipped (--no-torch)."


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=0.0)


def compare(*, use_torch: bool | None = None) -> dict[str, Any]:
    """Computes every quantity and compares; returns the report as plain data."""
    from fgrad._reproduce import _fgrad_side

    installed = torch_available()
    if use_torch is None:
        use_torch = installed
    fg = _fgrad_side.compute(jit=True)
    fg_eager = _fgrad_side.compute(jit=False)
    th: dict[str, float | None] = {}
    torch_errors: dict[str, str] = {}
    torch_version = None
    if use_torch:
        from fgrad._reproduce import _torch_side

        th = _torch_side.compute()
        torch_errors = _torch_side.second_backward()
        torch_version = _torch_side.version()

    rows = []
    for q in QUANTITIES:
        values = [q.notebook, fg[q.key], fg_eager[q.key]]
        if use_torch:
            values.append(th[q.key])
        ok = all(_same(values[0], v) for v in values[1:])
        rows.append(
            {
                "cell": q.cell,
                "key": q.key,
                "quantity": q.label,
                "notebook": q.notebook,
                "pytorch": th.get(q.key) if use_torch else None,
                "fgrad": fg[q.key],
                "fgrad_eager": fg_eager[q.key],
                "fgrad_idiom": q.fgrad_idiom,
                "match": ok,
            }
        )

    # In[25]-[26] the fgrad way: the In[31]-[33] rows (one forward pass, its pullback
    # called twice, then a backward), which PyTorch can only do with retain_graph=True.
    retained = {"grad_w1": "retain.w1", "grad_w2": "retain.w2", "backward_b2": "retain.backward.b2"}
    fgrad_twice = {name: fg[key] for name, key in retained.items()}
    by_key = {r["key"]: r for r in rows}
    second = {
        "notebook": SECOND_BACKWARD_ERROR,
        "pytorch": torch_errors or None,
        "fgrad": fgrad_twice,
        # PyTorch must refuse (as the notebook shows); fgrad must give the retained values.
        "match": (
            (not use_torch or all(e.startswith(_FREED) for e in torch_errors.values()))
            and all(by_key[key]["match"] for key in retained.values())
        ),
    }
    return {
        "rows": rows,
        "second_backward": second,
        "torch": torch_version,
        "torch_installed": installed,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": platform.python_version(),
        "all_match": all(r["match"] for r in rows) and second["match"],
    }


def _fmt(v: float | None, present: bool = True) -> str:
    if not present:
        return "-"
    if v is None:
        return "None"
    return f"{v:g}"


def render(report: dict[str, Any], out: TextIO) -> None:
    """Prints the report as a table."""
    has_torch = report["torch"] is not None
    head = ("In[]", "quantity", "notebook", "PyTorch", "fgrad", "match", "fgrad idiom")
    body = [
        (
            str(r["cell"]),
            r["quantity"],
            _fmt(r["notebook"]),
            _fmt(r["pytorch"], has_torch),
            _fmt(r["fgrad"]),
            "yes" if r["match"] else "NO",
            r["fgrad_idiom"],
        )
        for r in report["rows"]
    ]
    print("The seed notebook, y = ((w1*x)*w2 + b2)^2 with w1=3, w2=2, b2=6, x=4", file=out)
    print(
        f"fgrad on JAX {report['jax']} ({report['backend']}, jit-compiled and eager); "
        f"PyTorch {report['torch'] or 'not installed'}",
        file=out,
    )
    print(file=out)
    print_table(head, body, out, right={0, 2, 3, 4})

    s = report["second_backward"]
    print(file=out)
    print("In[25]-[26]: a second backward through the same forward pass", file=out)
    wrap = functools.partial(textwrap.fill, width=100, subsequent_indent=" " * 6)
    if s["pytorch"]:
        print(wrap(f"  PyTorch autograd.grad(y, w2): {s['pytorch']['grad_w2']}"), file=out)
        print(wrap(f"  PyTorch y.backward(): {s['pytorch']['backward']}"), file=out)
    else:
        print(wrap(f"  PyTorch (the notebook's output): {s['notebook']}"), file=out)
    fg = s["fgrad"]
    print(
        wrap(
            "  fgrad: y, pullback = vjp_intermediates(y_fn, argnums=0)(params, z); the "
            "pullback is a pure function, so it can be called again:"
        ),
        file=out,
    )
    print(
        f"    pullback(1) -> w1 grad {fg['grad_w1']:g}; pullback(1) again -> w2 grad "
        f"{fg['grad_w2']:g}; backward(y_fn, ...) -> b2 grad {fg['backward_b2']:g}   "
        f"[{'matches retain_graph=True' if s['match'] else 'MISMATCH'}]",
        file=out,
    )
    print(file=out)
    n_ok = sum(r["match"] for r in report["rows"])
    print(f"{n_ok} of {len(report['rows'])} quantities match", file=out, end="")
    print(" (fgrad, notebook and PyTorch)." if has_torch else " (fgrad and notebook).", file=out)
    if not has_torch:
        hint = SKIPPED_HINT if report["torch_installed"] else TORCH_HINT
        print(textwrap.fill(hint, width=100), file=out)
    print("All match." if report["all_match"] else "MISMATCH: see the rows marked NO.", file=out)


def main(*, json_path: str | None = None, use_torch: bool | None = None, out: TextIO) -> int:
    """Runs the comparison, prints it, optionally writes JSON; returns the exit status."""
    report = compare(use_torch=use_torch)
    render(report, out)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"Wrote {json_path}", file=out)
    return 0 if report["all_match"] else 1
