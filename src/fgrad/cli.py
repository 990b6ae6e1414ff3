"""The ``fgrad`` command line."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fgrad", description="PyTorch's autograd idioms as pure, jit-compiled JAX."
    )
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "reproduce":
        from fgrad import _reproduce

        return _reproduce.main(
            json_path=args.json, use_torch=False if args.no_torch else None, out=sys.stdout
        )
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
