"""Which (workload, operation, implementation) cases a suite runs."""

from __future__ import annotations

import dataclasses
import fnmatch

from fgrad.bench._workloads import Workload, workloads

OPS = (
    "grad",
    "grad_intermediates",
    "backward_accumulate",
    "microbatch",
    "microbatch_unrolled",
    "input_gradient",
    "wgan_gp",
    "hvp",
    "hessian",
    "derivative8",
)
JAX_IMPLS = ("fgrad", "jax")
TORCH_IMPLS = ("torch", "torch.func", "torch.compile")
TORCH_FUNC_OPS = {"grad", "hvp", "hessian", "input_gradient"}
# torch.compile does not support double backward (create_graph=True through a compiled
# graph): these cases are reported as unsupported.
DOUBLE_BACKWARD = {"input_gradient", "wgan_gp", "hvp", "hessian"}
MAX_HESSIAN_PARAMS = 1000  # dense Hessians only on small models
# The large suite (sized for a GPU) times fewer operations: the gradient (against
# torch.compile too), the accumulation loop, a penalty and the HVP.
LARGE_OPS = ("grad", "microbatch", "input_gradient", "hvp")
SCALAR = Workload("scalar", "scalar", {}, 1)  # the n-th derivative of sin(tanh(x) e^x)


class Unsupported(Exception):
    """A framework cannot run this case (e.g. torch.compile and double backward): reported
    as "unsupported", not as a failure."""


@dataclasses.dataclass(frozen=True)
class Case:
    workload: Workload
    op: str
    impl: str

    @property
    def framework(self) -> str:
        return "torch" if self.impl.startswith("torch") else "jax"

    @property
    def key(self) -> str:
        return f"{self.workload.name}/{self.op}/{self.impl}"


def _n_params(w: Workload) -> int:
    return sum(v.size for v in w.numpy_params().values())


def _ops_for(w: Workload) -> list[str]:
    if w.name == "hessian-mlp":
        return ["hessian"]
    ops = [op for op in OPS if op not in ("hessian", "derivative8")]
    if w.batch % 4:
        ops.remove("microbatch")
        ops.remove("microbatch_unrolled")
    if _n_params(w) <= MAX_HESSIAN_PARAMS:
        ops.append("hessian")
    return ops


def _impls_for(op: str) -> list[str]:
    if op == "derivative8":
        return ["fgrad", "fgrad-nested", "jax", "torch", "torch.compile"]
    impls = [*JAX_IMPLS, "torch"]
    if op in TORCH_FUNC_OPS:
        impls.append("torch.func")
    if op == "grad" or op in DOUBLE_BACKWARD:
        impls.append("torch.compile")  # measured on "grad"; double backward: unsupported
    return impls


def cases(suite: str, only: str | None = None, *, torch: bool = True) -> list[Case]:
    """Every case of ``suite`` whose ``workload/op`` matches the glob ``only``."""
    ws = workloads(suite)
    if suite not in ("tiny", "large"):
        ws.append(
            Workload("hessian-mlp", "mlp", {"inputs": 8, "width": 16, "depth": 2, "classes": 3}, 16)
        )
    out = []
    for w in ws:
        for op in _ops_for(w):
            if suite != "large" or op in LARGE_OPS:
                out += [Case(w, op, impl) for impl in _impls_for(op)]
    if suite != "large":
        out += [Case(SCALAR, "derivative8", impl) for impl in _impls_for("derivative8")]
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
