"""Models: the seed notebook's network (a pure function, a linen and an nnx module), and
small Flax models for examples and benchmarks."""

from fgrad.models._seed import SeedNet as SeedNet
from fgrad.models._seed import SeedNetNNX as SeedNetNNX
from fgrad.models._seed import seed_dy_dl as seed_dy_dl
from fgrad.models._seed import seed_linen_variables as seed_linen_variables
from fgrad.models._seed import seed_net as seed_net
from fgrad.models._seed import seed_params as seed_params
from fgrad.models._seed import seed_y as seed_y
from fgrad.models._small import MLP as MLP
from fgrad.models._small import SmallCNN as SmallCNN

__all__ = [
    "MLP",
    "SeedNet",
    "SeedNetNNX",
    "SmallCNN",
    "seed_dy_dl",
    "seed_linen_variables",
    "seed_net",
    "seed_params",
    "seed_y",
]
