"""The benchmark's operations as data: operation name -> builder per framework and
implementation, with the workloads each operation applies to.

A module of operations ends with module-level tables, merged in by `Registry.add_tables`::

    JAX = {"op": {"fgrad": build, "jax": build_by_hand}}      # build(impl, w) -> (jitted, args)
    TORCH = {"op": {"torch": build_torch}}                      # build(impl, w, device) -> run
    APPLIES = {"op": lambda w: w.kind in ("mlp", "cnn")}        # which suite workloads
    WORKLOADS = {"op": lambda suite: [Workload(...)]}           # optional: its own workloads

A JAX builder returns a jitted function and its arguments; a PyTorch builder returns a
no-argument callable, and raises `fgrad.bench._cases.Unsupported` where PyTorch cannot run
the case. Builders of PyTorch implementations import torch inside themselves: listing the
cases, and the JAX worker, never import PyTorch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

from fgrad.bench._workloads import Workload

Framework = Literal["jax", "torch"]
JaxBuilder = Callable[[str, Workload], tuple[Callable, tuple]]
TorchBuilder = Callable[[str, Workload, str], Callable[[], Any]]
FRAMEWORKS: tuple[Framework, ...] = ("jax", "torch")


@dataclasses.dataclass
class _Op:
    applies: Callable[[Workload], bool] | None = None
    workloads: Callable[[str], list[Workload]] | None = None
    builders: dict[Framework, dict[str, Callable]] = dataclasses.field(
        default_factory=lambda: {"jax": {}, "torch": {}}
    )


class Registry:
    """Operations in the order they were first registered; each one's implementations,
    JAX ones first, in the order they were registered."""

    def __init__(self) -> None:
        self._ops: dict[str, _Op] = {}

    def add(
        self,
        op: str,
        framework: Framework,
        impl: str,
        builder: Callable,
    ) -> None:
        """Registers ``builder`` as implementation ``impl`` of ``op`` in ``framework``."""
        if framework not in FRAMEWORKS:
            raise ValueError(f"fgrad bench: unknown framework {framework!r}; use jax or torch.")
        entry = self._ops.setdefault(op, _Op())
        if any(impl in b for b in entry.builders.values()):
            raise ValueError(f"fgrad bench: {op}/{impl} is registered twice.")
        entry.builders[framework][impl] = builder

    def applies_to(
        self,
        op: str,
        applies: Callable[[Workload], bool],
        workloads: Callable[[str], list[Workload]] | None = None,
    ) -> None:
        """Which of a suite's workloads ``op`` runs on (``applies(w) -> bool``), and
        optionally workloads of its own (``workloads(suite) -> [Workload]``) that no other
        operation runs on."""
        entry = self._ops.setdefault(op, _Op())
        entry.applies = applies
        if workloads is not None:
            entry.workloads = workloads

    def add_tables(self, tables: Any) -> None:
        """Merges a module's (or any object's) ``JAX``, ``TORCH``, ``APPLIES`` and optional
        ``WORKLOADS`` tables."""
        jax_table: Mapping = getattr(tables, "JAX", {})
        torch_table: Mapping = getattr(tables, "TORCH", {})
        applies: Mapping = getattr(tables, "APPLIES", {})
        own: Mapping = getattr(tables, "WORKLOADS", {})
        for op, fn in applies.items():
            self.applies_to(op, fn, own.get(op))
        for op in own.keys() - applies.keys():
            raise ValueError(f"fgrad bench: {op} has WORKLOADS but no APPLIES entry.")
        for op, impls in jax_table.items():
            for impl, builder in impls.items():
                self.add(op, "jax", impl, builder)
        for op, impls in torch_table.items():
            for impl, builder in impls.items():
                self.add(op, "torch", impl, builder)

    def copy(self) -> Registry:
        new = Registry()
        for op, e in self._ops.items():
            builders = {fw: dict(b) for fw, b in e.builders.items()}
            new._ops[op] = _Op(e.applies, e.workloads, builders)
        return new

    def ops(self) -> list[str]:
        return list(self._ops)

    def _entry(self, op: str) -> _Op:
        try:
            return self._ops[op]
        except KeyError:
            raise KeyError(f"fgrad bench: no operation {op!r} is registered") from None

    def impls(self, op: str) -> list[str]:
        b = self._entry(op).builders
        return [*b["jax"], *b["torch"]]

    def framework(self, op: str, impl: str) -> Framework:
        b = self._entry(op).builders
        for fw in FRAMEWORKS:
            if impl in b[fw]:
                return fw
        raise KeyError(f"fgrad bench: {op} has no implementation {impl!r}")

    def builder(self, op: str, impl: str) -> Callable:
        return self._entry(op).builders[self.framework(op, impl)][impl]

    def applies(self, op: str, w: Workload) -> bool:
        entry = self._entry(op)
        if entry.applies is None:
            raise ValueError(
                f"fgrad bench: operation {op!r} has builders but no APPLIES entry saying "
                "which workloads it runs on; add one to its module's APPLIES table."
            )
        return bool(entry.applies(w))

    def own_workloads(self, op: str, suite: str) -> list[Workload]:
        fn = self._entry(op).workloads
        return [] if fn is None else list(fn(suite))
