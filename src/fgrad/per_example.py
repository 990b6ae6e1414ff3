"""Per-example gradients, norms, clipped means and moments (Opacus, BackPACK) for
``loss_fn(params, batch) -> (B,)``, from layer inputs and output gradients found in the
traced program."""

from fgrad._per_example import clipped_grad as clipped_grad
from fgrad._per_example import clipped_loss as clipped_loss
from fgrad._per_example import grad_norms as grad_norms
from fgrad._per_example import grads as grads
from fgrad._per_example import moments as moments

__all__ = ["clipped_grad", "clipped_loss", "grad_norms", "grads", "moments"]
