"""The benchmark harness itself: a tiny suite end to end, the JSON schema, failures
reported rather than fatal. (Benchmarks are not tests: no timing is asserted here.)"""

import argparse
import io
import json

import pytest

from fgrad import bench, cli
from fgrad.bench import _cases, _measure, _worker
from fgrad.bench._workloads import Workload

CASE_KEYS = {"key", "workload", "op", "impl", "framework", "status"}
TIMED_KEYS = {"compile_s", "median_s", "iqr_s", "min_s", "calls_per_round", "rounds"}


def check_schema(report):
    assert report["schema"] == bench.SCHEMA
    assert {"suite", "created", "machine", "frameworks", "cases", "ratios", "hvp_over_grad"} <= set(
        report
    )
    assert {"name", "cpu", "cores", "device"} <= set(report["machine"])
    for fw in report["frameworks"]:
        assert fw["framework"] in ("jax", "torch") and fw["peak_gflops"] > 0
        # read before and after the cases; the higher reading is the peak
        assert fw["peak_gflops"] == max(fw["peak_gflops_readings"])
        assert fw["threads"] >= 1
    for c in report["cases"]:
        assert CASE_KEYS <= set(c), c
        assert c["status"] in ("ok", "unsupported", "error")
        if c["status"] == "ok":
            assert TIMED_KEYS <= set(c)
            assert 0 < c["median_s"] and c["iqr_s"] >= 0 and c["compile_s"] > 0
    json.dumps(report)  # plain data


@pytest.fixture(scope="module")
def report():
    return bench.run(
        suite="tiny", device="auto", only="seed/grad,seed/hvp,scalar/*", progress=False
    )


@pytest.mark.requires_torch  # runs the PyTorch worker
def test_tiny_suite_end_to_end(report):
    import jax

    check_schema(report)
    # device="auto": the GPU where JAX sees one, else the CPU
    assert report["machine"]["device"] == ("gpu" if jax.default_backend() == "gpu" else "cpu")
    got = {c["key"]: c for c in report["cases"]}
    expected = {c.key for c in _cases.cases("tiny", "seed/grad,seed/hvp,scalar/*")}
    assert set(got) == expected
    assert got["seed/grad/fgrad"]["status"] == "ok"
    assert got["seed/grad/torch"]["status"] == "ok"
    assert got["seed/hvp/torch.compile"]["status"] == "unsupported"
    assert "double backward" in got["seed/hvp/torch.compile"]["error"]
    assert got["scalar/derivative8/torch.compile"]["status"] == "unsupported"
    assert got["seed/grad/fgrad"]["flops"] and got["seed/grad/fgrad"]["memory_bytes"]
    ratio = {(r["workload"], r["op"]): r for r in report["ratios"]}
    assert ratio[("seed", "grad")]["fgrad/jax"] > 0
    assert ratio[("seed", "grad")]["fgrad/torch"] > 0
    assert ratio[("scalar", "derivative8")]["fgrad/fgrad-nested"] > 0
    assert "seed/fgrad" in report["hvp_over_grad"]


def test_render_and_plot(report, tmp_path):
    out = io.StringIO()
    bench._report.render(report, out)
    text = out.getvalue()
    assert "seed" in text and "/torch" in text and "matmul peak" in text
    path = tmp_path / "p.png"
    bench.plot(report, str(path))
    assert path.stat().st_size > 1000


def test_failing_case_is_reported_not_fatal(capsys):
    broken = Workload("broken", "mlp", {"inputs": 4}, 2)  # config lacks width/depth
    args = argparse.Namespace(
        device="cpu", threads=0, min_time=0.001, rounds=1, matmul=64, precision="float32"
    )
    ok = _cases.Case(Workload("seed", "seed", {}, 1), "grad", "fgrad")
    _worker.run_jax(args, [_cases.Case(broken, "grad", "fgrad"), ok])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["type"] == "meta"
    assert lines[1]["status"] == "error" and "KeyError" in lines[1]["error"]
    assert lines[2]["status"] == "ok"  # the next case still ran


def test_hvps_share_the_gradients_interleaved_rounds(monkeypatch):
    """The report divides the HVPs' times by the gradient's: they are timed in the same
    interleaved rounds (one measure_group call), other operations in their own."""
    groups = []

    def fake_measure_group(runs, sync, **kw):
        groups.append(sorted(runs))
        return {k: {"median_s": 1.0} for k in runs}

    monkeypatch.setattr(_worker, "measure_group", fake_measure_group)
    seed = Workload("seed", "seed", {}, 1)
    todo = [
        _cases.Case(seed, op, impl)
        for op in ("grad", "input_gradient", "hvp", "hvp_linearized")
        for impl in ("fgrad", "jax")
    ]
    args = argparse.Namespace(min_time=0.001, rounds=1)
    _worker._run_cases(todo, "jax", lambda case: (lambda: None, None), lambda x: x, args)
    with_grad = [
        f"seed/{op}/{i}" for op in ("grad", "hvp", "hvp_linearized") for i in ("fgrad", "jax")
    ]
    assert groups == [sorted(with_grad), ["seed/input_gradient/fgrad", "seed/input_gradient/jax"]]


