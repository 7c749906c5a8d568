"""Tokenize and pack: `tokenized_pairs` (chat template + tokenizer, prompt once),
`packed_shards` (bin-packed rows with mask metadata in verified Arrow shards) and
`eval_shards` (the curated eval pairs, tokenized and packed as the training shards were).

Every stage is keyed by a hash of everything that changes its bytes and reuses a
verified directory with that key, so materializing again with unchanged inputs rewrites
nothing; the key is each asset's data version, so downstream stays in sync.

`eval_shards` takes its tokenizer, template and settings from `packed_shards`' manifest
(`pipeline.eval_shards`), so it has no config of its own and cannot drift from the
training shards. When the curated pairs hold no eval pairs (no eval split configured on
`curated_pairs`, or one that held nothing out) its value is None, its metadata says why,
and its data version is `NO_EVAL_SHARDS`.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets import checks
from assets.configs import PackingConfig, TokenizationConfig
from assets.metadata import binned, count_table, layout_table, records_table
from assets.plots import fill_plot, length_plot
from assets.resources import StoreResource, TokenizerResource
from core.settings import config_from
from pipeline.eval_shards import build_eval_shards
from pipeline.io import pairs_path
from pipeline.pack import PackConfig, ShardResult, build_shards, truncation_warning
from pipeline.tokenized import TokenizeConfig, TokenizedResult, build_tokenized, read_tokenized

CODE_VERSION = "1"
NO_EVAL_SHARDS = "no-eval-shards"  # eval_shards' data version when there are none


def _keyed_output(
    context: dg.AssetExecutionContext,
    result: TokenizedResult | ShardResult,
    metadata: dict[str, object],
) -> dg.MaterializeResult[str]:
    """The stage's directory as output, its cache key as data version, reuse reported."""
    context.log.info(f"{'reused' if result.reused else 'wrote'} {result.directory}")
    return dg.MaterializeResult(
        value=str(result.directory),
        data_version=dg.DataVersion(result.key),
        metadata={
            "path": dg.MetadataValue.path(str(result.directory)),
            "key": result.key,
            "reused": result.reused,
            **metadata,
        },
    )


@dg.asset(
    group_name="packing",
    code_version=CODE_VERSION,
    check_specs=[
        *checks.specs("tokenized_pairs", checks.ACCOUNTING),
        *checks.specs("tokenized_pairs", checks.BOUNDARY, blocking=False),
    ],
    description="Curated pairs rendered with the chat template and tokenized: the prompt "
    "once, each response on its own (ending with end of turn). Trains a small BPE when no "
    "tokenizer is configured.",
)
def tokenized_pairs(
    context: dg.AssetExecutionContext,
    config: TokenizationConfig,
    curated_pairs: str,
    tokenizer: TokenizerResource,
    store: StoreResource,
):
    tokenizer.check()
    pairs = pairs_path(curated_pairs)
    result = build_tokenized(pairs, tokenizer.path, config_from(TokenizeConfig, config), store.root)
    report, stats = result.report, result.report["stats"]
    histograms = stats["length_histograms"]
    yield _keyed_output(
        context,
        result,
        {
            "pairs_in": stats["pairs_in"],
            "pairs_out": stats["pairs_out"],
            "dropped": sum(stats["dropped"].values()),
            "dropped_by_reason": count_table(
                stats["dropped"], total=stats["pairs_in"], unit="pairs"
            ),
            "boundary_agreement": float(stats["boundary_agreement"]["rate"]),
            "responses_ending_with_eos": float(stats["responses_ending_with_eos"]["rate"]),
            "end_of_turn": stats["responses_ending_with_eos"]["token"] or "(none)",
            "tokenizer": report["tokenizer"]["name"],
            "vocab_size": report["tokenizer"]["vocab_size"],
            "template": report["template"]["name"],
            "prompt_tokens": stats["tokens"]["prompt"],
            "response_tokens": stats["tokens"]["chosen"] + stats["tokens"]["rejected"],
            "token_lengths": records_table(
                [{"part": part, **q} for part, q in stats["lengths"].items()]
            ),
            **{
                f"{part}_length_histogram": binned(histograms["edges"], histograms[part], "tokens")
                for part in ("prompt", "chosen", "rejected", "pair")
            },
            "length_plot": length_plot(histograms),
        },
    )
    yield checks.check_tokenize_accounting(report, pq.read_metadata(pairs).num_rows)
    yield checks.check_boundary_agreement(report, config.min_boundary_agreement)


