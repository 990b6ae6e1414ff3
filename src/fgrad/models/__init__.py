"""Models: the seed notebook's network as a pure function, a linen and an nnx module."""

from fgrad.models._seed import SeedNet as SeedNet
from fgrad.models._seed import SeedNetNNX as SeedNetNNX
from fgrad.models._seed import seed_linen_variables as seed_linen_variables
from fgrad.models._seed import seed_net as seed_net
from fgrad.models._seed import seed_params as seed_params

__all__ = ["SeedNet", "SeedNetNNX", "seed_linen_variables", "seed_net", "seed_params"]
