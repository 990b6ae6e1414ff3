"""Path globs, for tap names and Flax module paths (`fgrad.tap_linen`, `fgrad.tap_nnx`,
`fgrad.with_hooks`): ``*`` and ``?`` stop at ``/``, ``**`` crosses it, ``[seq]`` is a
character class; a lone ``*`` is every path at any depth (the taps' default)."""

from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern:
    """A path glob as a regex: ``*`` and ``?`` stop at ``/``, ``**`` crosses it."""
    if pattern == "*":  # every submodule, at any depth: tap_linen/tap_nnx's default
        return re.compile(r".+")
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append(r"(?:.*/)?")  # zero or more whole path segments
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(r".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^/]*")
        elif c == "?":
            out.append(r"[^/]")
        elif c == "[" and pattern.find("]", i + 2) != -1:
            j = pattern.find("]", i + 2)
            body = pattern[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def match(path: str, pattern: str) -> bool:
    """Whether ``path`` is matched by the glob ``pattern``."""
    return glob_regex(pattern).fullmatch(path) is not None
