"""Small Flax models for examples, notebooks and benchmarks.

Layer names follow the PyTorch twins used in the comparison notebooks (``conv1``,
``conv2``, ``fc``), so `fgrad.interop.torch` moves weights between them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with ReLU, global average pooling and a linear head.

    Inputs are NHWC (``(batch, height, width, channels)``); the PyTorch twin
    ``Conv2d(c, f1, 3, padding=1) -> ReLU -> Conv2d(f1, f2, 3, padding=1) -> ReLU ->
    mean over H, W -> Linear(f2, classes)`` takes the same weights via
    `fgrad.interop.torch.to_linen`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> model = fgrad.models.SmallCNN(features=(4, 8), classes=10)
      >>> v = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
      >>> model.apply(v, jnp.ones((2, 8, 8, 1))).shape
      (2, 10)
    """

    features: Sequence[int] = (8, 16)
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(
                f"fgrad.models.SmallCNN: inputs must be NHWC (batch, height, width, channels), "
                f"got shape {x.shape}."
            )
        for i, f in enumerate(self.features):
            x = nn.relu(nn.Conv(f, (3, 3), padding=1, name=f"conv{i + 1}")(x))
        return nn.Dense(self.classes, name="fc")(jnp.mean(x, axis=(1, 2)))


class MLP(nn.Module):
    """A tanh MLP: ``Dense(widths[0]) -> tanh -> ... -> Dense(widths[-1])``, layers named
    ``fc1``, ``fc2``, ...

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fgrad
      >>> model = fgrad.models.MLP(widths=(16, 16, 3))
      >>> v = model.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> model.apply(v, jnp.ones((2, 4))).shape
      (2, 3)
    """

    widths: Sequence[int] = (64, 64, 10)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, w in enumerate(self.widths):
            x = nn.Dense(w, name=f"fc{i + 1}")(x)
            if i < len(self.widths) - 1:
                x = jnp.tanh(x)
        return x
