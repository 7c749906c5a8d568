"""A directory of difficulty scores on disk: written once, proven before it is read.

`prefpack difficulty` (`training/difficulty.py`) writes `scores.parquet`
(`data_contracts.difficulty_scores`, sorted by pair id) and `report.json` (what the scores
depend on, one entry per fold, the size and sha256 of `scores.parquet`, sealed with a
checksum as a shard manifest is). Reading is torch-free, so the Dagster process and the
selection (`pipeline.selection`) can check and reuse scores without loading the trainer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import difficulty_scores as contract
from data_contracts import manifest as sealed
from data_contracts.contract import ContractError
from pipeline.io import write_parquet
from pipeline.shards import ShardError, check_files, check_sealed, file_entries

REPORT = "report.json"


def write_scores(
    directory: Path, scores: pa.Table, folds: Sequence[dict[str, Any]], identity: dict[str, Any]
) -> dict[str, Any]:
    """Write `scores.parquet` and then the sealed `report.json` into `directory`.

    Args:
        directory: an existing (temporary) directory.
        scores: a `difficulty_scores` table.
        folds: one `difficulty_scores.FOLD_FIELDS` entry per fold.
        identity: `inputs`, `settings` and `code`: what the scores depend on.

    Returns:
        The report as written.
    """
    scores = contract.CONTRACT.validate(scores, source=str(directory / contract.SCORES_FILE))
    write_parquet(scores, directory / contract.SCORES_FILE)
    report = {
        "contract": "difficulty_report",
        "version": contract.VERSION,
        **identity,
        "pairs": scores.num_rows,
        "folds": list(folds),
        "files": file_entries(directory, [contract.SCORES_FILE]),
    }
    report["checksum"] = sealed.checksum(report)
    contract.validate_report(report, str(directory / REPORT))
    (directory / REPORT).write_text(sealed.text(report), encoding="utf-8")
    return report


def read_report(directory: str | Path) -> dict[str, Any]:
    """The report of a scores directory, after checking that it is unedited and that
    `scores.parquet` is the file it lists (size and sha256).

    Raises:
        ShardError: naming the file that is missing, edited or not what the report lists.
    """
    path = Path(directory) / REPORT
    try:
        raw = path.read_bytes().decode("utf-8")
        report = contract.validate_report(json.loads(raw), str(path))
    except FileNotFoundError as err:
        raise ShardError(f"{path}: missing; not a complete scores directory") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not valid JSON: {err}") from err
    except ContractError as err:
        raise ShardError(str(err)) from err
    check_sealed(report, raw, path)
    listed = [(f["file"], f["bytes"], f["sha256"]) for f in report["files"]]
    if [name for name, _, _ in listed] != [contract.SCORES_FILE]:
        raise ShardError(f"{path}: files must list {contract.SCORES_FILE} alone")
    check_files(directory, listed)
    return report


def read_scores(directory: str | Path) -> pa.Table:
    """The scores of a directory that `read_report` accepted, checked by their contract.

    Raises:
        ContractError: naming the file and the broken rules.
    """
    path = Path(directory) / contract.SCORES_FILE
    return contract.CONTRACT.validate(pq.read_table(path), source=str(path))
