"""The `prefpack` command: one dispatcher over the subcommands each area defines.

Each area keeps its own commands next to its code (`pipeline/cli.py`, `training/cli.py`,
`assets/cli.py`) and exposes `add_commands(subparsers)`. Those modules import their heavy
dependencies (torch, dagster) inside the handlers, so `prefpack --help` stays fast and
`pipeline` commands never load torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """Collect every area's subcommands under one parser."""
    from assets import cli as assets_cli
    from pipeline import cli as pipeline_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="prefpack",
        description="Shared-prefix packed preference data and an exact, compact DPO trainer.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in (pipeline_cli, training_cli, assets_cli):
        area.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run the chosen subcommand's handler."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
