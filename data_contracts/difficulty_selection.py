"""`difficulty_selection`: the pairs a difficulty rule dropped, and its accounting.

`pipeline.selection` drops the hardest share of the scored pairs (`difficulty_scores`) and
packs the rest into shards of their own. Its directory, `<store>/selected/<key>/`, holds
`dropped.parquet` (one row per dropped pair, with the rule as `reason`, so every dropped
pair can be found, not only counted) and `report.json` (`REPORT_FIELDS`):

    pairs_in (scored = the shards' packed pairs) = pairs_out (packed again) + sum(dropped)
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa

from data_contracts.contract import Contract, ContractError, JsonSpec, check_document, described

VERSION = "1"

# The one rule so far: among the highest held-out losses (`drop_hardest`).
DROP_DIFFICULTY = "difficulty"
REASONS = (DROP_DIFFICULTY,)

SCHEMA = pa.schema(
    [
        described("pair_id", pa.string(), "preference_pair.pair_id"),
        described("reason", pa.string(), "the rule that dropped the pair: " + ", ".join(REASONS)),
        described("rank", pa.int64(), "1 = the hardest pair (highest loss; ties by pair id)"),
        described("fold", pa.int32(), "difficulty_scores.fold"),
        described("loss", pa.float32(), "difficulty_scores.loss, the held-out loss"),
        described("margin", pa.float32(), "difficulty_scores.margin"),
    ],
    metadata={"contract": "difficulty_selection", "version": VERSION},
)

CONTRACT = Contract(
    name="difficulty_selection",
    version=VERSION,
    schema=SCHEMA,
    rules={
        "duplicate_pair_id": lambda: pl.col("pair_id").is_unique(),
        "unknown_reason": lambda: pl.col("reason").is_in(REASONS),
    },
)

REPORT_FIELDS: JsonSpec = {
    "contract": (str, 'always "difficulty_selection"'),
    "version": (str, "this contract's version"),
    "key": (str, "the selection's key = directory name"),
    "config": (dict, "every selection setting (pipeline.selection.SelectConfig)"),
    "shard_key": (str, "the shards whose pairs were scored"),
    "scores": (str, "checksum of the scores' report.json (inputs, settings, scores sha256)"),
    "pairs_in": (int, "pairs scored = packed pairs of the shards"),
    "pairs_out": (int, "pairs kept, packed again into the selected shards"),
    "dropped": (dict, "reason -> pairs dropped"),
    "loss_threshold": ((float, type(None)), "the lowest held-out loss dropped; null if none"),
    "tokenized_key": (str, "key of the kept pairs' tokenized directory"),
    "selected_shard_key": (str, "key of the shards the kept pairs were packed into"),
}


def validate_report(report: Any, source: str = "report.json") -> dict:
    """Check fields, types, reasons and the row accounting.

    Raises:
        ContractError: naming `source` and the missing or mistyped field, or the broken
            rule (`unknown_reason`, `pairs_add_up`).
    """
    check_document(report, REPORT_FIELDS, "difficulty_selection", source)
    if unknown := set(report["dropped"]) - set(REASONS):
        raise ContractError(f"{source}: unknown_reason: {sorted(unknown)}")
    if report["pairs_out"] + sum(report["dropped"].values()) != report["pairs_in"]:
        raise ContractError(f"{source}: pairs_add_up broken: pairs_out + dropped != pairs_in")
    return report
