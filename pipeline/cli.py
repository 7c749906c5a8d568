"""Subcommands of `prefpack` that belong to `pipeline/`: normalize, curate, pack, inspect."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `normalize`, `curate`, `pack` and `inspect`."""
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

    _add_pack(subparsers)
    _add_inspect(subparsers)


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


# ------------------------------------------------------------------------------ pack


def _add_pack(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.pack import PACK_DEFAULTS as d

    p = subparsers.add_parser(
        "pack",
        help="tokenize and pack preference pairs into shards (prints the shard directory)",
        description="Tokenize a preference_pair parquet and bin-pack it into Arrow shards "
        "with mask metadata under STORE/shards/<cache key>. An identical second call "
        "reuses the verified shards and rewrites nothing.",
    )
    # inputs and output
    p.add_argument("--pairs", required=True, help="preference_pair parquet file")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or a Hugging Face model folder; omitted: train a byte-level BPE",
    )
    p.add_argument("--out", default="store", help="store root (default: %(default)s)")
    # layout and length
    p.add_argument("--max-len", type=int, default=d["max_len"], help="tokens per row at most")
    p.add_argument(
        "--layout",
        choices=("shared", "unshared", "padded"),
        default=d["layout"],
        help="shared P|C|R (default), unshared P|C|P|R packed, padded one pair per row",
    )
    p.add_argument(
        "--too-long",
        choices=("truncate", "drop"),
        default=d["too_long"],
        help="what to do with pairs longer than --max-len (default: %(default)s)",
    )
    p.add_argument(
        "--min-response-len",
        type=int,
        default=d["min_response_len"],
        help="truncation never cuts a response below this (default: %(default)s)",
    )
    p.add_argument(
        "--template",
        default=d["template"],
        help="chatml | llama3 | plain | path.jinja (default: the tokenizer's, else chatml)",
    )
    # mask metadata, memory and files
    p.add_argument(
        "--block-size",
        type=int,
        default=d["mask_block_size"],
        help="block size of the block-sparse mask summary (default: %(default)s)",
    )
    p.add_argument(
        "--pack-window",
        type=int,
        default=d["pack_window"],
        help="pairs packed together; bounds memory (default: %(default)s)",
    )
    p.add_argument(
        "--shard-bytes",
        type=int,
        default=d["shard_bytes"],
        help="a shard file closes past this size (default: %(default)s)",
    )
    p.add_argument(
        "--bpe-vocab-size",
        type=int,
        default=d["bpe_vocab_size"],
        help="vocabulary of the trained BPE when no --tokenizer (default: %(default)s)",
    )
    p.add_argument(
        "--boundary-check-pairs",
        type=int,
        default=d["boundary_check_pairs"],
        help="pairs whose split tokenization is checked against the joined text",
    )
    p.set_defaults(handler=_pack)


def _pack(args: argparse.Namespace) -> int:
    from pipeline.pack import PackConfig, build_shards

    config = PackConfig(
        layout=args.layout,
        max_len=args.max_len,
        too_long=args.too_long,
        min_response_len=args.min_response_len,
        template=args.template,
        mask_block_size=args.block_size,
        pack_window=args.pack_window,
        shard_bytes=args.shard_bytes,
        bpe_vocab_size=args.bpe_vocab_size,
        boundary_check_pairs=args.boundary_check_pairs,
    )
    result = build_shards(args.pairs, args.tokenizer, config, args.out)
    stats = result.manifest["stats"]
    if result.reused:
        print(f"reused verified shards {result.key}; nothing rewritten", file=sys.stderr)
    else:
        print(
            f"packed {stats['pairs']} pairs into {stats['rows']} rows "
            f"(fill {stats['fill_ratio']:.4f}, dropped {sum(stats['dropped'].values())}, "
            f"truncated {stats['truncated']})",
            file=sys.stderr,
        )
    print(result.directory)
    return 0


# --------------------------------------------------------------------------- inspect


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="print a shard directory's stats and decode one row with segment markers",
    )
    p.add_argument("directory", help="a shard directory printed by `prefpack pack`")
    p.add_argument("--row", type=int, default=0, help="row to decode (default: %(default)s)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    p.set_defaults(handler=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from pipeline.shards import open_shards

    reader = open_shards(args.directory, verify=not args.no_verify)
    m, stats = reader.manifest, reader.manifest["stats"]
    by_layout = stats["tokens_by_layout"]
    print(f"key        {m['key']}  layout {m['layout']}  max_len {m['max_len']}")
    print(f"input      {m['input']['name']} ({m['input']['rows']} pairs)")
    print(f"tokenizer  {m['tokenizer']['name']}  template {m['template']['name']}")
    print(f"rows       {stats['rows']} in {len(m['shards'])} shard(s)")
    print(f"pairs      {stats['pairs']} packed, {stats['truncated']} truncated")
    print(f"dropped    {json.dumps(stats['dropped'])}")
    print(f"fill ratio {stats['fill_ratio']:.4f}")
    print(
        f"tokens     shared {by_layout['shared']}  unshared {by_layout['unshared']}  "
        f"padded {by_layout['padded']}  (prefix sharing saves "
        f"{stats['tokens_saved_by_prefix_sharing']}, {stats['prefix_sharing_saving']:.1%})"
    )
    agreement = stats["boundary_agreement"]
    print(f"boundary   {agreement['agreed']}/{agreement['checked']} responses agree")
    if not len(reader):
        return 0
    tokenizer = Tokenizer.from_file(str(reader.tokenizer_path))
    row = reader[args.row]
    print(f"\nrow {args.row % len(reader)}: {row.num_pairs} pair(s), {row.num_tokens} tokens")
    for i in range(row.num_pairs):
        s, p, c, r = (
            int(a[i]) for a in (row.pair_start, row.prompt_len, row.chosen_len, row.rejected_len)
        )
        print(f"\n=== pair {i} {row.pair_ids[i]}  P={p} C={c} R={r} ===")
        if m["layout"] == "shared":
            segments = [("PROMPT", s, p), ("CHOSEN", s + p, c), ("REJECTED", s + p + c, r)]
        else:
            segments = [
                ("PROMPT", s, p),
                ("CHOSEN", s + p, c),
                ("PROMPT again", s + p + c, p),
                ("REJECTED", s + 2 * p + c, r),
            ]
        for name, start, length in segments:
            ids = row.input_ids[start : start + length].tolist()
            print(f"[{name}]{tokenizer.decode(ids, skip_special_tokens=False)}[/{name}]")
    return 0
