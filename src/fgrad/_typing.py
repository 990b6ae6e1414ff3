"""What fgrad's signatures share: the ``PyTree`` alias, and the ``ParamSpec`` ``P`` with
which a transformation says it returns a function of its argument's parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeAlias, TypeVar

# A pytree (nested dicts, lists, tuples, NamedTuples, dataclasses... of arrays): what JAX's
# tree functions accept. Its structure is checked at run time, with messages that name the
# offending leaf; to a type checker it is any value.
PyTree: TypeAlias = Any

# The positional (and keyword) parameters of a function that a transformation returns with
# the same parameters (as equinox's filter_grad is typed): Callable[P, ...] -> Callable[P, ...].
P = ParamSpec("P")
R = TypeVar("R")


def with_params_of(fn: Callable[P, Any], wrapped: Callable[..., R]) -> Callable[P, R]:
    """``wrapped`` itself, typed as taking ``fn``'s parameters: for a transformation whose
    result is called with ``fn``'s positional arguments."""
    del fn
    return wrapped
