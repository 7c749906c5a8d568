"""The `prefpack` command: one dispatcher over the subcommands each area defines.

Each area keeps its own commands next to its code (`pipeline/cli.py`, `training/cli.py`,
`assets/cli.py`) and exposes `add_commands(subparsers)`. Those modules import their heavy
dependencies (torch, dagster) inside the handlers, so `prefpack --help` stays fast and
`pipeline` commands never load torch.

Errors: the library raises `ValueError` (bad input or settings, message naming the file,
row, column or flag) and `OSError` (a path that cannot be read or written). Either ends
the command with one line, `prefpack <command>: error: <message>` (`core.errors`), and
exit status 2; the traceback is shown only with `--debug` or `PREFPACK_DEBUG=1`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from core.errors import USER_ERROR, error_line


def build_parser() -> argparse.ArgumentParser:
    """Collect every area's subcommands under one parser."""
    from assets import cli as assets_cli
    from pipeline import cli as pipeline_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="prefpack",
        description="Shared-prefix packed preference data and an exact, compact DPO trainer.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("PREFPACK_DEBUG", "") not in ("", "0"),
        help="show the traceback of an error (also PREFPACK_DEBUG=1)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in (pipeline_cli, training_cli, assets_cli):
        area.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run the chosen subcommand's handler, turning user errors
    into one line and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, OSError) as err:
        if args.debug:
            raise
        print(error_line(args.command, err), file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"prefpack {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
