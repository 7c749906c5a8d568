"""`manifest`: the `manifest.json` of a packed shard directory.

A shard directory is named by its cache key and holds `shard-NNNNN.arrow` (Arrow IPC
stream files, uncompressed, `packed_row` schema), the `tokenizer.json` (+ a minimal
`tokenizer_config.json`) the rows were made with, and this manifest. The manifest is JSON,
so it is described field by field here rather than as an Arrow schema; `validate` checks
presence, types and the row accounting.

Row accounting spans both stages that made the rows: of `stats.pairs_in` preference
pairs, the tokenize stage dropped some (`empty_*_ids`, see
`data_contracts.tokenized_report`) and kept `stats.tokenized_pairs`; of those, the pack
stage dropped `too_long` and packed `stats.pairs`. `stats.dropped` holds the drops of
both stages by reason.

Version 2 added `tokenized` and `stats.tokenized_pairs` (the stages were split).

Token counts by layout (`stats.tokens_by_layout`), over the same packed pairs:
- shared: sum of P+C+R (prompt once);
- unshared: sum of 2P+C+R (prompt+chosen and prompt+rejected as two documents);
- padded: sum of 2 * max(P+C, P+R) (both sequences of a pair padded to the longer one,
  the least a padding trainer computes; padding a batch to its longest adds more);
- padded_to_max_len: 2 * max_len per pair (padding every sequence to max_len).
"""

from __future__ import annotations

from typing import Any

from data_contracts.contract import ContractError, JsonSpec, check_fields

VERSION = "2"

# The pack stage's drop reason: a pair longer than max_len under the length policy.
DROP_TOO_LONG = "too_long"

SHARD_FIELDS: JsonSpec = {
    "file": (str, "file name inside the directory"),
    "rows": (int, "packed rows in the file"),
    "pairs": (int, "pairs in the file"),
    "tokens": (int, "real tokens in the file (no padding is stored)"),
    "bytes": (int, "file size"),
    "sha256": (str, "sha256 of the file, checked on open"),
}

STATS_FIELDS: JsonSpec = {
    "rows": (int, "packed rows"),
    "pairs_in": (int, "preference pairs read by the tokenize stage = pairs + sum(dropped)"),
    "tokenized_pairs": (int, "tokenized pairs read by the pack stage = pairs + too_long"),
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

TOKENIZED_FIELDS: JsonSpec = {
    "key": (str, "cache key of the tokenized directory"),
    "directory": (str, "the tokenized directory, relative to the store root"),
    "config": (dict, "every tokenize setting (pipeline.tokenized.TokenizeConfig)"),
}

FIELDS: JsonSpec = {
    "contract": (str, 'always "manifest"'),
    "version": (str, "manifest contract version"),
    "contracts": (dict, "contract name -> version of every stage that shaped the bytes"),
    "key": (str, "cache key = directory name"),
    "layout": (str, "shared | unshared | padded (data_contracts.packed_row)"),
    "max_len": (int, "tokens per row at most"),
    "mask_block_size": (int, "block size of kv_block_full / kv_block_partial"),
    "config": (dict, "every pack setting (pipeline.pack.PackConfig)"),
    "input": (dict, "name, sha256 and rows of the preference_pair file"),
    "tokenized": (dict, "TOKENIZED_FIELDS: the tokenize stage's output the rows came from"),
    "tokenizer": (dict, "path (inside the directory), fingerprint, name, bos/eos, trained"),
    "template": (dict, "name and sha256 of the chat template"),
    "shards": (list, "one entry per shard file, in row order (SHARD_FIELDS)"),
    "stats": (dict, "STATS_FIELDS"),
}


def validate(manifest: Any, source: str = "manifest.json") -> dict:
    """Check fields, types and row accounting.

    Raises:
        ContractError: naming `source` and the first missing or mistyped field, or the
            broken rule (`shard_rows_add_up`, `pairs_add_up`, `tokenized_pairs_add_up`).
    """
    if not isinstance(manifest, dict):
        raise ContractError(f"{source}: not a JSON object")
    check_fields(manifest, FIELDS, "", source)
    if manifest["contract"] != "manifest":
        raise ContractError(f"{source}: contract is {manifest['contract']!r}, not 'manifest'")
    for i, shard in enumerate(manifest["shards"]):
        check_fields(shard, SHARD_FIELDS, f"shards[{i}].", source)
    check_fields(manifest["tokenized"], TOKENIZED_FIELDS, "tokenized.", source)
    stats = manifest["stats"]
    check_fields(stats, STATS_FIELDS, "stats.", source)
    if sum(s["rows"] for s in manifest["shards"]) != stats["rows"]:
        raise ContractError(f"{source}: shard_rows_add_up broken: shard rows != stats.rows")
    if stats["pairs"] + sum(stats["dropped"].values()) != stats["pairs_in"]:
        raise ContractError(f"{source}: pairs_add_up broken: pairs + dropped != pairs_in")
    if stats["pairs"] + stats["dropped"].get(DROP_TOO_LONG, 0) != stats["tokenized_pairs"]:
        raise ContractError(
            f"{source}: tokenized_pairs_add_up broken: pairs + too_long != tokenized_pairs"
        )
    return manifest
