"""`difficulty_scores`: how hard each packed pair is for a model that never saw it.

Selective DPO ("Principled Data Selection for Alignment: The Hidden Risks of Difficult
Examples") measures a pair's difficulty by the validation loss of models trained on other
parts of the data. `prefpack difficulty` (`training/difficulty.py`) splits the packed
pairs into k folds (`pipeline.shards.assign_folds`), trains one model per fold on the other
folds' pairs, and scores the fold's pairs with it against the reference log-probs.

A directory of scores holds `scores.parquet` (these rows, sorted by pair id) and
`report.json` (`REPORT_FIELDS`, sealed with `data_contracts.manifest.checksum`), which
names what the numbers depend on and accounts for every pair:

    pairs = sum over folds of held_out_pairs, and for each fold
    train_pairs + held_out_pairs = pairs
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa

from data_contracts.contract import (
    Contract,
    ContractError,
    JsonSpec,
    check_document,
    check_fields,
    described,
)

VERSION = "1"

SCHEMA = pa.schema(
    [
        described("pair_id", pa.string(), "preference_pair.pair_id"),
        described(
            "fold",
            pa.int32(),
            "the fold the pair was held out in: scored by the model trained on the others",
        ),
        described(
            "loss",
            pa.float32(),
            "held-out preference loss of the pair (the run's --loss, e.g. sigmoid DPO "
            "-log sigmoid(margin)); higher is harder",
        ),
        described(
            "margin",
            pa.float32(),
            "implicit reward margin beta * ((log pi - log ref)(chosen) - (log pi - log "
            "ref)(rejected)); below 0 the fold model prefers the rejected response",
        ),
        described("chosen_reward", pa.float32(), "beta * (log pi - log ref) of chosen"),
        described("rejected_reward", pa.float32(), "beta * (log pi - log ref) of rejected"),
        described("chosen_logps", pa.float32(), "log pi(chosen | prompt) under the fold model"),
        described("rejected_logps", pa.float32(), "log pi(rejected | prompt) under the fold model"),
    ],
    metadata={"contract": "difficulty_scores", "version": VERSION},
)

CONTRACT = Contract(
    name="difficulty_scores",
    version=VERSION,
    schema=SCHEMA,
    rules={
        "duplicate_pair_id": lambda: pl.col("pair_id").is_unique(),
        "negative_fold": lambda: pl.col("fold") >= 0,
        "loss_not_finite": lambda: pl.col("loss").is_finite(),
    },
)

SCORES_FILE = "scores.parquet"

FOLD_FIELDS: JsonSpec = {
    "fold": (int, "fold index, 0..k-1"),
    "train_pairs": (int, "pairs of the other folds, the fold model's training data"),
    "train_rows": (int, "packed rows they made"),
    "held_out_pairs": (int, "pairs of this fold, scored by the fold model"),
    "steps": (int, "optimizer steps of the fold model"),
    "train_loss": (float, "the fold model's training loss at its last step"),
    "train_accuracy": (float, "its training reward accuracy at its last step"),
    "held_out_loss": (float, "mean loss over the held-out pairs"),
    "held_out_accuracy": (float, "share of held-out pairs with a margin above 0"),
    "curve": (list, "(step, loss, reward accuracy, reward margin) of every training step"),
}

REPORT_FIELDS: JsonSpec = {
    "contract": (str, 'always "difficulty_report"'),
    "version": (str, "this contract's version"),
    "inputs": (dict, "shard_key, model_fingerprint, init_seed, reference (its key)"),
    "settings": (dict, "folds, fold_seed, score_batch_rows and the fold models' training"),
    "code": (dict, "difficulty, trainer and reference code versions"),
    "pairs": (int, "pairs scored = packed pairs of the shards"),
    "folds": (list, "one entry per fold (FOLD_FIELDS)"),
    "files": (list, "scores.parquet: file, bytes, sha256"),
    "checksum": (str, "sha256 of the canonical JSON of every other field"),
}


def validate_report(report: Any, source: str = "report.json") -> dict:
    """Check fields, types and the fold accounting.

    Raises:
        ContractError: naming `source` and the missing or mistyped field, or the broken
            rule (`folds_cover_pairs`, `fold_splits_pairs`).
    """
    check_document(report, REPORT_FIELDS, "difficulty_report", source)
    for i, fold in enumerate(report["folds"]):
        check_fields(fold, FOLD_FIELDS, f"folds[{i}].", source)
        if fold["train_pairs"] + fold["held_out_pairs"] != report["pairs"]:
            raise ContractError(
                f"{source}: fold_splits_pairs broken: fold {fold['fold']} trains on "
                f"{fold['train_pairs']} and holds out {fold['held_out_pairs']} of "
                f"{report['pairs']} pairs"
            )
    if sum(fold["held_out_pairs"] for fold in report["folds"]) != report["pairs"]:
        raise ContractError(f"{source}: folds_cover_pairs broken: held-out pairs != pairs")
    return report
