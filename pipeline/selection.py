"""Selective DPO's rule: drop the hardest share of the scored pairs, pack the rest.

`select_by_difficulty` ranks the pairs by their held-out loss (`difficulty_scores`, from
`prefpack difficulty`), hardest first, ties by pair id, and drops the first
`floor(drop_hardest x pairs)`. `build_selected_shards` then makes the kept pairs a
training set of their own with the existing stages: their tokenized rows, copied from the
shards' tokenized directory (`pipeline.tokenized.select_tokenized`), are packed by
`pipeline.pack.build_shards` with the shards' own `PackConfig`, so the selected shards are
an ordinary, verified shard directory (any `prefpack train --shards`, `inspect`, the
`trained_model` path) holding exactly the kept pairs, each token for token as before.

Beside them, `<store>/selected/<key>/` holds `dropped.parquet` (each dropped pair with its
reason, rank, fold, loss and margin) and `report.json` (`data_contracts.
difficulty_selection`): pairs in = pairs kept + dropped by reason. The key hashes the
shard key, the scores' sealed report (which covers their inputs, settings and sha256),
the settings and this code's version; the tokenized and shard directories are keyed from it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from core.atomic import atomic_directory
from core.settings import check_settings, setting
from data_contracts import difficulty_selection as contract
from pipeline.io import DROPPED_FILE, REPORT_FILE, write_json, write_parquet
from pipeline.pack import PackConfig, ShardResult, build_shards
from pipeline.shards import read_manifest, read_report, read_scores
from pipeline.tokenized import select_tokenized

# Bump when this module would select other pairs or write other bytes for the same inputs.
SELECT_VERSION = "1"


@dataclass(frozen=True)
class SelectConfig:
    """The difficulty rule; every setting is part of the selection's key."""

    drop_hardest: float = setting(
        0.1,
        "share of the scored pairs to drop, highest held-out loss first (Selective DPO); "
        "0 keeps every pair",
        ge=0,
        lt=1,
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class Selection:
    """What the rule kept and dropped.

    Attributes:
        kept: the kept pair ids, sorted.
        dropped: `difficulty_selection` rows, hardest first.
        loss_threshold: the lowest loss dropped (None when nothing was).
    """

    kept: pa.Array
    dropped: pa.Table
    loss_threshold: float | None


def select_by_difficulty(scores: pa.Table, config: SelectConfig) -> Selection:
    """Drop the `floor(drop_hardest x pairs)` pairs of highest held-out loss.

    Args:
        scores: a `difficulty_scores` table.
        config: the rule's settings.
    """
    ranked = (
        pl.from_arrow(scores)
        .sort(["loss", "pair_id"], descending=[True, False])
        .with_row_index("rank", offset=1)
    )
    # floor, rounded first so that a share like 0.29 of 100 pairs drops 29, not 28
    cut = math.floor(round(config.drop_hardest * ranked.height, 9))
    dropped = ranked.head(cut).select(
        "pair_id",
        pl.lit(contract.DROP_DIFFICULTY).alias("reason"),
        pl.col("rank").cast(pl.Int64),
        "fold",
        "loss",
        "margin",
    )
    kept = ranked.tail(ranked.height - cut)["pair_id"].sort().to_arrow()
    threshold = float(dropped["loss"].min()) if cut else None
    return Selection(kept, contract.CONTRACT.validate(dropped.to_arrow()), threshold)


@dataclass(frozen=True)
class SelectedShards:
    """What `build_selected_shards` made.

    Attributes:
        directory: `<store>/selected/<key>`: dropped.parquet and report.json.
        report: the parsed report.
        shards: the kept pairs' shards (`build_shards`'s result; reused when they exist).
    """

    directory: Path
    report: dict
    shards: ShardResult


def build_selected_shards(
    shards: str | Path, scores: str | Path, config: SelectConfig, store: str | Path
) -> SelectedShards:
    """Apply the difficulty rule to scored shards and pack the kept pairs.

    Args:
        shards: the shard directory whose pairs were scored.
        scores: a directory written by `prefpack difficulty` for those shards.
        config: the rule.
        store: the store root (the shards' tokenized directory is found there).

    Raises:
        ShardError: a shard, tokenized or scores directory that does not prove itself.
        ValueError: scores of other shards, or not one per packed pair.
    """
    shards, store = Path(shards), Path(store)
    manifest = read_manifest(shards)
    report = read_report(scores)
    scored_shards = report["inputs"]["shard_key"]
    if scored_shards != manifest["key"] or report["pairs"] != manifest["stats"]["pairs"]:
        raise ValueError(
            f"{scores}: scores of {report['pairs']} pairs of shards {scored_shards}, not of the "
            f"{manifest['stats']['pairs']} pairs of {shards}; score these shards first"
        )
    selection = select_by_difficulty(read_scores(scores), config)
    payload = [manifest["key"], report["checksum"], asdict(config), SELECT_VERSION]
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    tokenized = select_tokenized(
        store / manifest["tokenized"]["directory"], selection.kept, key, store
    )
    packed = build_shards(tokenized.directory, PackConfig(**manifest["config"]), store)
    if packed.manifest["stats"]["pairs"] != len(selection.kept):
        raise ValueError(
            f"{packed.directory}: {packed.manifest['stats']['pairs']} pairs packed of the "
            f"{len(selection.kept)} kept; the shards' pack settings no longer fit them"
        )
    directory = store / "selected" / key
    counts = {contract.DROP_DIFFICULTY: selection.dropped.num_rows}
    summary = contract.validate_report(
        {
            "contract": "difficulty_selection",
            "version": contract.VERSION,
            "key": key,
            "config": asdict(config),
            "shard_key": manifest["key"],
            "scores": report["checksum"],
            "pairs_in": report["pairs"],
            "pairs_out": len(selection.kept),
            "dropped": counts,
            "loss_threshold": selection.loss_threshold,
            "tokenized_key": tokenized.key,
            "selected_shard_key": packed.key,
        }
    )
    with atomic_directory(directory, keep_identical=True) as tmp:
        write_parquet(selection.dropped, tmp / DROPPED_FILE)
        write_json(summary, tmp / REPORT_FILE)
    return SelectedShards(directory, summary, packed)