@dg.asset(
    group_name="packing",
    code_version=CODE_VERSION,
    check_specs=[
        *checks.specs("packed_shards", checks.VERIFIED, checks.ACCOUNTING),
        *checks.specs("packed_shards", checks.FILL, blocking=False),
    ],
    description="Whole pairs bin-packed into rows of at most max_len tokens (shared prefix: "
    "prompt | chosen | rejected), with per-pair boundaries and the FlexAttention block "
    "summary, in verified Arrow IPC shards under store/shards/<cache key>.",
)
def packed_shards(
    context: dg.AssetExecutionContext,
    config: PackingConfig,
    tokenized_pairs: str,
    store: StoreResource,
):
    pack_config = config_from(PackConfig, config)
    result = build_shards(tokenized_pairs, pack_config, store.root)
    manifest = result.manifest
    stats = manifest["stats"]
    warning = truncation_warning(stats, pack_config)
    if warning:
        context.log.warning(warning)
    histogram = stats["pair_length_histogram"]
    yield _keyed_output(
        context,
        result,
        {
            **_shard_metadata(manifest),
            "tokens_saved_by_prefix_sharing": stats["tokens_saved_by_prefix_sharing"],
            "prefix_sharing_saving": float(stats["prefix_sharing_saving"]),
            "tokens_by_layout": layout_table(stats["tokens_by_layout"]),
            "pair_length_histogram": binned(histogram["edges"], histogram["counts"], "pair tokens"),
            "fill_plot": _fill_plot(result),
        },
    )
    # Each file is hashed once per materialization, by build_shards: the shards when it
    # writes or reuses them, the tokenized pairs when it packs them (and tokenized_pairs
    # when it wrote or reused them), so neither check reads them again.
    yield checks.check_shards_verified(result)
    yield checks.check_pack_accounting(
        manifest, read_tokenized(tokenized_pairs, verify=False)["stats"]["pairs_out"]
    )
    yield checks.check_fill_ratio(manifest, config.min_fill_ratio)


@dg.asset(
    group_name="packing",
    code_version=CODE_VERSION,
    check_specs=checks.specs("eval_shards", checks.VERIFIED, checks.ACCOUNTING, checks.DISJOINT),
    description="The curated eval pairs (curated_pairs' eval split: no prompt of them is "
    "trained on) tokenized and packed exactly as packed_shards were: their tokenizer (the "
    "BPE trained on the training pairs when none is configured), chat template and pack "
    "settings, read from packed_shards' manifest. None when curated_pairs holds no eval "
    "pairs (set its eval_share, eval_pairs or eval_splits).",
)
def eval_shards(
    context: dg.AssetExecutionContext,
    curated_pairs: str,
    packed_shards: str,
    store: StoreResource,
):
    report = checks.read_report(curated_pairs)
    if not report["eval_pairs"]:
        why = (
            "no eval split configured: set curated_pairs' eval_share, eval_pairs or eval_splits"
            if report["eval_split"] is None
            else "the eval split held no pairs out"
        )
        context.log.info(f"no eval shards: {why}")
        yield dg.MaterializeResult(
            value=None,
            data_version=dg.DataVersion(NO_EVAL_SHARDS),
            metadata={"eval_pairs": 0, "pairs": 0, "rows": 0, "status": why},
        )
        yield from checks.no_eval_checks(why)
        return
    result = build_eval_shards(curated_pairs, packed_shards, store.root).shards
    manifest = result.manifest
    split = report["eval_split"]
    yield _keyed_output(
        context,
        result,
        {
            "eval_pairs": report["eval_pairs"],
            "eval_split": f"{split['mode']} {split['setting']} (seed {split['seed']})",
            "status": "packed with the training shards' settings",
            "train_shards": Path(packed_shards).name,
            "tokenizer": manifest["tokenizer"]["name"],
            "template": manifest["template"]["name"],
            **_shard_metadata(manifest),
        },
    )
    yield checks.check_shards_verified(result)
    yield checks.check_eval_accounting(manifest, report["eval_pairs"])
    yield checks.check_disjoint(result.directory, packed_shards)


def _shard_metadata(manifest: dict) -> dict[str, object]:
    """What the UI shows of any shard directory: layout, size, fill and drops."""
    stats = manifest["stats"]
    return {
        "layout": manifest["layout"],
        "max_len": manifest["max_len"],
        "shards": len(manifest["shards"]),
        "rows": stats["rows"],
        "pairs": stats["pairs"],
        "tokens": stats["tokens"],
        "fill_ratio": float(stats["fill_ratio"]),
        "truncated": stats["truncated"],
        "dropped": sum(stats["dropped"].values()),
        "dropped_by_reason": count_table(stats["dropped"], total=stats["pairs_in"], unit="pairs"),
    }


def _fill_plot(result: ShardResult) -> dg.MetadataValue:
    """Row fill from the memory-mapped `input_ids` offsets only (`open_shards` would hash
    the tokenizer files a second time). A shard that does not read is left to
    check_shards_verified to report, rather than failing the asset here."""
    try:
        lengths = [
            pc.list_value_length(
                pa.ipc.open_stream(pa.memory_map(str(result.directory / shard["file"])))
                .read_all()
                .column("input_ids")
            ).to_numpy()
            for shard in result.manifest["shards"]
        ]
    except (OSError, pa.ArrowInvalid) as err:
        return dg.MetadataValue.md(f"(row fill: not plotted, a shard does not read: {err})")
    return fill_plot(np.concatenate([np.zeros(0, np.int64), *lengths]), result.manifest["max_len"])
