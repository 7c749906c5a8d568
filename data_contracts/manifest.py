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
Version 3 made the directory prove what it is: `packer` (the code version in the key),
`files` (size and sha256 of tokenizer.json and tokenizer_config.json), `checksum`, and
`stats.one_response_cut`; `validate` also checks that the version is this one and that
`layout`, `max_len` and `mask_block_size` equal their `config` values.

Proof (checked by `pipeline.shards.read_manifest` before any shard is trusted):
- `key` is the directory's name and `shard_key` of the manifest's own `tokenized.key`,
  `config`, `packer` and the `KEY_CONTRACTS` versions in `contracts`: an edited setting
  (max_len, mask_block_size, layout, ...) no longer gives the key.
- `checksum` is `checksum(manifest)`, the sha256 of the canonical JSON of every other
  field, and the file is exactly `text(manifest)`: any edited byte, a listed sha256 or a
  stat included, is blamed on manifest.json itself, never on an intact shard.
- every other file of the directory is listed with its size and sha256 (`shards`,
  `files`), so an edited shard, tokenizer.json or tokenizer_config.json is named.

Token counts by layout (`stats.tokens_by_layout`), over the same packed pairs:
- shared: sum of P+C+R (prompt once);
- unshared: sum of 2P+C+R (prompt+chosen and prompt+rejected as two documents);
- padded: sum of 2 * max(P+C, P+R) (both sequences of a pair padded to the longer one,
  the least a padding trainer computes; padding a batch to its longest adds more);
- padded_to_max_len: 2 * max_len per pair (padding every sequence to max_len).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from data_contracts.contract import ContractError, JsonSpec, check_fields

VERSION = "3"

# The contracts whose versions the shard key hashes (with the tokenized key, which covers
# the earlier stages' own).
KEY_CONTRACTS = ("manifest", "packed_row", "tokenized_pair")
# Settings the trainer reads from the top level; each must equal its `config` value.
TRAINER_FIELDS = ("layout", "max_len", "mask_block_size")

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

FILE_FIELDS: JsonSpec = {
    "file": (str, "file name inside the directory"),
    "bytes": (int, "file size"),
    "sha256": (str, "sha256 of the file, checked on open (even with verify off: small)"),
}

STATS_FIELDS: JsonSpec = {
    "rows": (int, "packed rows"),
    "pairs_in": (int, "preference pairs read by the tokenize stage = pairs + sum(dropped)"),
    "tokenized_pairs": (int, "tokenized pairs read by the pack stage = pairs + too_long"),
    "pairs": (int, "pairs packed"),
    "tokens": (int, "real tokens packed"),
    "fill_ratio": (float, "tokens / (rows x max_len)"),
    "truncated": (int, "pairs cut by the length policy"),
    "one_response_cut": (
        int,
        "truncated pairs where exactly one response lost its end of turn (its last kept "
        "token is not the end of turn): a preference the length policy, not the data, made",
    ),
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
    "key": (str, "cache key = directory name = shard_key(tokenized.key, config, ...)"),
    "packer": (str, "pipeline.pack.PACKER_VERSION, the code version in the key"),
    "layout": (str, "shared | unshared | padded (data_contracts.packed_row)"),
    "max_len": (int, "tokens per row at most"),
    "mask_block_size": (int, "block size of kv_block_full / kv_block_partial"),
    "config": (dict, "every pack setting (pipeline.pack.PackConfig)"),
    "input": (dict, "name, sha256 and rows of the preference_pair file"),
    "tokenized": (dict, "TOKENIZED_FIELDS: the tokenize stage's output the rows came from"),
    "tokenizer": (dict, "path (inside the directory), fingerprint, name, bos/eos, trained"),
    "template": (dict, "name and sha256 of the chat template"),
    "shards": (list, "one entry per shard file, in row order (SHARD_FIELDS)"),
    "files": (list, "tokenizer.json and tokenizer_config.json (FILE_FIELDS)"),
    "stats": (dict, "STATS_FIELDS"),
    "checksum": (str, "checksum(manifest): sha256 of the canonical JSON of the other fields"),
}


def shard_key(tokenized_key: str, config: dict, contracts: dict, packer: str) -> str:
    """The cache key of a shard directory: a hash of everything that changes its bytes.

    Args:
        tokenized_key: the tokenized directory's key (covers data, tokenizer, template).
        config: every pack setting, as `dataclasses.asdict(PackConfig)`.
        contracts: name -> version, of at least `KEY_CONTRACTS`.
        packer: the pack code's version.
    """
    payload = {
        "contracts": {name: contracts.get(name) for name in KEY_CONTRACTS},
        "packer": packer,
        "tokenized": tokenized_key,
        "config": config,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def checksum(document: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of every field but `checksum`."""
    body = {k: v for k, v in document.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text(document: dict) -> str:
    """The exact text a manifest (or report) is written as; reading checks the file is it."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def validate(manifest: Any, source: str = "manifest.json") -> dict:
    """Check fields, types and row accounting.

    Raises:
        ContractError: naming `source` and the first missing or mistyped field, or the
            broken rule (`version`, `trainer_fields_match_config`, `shard_rows_add_up`,
            `pairs_add_up`, `tokenized_pairs_add_up`).
    """
    if not isinstance(manifest, dict):
        raise ContractError(f"{source}: not a JSON object")
    if manifest.get("contract") == "manifest" and manifest.get("version", VERSION) != VERSION:
        raise ContractError(
            f"{source}: version is {manifest.get('version')!r}, this prefpack reads manifest "
            f"v{VERSION}; pack again to rebuild the directory"
        )
    check_fields(manifest, FIELDS, "", source)
    if manifest["contract"] != "manifest":
        raise ContractError(f"{source}: contract is {manifest['contract']!r}, not 'manifest'")
    for field in TRAINER_FIELDS:
        if manifest[field] != manifest["config"].get(field):
            raise ContractError(
                f"{source}: trainer_fields_match_config broken: {field} is "
                f"{manifest[field]!r}, config.{field} is {manifest['config'].get(field)!r}"
            )
    for i, shard in enumerate(manifest["shards"]):
        check_fields(shard, SHARD_FIELDS, f"shards[{i}].", source)
    for i, entry in enumerate(manifest["files"]):
        check_fields(entry, FILE_FIELDS, f"files[{i}].", source)
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
