"""The fgrad command line: --version, and options checked before a run starts (a bad output
path used to surface as a traceback after the whole benchmark had run)."""

import pytest

import fgrad
from fgrad import bench, cli


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fgrad {fgrad.__version__}"


@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if a benchmark or the reproduction would start."""
    from fgrad import _reproduce

    def refuse(*a, **k):
        raise AssertionError("started a run before checking its options")

    monkeypatch.setattr(bench, "_run_worker", refuse)
    monkeypatch.setattr(bench, "_gpu_available", refuse)
    monkeypatch.setattr(_reproduce, "compare", refuse)


def one_line_error(capsys, match: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.mark.parametrize("threads", ["-3", "-1"])
def test_negative_threads_are_refused(capsys, no_run, threads):
    # -3 was recorded in the report while XLA used every core
    assert cli.main(["bench", "--suite", "tiny", "--device", "cpu", "--threads", threads]) == 2
    one_line_error(
        capsys, f"--threads must be 0 (all cores) or a positive number of threads, got {threads}"
    )


def test_output_paths_are_checked_before_a_run(tmp_path, capsys, no_run):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    bad = {
        "--json": (str(tmp_path), "is a directory"),
        "--plot": (str(a_file / "p.png"), "is a file, not a folder"),
        "--log": (str(a_file / "deeper" / "l.jsonl"), "is a file, not a folder"),
    }
    for option, (path, why) in bad.items():
        argv = ["bench", "--suite", "tiny", "--device", "cpu", option, path]
        assert cli.main(argv) == 2
        assert why in one_line_error(capsys, f"fgrad bench: {option} {path}: ")
    assert cli.main(["reproduce", "--json", str(a_file / "r.json")]) == 2
    one_line_error(capsys, "fgrad reproduce: --json")


def test_a_missing_folder_is_fine_and_a_late_file_error_is_one_line(tmp_path, capsys, monkeypatch):
    cli.check_output_path(str(tmp_path / "new" / "r.json"), "--json")  # created when written

    def broken(**kw):
        raise FileNotFoundError(2, "No such file or directory", kw["json_path"])

    monkeypatch.setattr(bench, "main", broken)
    path = str(tmp_path / "r.json")
    assert cli.main(["bench", "--json", path]) == 2
    one_line_error(capsys, f"fgrad bench: {path}: No such file or directory")
