"""fgrad.interop.torch: weights move between PyTorch and Flax with layouts converted."""

import flax.linen as ln
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from fgrad.interop import torch as tt
from helpers import assert_tree_allclose
from models_torch_flax import LinenCNN, NnxCNN, TorchCNN, nhwc

X = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)


def test_cnn_linen_and_nnx_outputs_equal_torch(cnn):
    expected = cnn(torch.from_numpy(X))
    x = jnp.asarray(nhwc(X))
    v = tt.to_linen(cnn)
    assert set(v) == {"params", "batch_stats"}
    assert v["params"]["conv1"]["kernel"].shape == (3, 3, 1, 4)
    assert_tree_allclose(jax.jit(LinenCNN().apply)(v, x), expected)
    model = tt.to_nnx(cnn, NnxCNN())
    assert_tree_allclose(model(x), expected)


def test_round_trips_restore_every_tensor(cnn):
    sd = {k: v.clone() for k, v in cnn.state_dict().items()}
    for back in (
        lambda m: tt.from_linen(tt.to_linen(cnn), m),
        lambda m: tt.from_nnx(tt.to_nnx(cnn, NnxCNN()), m),
        lambda m: tt.from_jax(tt.to_jax(cnn), m),
    ):
        fresh = TorchCNN()
        back(fresh)
        for k, v in sd.items():
            if not k.endswith("num_batches_tracked"):
                assert torch.equal(fresh.state_dict()[k], v), k


def test_layernorm_embedding_linear_with_rename():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Embedding(7, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.1, 0.1)
    ids = torch.tensor([[1, 4, 6]])
    expected = m(ids)

    class Port(ln.Module):
        @ln.compact
        def __call__(self, ids):
            h = ln.Embed(7, 5, name="embed")(ids)
            h = ln.LayerNorm(epsilon=1e-5, name="norm")(h)
            return ln.Dense(3, name="out")(h)

    v = tt.to_linen(m, rename={"0": "embed", "1": "norm", "2": "out"})
    assert_tree_allclose(Port().apply(v, jnp.asarray(ids.numpy())), expected)
    fresh = nn.Sequential(nn.Embedding(7, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    tt.from_linen(v, fresh, rename=lambda p: {"0": "embed", "1": "norm", "2": "out"}[p])
    assert_tree_allclose(fresh(ids), expected)


def test_flat_torch_layout():
    lin = nn.Linear(3, 2)
    p = tt.to_jax(lin)
    assert_tree_allclose(p, {"weight": lin.weight, "bias": lin.bias})
    x = np.ones((1, 3), np.float32)
    assert_tree_allclose(jnp.asarray(x) @ p["weight"].T + p["bias"], lin(torch.from_numpy(x)))


def test_errors(cnn):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(2))
            self.prelu = nn.PReLU()

    with pytest.raises(TypeError, match=r"no layout conversion for Odd.*'alpha'"):
        tt.to_linen(Odd())
    assert "alpha" in tt.to_linen(Odd(), strict=False)["params"]
    with pytest.raises(KeyError, match=r"'conv1\.weight' has no counterpart"):
        tt.from_linen({"params": {}}, TorchCNN())
    with pytest.raises(KeyError, match=r"has no counterpart .*pass rename"):
        tt.to_nnx(nn.Sequential(nn.Linear(6, 10)), NnxCNN())
    with pytest.raises(ValueError, match="converts to shape"):
        tt.to_nnx(nn.ModuleDict({"fc": nn.Linear(5, 10)}), NnxCNN())
    with pytest.raises(ValueError, match="missing"):
        tt.from_jax({"weight": jnp.ones((2, 3))}, nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"'weight' has shape \(3, 2\)"):
        tt.from_jax({"weight": jnp.ones((3, 2)), "bias": jnp.ones(2)}, nn.Linear(3, 2))


def test_bfloat16_both_ways():
    # bfloat16 parameters failed in NumPy on the way in and out (NumPy has no bfloat16)
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(3, 2)).to(torch.bfloat16)
    v = tt.to_linen(lin, rename={"0": "d"})
    assert v["params"]["d"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(v["params"]["d"]["kernel"], np.float32), lin[0].weight.detach().float().numpy().T
    )
    flat = tt.to_jax(lin)
    assert flat["0.weight"].dtype == jnp.bfloat16
    # back: into a bfloat16 module and into a float32 one, exactly (bfloat16 ⊂ float32)
    trained = jax.tree.map(lambda a: a * 2, v)
    back = tt.from_linen(
        trained, nn.Sequential(nn.Linear(3, 2)).to(torch.bfloat16), rename={"0": "d"}
    )
    assert back[0].weight.dtype == torch.bfloat16
    assert torch.equal(back[0].weight, lin[0].weight * 2)
    back32 = tt.from_jax(jax.tree.map(lambda a: a * 2, flat), nn.Sequential(nn.Linear(3, 2)))
    assert torch.equal(back32[0].bias, lin[0].bias.float() * 2)


def test_a_state_dict_instead_of_a_module_says_what_to_pass():
    sd = nn.Linear(3, 2).state_dict()
    for fn in (tt.to_linen, tt.to_jax):
        with pytest.raises(
            TypeError,
            match=rf"{fn.__name__}: module must be a torch\.nn\.Module"
            r".*got OrderedDict.*load_state_dict",
        ):
            fn(sd)
    with pytest.raises(TypeError, match=r"from_linen: module must be a torch\.nn\.Module"):
        tt.from_linen({"params": {}}, sd)
    with pytest.raises(TypeError, match=r"rename must be a dict or a function .* got int"):
        tt.to_linen(nn.Linear(3, 2), rename=3)
    with pytest.raises(TypeError, match=r"to_nnx: model must be a flax\.nnx\.Module, got dict"):
        tt.to_nnx(nn.Linear(3, 2), {"kernel": jnp.ones((3, 2))})
