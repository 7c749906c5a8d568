"""The JSON contracts of stage outputs: the tokenized report and the shard manifest refuse
documents whose row accounting does not add up."""

from __future__ import annotations

import copy

import pytest

from data_contracts import manifest, tokenized_report
from data_contracts.contract import ContractError

REPORT = {
    "contract": "tokenized_report",
    "version": tokenized_report.VERSION,
    "contracts": {},
    "key": "k",
    "config": {},
    "input": {"name": "pairs.parquet", "sha256": "0" * 64, "rows": 10},
    "tokenizer": {},
    "template": {},
    "files": [{"file": "tokenized.parquet", "bytes": 1, "sha256": "0" * 64}],
    "stats": {
        "pairs_in": 10,
        "pairs_out": 7,
        "dropped": {"empty_chosen_ids": 2, "empty_rejected_ids": 1},
        "tokens": {},
        "lengths": {},
        "length_histograms": {},
        "boundary_agreement": {},
        "responses_ending_with_eos": {},
    },
}


def _changed(document: dict, path: tuple[str, ...], value: object) -> dict:
    document = copy.deepcopy(document)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return document


def test_a_consistent_report_validates() -> None:
    assert tokenized_report.validate(copy.deepcopy(REPORT)) == REPORT


@pytest.mark.parametrize(
    ("path", "value", "rule"),
    [
        (("stats", "pairs_out"), 8, "pairs_add_up"),
        (("input", "rows"), 11, "input_rows_add_up"),
        (("stats", "dropped"), {"too_long": 3}, "unknown_drop_reason"),
        (("files",), [{"file": "tokenized.parquet", "bytes": 1}], r"files\[0\]\. lacks sha256"),
        (("stats", "pairs_in"), "10", "pairs_in is str"),
    ],
)
def test_report_rules_name_what_is_broken(path: tuple, value: object, rule: str) -> None:
    with pytest.raises(ContractError, match=rule):
        tokenized_report.validate(_changed(REPORT, path, value), "r.json")


MANIFEST = {
    "contract": "manifest",
    "version": manifest.VERSION,
    "contracts": {},
    "key": "k",
    "layout": "shared",
    "max_len": 64,
    "mask_block_size": 16,
    "config": {},
    "input": {},
    "tokenized": {"key": "t", "directory": "tokenized/t", "config": {}},
    "tokenizer": {},
    "template": {},
    "shards": [{"file": "s", "rows": 3, "pairs": 5, "tokens": 100, "bytes": 1, "sha256": ""}],
    "stats": {
        "rows": 3,
        "pairs_in": 10,
        "tokenized_pairs": 7,
        "pairs": 5,
        "tokens": 100,
        "fill_ratio": 0.5,
        "truncated": 0,
        "dropped": {"empty_chosen_ids": 3, "too_long": 2},
        "tokens_by_layout": {},
        "tokens_saved_by_prefix_sharing": 0,
        "prefix_sharing_saving": 0.0,
        "lengths": {},
        "pair_length_histogram": {},
        "boundary_agreement": {},
    },
}


def test_a_consistent_manifest_validates() -> None:
    assert manifest.validate(copy.deepcopy(MANIFEST)) == MANIFEST


@pytest.mark.parametrize(
    ("path", "value", "rule"),
    [
        # Both stages' accounting: 10 in = 7 tokenized + 3 empty; 7 = 5 packed + 2 too long.
        (("stats", "tokenized_pairs"), 8, "tokenized_pairs_add_up"),
        (("stats", "dropped"), {"empty_chosen_ids": 3, "too_long": 1}, "pairs_add_up"),
        (("stats", "rows"), 4, "shard_rows_add_up"),
        (("tokenized",), {"key": "t"}, r"tokenized\. lacks directory, config"),
    ],
)
def test_manifest_rules_name_what_is_broken(path: tuple, value: object, rule: str) -> None:
    with pytest.raises(ContractError, match=rule):
        manifest.validate(_changed(MANIFEST, path, value), "m.json")
