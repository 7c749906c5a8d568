"""Asset checks: small named predicates that report actual against expected.

Each stage's asset evaluates its checks in the same pass (declared in its `check_specs`),
from the files it just wrote, so a check sees exactly what downstream will read. Blocking
checks stop the run before bad data reaches the stages after them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pyarrow.parquet as pq

from data_contracts import ContractError, preference_pair, quarantine
from pipeline.io import PAIRS_FILE, QUARANTINE_FILE, REPORT_FILE
from pipeline.pack import ShardResult
from pipeline.shards import ShardError, check_files, open_shards, unpack_pairs

SCHEMA = "check_schema"
ACCOUNTING = "check_accounting"
BOUNDARY = "check_boundary_agreement"
VERIFIED = "check_shards_verified"
FILL = "check_fill_ratio"
DISJOINT = "check_disjoint_from_train"


def specs(asset: str, *names: str, blocking: bool = True) -> list[dg.AssetCheckSpec]:
    """Check specs of `asset`, with the description of each named check."""
    return [
        dg.AssetCheckSpec(name, asset=asset, blocking=blocking, description=DESCRIPTIONS[name])
        for name in names
    ]


def read_report(directory: str | Path) -> dict[str, Any]:
    return json.loads(Path(directory, REPORT_FILE).read_text())


def check_schema(directory: str | Path, with_quarantine: bool) -> dg.AssetCheckResult:
    """Every written pair (and quarantine row) satisfies its contract."""
    files = [(PAIRS_FILE, preference_pair.CONTRACT)]
    if with_quarantine:
        files.append((QUARANTINE_FILE, quarantine.CONTRACT))
    problems = {}
    for name, contract in files:
        path = Path(directory, name)
        try:
            contract.validate(pq.read_table(path), source=str(path))
        except ContractError as err:
            problems[name] = str(err)
    return dg.AssetCheckResult(
        check_name=SCHEMA,
        passed=not problems,
        metadata={"files": ", ".join(n for n, _ in files), "problems": json.dumps(problems)},
    )


def check_normalize_accounting(directory: str | Path) -> dg.AssetCheckResult:
    """rows in = rows paired + quarantined + dropped, and the pairs file holds pairs_out."""
    report = read_report(directory)
    accounted = (
        report["rows_paired"]
        + sum(report["quarantined"].values())
        + sum(report["dropped"].values())
    )
    written = pq.read_metadata(Path(directory, PAIRS_FILE)).num_rows
    return dg.AssetCheckResult(
        check_name=ACCOUNTING,
        passed=accounted == report["rows_in"] and written == report["pairs_out"],
        metadata={
            "rows_in": report["rows_in"],
            "rows_accounted": accounted,
            "pairs_in_report": report["pairs_out"],
            "pairs_written": written,
        },
    )


def check_curate_accounting(directory: str | Path, pairs_in: int) -> dg.AssetCheckResult:
    """pairs from upstream = rows in = rows out + eval pairs + dropped, and the files hold
    rows out (pairs.parquet) and the eval pairs (eval_pairs.parquet)."""
    report = read_report(directory)
    written = pq.read_metadata(Path(directory, PAIRS_FILE)).num_rows
    held = pq.read_metadata(Path(directory, report["eval_file"])).num_rows
    accounted = report["rows_out"] + report["eval_pairs"] + sum(report["dropped"].values())
    return dg.AssetCheckResult(
        check_name=ACCOUNTING,
        passed=report["rows_in"] == pairs_in == accounted
        and written == report["rows_out"]
        and held == report["eval_pairs"],
        metadata={
            "upstream_pairs": pairs_in,
            "rows_in": report["rows_in"],
            "rows_out_plus_eval_plus_dropped": accounted,
            "rows_written": written,
            "eval_pairs_written": held,
        },
    )


def check_tokenize_accounting(report: dict[str, Any], pairs_in: int) -> dg.AssetCheckResult:
    """curated pairs = pairs tokenized + dropped (by tokenized_pair rule)."""
    stats = report["stats"]
    dropped = sum(stats["dropped"].values())
    return dg.AssetCheckResult(
        check_name=ACCOUNTING,
        passed=pairs_in == stats["pairs_in"] == stats["pairs_out"] + dropped,
        metadata={
            "upstream_pairs": pairs_in,
            "pairs_in": stats["pairs_in"],
            "pairs_out_plus_dropped": stats["pairs_out"] + dropped,
        },
    )


def check_boundary_agreement(report: dict[str, Any], minimum: float) -> dg.AssetCheckResult:
    """How often prompt ids + response ids equal the ids of the joined text."""
    boundary = report["stats"]["boundary_agreement"]
    return dg.AssetCheckResult(
        check_name=BOUNDARY,
        passed=boundary["rate"] >= minimum,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "rate": float(boundary["rate"]),
            "minimum": minimum,
            "checked": boundary["checked"],
            "template": boundary["template"],
            "tokenizer": boundary["tokenizer"],
        },
    )


def check_shards_verified(result: ShardResult) -> dg.AssetCheckResult:
    """Every file the manifest lists is there with its sha256 proven once (blocking).

    `build_shards` hashes each file once per materialization: a reused directory is
    reused only after every sha256 matched, a new one lists the sha256 of the bytes it
    wrote. So this check reads no data again: it reports that proof and re-checks that
    every listed file is still there at its listed size.
    """
    manifest = result.manifest
    listed = [(f["file"], f["bytes"], f["sha256"]) for f in manifest["files"] + manifest["shards"]]
    try:
        check_files(result.directory, listed, hash_=False)
    except ShardError as err:
        return dg.AssetCheckResult(check_name=VERIFIED, passed=False, metadata={"error": str(err)})
    return dg.AssetCheckResult(
        check_name=VERIFIED,
        passed=True,
        metadata={
            "shards": len(manifest["shards"]),
            "files": len(listed),
            "sha256": "matched on reuse" if result.reused else "of the bytes written",
        },
    )


def check_pack_accounting(manifest: dict[str, Any], tokenized_pairs: int) -> dg.AssetCheckResult:
    """tokenized pairs = packed pairs + dropped as too long; the shards hold those pairs."""
    stats = manifest["stats"]
    too_long = stats["dropped"].get("too_long", 0)
    in_shards = sum(shard["pairs"] for shard in manifest["shards"])
    return dg.AssetCheckResult(
        check_name=ACCOUNTING,
        passed=tokenized_pairs == stats["tokenized_pairs"] == stats["pairs"] + too_long
        and in_shards == stats["pairs"],
        metadata={
            "upstream_pairs": tokenized_pairs,
            "packed_plus_too_long": stats["pairs"] + too_long,
            "pairs_in_shards": in_shards,
        },
    )


def check_eval_accounting(manifest: dict[str, Any], eval_pairs: int) -> dg.AssetCheckResult:
    """curated eval pairs = pairs packed + dropped (tokenize and pack, by reason); the
    shards hold those pairs."""
    stats = manifest["stats"]
    dropped = sum(stats["dropped"].values())
    in_shards = sum(shard["pairs"] for shard in manifest["shards"])
    return dg.AssetCheckResult(
        check_name=ACCOUNTING,
        passed=eval_pairs == stats["pairs_in"] == stats["pairs"] + dropped
        and in_shards == stats["pairs"],
        metadata={
            "curated_eval_pairs": eval_pairs,
            "packed_plus_dropped": stats["pairs"] + dropped,
            "pairs_in_shards": in_shards,
        },
    )


def check_disjoint(eval_shards: str | Path, train_shards: str | Path) -> dg.AssetCheckResult:
    """No prompt of the eval shards is a prompt of the training shards, token for token
    (blocking): a held-out pair whose prompt was trained on measures memory, not learning.
    (Near-duplicate prompts are kept apart by the curate split; tokens cannot show them.)"""
    held, trained = (_prompt_hashes(shards) for shards in (eval_shards, train_shards))
    shared = held.is_in(trained.implode())
    return dg.AssetCheckResult(
        check_name=DISJOINT,
        passed=not shared.any(),
        metadata={
            "eval_pairs": len(held),
            "train_pairs": len(trained),
            "eval_pairs_with_a_training_prompt": int(shared.sum()),
        },
    )


def _prompt_hashes(directory: str | Path) -> pl.Series:
    """A hash of each packed pair's prompt tokens (compared within one process only)."""
    reader = open_shards(directory, verify=False)  # its files were verified when built
    prompts = unpack_pairs(reader.table, reader.layout).column("prompt_ids")
    return pl.Series(prompts).hash(seed=0)


