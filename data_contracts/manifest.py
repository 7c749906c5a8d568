"""`manifest`: the `manifest.json` of a packed shard directory.

A shard directory is named by its cache key and holds `shard-NNNNN.arrow` (Arrow IPC
stream files, uncompressed, `packed_row` schema), the `tokenizer.json` (+ a minimal
`tokenizer_config.json`) the rows were made with, and this manifest. The manifest is JSON,
so it is described field by field here rather than as an Arrow schema; `validate` checks
presence, types and the row accounting.

Token counts by layout (`stats.tokens_by_layout`), over the same packed pairs:
- shared: sum of P+C+R (prompt once);
- unshared: sum of 2P+C+R (prompt+chosen and prompt+rejected as two documents);
- padded: sum of 2 * max(P+C, P+R) (both sequences of a pair padded to the longer one,
  the least a padding trainer computes; padding a batch to its longest adds more);
- padded_to_max_len: 2 * max_len per pair (padding every sequence to max_len).
"""

from __future__ import annotations

from typing import Any

from data_contracts.contract import ContractError

VERSION = "1"

# field -> (JSON type, description). A nested dict spec is checked recursively.
Spec = dict[str, tuple[Any, str]]

SHARD_FIELDS: Spec = {
    "file": (str, "file name inside the directory"),
    "rows": (int, "packed rows in the file"),
    "pairs": (int, "pairs in the file"),
    "tokens": (int, "real tokens in the file (no padding is stored)"),
    "bytes": (int, "file size"),
    "sha256": (str, "sha256 of the file, checked on open"),
}

STATS_FIELDS: Spec = {
    "rows": (int, "packed rows"),
    "pairs_in": (int, "pairs read = pairs + sum(dropped)"),
    "pairs": (int, "pairs packed"),
    "tokens": (int, "real tokens packed"),
    "fill_ratio": (float, "tokens / (rows x max_len)"),
    "truncated": (int, "pairs cut by the length policy"),
    "dropped": (dict, "reason -> pairs dropped (too_long, empty_*_ids)"),
    "tokens_by_layout": (dict, "shared / unshared / padded / padded_to_max_len, see above"),
    "tokens_saved_by_prefix_sharing": (int, "unshared - shared tokens"),
    "prefix_sharing_saving": (float, "(unshared - shared) / unshared"),
    "lengths": (dict, "prompt / chosen / rejected / pair token lengths: p50, p90, p99, max"),
    "pair_length_histogram": (dict, "edges and counts of pair lengths (this layout)"),
    "boundary_agreement": (dict, "template, tokenizer, checked, agreed, rate, examples"),
}

FIELDS: Spec = {
    "contract": (str, 'always "manifest"'),
    "version": (str, "manifest contract version"),
    "contracts": (dict, "contract name -> version of every stage that shaped the bytes"),
    "key": (str, "cache key = directory name"),
    "layout": (str, "shared | unshared | padded (data_contracts.packed_row)"),
    "max_len": (int, "tokens per row at most"),
    "mask_block_size": (int, "block size of kv_block_full / kv_block_partial"),
    "config": (dict, "every pack setting (pipeline.pack.PackConfig)"),
    "input": (dict, "name, sha256 and rows of the preference_pair file"),
    "tokenizer": (dict, "path (inside the directory), fingerprint, name, bos/eos, trained"),
    "template": (dict, "name and sha256 of the chat template"),
    "shards": (list, "one entry per shard file, in row order (SHARD_FIELDS)"),
    "stats": (dict, "STATS_FIELDS"),
}


def _check(obj: dict, spec: Spec, where: str, source: str) -> None:
    missing = [name for name in spec if name not in obj]
    if missing:
        raise ContractError(f"{source}: {where} lacks " + ", ".join(missing))
    for name, (type_, _) in spec.items():
        value = obj[name]
        ok = isinstance(value, (int, float)) if type_ is float else isinstance(value, type_)
        if not ok or (type_ is int and isinstance(value, bool)):
            raise ContractError(f"{source}: {where}{name} is {type(value).__name__}, not {type_}")


def validate(manifest: Any, source: str = "manifest.json") -> dict:
    """Check fields, types and row accounting.

    Raises:
        ContractError: naming `source` and the first missing or mistyped field, or the
            broken rule (`shard_rows_add_up`, `pairs_add_up`).
    """
    if not isinstance(manifest, dict):
        raise ContractError(f"{source}: not a JSON object")
    _check(manifest, FIELDS, "", source)
    if manifest["contract"] != "manifest":
        raise ContractError(f"{source}: contract is {manifest['contract']!r}, not 'manifest'")
    for i, shard in enumerate(manifest["shards"]):
        _check(shard, SHARD_FIELDS, f"shards[{i}].", source)
    stats = manifest["stats"]
    _check(stats, STATS_FIELDS, "stats.", source)
    if sum(s["rows"] for s in manifest["shards"]) != stats["rows"]:
        raise ContractError(f"{source}: shard_rows_add_up broken: shard rows != stats.rows")
    if stats["pairs"] + sum(stats["dropped"].values()) != stats["pairs_in"]:
        raise ContractError(f"{source}: pairs_add_up broken: pairs + dropped != pairs_in")
    return manifest
