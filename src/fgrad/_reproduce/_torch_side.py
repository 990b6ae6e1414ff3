"""Every quantity of the seed notebook, computed by the notebook's own PyTorch code."""

from __future__ import annotations

from typing import Any

import torch
from torch import autograd, nn


class Net(nn.Module):
    """The notebook's In[3], verbatim in substance."""

    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(1, 1, bias=False)
        self.linear1.weight.data = torch.tensor([[3.0]])
        self.linear2 = nn.Linear(1, 1, bias=True)
        self.linear2.weight.data = torch.tensor([[2.0]])
        self.linear2.bias.data = torch.tensor([6.0])

    def forward(self, x):
        l = self.linear1(x)
        return l, self.linear2(l).pow(2)


def _f(t: Any) -> float | None:
    return None if t is None else float(t.reshape(()).item())


def _grads(net: Net, prefix: str, out: dict) -> None:
    out[f"{prefix}.w1"] = _f(net.linear1.weight.grad)
    out[f"{prefix}.w2"] = _f(net.linear2.weight.grad)
    out[f"{prefix}.b2"] = _f(net.linear2.bias.grad)


def compute() -> dict[str, float | None]:
    """Runs the notebook's cells; returns the quantities keyed as in ``QUANTITIES``."""
    out: dict[str, float | None] = {}
    z = torch.tensor([[4.0]])

    net = Net()  # In[5]-[10]
    l, y = net(z)
    out["l"], out["y"] = _f(l), _f(y)
    (grad,) = autograd.grad(outputs=y, inputs=l)
    out["dy_dl"] = _f(grad)

    net = Net()  # In[14]-[18]
    l, y = net(z)
    y.backward()
    out["backward.z"] = _f(z.grad)
    _grads(net, "backward", out)

    net = Net()  # In[21]-[23]
    l, y = net(z)
    (grad,) = autograd.grad(outputs=y, inputs=net.linear1.weight)
    out["grad_w1"], out["grad_w1.acc"] = _f(grad), _f(net.linear1.weight.grad)

    net = Net()  # In[31]-[33]
    l, y = net(z)
    (grad,) = autograd.grad(outputs=y, inputs=net.linear1.weight, retain_graph=True)
    out["retain.w1"] = _f(grad)
    (grad,) = autograd.grad(outputs=y, inputs=net.linear2.weight, retain_graph=True)
    out["retain.w2"] = _f(grad)
    y.backward()
    _grads(net, "retain.backward", out)

    net = Net()  # In[36]-[40]
    l, y = net(z)
    (f,) = autograd.grad(outputs=y, inputs=l, create_graph=True)
    out["f"] = _f(f)
    f.backward()
    _grads(net, "f.backward", out)

    net = Net()  # In[43]
    l, y = net(z)
    (d1,) = autograd.grad(outputs=y, inputs=net.linear1.weight, create_graph=True)
    (d2,) = autograd.grad(outputs=d1, inputs=net.linear1.weight)
    out["d1_w1"], out["d2_w1"] = _f(d1), _f(d2)

    net = Net()  # In[46]
    l, y = net(z)
    (f,) = autograd.grad(outputs=y, inputs=l, create_graph=True)
    f.backward(retain_graph=True)
    y.backward()
    _grads(net, "acc", out)
    return out


def second_backward() -> dict[str, str]:
    """In[21]-[26]: backward through a freed graph, as PyTorch reports it."""
    net = Net()
    z = torch.tensor([[4.0]])
    _, y = net(z)
    autograd.grad(outputs=y, inputs=net.linear1.weight)
    errors = {}
    for key, call in (
        ("grad_w2", lambda: autograd.grad(outputs=y, inputs=net.linear2.weight)),
        ("backward", y.backward),
    ):
        try:
            call()
            errors[key] = "no error"
        except RuntimeError as e:
            errors[key] = f"RuntimeError: {e}"
    return errors


def version() -> str:
    return torch.__version__
