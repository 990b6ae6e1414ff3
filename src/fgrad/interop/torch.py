"""PyTorch parameters to JAX/Flax pytrees and back, layouts converted.

So that a port can be checked against its original: take a ``torch.nn.Module``'s weights
into the Flax model (linen variables or an nnx module), compare numbers, and write
trained weights back. Conversions by layer type:

=================  =============================  ======================================
PyTorch            tensor (layout)                Flax (layout)
=================  =============================  ======================================
``Linear``         ``weight`` (out, in)           ``kernel`` (in, out); ``bias``
``Conv1d/2d/3d``   ``weight`` (out, in, *k)       ``kernel`` (*k, in, out); ``bias``
``LayerNorm``,     ``weight``, ``bias``           ``scale``, ``bias``
``GroupNorm``
``BatchNorm*d``    ``weight``, ``bias``,          ``scale``, ``bias`` (params);
                   ``running_mean/var``           ``mean``, ``var`` (batch_stats)
``Embedding``      ``weight`` (num, dim)          ``embedding`` (num, dim)
=================  =============================  ======================================

A parameter of any other layer type is an error (pass ``strict=False`` to carry it over
unchanged under its PyTorch name), never a silently mis-laid weight. Module paths keep
PyTorch's names (``features.0`` becomes ``{"features": {"0": ...}}`` for linen and
``("features", 0)`` for nnx); ``rename`` maps them when the Flax model names differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

Rename = Callable[[str], str] | Mapping[str, str] | None

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _np(t: torch.Tensor) -> np.ndarray:
    """A tensor as NumPy, in its own dtype (bfloat16, which NumPy lacks, as JAX's
    ml_dtypes bfloat16, converted exactly through float32)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(jnp.bfloat16)
    return t.numpy()