def no_eval_checks(why: str) -> list[dg.AssetCheckResult]:
    """The eval shards' checks when there are none to check: nothing to verify, nothing
    to account for, nothing shared (each says why)."""
    return [
        dg.AssetCheckResult(check_name=name, passed=True, metadata={"eval_pairs": 0, "why": why})
        for name in (VERIFIED, ACCOUNTING, DISJOINT)
    ]


def check_fill_ratio(manifest: dict[str, Any], minimum: float) -> dg.AssetCheckResult:
    """Real tokens / (rows x max_len) of a packed layout (padded stores a pair per row)."""
    fill = float(manifest["stats"]["fill_ratio"])
    exempt = manifest["layout"] == "padded"
    return dg.AssetCheckResult(
        check_name=FILL,
        passed=exempt or fill >= minimum,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"fill_ratio": fill, "minimum": minimum, "layout": manifest["layout"]},
    )


DESCRIPTIONS = {
    BOUNDARY: "Tokenizing prompt and response apart gives the same ids as the joined text "
    "at least this often (warns: the pairs stay exact, but differ from joined tokenization).",
    VERIFIED: "Every file listed in manifest.json is there at its size, with its sha256 "
    "proven once in this materialization (blocking: training on corrupt shards would be "
    "silently wrong).",
    FILL: "Fill ratio (real tokens / rows x max_len) of packed rows is at least the "
    "configured minimum (warns).",
    SCHEMA: "Every written row satisfies its data contract (blocking: a malformed pair "
    "would poison tokenization and training).",
    DISJOINT: "No prompt of the eval shards is a prompt of the training shards, token for "
    "token (blocking: an eval set whose prompts the model trained on measures memory).",
    ACCOUNTING: "Row accounting holds: rows in = rows out + dropped (by reason) + "
    "quarantined; nothing disappears silently (blocking).",
}
