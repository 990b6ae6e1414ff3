"""fgrad: PyTorch's autograd idioms as pure, jit-compiled JAX functions.

``autograd.grad(y, l)`` → `grad_intermediates`; ``.backward()`` into ``.grad`` →
`backward` with an explicit accumulator from `zero_grad`; ``retain_graph=True`` →
`vjp_intermediates` (a pullback you can call again); ``create_graph=True`` and second
derivatives → every fgrad result is differentiable, and `derivative`.
"""

from fgrad import curvature as curvature
from fgrad import models as models
from fgrad import penalties as penalties
from fgrad import per_example as per_example
from fgrad._accumulate import accumulate as accumulate
from fgrad._backward import backward as backward
from fgrad._grads import NoGrad as NoGrad
from fgrad._grads import torch_grads as torch_grads
from fgrad._grads import zero_grad as zero_grad
from fgrad._hessian import hessian as hessian
from fgrad._hessian import hvp as hvp
from fgrad._hessian import linearize_grad as linearize_grad
from fgrad._higher import derivative as derivative
from fgrad._hooks import with_hooks as with_hooks
from fgrad._intermediates import grad_intermediates as grad_intermediates
from fgrad._intermediates import intermediates as intermediates
from fgrad._intermediates import value_and_grad_intermediates as value_and_grad_intermediates
from fgrad._intermediates import vjp_intermediates as vjp_intermediates
from fgrad._modules import tap_linen as tap_linen
from fgrad._modules import tap_nnx as tap_nnx
from fgrad._step import step as step
from fgrad._tap import tap as tap

__version__ = "0.1.0"

__all__ = [
    "NoGrad",
    "accumulate",
    "backward",
    "curvature",
    "derivative",
    "grad_intermediates",
    "hessian",
    "hvp",
    "intermediates",
    "linearize_grad",
    "models",
    "penalties",
    "per_example",
    "step",
    "tap",
    "tap_linen",
    "tap_nnx",
    "torch_grads",
    "value_and_grad_intermediates",
    "vjp_intermediates",
    "with_hooks",
    "zero_grad",
]
