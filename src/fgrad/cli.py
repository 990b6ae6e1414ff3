"""The ``fgrad`` command line."""

from __future__ import annotations

import argparse
import os
import sys


def _version() -> str:
    from fgrad import __version__

    return __version__


def check_output_path(path: str, option: str) -> None:
    """Raises OSError, in one line naming ``option``, unless ``path`` can be written: checked
    before a run, so that minutes of measurements are not lost to a typo at the end."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise OSError(f"{option} {path}: is a directory; give a file name.")
    if os.path.exists(full):
        if not os.access(full, os.W_OK):
            raise OSError(f"{option} {path}: the file is not writable.")
        return
    parent = os.path.dirname(full)
    while not os.path.exists(parent):  # missing folders are created; their parent must allow it
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OSError(f"{option} {path}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"{option} {path}: the folder {parent} is not writable.")


def _parser() -> argparse.ArgumentParser:
    from fgrad import bench  # light: no framework is imported until a worker starts

    p = argparse.ArgumentParser(
        prog="fgrad", description="PyTorch's autograd idioms as pure, jit-compiled JAX."
    )
    p.add_argument("--version", action="version", version=f"fgrad {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser(
        "reproduce",
        help="run every cell of the seed notebook in PyTorch and in fgrad, side by side",
        description=(
            "Computes every quantity the seed notebook prints with the notebook's own PyTorch "
            "code and with fgrad, prints them side by side and exits with status 1 on any "
            "mismatch. Without PyTorch, compares fgrad with the notebook's printed values."
        ),
    )
    r.add_argument("--json", metavar="PATH", help="also write the table as JSON to PATH")
    r.add_argument(
        "--no-torch",
        action="store_true",
        help="skip the PyTorch column even when torch is installed",
    )
    b = sub.add_parser(
        "bench",
        help="benchmark fgrad against hand-written JAX, PyTorch eager, torch.func, torch.compile",
        description=(
            "Times every fgrad operation next to the same computation written by hand in JAX "
            "and in PyTorch (eager, torch.func, torch.compile), each framework in its own "
            "process; prints a summary table with ratios measured in the same run."
        ),
    )
    b.add_argument("--suite", choices=tuple(bench.SUITE_SETTINGS), default="quick")
    b.add_argument("--device", choices=("cpu", "gpu", "auto"), default="auto")
    b.add_argument(
        "--only",
        metavar="PATTERN",
        help="glob(s) over workload/op, comma-separated, e.g. 'mlp-*/hvp,seed/*'",
    )
    b.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    b.add_argument("--plot", metavar="PATH", help="write a plot of the ratios to PATH (PNG)")
    b.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads per framework (default: all cores); reported either way",
    )
    b.add_argument(
        "--precision",
        choices=bench.PRECISIONS,
        default="float32",
        help=(
            "what float32 matmuls and convolutions compute, set alike in both frameworks: "
            "full float32 (default) or TensorFloat-32 on GPUs that have it (JAX's GPU "
            "default; no effect on a CPU)"
        ),
    )
    b.add_argument(
        "--log",
        metavar="PATH",
        help="append every result as a JSON line the moment it is measured "
        "(an interrupted run keeps what it measured)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except OSError as e:  # a file that cannot be read or written: one line, no traceback
        reason = e.strerror or str(e)
        where = f"{e.filename}: " if e.filename else ""
        print(f"fgrad {args.command}: {where}{reason}", file=sys.stderr)
        return 2
    except ValueError as e:  # options that cannot run here: say what to do, no traceback
        print(e, file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "reproduce":
        if args.json:
            check_output_path(args.json, "--json")
        from fgrad import _reproduce

        return _reproduce.main(
            json_path=args.json, use_torch=False if args.no_torch else None, out=sys.stdout
        )
    if args.command == "bench":
        from fgrad import bench

        for option, path in (("--json", args.json), ("--plot", args.plot), ("--log", args.log)):
            if path:
                check_output_path(path, option)
        return bench.main(
            suite=args.suite,
            device=args.device,
            only=args.only,
            json_path=args.json,
            plot_path=args.plot,
            threads=args.threads,
            out=sys.stdout,
            precision=args.precision,
            log_path=args.log,
        )
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
