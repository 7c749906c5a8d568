"""Subcommands of `prefpack` that belong to `assets/`."""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register this area's subcommands (none yet)."""