def test_crashed_worker_cases_are_errors():
    bar = bench._Progress(1, io.StringIO(), enabled=False)
    meta, results = bench._run_worker(
        "jax", "tiny", "no-such-case", "cpu", 0, "float32", ["ghost/grad/fgrad"], bar, None
    )
    assert meta["framework"] == "jax"
    assert results[-1]["key"] == "ghost/grad/fgrad" and results[-1]["status"] == "error"


@pytest.mark.requires_torch  # runs the PyTorch worker
def test_cli_writes_json_and_plot(tmp_path, capsys):
    j, p, log = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.jsonl"
    code = cli.main(
        [
            "bench",
            "--suite",
            "tiny",
            "--device",
            "cpu",
            "--only",
            "seed/grad",
            "--json",
            str(j),
            "--plot",
            str(p),
            "--log",
            str(log),
        ]
    )
    assert code == 0
    report = json.loads(j.read_text())
    check_schema(report)
    assert p.exists()
    assert "seed" in capsys.readouterr().out
    # the log holds every worker record as it arrived: one meta per framework, every case
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["framework"] for x in lines if x["type"] == "meta"] == ["jax", "torch"]
    assert [x["framework"] for x in lines if x["type"] == "peak"] == ["jax", "torch"]
    assert {x["key"] for x in lines if x["type"] == "case"} == {c["key"] for c in report["cases"]}
    assert all(x["precision"] == "float32" for x in lines if x["type"] == "meta")
    assert report["precision"] == "float32"


def test_errors():
    with pytest.raises(ValueError, match="unknown suite"):
        bench.run(suite="huge")
    with pytest.raises(ValueError, match="no case matches"):
        bench.run(suite="tiny", only="nothing/*", progress=False)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        bench.run(suite="tiny", precision="fp8", progress=False)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        bench.run(suite="tiny", device="tpu", progress=False)


def test_gpu_without_a_gpu_says_what_to_do(capsys, monkeypatch):
    """Without a GPU, JAX would silently fall back to the CPU: refuse instead."""
    import jax

    # the probe (a fresh process) sees what this process's JAX sees
    assert bench._gpu_available() == (jax.default_backend() == "gpu")
    monkeypatch.setattr(bench, "_gpu_available", lambda: False)
    with pytest.raises(ValueError, match=r"JAX sees no GPU here.*--device cpu"):
        bench.run(suite="tiny", device="gpu", progress=False)
    assert cli.main(["bench", "--suite", "tiny", "--device", "gpu"]) == 2
    assert "pip install 'jax[cuda13]'" in capsys.readouterr().err


def test_machine_name_names_the_gpu():
    cpu = bench.machine("cpu")
    assert cpu["name"].startswith("cpu-") and cpu["name"].endswith(f"-{cpu['cores']}c")
    assert cpu["accelerator"] is None
    metas = [
        {"framework": "jax", "backend": "gpu", "device_kind": "NVIDIA H200"},
        {"framework": "torch", "backend": "cuda", "device_kind": "NVIDIA H200"},
    ]
    gpu = bench.machine("gpu", bench._accelerator(metas))
    assert gpu["name"] == "gpu-nvidia-h200" and gpu["accelerator"] == "NVIDIA H200"
    on_cpu = [{"framework": "jax", "backend": "cpu", "device_kind": "cpu"}]
    assert bench._accelerator(on_cpu) is None


@pytest.mark.requires_torch  # runs the PyTorch worker
@pytest.mark.parametrize(("precision", "mode"), [("float32", "ieee"), ("tf32", "tf32")])
def test_torch_precision_is_set_explicitly(precision, mode):
    import torch

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        _worker._set_torch_precision(torch, precision)
        assert (matmul.fp32_precision, conv.fp32_precision) == (mode, mode)
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_measure_group_interleaves_rounds_and_isolates_failures():
    """Rounds alternate between implementations, their order rotated each round; one that
    fails (at its first call, or mid-way) is reported while the others are still timed."""
    calls = []

    def impl(name, fail_after=None):
        def run():
            calls.append(name)
            if fail_after is not None and calls.count(name) > fail_after:
                raise RuntimeError(f"{name} broke")
            return name

        return run

    runs = {
        "a": impl("a"),
        "b": impl("b"),
        "late": impl("late", fail_after=6),
        "dead": impl("dead", 0),
    }
    out = _measure.measure_group(runs, lambda _: None, min_time=0.0, rounds=3)
    assert list(out) == ["a", "b", "late", "dead"]
    assert isinstance(out["dead"], RuntimeError) and isinstance(out["late"], RuntimeError)
    for key in ("a", "b"):
        assert out[key]["rounds"] == 3 and out[key]["calls_per_round"] == 1
        assert out[key]["min_s"] <= out[key]["median_s"] and out[key]["iqr_s"] >= 0
    # after the first call and 3 warm-ups each (dead fails at its first), rounds rotate
    rounds = calls[4 + 4 + 4 + 1 :]
    # late's 7th call (its third round) fails, and the round goes on without it
    assert rounds == ["a", "b", "late", "b", "late", "a", "late", "a", "b"]


