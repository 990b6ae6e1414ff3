"""The README's headline benchmark table is the committed JSON's: every ratio it prints,
read back from `benchmarks/results/` (the CPU and the GPU quick-suite files) and rounded
as the README rounds it. (No timing is asserted: this checks the figures are copied, not
how fast anything is.)"""

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

WORKLOADS = {
    "seed network": "seed",
    "MLP 256x3": "mlp-256x3",
    "MLP 1024x3": "mlp-1024x3",
    "CNN 16-32, 32x32": "cnn-16-32",
    "CNN 16-32": "cnn-16-32",
    "transformer block": "transformer-d128",
    "scalar": "scalar",
}
OPS = {
    "gradient": "grad",
    "HVP": "hvp",
    "HVP per product, linearised once": "hvp_linearized",
    "gradient w.r.t. all activations": "grad_intermediates",
    "input-gradient penalty": "input_gradient",
    "WGAN-GP step": "wgan_gp",
    "micro-batch accumulation (default)": "microbatch",
    "micro-batch accumulation, unrolled": "microbatch_unrolled",
    "8th derivative (Taylor mode)": "derivative8",
}
COLUMNS = {  # README column -> (device, ratio key)
    "CPU: fgrad / hand JAX": ("cpu", "fgrad/jax"),
    "CPU: fgrad / PyTorch eager": ("cpu", "fgrad/torch"),
    "GPU: fgrad / hand JAX": ("gpu", "fgrad/jax"),
    "GPU: fgrad / PyTorch eager": ("gpu", "fgrad/torch"),
    "GPU: fgrad / torch.compile": ("gpu", "fgrad/torch.compile"),
}


def _report(device):
    (path,) = RESULTS.glob(f"{device}-*.json")  # one quick-suite file per device
    return {(r["workload"], r["op"]): r for r in json.loads(path.read_text())["ratios"]}


def _table():
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| workload | operation |"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return head, rows


def test_headline_table_is_the_committed_json():
    head, rows = _table()
    assert set(head[2:]) == set(COLUMNS)
    reports = {"cpu": _report("cpu"), "gpu": _report("gpu")}
    checked = 0
    for row in rows:
        key = (WORKLOADS[row["workload"]], OPS[row["operation"]])
        for column, (device, ratio) in COLUMNS.items():
            cell = row[column]
            if not cell:
                continue
            shown = re.match(r"[0-9.]+", cell).group(0)  # "1.28 (0.98 rechecked)" -> 1.28
            value = reports[device][key][ratio]
            digits = len(shown.split(".")[1])
            assert float(shown) == pytest.approx(round(value, digits), abs=1e-12), (
                f"README {row['workload']} / {row['operation']} / {column}: {shown}, "
                f"the JSON says {value:.{digits + 2}f}"
            )
            checked += 1
    assert checked >= 40
