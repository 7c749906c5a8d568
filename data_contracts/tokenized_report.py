"""`tokenized_report`: the `report.json` of a tokenized directory.

A tokenized directory is named by its cache key and holds `tokenized.parquet`
(`tokenized_pair` rows, in input order), the `tokenizer.json` (+ a minimal
`tokenizer_config.json`) they were made with, and this report, written last. Like the
shard manifest it is JSON, described field by field; `validate` checks presence, types
and the row accounting:

    pairs_in (preference pairs read) = pairs_out (tokenized pairs written) + sum(dropped)

where every drop reason is a `tokenized_pair` rule (a response that renders to no
tokens). `files` lists every other file of the directory with its size and sha256, so a
reader can verify the directory before reusing it.

Token lengths are over the written pairs: prompt P, chosen C, rejected R and the pair
P+C+R (the prompt once, as the shared layout packs it). The four histograms share one
set of edges, 0 then powers of two from 16 up to the first one >= the longest pair, so
they plot on one axis and the pairs over a candidate max_len can be read off directly.
"""

from __future__ import annotations

from typing import Any

from data_contracts import tokenized_pair
from data_contracts.contract import ContractError, JsonSpec, check_document, check_fields

VERSION = "3"

LENGTH_PARTS = ("prompt", "chosen", "rejected", "pair")

FILE_FIELDS: JsonSpec = {
    "file": (str, "file name inside the directory"),
    "bytes": (int, "file size"),
    "sha256": (str, "sha256 of the file, checked before reuse"),
}

STATS_FIELDS: JsonSpec = {
    "pairs_in": (int, "preference pairs read = pairs_out + sum(dropped)"),
    "pairs_out": (int, "tokenized pairs written (rows of tokenized.parquet)"),
    "dropped": (dict, "reason (a tokenized_pair rule) -> pairs dropped"),
    "tokens": (dict, "prompt / chosen / rejected / pair -> total tokens written"),
    "lengths": (dict, "prompt / chosen / rejected / pair -> p50, p90, p99, max"),
    "length_histograms": (dict, "edges (shared, see above) and counts per part"),
    "boundary_agreement": (dict, "template, tokenizer, checked, agreed, rate, examples"),
    "responses_ending_with_eos": (
        dict,
        "token (the template's end of turn), token_ids, suffix, count, of, rate",
    ),
}

FIELDS: JsonSpec = {
    "contract": (str, 'always "tokenized_report"'),
    "version": (str, "tokenized_report contract version"),
    "contracts": (dict, "contract name -> version of every stage that shaped the bytes"),
    "key": (str, "cache key = directory name"),
    "config": (dict, "every tokenize setting (pipeline.tokenized.TokenizeConfig)"),
    "input": (dict, "name, sha256 and rows of the preference_pair file"),
    "tokenizer": (dict, "path (inside the directory), fingerprint, name, bos/eos, trained"),
    "template": (dict, "name and sha256 of the chat template"),
    "files": (list, "one entry per data file (FILE_FIELDS), checked before reuse"),
    "stats": (dict, "STATS_FIELDS"),
    "checksum": (str, "sha256 of this document's canonical JSON without this field"),
}


def validate(report: Any, source: str = "report.json") -> dict:
    """Check fields, types, drop reasons and row accounting.

    Raises:
        ContractError: naming `source` and the first missing or mistyped field, or the
            broken rule (`unknown_drop_reason`, `pairs_add_up`, `input_rows_add_up`).
    """
    check_document(report, FIELDS, "tokenized_report", source)
    for i, entry in enumerate(report["files"]):
        check_fields(entry, FILE_FIELDS, f"files[{i}].", source)
    stats = report["stats"]
    check_fields(stats, STATS_FIELDS, "stats.", source)
    unknown = set(stats["dropped"]) - set(tokenized_pair.CONTRACT.rule_names())
    if unknown:
        raise ContractError(f"{source}: unknown_drop_reason: {sorted(unknown)}")
    if stats["pairs_out"] + sum(stats["dropped"].values()) != stats["pairs_in"]:
        raise ContractError(f"{source}: pairs_add_up broken: pairs_out + dropped != pairs_in")
    if report["input"].get("rows") != stats["pairs_in"]:
        raise ContractError(f"{source}: input_rows_add_up broken: input.rows != pairs_in")
    return report
