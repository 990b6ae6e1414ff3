"""Small models written twice, in PyTorch and in Flax (linen and nnx), with matching
module names, so weights move between them with fgrad.interop.torch."""

import flax.linen as ln
import jax.numpy as jnp
import torch
from flax import nnx
from torch import nn


def nhwc(t):
    """A PyTorch NCHW image batch (tensor or array) as a NumPy NHWC one, Flax's layout;
    anything not 4-D (logits, a Linear's output) unchanged."""
    t = t.detach().numpy() if isinstance(t, torch.Tensor) else t
    return t.transpose(0, 2, 3, 1) if t.ndim == 4 else t


class TorchCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):  # x: (N, 1, H, W)
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.tanh(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


class LinenCNN(ln.Module):
    classes: int = 10

    @ln.compact
    def __call__(self, x):  # x: (N, H, W, 1)
        h = ln.Conv(4, (3, 3), padding=1, name="conv1")(x)
        h = ln.relu(ln.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(h))
        h = jnp.tanh(ln.Conv(6, (3, 3), padding=1, name="conv2")(h))
        return ln.Dense(self.classes, name="fc")(h.mean(axis=(1, 2)))


class NnxCNN(nnx.Module):
    def __init__(self, classes=10, *, rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self.conv1 = nnx.Conv(1, 4, (3, 3), padding=1, rngs=rngs)
        self.bn = nnx.BatchNorm(4, use_running_average=True, epsilon=1e-5, rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), padding=1, rngs=rngs)
        self.fc = nnx.Linear(6, classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.conv1(x)))
        h = jnp.tanh(self.conv2(h))
        return self.fc(h.mean(axis=(1, 2)))


def randomize_batchnorm(bn: nn.BatchNorm2d, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)


def make_torch_cnn(seed=0, classes=10):
    """The TorchCNN with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    m = TorchCNN(classes).eval()
    randomize_batchnorm(m.bn)
    return m