# --- the registry: operations are data ------------------------------------------------------


def test_default_registry_lists_the_operations():
    reg = _cases.registry()
    assert reg.ops()[:3] == ["grad", "grad_intermediates", "backward_accumulate"]
    assert reg.impls("grad") == ["fgrad", "jax", "torch", "torch.func", "torch.compile"]
    assert reg.impls("derivative8") == ["fgrad", "fgrad-nested", "jax", "torch", "torch.compile"]
    assert reg.framework("hvp", "torch.func") == "torch"
    keys = [c.key for c in _cases.cases("tiny")]
    assert len(keys) == len(set(keys))
    # the dense Hessian's and the n-th derivative's own workloads come last
    assert keys[-5:] == [f"scalar/derivative8/{i}" for i in reg.impls("derivative8")]
    assert "hessian-mlp/hessian/fgrad" in {c.key for c in _cases.cases("quick")}
    assert "mlp-16x2/microbatch/fgrad" in keys  # batch 4 splits into 4 micro-batches
    assert not any(k.startswith("seed/microbatch") for k in keys)  # batch 1 does not


def test_listing_cases_does_not_import_torch():
    """The parent process and the JAX worker never import PyTorch (it would compete for
    threads): builders of PyTorch implementations import it themselves."""
    import subprocess
    import sys

    code = (
        "import sys; from fgrad.bench import _cases; _cases.cases('full'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def toy_registry():
    import bench_toy_ops

    reg = _cases.registry().copy()
    reg.add_tables(bench_toy_ops)
    return reg


def test_an_operation_plugs_in_by_its_tables(toy_registry, capsys):
    """A module's JAX / TORCH / APPLIES tables merged into a registry: its cases are
    listed (on the workloads it applies to, with its own JAX implementation "vmap"), its
    builders compute the right numbers, and the workers run them."""
    import torch

    reg = toy_registry
    assert "toy" not in _cases.registry().ops()  # the default registry is untouched
    todo = _cases.cases("tiny", "*/toy", reg=reg)
    assert [(c.key, c.framework) for c in todo] == [
        ("seed/toy/fgrad", "jax"),
        ("seed/toy/vmap", "jax"),
        ("seed/toy/torch", "torch"),
    ]
    assert _cases.cases("tiny", "*/toy", reg=reg, torch=False) == todo[:2]
    # d/dθ sum(u⁴), u = w2·w1·x + b2 = 30 (w1=3, w2=2, b2=6, x=4): 4u³ · (x·w2, w1·x, 1)
    want = {
        "linear1.weight": 4 * 30**3 * 8.0,
        "linear2.weight": 4 * 30**3 * 12.0,
        "linear2.bias": 4 * 30**3 * 1.0,
    }
    w = todo[0].workload
    for case in todo[:2]:
        fn, args = reg.builder("toy", case.impl)(case.impl, w)
        got = fn(*args)
        assert {k: float(v.reshape(())) for k, v in got.items()} == pytest.approx(want)
    got = reg.builder("toy", "torch")("torch", w, "cpu")()
    assert {k: float(v.reshape(())) for k, v in got.items()} == pytest.approx(want)

    args = argparse.Namespace(
        device="cpu", threads=0, min_time=0.001, rounds=1, matmul=64, precision="float32"
    )
    _worker.run_jax(args, todo[:2], reg)
    _worker.run_torch(args, todo[2:], reg)
    torch.set_num_threads(1)  # the worker set PyTorch's threads; the suite runs on one
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    recs = {r["key"]: r for r in recs if r["type"] == "case"}
    assert {k: r["status"] for k, r in recs.items()} == dict.fromkeys(
        ["seed/toy/fgrad", "seed/toy/vmap", "seed/toy/torch"], "ok"
    )


def test_registry_refuses_what_it_cannot_list(toy_registry):
    from fgrad.bench._registry import Registry

    reg = Registry()
    reg.add("orphan", "jax", "fgrad", lambda impl, w: None)
    with pytest.raises(ValueError, match="'orphan' has builders but no APPLIES"):
        _cases.cases("tiny", reg=reg)
    with pytest.raises(ValueError, match="orphan/fgrad is registered twice"):
        reg.add("orphan", "torch", "fgrad", lambda impl, w, d: None)
    with pytest.raises(ValueError, match="unknown framework 'tf'"):
        reg.add("orphan", "tf", "x", lambda impl, w: None)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="no implementation 'opacus'"):
        toy_registry.builder("toy", "opacus")
