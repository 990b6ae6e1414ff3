"""Executes the comparison notebooks; with --inplace, rewrites their stored outputs.

    python tools/run_notebooks.py --inplace             # regenerate every notebook
    python tools/run_notebooks.py notebooks/01_*.ipynb  # check that they run

The test suite calls `execute` on every notebook (tests/test_notebooks.py).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def execute(path: pathlib.Path, *, inplace: bool = False, timeout: int = 600):
    """Runs every cell of the notebook at ``path`` in a fresh kernel; raises on any error."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    if inplace:
        for cell in nb.cells:  # keep diffs small: no execution timestamps
            cell.get("metadata", {}).pop("execution", None)
        nbformat.write(nb, path)
    return nb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", type=pathlib.Path)
    p.add_argument("--inplace", action="store_true", help="store the new outputs")
    args = p.parse_args(argv)
    for path in args.paths or NOTEBOOKS:
        execute(path, inplace=args.inplace)
        print(f"ran {path.relative_to(ROOT) if path.is_absolute() else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
