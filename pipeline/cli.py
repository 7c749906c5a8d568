"""Subcommands of `prefpack` that belong to `pipeline/`: `normalize` and `curate`."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `normalize` and `curate`."""
    from pipeline.curate import CurateConfig
    from pipeline.sources import SOURCES
    from pipeline.sources.base import option_types

    lines = ["source options (-o KEY=VALUE):"]
    for name, source in SOURCES.items():
        lines.append(f"  {name}: " + ", ".join(option_types(source.options)))
    normalize = subparsers.add_parser(
        "normalize",
        help="map one source to canonical pairs (pairs, quarantine, report)",
        description="Read a source (local file/dir or hub id) and write pairs.parquet, "
        "quarantine.parquet and report.json to --out, atomically.",
        epilog="\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    normalize.add_argument("--source", required=True, choices=list(SOURCES), help="source name")
    normalize.add_argument("--input", required=True, help="file, directory or hub id")
    normalize.add_argument("--out", required=True, type=Path, help="output directory")
    normalize.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a source option, e.g. rejected=random or weights=helpfulness:1,correctness:0.5",
    )
    normalize.set_defaults(handler=_normalize)

    curate = subparsers.add_parser(
        "curate",
        help="filter canonical pairs by named rules; report the funnel",
        description="Curate pairs and write the kept pairs.parquet and report.json to --out.",
    )
    curate.add_argument(
        "--pairs",
        required=True,
        nargs="+",
        type=Path,
        help="pairs.parquet file(s) or normalize output dir(s); several are concatenated",
    )
    curate.add_argument("--out", required=True, type=Path, help="output directory")
    curate.add_argument(
        "--eval-prompts",
        type=Path,
        help="eval prompts (.txt one per line, or .jsonl/.parquet with 'prompt') to "
        "check contamination against",
    )
    rules = curate.add_argument_group("rules (CurateConfig)")
    hints = typing.get_type_hints(CurateConfig)
    for f in dataclasses.fields(CurateConfig):
        _add_config_flag(rules, f, hints[f.name])
    curate.set_defaults(handler=_curate)


def _add_config_flag(group: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    text = f.metadata["help"]
    if hint is bool:
        group.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=f.default, help=text
        )
        return
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if typing.get_origin(args[0]) is tuple:
        group.add_argument(flag, nargs="+", default=f.default, metavar="NAME", help=text)
        return
    base, optional = args[0], type(None) in typing.get_args(hint)

    def parse(text: str) -> Any:
        return None if optional and text.lower() == "none" else base(text)

    off = "; 'none' turns it off" if optional else ""
    group.add_argument(
        flag,
        type=parse,
        default=f.default,
        metavar=base.__name__.upper(),
        help=f"{text} (default: {f.default}{off})",
    )


def _normalize(args: argparse.Namespace) -> int:
    from pipeline.normalize import normalize, write_normalized
    from pipeline.sources import get_source
    from pipeline.sources.base import option_types, parse_option

    types_ = option_types(get_source(args.source).options)
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or key not in types_:
            raise SystemExit(
                f"prefpack normalize: bad option {item!r}; {args.source} takes "
                f"{', '.join(types_)} as KEY=VALUE"
            )
        options[key] = parse_option(types_[key], value)
    result = normalize(args.source, args.input, **options)
    out = write_normalized(result, args.out)
    report = result.report
    print(
        f"{args.source}: {report['rows_in']} rows in, {report['pairs_out']} pairs, "
        f"quarantined {report['quarantined']}, dropped {report['dropped']} -> {out}"
    )
    return 0


def _curate(args: argparse.Namespace) -> int:
    from pipeline.curate import CurateConfig, curate, load_eval_prompts, read_pairs, write_curated

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(CurateConfig)}
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    config = CurateConfig(**values)
    evals = None if args.eval_prompts is None else load_eval_prompts(args.eval_prompts)
    result = curate(read_pairs(args.pairs), config, evals)
    out = write_curated(result, args.out)
    report = result.report
    dropped = {k: v for k, v in report["dropped"].items() if v}
    print(f"curate: {report['rows_in']} in, dropped {dropped}, {report['rows_out']} out -> {out}")
    return 0
