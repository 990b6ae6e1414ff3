"""What the seed notebook prints, cell by cell: the reference every side is held to."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Quantity:
    key: str  # stable identifier, shared by the PyTorch and fgrad sides
    cell: int  # the notebook's In[n] that prints it
    label: str  # what the notebook computes, in PyTorch's words
    notebook: float | None  # the printed value; None where the notebook prints None
    fgrad_idiom: str  # how fgrad writes it


QUANTITIES: tuple[Quantity, ...] = (
    Quantity("l", 7, "l, y = net(z): l", 12.0, "l, y = seed_net(params, z)"),
    Quantity("y", 7, "l, y = net(z): y", 900.0, "l, y = seed_net(params, z)"),
    Quantity("dy_dl", 10, "autograd.grad(y, l)", 120.0, 'grad_intermediates(y_fn, "l")'),
    Quantity("backward.z", 18, "y.backward(); z.grad", None, "zero_grad(..., trainable)"),
    Quantity("backward.w1", 18, "y.backward(); linear1.weight.grad", 480.0, "backward(y_fn, ...)"),
    Quantity("backward.w2", 18, "y.backward(); linear2.weight.grad", 720.0, "backward(y_fn, ...)"),
    Quantity("backward.b2", 18, "y.backward(); linear2.bias.grad", 60.0, "backward(y_fn, ...)"),
    Quantity("grad_w1", 21, "autograd.grad(y, linear1.weight)", 480.0, "jax.grad(y_fn)"),
    Quantity("grad_w1.acc", 23, "linear1.weight.grad after it", None, "no backward: grads is None"),
    Quantity("retain.w1", 31, "autograd.grad(y, w1, retain_graph)", 480.0, "pullback(1)"),
    Quantity("retain.w2", 31, "autograd.grad(y, w2, retain_graph)", 720.0, "pullback(1) again"),
    Quantity("retain.backward.w1", 33, "then y.backward(): w1.grad", 480.0, "backward(y_fn, ...)"),
    Quantity("retain.backward.w2", 33, "then y.backward(): w2.grad", 720.0, "backward(y_fn, ...)"),
    Quantity("retain.backward.b2", 33, "then y.backward(): b2.grad", 60.0, "backward(y_fn, ...)"),
    Quantity(
        "f", 36, "f = autograd.grad(y, l, create_graph)", 120.0, 'f_fn = grad_int..(y_fn,"l")'
    ),
    Quantity("f.backward.w1", 40, "f.backward(): linear1.weight.grad", 32.0, "backward(f_fn, ...)"),
    Quantity(
        "f.backward.w2", 40, "f.backward(): linear2.weight.grad", 108.0, "backward(f_fn, ...)"
    ),
    Quantity("f.backward.b2", 40, "f.backward(): linear2.bias.grad", 4.0, "backward(f_fn, ...)"),
    Quantity("d1_w1", 43, "y'(w1), create_graph=True", 480.0, "derivative(y_w1, 1)"),
    Quantity("d2_w1", 43, "y''(w1)", 128.0, "derivative(y_w1, 2)"),
    Quantity("acc.w1", 46, "f.backward(); y.backward(): w1.grad", 512.0, "backward f, then y"),
    Quantity("acc.w2", 46, "f.backward(); y.backward(): w2.grad", 828.0, "backward f, then y"),
    Quantity("acc.b2", 46, "f.backward(); y.backward(): b2.grad", 64.0, "backward f, then y"),
)

# In[25] and In[26]: a second backward through a freed graph.
SECOND_BACKWARD_ERROR = (
    "RuntimeError: Trying to backward through the graph a second time, but the saved "
    "intermediate results have already been freed. Specify retain_graph=True when calling "
    ".backward() or autograd.grad() the first time."
)
