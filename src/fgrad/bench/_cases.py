"""Which (workload, operation, implementation) cases a suite runs: every registered
operation (`fgrad.bench._registry`) on the suite's workloads it applies to."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib

from fgrad.bench._registry import Framework, Registry
from fgrad.bench._workloads import Workload, workloads

# The modules whose JAX / TORCH / APPLIES / WORKLOADS tables make the default registry, in
# order (their operations are listed in that order). A new module of operations plugs in
# by adding its name here.
OP_MODULES = (
    "fgrad.bench._jax_ops",
    "fgrad.bench._torch_ops",
    "fgrad.bench._ops_hooks",
    "fgrad.bench._ops_per_example",
    "fgrad.bench._ops_curvature",
)

# The large suite (sized for a GPU) times fewer operations, on its own workloads only: the
# gradient (against torch.compile too), the accumulation loop, a penalty and the HVP.
LARGE_OPS = ("grad", "microbatch", "input_gradient", "hvp", "hvp_linearized")


# Operations whose time the report divides by another's (hvp_over_grad): timed in the same
# interleaved rounds as that operation, so that drift on a shared machine between the two
# does not enter the ratio.
TIMED_WITH = {"hvp": "grad", "hvp_linearized": "grad"}


class Unsupported(Exception):
    """A framework cannot run this case (e.g. torch.compile and double backward): reported
    as "unsupported", not as a failure."""


@functools.cache
def registry() -> Registry:
    """The default registry, built from `OP_MODULES` on first use (so that those modules
    may import this one)."""
    reg = Registry()
    for name in OP_MODULES:
        reg.add_tables(importlib.import_module(name))
    return reg


@dataclasses.dataclass(frozen=True)
class Case:
    workload: Workload
    op: str
    impl: str
    framework: Framework | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.framework is None:  # looked up in the default registry
            object.__setattr__(self, "framework", registry().framework(self.op, self.impl))

    @property
    def key(self) -> str:
        return f"{self.workload.name}/{self.op}/{self.impl}"


def cases(
    suite: str, only: str | None = None, *, torch: bool = True, reg: Registry | None = None
) -> list[Case]:
    """Every case of ``suite`` whose ``workload/op`` matches the glob ``only``: per suite
    workload, each operation that applies to it with all its implementations; then each
    operation's own workloads."""
    reg = registry() if reg is None else reg
    out: list[Case] = []

    def add(w: Workload, op: str) -> None:
        out.extend(Case(w, op, impl, reg.framework(op, impl)) for impl in reg.impls(op))

    ops = [op for op in reg.ops() if suite != "large" or op in LARGE_OPS]
    for w in workloads(suite):
        for op in ops:
            if reg.applies(op, w):
                add(w, op)
    for op in ops:
        for w in reg.own_workloads(op, suite) if suite != "large" else ():
            add(w, op)
    if only:
        pats = [p.strip() for p in only.split(",") if p.strip()]
        out = [
            c for c in out if any(fnmatch.fnmatchcase(f"{c.workload.name}/{c.op}", p) for p in pats)
        ]
    if not torch:
        out = [c for c in out if c.framework == "jax"]
    return out


def find(suite: str, key: str) -> Case:
    for c in cases(suite):
        if c.key == key:
            return c
    raise KeyError(key)
