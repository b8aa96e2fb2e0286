"""Command line: ``python -m rable_nb run|...`` (see README)."""
from __future__ import annotations

import argparse
import sys

from . import config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rable_nb",
                                     description="RABLE notebooks: run the executable report.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute notebooks in order with papermill")
    run.add_argument("--profile", default="smoke", help=f"one of {config.PROFILES}")
    run.add_argument("--only", help="comma-separated notebook numbers, e.g. 00,01")
    run.add_argument("--out", help="run directory (default runs/<profile>)")
    run.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"),
                     help="notebook parameter (repeatable); values parse as Python literals")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from .runner import main_run
        return main_run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
