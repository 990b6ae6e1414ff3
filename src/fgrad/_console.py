"""What fgrad's command-line reports (`fgrad reproduce`, `fgrad bench`) share: whether
PyTorch is installed, and the plain-text table they print."""

from __future__ import annotations

import importlib.util
from collections.abc import Collection, Sequence
from typing import TextIO


def torch_available() -> bool:
    """Whether PyTorch can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def print_table(
    head: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO, *, right: Collection[int]
) -> None:
    """Prints ``head``, a rule and ``rows`` in aligned columns (``right``: the indices of
    the right-aligned ones), two spaces apart."""
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(head), file=out)
    print(line(["-" * w for w in widths]), file=out)
    for r in rows:
        print(line(r), file=out)