def _to_torch(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """A JAX/NumPy array as a tensor of ``dtype``; bfloat16 and other dtypes torch cannot
    take from NumPy go through float32 (exact for bfloat16 and float16)."""
    arr = np.array(value)
    if arr.dtype.kind == "V" or arr.dtype == np.dtype(jnp.bfloat16):
        arr = arr.astype(np.float32)
    return torch.from_numpy(arr).to(dtype)


def _require_module(module: Any, caller: str, what: str = "module") -> None:
    if isinstance(module, nn.Module):
        return
    hint = ""
    if isinstance(module, Mapping):
        hint = (
            " It is a mapping (a state_dict?): build the model and load it first, "
            "model.load_state_dict(state_dict), then pass the model."
        )
    raise TypeError(
        f"{caller}: {what} must be a torch.nn.Module (the PyTorch model itself), got "
        f"{type(module).__name__}.{hint}"
    )


def _kernel_to_flax(w: np.ndarray, module: nn.Module) -> np.ndarray:
    if isinstance(module, nn.Linear):
        return w.T
    return np.moveaxis(w, (0, 1), (-1, -2))  # (out, in, *k) -> (*k, in, out)


def _kernel_to_torch(k: np.ndarray, module: nn.Module) -> np.ndarray:
    if isinstance(module, nn.Linear):
        return k.T
    return np.moveaxis(k, (-1, -2), (0, 1))


def _rename(path: str, rename: Rename) -> str:
    if rename is None:
        return path
    if callable(rename):
        return rename(path)
    if not isinstance(rename, Mapping):
        raise TypeError(
            "fgrad.interop.torch: rename must be a dict or a function mapping PyTorch module "
            f"paths ('features.0') to Flax ones, got {type(rename).__name__}."
        )
    return rename.get(path, path)


def _is_kernel(name: str, mod: nn.Module) -> bool:
    """Whether the Flax variable ``name`` of ``mod`` is a (transposed) Linear/conv kernel."""
    return name == "kernel" and isinstance(mod, (nn.Linear, *_CONVS))


def _to_flax(t: torch.Tensor, name: str, mod: nn.Module) -> np.ndarray:
    return _kernel_to_flax(_np(t), mod) if _is_kernel(name, mod) else _np(t)


def _entries(module: nn.Module, strict: bool):
    """(module path, flax collection, flax name, torch tensor, torch name, owning module),
    the tensor unconverted (see `_to_flax`): loading back into torch needs no copy of it."""
    for mpath, mod in module.named_modules():
        tensors = {
            **{n: p for n, p in mod.named_parameters(recurse=False)},
            **{n: b for n, b in mod.named_buffers(recurse=False) if b is not None},
        }
        for tname, t in tensors.items():
            full = f"{mpath}.{tname}" if mpath else tname
            if isinstance(mod, (nn.Linear, *_CONVS)):
                yield mpath, "params", {"weight": "kernel", "bias": "bias"}[tname], t, full, mod
            elif isinstance(mod, _NORMS):
                yield mpath, "params", {"weight": "scale"}.get(tname, tname), t, full, mod
            elif isinstance(mod, _BATCHNORMS):
                if tname == "num_batches_tracked":
                    continue
                coll = "batch_stats" if tname.startswith("running_") else "params"
                name = {"weight": "scale", "running_mean": "mean", "running_var": "var"}.get(
                    tname, tname
                )
                yield mpath, coll, name, t, full, mod
            elif isinstance(mod, nn.Embedding):
                yield mpath, "params", "embedding", t, full, mod
            elif strict:
                raise TypeError(
                    f"fgrad.interop.torch: no layout conversion for {type(mod).__name__} "
                    f"(parameter {full!r}). Supported: Linear, Conv1d/2d/3d, LayerNorm, "
                    "GroupNorm, BatchNorm1d/2d/3d, Embedding. Pass strict=False to copy it "
                    "unchanged."
                )
            else:
                yield mpath, "params", tname, t, full, mod


def to_jax(module: nn.Module, dtype: Any = None) -> dict[str, jax.Array]:
    """A module's ``state_dict`` as a flat dict of JAX arrays, PyTorch names and layouts.

    This is the layout of `fgrad.models.seed_params`: for pure functions written against
    PyTorch's conventions (``x @ W.T + b``).

    Examples:
      >>> import torch
      >>> from fgrad.interop.torch import to_jax
      >>> sorted(to_jax(torch.nn.Linear(3, 2)))
      ['bias', 'weight']
    """
    _require_module(module, "fgrad.interop.torch.to_jax")
    return {
        k: jnp.asarray(_np(v), dtype)
        for k, v in module.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def from_jax(params: Mapping[str, Any], module: nn.Module) -> nn.Module:
    """Loads a flat dict made by `to_jax` (possibly trained) back into ``module``."""
    _require_module(module, "fgrad.interop.torch.from_jax")
    if not isinstance(params, Mapping):
        raise TypeError(
            "fgrad.interop.torch.from_jax: params must be a flat dict of arrays keyed by "
            f"PyTorch names (as to_jax makes it), got {type(params).__name__}."
        )
    sd = module.state_dict()
    missing = sorted(k for k in sd if k not in params and not k.endswith("num_batches_tracked"))
    extra = sorted(k for k in params if k not in sd)
    if missing or extra:
        raise ValueError(
            f"fgrad.interop.torch.from_jax: keys differ from the module's state_dict: missing "
            f"{missing}, unexpected {extra}."
        )
    new = {k: _to_torch(params[k], sd[k].dtype) for k in params}
    for k, v in new.items():
        if v.shape != sd[k].shape:
            raise ValueError(
                f"fgrad.interop.torch.from_jax: {k!r} has shape {tuple(v.shape)}, the module "
                f"expects {tuple(sd[k].shape)}."
            )
    module.load_state_dict(new, strict=False)
    return module


def _split_path(path: str) -> list[str]:
    return [p for p in path.replace("/", ".").split(".") if p]


def to_linen(
    module: nn.Module, *, rename: Rename = None, strict: bool = True, dtype: Any = None
) -> dict[str, Any]:
    """Linen variables (``{"params": ..., "batch_stats": ...}``) from a PyTorch module.

    Args:
      module: the PyTorch module.
      rename: maps a PyTorch module path (``"features.0"``) to the linen one
        (``"features/Conv_0"``); a dict or a function. Unmapped paths are kept.
      strict: refuse parameters of layer types without a known conversion.
      dtype: cast every array to this dtype.

    Returns:
      Nested dicts keyed by module name, ready for ``model.apply``.

    Examples:
      >>> import torch
      >>> from fgrad.interop.torch import to_linen
      >>> v = to_linen(torch.nn.Sequential(torch.nn.Linear(3, 2)), rename={"0": "layers_0"})
      >>> v["params"]["layers_0"]["kernel"].shape
      (3, 2)
    """
    _require_module(module, "fgrad.interop.torch.to_linen")
    out: dict[str, Any] = {}
    for mpath, coll, name, t, _, mod in _entries(module, strict):
        node = out.setdefault(coll, {})
        for part in _split_path(_rename(mpath, rename)):
            node = node.setdefault(part, {})
        node[name] = jnp.asarray(_to_flax(t, name, mod), dtype)
    return out


def _linen_leaf(variables, coll: str, path: list[str], name: str, full: str):
    node = variables.get(coll, {})
    for part in path:
        if part not in node:
            raise KeyError(
                f"fgrad.interop.torch: {full!r} has no counterpart: no "
                f"{coll}/{'/'.join(path)} in the Flax variables (pass rename=...)."
            )
        node = node[part]
    if name not in node:
        raise KeyError(
            f"fgrad.interop.torch: {full!r} has no counterpart {coll}/{'/'.join(path)}/{name}."
        )
    return np.asarray(node[name])


def _load(module: nn.Module, get, strict: bool) -> nn.Module:
    with torch.no_grad():
        for mpath, coll, name, _, full, mod in _entries(module, strict):
            value = get(mpath, coll, name, full)
            if _is_kernel(name, mod):
                value = _kernel_to_torch(value, mod)
            target = module.get_parameter(full) if coll == "params" else module.get_buffer(full)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"fgrad.interop.torch: {full!r} would get shape {tuple(value.shape)}, the "
                    f"module expects {tuple(target.shape)}."
                )
            target.copy_(_to_torch(value, target.dtype))
    return module


def from_linen(
    variables: Mapping[str, Any], module: nn.Module, *, rename: Rename = None, strict: bool = True
) -> nn.Module:
    """Loads linen variables (e.g. after training) back into the PyTorch ``module``."""
    _require_module(module, "fgrad.interop.torch.from_linen")
    if not isinstance(variables, Mapping):
        raise TypeError(
            "fgrad.interop.torch.from_linen: variables must be linen variables, a dict like "
            f"{{'params': ...}}, got {type(variables).__name__}."
        )

    def get(mpath, coll, name, full):
        return _linen_leaf(variables, coll, _split_path(_rename(mpath, rename)), name, full)

    return _load(module, get, strict)


def _nnx_path(path: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in _split_path(path))


def to_nnx(
    module: nn.Module, model: nnx.Module, *, rename: Rename = None, strict: bool = True
) -> nnx.Module:
    """Copies a PyTorch module's weights into the nnx ``model`` (in place), layouts
    converted; returns ``model``. Every converted tensor must land on an existing
    variable of the same shape."""
    _require_module(module, "fgrad.interop.torch.to_nnx")
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"fgrad.interop.torch.to_nnx: model must be a flax.nnx.Module, got "
            f"{type(model).__name__}."
        )
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    for mpath, _, name, t, full, mod in _entries(module, strict):
        arr = _to_flax(t, name, mod)
        key = (*_nnx_path(_rename(mpath, rename)), name)
        if key not in flat:
            raise KeyError(
                f"fgrad.interop.torch.to_nnx: {full!r} has no counterpart {key} in the nnx "
                "model (pass rename=...)."
            )
        var = flat[key]
        if tuple(var.shape) != arr.shape:
            raise ValueError(
                f"fgrad.interop.torch.to_nnx: {full!r} converts to shape {arr.shape} but the "
                f"nnx variable {key} has shape {tuple(var.shape)}."
            )
        var[...] = jnp.asarray(arr, var.dtype)
    nnx.update(model, state)
    return model


def from_nnx(
    model: nnx.Module, module: nn.Module, *, rename: Rename = None, strict: bool = True
) -> nn.Module:
    """Copies the nnx ``model``'s weights back into the PyTorch ``module``."""
    _require_module(module, "fgrad.interop.torch.from_nnx")
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"fgrad.interop.torch.from_nnx: model must be a flax.nnx.Module, got "
            f"{type(model).__name__}."
        )
    flat = dict(nnx.to_flat_state(nnx.state(model)))

    def get(mpath, coll, name, full):
        key = (*_nnx_path(_rename(mpath, rename)), name)
        if key not in flat:
            raise KeyError(f"fgrad.interop.torch.from_nnx: {full!r} has no counterpart {key}.")
        return np.asarray(flat[key][...])

    return _load(module, get, strict)
