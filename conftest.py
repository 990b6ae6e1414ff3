"""Collection rule for a test environment without PyTorch (the newest-JAX leg).

PyTorch's CPU build exists on these machines for Python 3.11 only, and JAX 0.11 and later
need Python 3.12, so `tools/test_newest_jax.sh` runs the suite there without torch. Every
module (test file or fgrad module collected for its doctests) that imports torch at module
level, directly or through a local test module, is then left out of collection: not
skipped, not run; so is every test that runs PyTorch without importing it at module
level (marked ``requires_torch``, e.g. a bench worker or `fgrad reproduce` in a
subprocess, or naming torch or a PyTorch-side oracle in its body or fixtures), which
pytest reports as deselected. Those are the PyTorch parity tests and notebooks, which the pinned leg
(`.ci/run`'s last command) runs in full. With torch installed this file changes nothing.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from pathlib import Path

HAVE_TORCH = importlib.util.find_spec("torch") is not None
_TESTS = Path(__file__).parent / "tests"
_memo: dict[Path, bool] = {}
# Modules that need torch without importing it themselves: the notebooks they execute
# compare against PyTorch in their cells.
_RUNS_TORCH_CODE = {"test_notebooks.py"}


def _module_imports(path: Path) -> set[str]:
    """Top-level names imported at module level (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
            if node.module == "fgrad.interop" and any(a.name == "torch" for a in node.names):
                names.add("torch")
            if node.module.startswith("fgrad.interop.torch"):
                names.add("torch")
    return names


def needs_torch(path: Path) -> bool:
    """Whether importing ``path`` imports torch (through local test modules too)."""
    if path not in _memo:
        _memo[path] = False  # cycles
        names = _module_imports(path)
        local = [_TESTS / f"{n}.py" for n in names if (_TESTS / f"{n}.py").exists()]
        _memo[path] = (
            path.name in _RUNS_TORCH_CODE or "torch" in names or any(needs_torch(p) for p in local)
        )
    return _memo[path]


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    if HAVE_TORCH or collection_path.suffix not in (".py", ".ipynb"):
        return None
    if collection_path.name == "conftest.py":
        return None
    return True if needs_torch(collection_path) else None


# A test that runs PyTorch or one of the PyTorch-side oracles inside its body or its
# fixtures (an import inside the function, a `_torch_...` helper call) names it there.
_TORCH_CODE = re.compile(r"torch|opacus|backpack|curvlinops")


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _runs_torch(item) -> bool:
    if item.get_closest_marker("requires_torch") is not None:
        return True
    fns = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info else ():
        fns += [d.func for d in defs]
    return any(fn is not None and _TORCH_CODE.search(_source(fn)) for fn in fns)


def pytest_collection_modifyitems(config, items) -> None:
    if HAVE_TORCH:
        return
    keep = [i for i in items if not _runs_torch(i)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
