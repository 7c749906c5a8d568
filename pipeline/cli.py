"""Subcommands of `prefpack` that belong to `pipeline/`: normalize, curate, tokenize, pack,
inspect, select."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.pack import PackConfig, ShardResult
    from pipeline.tokenized import TokenizedResult


class _ListPresets(argparse.Action):
    """`--list-presets`: print every preset's settings and notes, then exit (as --version)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show every preset's settings and notes, then exit",
        )

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from pipeline.presets import describe_all

        print(describe_all())
        parser.exit()


def _add_preset(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--preset",
        metavar="NAME",
        help=f"a public cleaning recipe: its {what}, under what you set (see below)",
    )
    p.add_argument("--list-presets", action=_ListPresets)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `normalize`, `curate`, `tokenize`, `pack`, `inspect` and `select`."""
    from core.settings import add_flags
    from pipeline.curate import CurateConfig
    from pipeline.presets import summaries
    from pipeline.sources import SOURCES
    from pipeline.sources.base import option_types

    lines = ["source options (-o KEY=VALUE):"]
    for name, source in SOURCES.items():
        lines.append(f"  {name}: " + ", ".join(option_types(source.options)))
    lines += ["", summaries()]
    normalize = subparsers.add_parser(
        "normalize",
        help="map one source to canonical pairs (pairs, quarantine, report)",
        description="Read a source (local file/dir or hub id) and write pairs.parquet, "
        "quarantine.parquet (rows that could not be read or mapped, with a reason), "
        "dropped.parquet (rows the source's rules leave out, with a reason) and report.json "
        "to --out, atomically. *_column options take dotted paths into struct columns "
        "(-o score_chosen_column=metadata.score_chosen); naming an absent column is an error.",
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
    _add_preset(normalize, "source options (-o wins)")
    normalize.set_defaults(handler=_normalize)

    curate = subparsers.add_parser(
        "curate",
        help="filter canonical pairs by named rules; report the funnel",
        description="Curate pairs and write the kept pairs.parquet and report.json to --out. "
        "Every pair a rule drops goes to dropped.parquet with the rule as its reason. With "
        "--eval-share, --eval-pairs or --eval-splits, whole prompts (and near-duplicate "
        "groups) are held out in eval_pairs.parquet (always written; empty without a split): "
        "pack them with `prefpack pack --pairs OUT --eval`. The rules run in the order the "
        "report lists them; --max-pairs N samples N pairs (by content hash, seeded) after "
        "the per-pair rules and dedup, before the rules that compare pairs with each other, "
        "to try settings on a subset. The pairs are read in batches, so memory does not "
        "grow with them.",
        epilog=summaries(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    curate.add_argument(
        "--benchmark-prompts",
        type=Path,
        help="a benchmark's questions (.txt one per line, or .jsonl/.parquet with 'prompt' or "
        "'question', e.g. TruthfulQA's); a pair with a user turn equal to one is dropped as "
        "benchmark_prompt",
    )
    _add_preset(curate, "rule settings (each flag you give wins)")
    add_flags(curate.add_argument_group("rules (CurateConfig)"), CurateConfig, only_given=True)
    curate.set_defaults(handler=_curate)

    _add_tokenize(subparsers)
    _add_pack(subparsers)
    _add_inspect(subparsers)
    _add_select(subparsers)


def _normalize(args: argparse.Namespace) -> int:
    from pipeline.normalize import normalize_to
    from pipeline.sources import get_source
    from pipeline.sources.base import option_types, parse_option

    types_ = option_types(get_source(args.source).options)
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or key not in types_:
            raise ValueError(
                f"bad option {item!r}; {args.source} takes {', '.join(types_)} as KEY=VALUE"
            )
        options[key] = parse_option(types_[key], value)
    report = normalize_to(args.out, args.source, args.input, args.preset, **options)
    preset = f" (preset {args.preset})" if args.preset else ""
    print(
        f"{args.source}{preset}: {report['rows_in']} rows in, {report['pairs_out']} pairs, "
        f"quarantined {report['quarantined']}, dropped {report['dropped']} -> {args.out}"
    )
    return 0


def _curate(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from core.settings import config_from
    from pipeline.curate import CurateConfig, Pairs, curate_to, load_eval_prompts
    from pipeline.presets import curate_config, get_preset

    preset = None if args.preset is None else get_preset(args.preset)
    config_from(CurateConfig, args)  # the flags given, checked before any data is read
    evals = None if args.eval_prompts is None else load_eval_prompts(args.eval_prompts)
    benchmark = None
    if args.benchmark_prompts is not None:
        benchmark = load_eval_prompts(args.benchmark_prompts)
    elif preset is not None and preset.benchmark_prompts:
        print(
            f"curate: note: no --benchmark-prompts ({preset.benchmark_prompts}), so preset "
            f"{preset.name} keeps prompts that ask one under other sources",
            file=sys.stderr,
        )
    pairs = Pairs.open(args.pairs)  # read batch by batch: any number of pairs
    # What a preset's settings depend on: the pairs' sources and their scales.
    sources = pa.table(
        {"source": pairs.sources() if preset else []}, pa.schema([("source", pa.string())])
    )
    config = curate_config(preset, args, sources.replace_schema_metadata(pairs.schema.metadata))
    report = curate_to(args.out, pairs, config, evals, benchmark, preset=preset and preset.name)
    dropped = {k: v for k, v in report["dropped"].items() if v}
    label = f" (preset {preset.name})" if preset else ""
    split = report["eval_split"]
    held = f", {report['eval_pairs']} eval ({split['mode']} {split['setting']})" if split else ""
    print(
        f"curate{label}: {report['rows_in']} in, dropped {dropped}, {report['rows_out']} out"
        f"{held} -> {args.out}"
    )
    return 0


# -------------------------------------------------------------------- tokenize, pack


def _add_tokenize_flags(p: argparse.ArgumentParser) -> None:
    """Inputs and settings of the tokenize stage, shared by `tokenize` and `pack`."""
    from core.settings import add_flags
    from pipeline.tokenized import TokenizeConfig

    p.add_argument(
        "--pairs",
        required=True,
        help="preference_pair parquet file (or a curate/normalize output directory)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json or a Hugging Face model folder; omitted: train a byte-level BPE",
    )
    p.add_argument("--out", default="store", help="store root (default: %(default)s)")
    add_flags(p.add_argument_group("tokenize (TokenizeConfig)"), TokenizeConfig)


def _add_tokenize(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tokenize",
        help="tokenize preference pairs (prints the tokenized directory)",
        description="Render and tokenize a preference_pair parquet into "
        "STORE/tokenized/<cache key> (tokenized.parquet, tokenizer, report.json). An "
        "identical second call reuses the verified directory and rewrites nothing.",
    )
    _add_tokenize_flags(p)
    p.set_defaults(handler=_tokenize)


def _add_pack(subparsers: argparse._SubParsersAction) -> None:
    from core.settings import add_flags
    from pipeline.pack import PackConfig

    p = subparsers.add_parser(
        "pack",
        help="tokenize and pack preference pairs into shards (prints the shard directory)",
        description="Tokenize a preference_pair parquet (STORE/tokenized/<key>, as "
        "`prefpack tokenize`) and bin-pack it into Arrow shards with mask metadata under "
        "STORE/shards/<cache key>. Each stage reuses its verified output when its key is "
        "unchanged: a new --max-len or --layout repacks without tokenizing again, and an "
        "identical second call rewrites nothing.",
    )
    _add_tokenize_flags(p)
    p.add_argument(
        "--eval",
        action="store_true",
        help="pack the eval pairs of the curate output --pairs names (its eval_pairs.parquet) "
        "with the training shards' tokenizer, template and settings (the training pairs are "
        "tokenized and packed first, or reused) and print the eval shard directory instead",
    )
    add_flags(p.add_argument_group("pack (PackConfig)"), PackConfig)
    p.set_defaults(handler=_pack)


def _run_tokenize(args: argparse.Namespace) -> TokenizedResult:
    """The tokenize stage from the shared flags; says on stderr what it did."""
    from core.settings import config_from
    from pipeline.tokenized import TokenizeConfig, build_tokenized

    config = config_from(TokenizeConfig, args)
    result = build_tokenized(args.pairs, args.tokenizer, config, args.out)
    stats = result.report["stats"]
    if result.reused:
        print(
            f"tokenize: reused verified tokenized pairs {result.key} (not rewritten)",
            file=sys.stderr,
        )
    else:
        agreement, ending = stats["boundary_agreement"], stats["responses_ending_with_eos"]
        print(
            f"tokenize: {stats['pairs_in']} pairs in, {stats['pairs_out']} tokenized, "
            f"dropped {stats['dropped']}, boundary agreement {agreement['rate']:.4f} "
            f"({agreement['agreed']}/{agreement['checked']}), responses ending with "
            f"{ending['token']} {ending['rate']:.4f} ({ending['count']}/{ending['of']})",
            file=sys.stderr,
        )
    return result


def _tokenize(args: argparse.Namespace) -> int:
    print(_run_tokenize(args).directory)
    return 0


def _pack(args: argparse.Namespace) -> int:
    from core.settings import config_from
    from pipeline.eval_shards import build_eval_shards, eval_pairs_path
    from pipeline.pack import PackConfig, build_shards

    config = config_from(PackConfig, args)  # checked before anything is tokenized
    if args.eval:
        eval_pairs_path(args.pairs)  # an eval split to pack, before anything is tokenized
    tokenized = _run_tokenize(args)
    result = build_shards(tokenized.directory, config, args.out)
    _say_packed("pack", result, config)
    if tokenized.reused and result.reused:
        print("both stages reused; nothing rewritten", file=sys.stderr)
    if args.eval:
        evals = build_eval_shards(args.pairs, result.directory, args.out)
        _say_packed("pack --eval", evals.shards, config)
        result = evals.shards
    print(result.directory)
    return 0


def _say_packed(stage: str, result: ShardResult, config: PackConfig) -> None:
    """On stderr: what the pack stage made or reused, and its truncation warning."""
    from pipeline.pack import truncation_warning

    stats = result.manifest["stats"]
    if result.reused:
        print(f"{stage}: reused verified shards {result.key} (not rewritten)", file=sys.stderr)
    else:
        print(
            f"{stage}: packed {stats['pairs']} pairs into {stats['rows']} rows "
            f"(fill {stats['fill_ratio']:.4f}, dropped {sum(stats['dropped'].values())}, "
            f"truncated {stats['truncated']})",
            file=sys.stderr,
        )
    warning = truncation_warning(stats, config)
    if warning:
        print(f"{stage}: warning: {warning}", file=sys.stderr)


# --------------------------------------------------------------------------- inspect


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="print a shard directory's stats and decode one row with segment markers",
    )
    p.add_argument("directory", help="a shard directory printed by `prefpack pack`")
    p.add_argument("--row", type=int, default=0, help="row to decode (default: %(default)s)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip hashing the shard files (the manifest's key and checksum and the "
        "tokenizer files are checked either way)",
    )
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
    print(
        f"pairs      {stats['pairs']} packed, {stats['truncated']} truncated "
        f"({stats['one_response_cut']} with only one response cut before its end of turn)"
    )
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
    if not -len(reader) <= args.row < len(reader):
        raise ValueError(
            f"--row {args.row} is out of range: {args.directory} has {len(reader)} rows"
        )
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


# ---------------------------------------------------------------------------- select


def _add_select(subparsers: argparse._SubParsersAction) -> None:
    from core.settings import add_flags
    from pipeline.selection import SelectConfig

    p = subparsers.add_parser(
        "select",
        help="drop the hardest scored pairs and pack the rest (prints the shard directory)",
        description="Rank the pairs of --shards by the held-out loss in --scores (written by "
        "`prefpack difficulty` for those shards), drop the hardest --drop-hardest share, and "
        "pack the kept pairs with the shards' own settings into STORE/shards/<key>. "
        "STORE/selected/<key>/ holds dropped.parquet (every dropped pair and its reason) and "
        "report.json (pairs in = kept + dropped).",
    )
    p.add_argument("--shards", required=True, type=Path, help="the scored shard directory")
    p.add_argument("--scores", required=True, type=Path, help="its `prefpack difficulty` --out")
    p.add_argument("--out", default="store", help="store root (default: %(default)s)")
    add_flags(p.add_argument_group("rule (SelectConfig)"), SelectConfig)
    p.set_defaults(handler=_select)


def _select(args: argparse.Namespace) -> int:
    from core.settings import config_from
    from pipeline.selection import SelectConfig, build_selected_shards

    result = build_selected_shards(
        args.shards, args.scores, config_from(SelectConfig, args), args.out
    )
    report = result.report
    threshold = report["loss_threshold"]
    at = f" (held-out loss >= {threshold:.4f})" if threshold is not None else ""
    print(
        f"select: {report['pairs_in']} pairs scored, dropped {report['dropped']}{at}, kept "
        f"{report['pairs_out']} -> {result.directory}",
        file=sys.stderr,
    )
    print(result.shards.directory)
    return 0
