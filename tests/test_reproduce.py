"""`fgrad reproduce`: the table, the JSON, the exit status, with and without PyTorch."""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import pytest

from fgrad import _reproduce, cli
from fgrad._reproduce import _notebook

# fgrad reproduce runs the notebook's PyTorch side: left out where torch is not installed.
pytestmark = pytest.mark.requires_torch

KEYS = {q.key for q in _notebook.QUANTITIES}


@pytest.fixture(scope="module")
def report():
    return _reproduce.compare()


def test_every_quantity_matches_torch_and_notebook(report):
    assert report["all_match"]
    assert report["torch"].startswith("2.13.0")
    assert {r["key"] for r in report["rows"]} == KEYS
    for r in report["rows"]:
        assert r["match"], r
        assert r["pytorch"] == r["fgrad"] == r["notebook"] or (
            abs(r["pytorch"] - r["notebook"]) <= 1e-6 * abs(r["notebook"])
        )
    by_key = {r["key"]: r["fgrad"] for r in report["rows"]}
    assert (by_key["dy_dl"], by_key["d2_w1"], by_key["acc.w2"]) == (120.0, 128.0, 828.0)
    assert by_key["backward.z"] is None


def test_second_backward_pytorch_fails_fgrad_does_not(report):
    s = report["second_backward"]
    assert s["match"]
    for err in s["pytorch"].values():
        assert err.startswith("RuntimeError: Trying to backward through the graph a second time")
    assert s["fgrad"] == {"grad_w1": 480.0, "grad_w2": 720.0, "backward_b2": 60.0}


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert cli.main(["reproduce", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "23 of 23 quantities match (fgrad, notebook and PyTorch)." in out
    assert "Trying to backward through the graph a second time" in out
    data = json.loads(path.read_text())
    assert data["all_match"] is True
    assert set(data["rows"][0]) >= {"cell", "quantity", "notebook", "pytorch", "fgrad", "match"}


def test_without_torch_compares_with_the_notebook(monkeypatch, capsys):
    monkeypatch.setattr(_reproduce, "torch_available", lambda: False)
    assert cli.main(["reproduce"]) == 0
    out = capsys.readouterr().out
    assert "23 of 23 quantities match (fgrad and notebook)." in out
    assert "pip install -c constraints.txt 'fgrad[torch]'" in out
    assert cli.main(["reproduce", "--no-torch"]) == 0


def test_torch_absent_from_sys_modules_is_detected(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert _reproduce.torch_available() is False


def test_mismatch_exits_nonzero(monkeypatch, capsys):
    q = _notebook.QUANTITIES
    wrong = (dataclasses.replace(q[0], notebook=13.0), *q[1:])
    monkeypatch.setattr(_reproduce, "QUANTITIES", wrong)
    assert cli.main(["reproduce", "--no-torch"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and " NO " in out


def test_console_script_runs():
    done = subprocess.run(
        [sys.executable, "-m", "fgrad.cli", "reproduce", "--no-torch"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "All match." in done.stdout


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nonsense"])
    assert e.value.code == 2


def test_fgrad_does_not_import_torch():
    """PyTorch is optional: importing and using fgrad (reproduce --no-torch included)
    never imports it."""
    code = (
        "import sys, io, fgrad, jax.numpy as jnp\n"
        "from fgrad import _reproduce\n"
        "fgrad.grad_intermediates(lambda p, z: fgrad.models.seed_net(p, z)[1])("
        "fgrad.models.seed_params(), jnp.ones((1, 1)))\n"
        "assert _reproduce.main(use_torch=False, out=io.StringIO()) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr


def test_readme_example_runs():
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
