"""Tree-aware comparisons with dtype-based tolerances, and PyTorch conversions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RTOL = {np.dtype("float64"): 1e-12, np.dtype("float32"): 1e-5, np.dtype("float16"): 1e-2}
ATOL = {np.dtype("float64"): 1e-12, np.dtype("float32"): 1e-6, np.dtype("float16"): 1e-3}


def _is_tensor(x) -> bool:
    """A torch tensor, without importing torch (the newest-JAX leg runs without it)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_numpy(x):
    if _is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def assert_tree_allclose(actual, expected, *, rtol=None, atol=None):
    """Every leaf of ``actual`` equals ``expected`` (same structure) within tolerance;
    leaves may be JAX arrays, NumPy arrays, torch tensors or numbers."""
    is_leaf = lambda x: x is None or _is_tensor(x)
    a_leaves, a_tree = jax.tree.flatten(actual, is_leaf=is_leaf)
    # Leaves of ``expected`` may be nested lists of numbers: flatten only down to ``actual``.
    e_leaves = a_tree.flatten_up_to(expected)
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves, strict=True)):
        if a is None or e is None:
            assert a is None and e is None, f"leaf {i}: {a!r} vs {e!r}"
            continue
        a, e = to_numpy(a), to_numpy(e).astype(to_numpy(a).dtype)
        assert a.shape == e.shape, f"leaf {i}: shape {a.shape} vs {e.shape}"
        dt = np.result_type(a.dtype, np.float32)
        np.testing.assert_allclose(
            a,
            e,
            rtol=RTOL.get(dt, 1e-5) if rtol is None else rtol,
            atol=ATOL.get(dt, 1e-6) if atol is None else atol,
            err_msg=f"leaf {i}",
        )


def from_torch(t) -> jax.Array:
    return jnp.asarray(t.detach().cpu().numpy())


def torch_seed_net():
    """The notebook's Net, built exactly as in its In[3] (the PyTorch reference of the
    tests; torch imported here, so this module also serves the leg without PyTorch)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1 = torch.nn.Linear(1, 1, bias=False)
            self.linear1.weight.data = torch.tensor([[3.0]])
            self.linear2 = torch.nn.Linear(1, 1, bias=True)
            self.linear2.weight.data = torch.tensor([[2.0]])
            self.linear2.bias.data = torch.tensor([6.0])

        def forward(self, x):
            l = self.linear1(x)
            return l, self.linear2(l).pow(2)

    return Net()


def cpu_data_parallel(axis: str):
    """The 8 forced CPU devices (conftest) as a 1-D mesh, and two placements on it:
    ``shard(tree)`` splits leading axes over the devices, ``replicate(tree)`` copies.
    CPU devices explicitly, so sharding is tested the same on a machine with a GPU."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    cpus = jax.devices("cpu")
    assert len(cpus) == 8, "conftest forces 8 CPU devices"
    mesh = Mesh(np.array(cpus), (axis,))
    shard = lambda t: jax.device_put(t, NamedSharding(mesh, PartitionSpec(axis)))
    replicate = lambda t: jax.device_put(t, NamedSharding(mesh, PartitionSpec()))
    return shard, replicate
