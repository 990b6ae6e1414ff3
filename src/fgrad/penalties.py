"""Gradient-norm regularisers (losses that contain a gradient): double backprop, the
notebook's penalty on dy/dl, WGAN-GP, R1/R2 (with lazy regularisation), the
parameter-gradient norm, and Jacobian regularisation."""

from fgrad._penalties import gradient_norm as gradient_norm
from fgrad._penalties import input_gradient as input_gradient
from fgrad._penalties import intermediate_gradient as intermediate_gradient
from fgrad._penalties import jacobian_norm as jacobian_norm
from fgrad._penalties import lazy as lazy
from fgrad._penalties import r1 as r1
from fgrad._penalties import r2 as r2
from fgrad._penalties import wgan_gp as wgan_gp

__all__ = [
    "gradient_norm",
    "input_gradient",
    "intermediate_gradient",
    "jacobian_norm",
    "lazy",
    "r1",
    "r2",
    "wgan_gp",
]
