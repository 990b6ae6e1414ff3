"""`fgrad bench --suite large`: its cases, its refusal on the CPU, and its ResNet-style CNN
checked against PyTorch on the same weights, at a small size. (No timing asserted.)"""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from fgrad import bench
from fgrad.bench import _cases
from fgrad.bench._workloads import jax_forward, torch_forward, workloads
from helpers import assert_tree_allclose


def small_resnet():
    (w,) = [w for w in workloads("large") if w.kind == "cnn"]
    cfg = {**w.config, "channels": (4, 6), "size": 8, "blocks": 2}
    return dataclasses.replace(w, config=cfg, batch=4)


def test_large_suite_cases():
    got = _cases.cases("large")
    assert {c.workload.name for c in got} == {"resnet-64-128", "transformer-d1024"}
    assert {c.op for c in got} == set(_cases.LARGE_OPS)
    (tr,) = [w for w in workloads("large") if w.kind == "transformer"]
    assert (tr.config["d_model"], tr.config["seq"]) == (1024, 1024)
    assert "torch.compile" in {c.impl for c in got if c.op == "grad"}


def test_large_suite_refused_on_cpu():
    with pytest.raises(ValueError, match="fgrad bench: --suite large is sized for a GPU"):
        bench.run(suite="large", device="cpu", progress=False)


def test_resnet_forward_and_gradient_match_pytorch():
    w = small_resnet()
    p, b = w.numpy_params(), w.numpy_batch()
    assert sum(k.startswith("block") for k in p) == 8  # 2 blocks x 2 convs x (weight, bias)
    x_nhwc = np.transpose(b["x"], (0, 2, 3, 1))
    fwd = lambda q: jax_forward(w)(q, x_nhwc, lambda n, h: h).sum()
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    out = torch_forward(w)(tp, torch.tensor(b["x"]), lambda n, h: h).sum()
    out.backward()
    value, g = jax.value_and_grad(fwd)(p)
    assert_tree_allclose(value, out, rtol=1e-5, atol=1e-5)
    assert_tree_allclose(g, {k: t.grad for k, t in tp.items()}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["microbatch", "hvp"])
def test_large_ops_run_and_agree(op):
    """Large-suite operations built for the small ResNet (the accumulation loop, whose
    convolutions fgrad rewrites on CPU, and the HVP): fgrad and hand-written JAX give
    the same numbers, and PyTorch eager runs."""
    w = small_resnet()
    outs = {}
    for impl in ("fgrad", "jax"):
        fn, args = _cases.registry().builder(op, impl)(impl, w)
        outs[impl] = fn(*args)
    assert_tree_allclose(outs["fgrad"], outs["jax"], rtol=1e-4, atol=1e-6)
    _cases.registry().builder(op, "torch")("torch", w, "cpu")()
