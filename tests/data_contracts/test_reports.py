"""The JSON contracts of stage outputs: the curation report, the tokenized report and the
shard manifest refuse documents whose row accounting does not add up; the manifest's key and checksum are
functions of its content."""

from __future__ import annotations

import copy

import pytest

from data_contracts import curation_report, manifest, tokenized_report
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
    "checksum": "0" * 64,
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
    "packer": "1",
    "layout": "shared",
    "max_len": 64,
    "mask_block_size": 16,
    "config": {"layout": "shared", "max_len": 64, "mask_block_size": 16},
    "input": {},
    "tokenized": {"key": "t", "directory": "tokenized/t", "config": {}},
    "tokenizer": {},
    "template": {},
    "shards": [{"file": "s", "rows": 3, "pairs": 5, "tokens": 100, "bytes": 1, "sha256": ""}],
    "files": [{"file": "tokenizer.json", "bytes": 1, "sha256": ""}],
    "checksum": "",
    "stats": {
        "rows": 3,
        "pairs_in": 10,
        "tokenized_pairs": 7,
        "pairs": 5,
        "tokens": 100,
        "fill_ratio": 0.5,
        "truncated": 0,
        "one_response_cut": 0,
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
        (("files",), [{"file": "tokenizer.json"}], r"files\[0\]\. lacks bytes, sha256"),
        (("stats", "one_response_cut"), None, "one_response_cut is NoneType"),
        (("version",), "2", "version is '2', this prefpack reads manifest v3"),
        # What the trainer reads at the top level must be what the key hashes (config).
        (("max_len",), 65, "trainer_fields_match_config broken: max_len is 65, config"),
        (("config", "layout"), "padded", "layout is 'shared', config.layout is 'padded'"),
        (("mask_block_size",), 32, "mask_block_size is 32, config.mask_block_size is 16"),
    ],
)
def test_manifest_rules_name_what_is_broken(path: tuple, value: object, rule: str) -> None:
    with pytest.raises(ContractError, match=rule):
        manifest.validate(_changed(MANIFEST, path, value), "m.json")


def test_the_checksum_covers_every_field_but_itself() -> None:
    base = manifest.checksum(MANIFEST)
    assert len(base) == 64 and manifest.checksum(_changed(MANIFEST, ("checksum",), "x")) == base
    # Key order and formatting do not matter; any value does, nested ones included.
    assert manifest.checksum(dict(reversed(list(MANIFEST.items())))) == base
    for path, value in [
        (("shards", 0, "sha256"), "0" * 64),
        (("stats", "truncated"), 1),
        (("config", "max_len"), 63),
        (("files", 0, "bytes"), 2),
    ]:
        assert manifest.checksum(_changed(MANIFEST, path, value)) != base, path


def test_the_shard_key_hashes_each_input_and_only_the_key_contracts() -> None:
    contracts = {"manifest": "3", "packed_row": "1", "tokenized_pair": "2"}
    base = manifest.shard_key("ab", {"max_len": 64}, contracts, "3")
    assert len(base) == 20 and base == manifest.shard_key("ab", {"max_len": 64}, contracts, "3")
    variants = [
        manifest.shard_key("ac", {"max_len": 64}, contracts, "3"),
        manifest.shard_key("ab", {"max_len": 65}, contracts, "3"),
        manifest.shard_key("ab", {"max_len": 64}, {**contracts, "packed_row": "2"}, "3"),
        manifest.shard_key("ab", {"max_len": 64}, contracts, "4"),
    ]
    assert len({base, *variants}) == 5
    # Upstream contracts are covered by the tokenized key, not hashed twice.
    assert manifest.shard_key("ab", {"max_len": 64}, {**contracts, "x": "9"}, "3") == base


def test_the_text_is_what_json_reads_back() -> None:
    import json

    text = manifest.text(MANIFEST)
    assert text.endswith("}\n") and manifest.text(json.loads(text)) == text


BIAS = {
    "pairs": 4,
    "chosen_longer": 2,
    "rejected_longer": 1,
    "equal": 1,
    "chosen_longer_share": 0.5,
    "ratio_quantiles": {"p50": 1.5},
}
CURATION = {
    "contract": "curation_report",
    "version": curation_report.VERSION,
    "rows_in": 10,
    "dropped": {"tie": 3, "near_duplicate": 1, "over_chosen_longer_share": 2},
    "rows_out": 3,
    "eval_pairs": 1,
    "dropped_file": "dropped.parquet",
    "eval_file": "eval_pairs.parquet",
    "config": {},
    "eval_split": {"mode": "share", "setting": 0.1, "seed": 0, "prompts": 1, "units": 1},
    "eval_prompts": None,
    "score_scale": {},
    "sources": {
        "a": {"rows_in": 6, "rows_out": 3, "eval_pairs": 1},
        "b": {"rows_in": 4, "rows_out": 0, "eval_pairs": 0},
    },
    "attribute_agreement": {},
    "length_bias": {"unit": "characters", "in": {"a": BIAS}, "out": {"a": dict(BIAS)}},
    "near_duplicates": None,
}


def test_a_consistent_curation_report_validates() -> None:
    assert curation_report.validate(copy.deepcopy(CURATION)) == CURATION


@pytest.mark.parametrize(
    ("path", "value", "rule"),
    [
        (("rows_out",), 5, "rows_add_up"),
        (("dropped",), {"tie": 3, "too_long": 3}, r"unknown_drop_reason: \['too_long'\]"),
        (("dropped",), {"near_duplicate": 1, "tie": 3, "over_chosen_longer_share": 2}, "order"),
        (("sources", "b", "rows_in"), 3, "sources_add_up broken: sources' rows_in"),
        (("length_bias", "out", "a", "equal"), 2, r"length_bias_adds_up broken at .*out\.a"),
        (("length_bias", "in"), None, "length_bias.in is NoneType"),
        (("near_duplicates",), {"threshold": 0.8}, r"near_duplicates\. lacks ngram"),
        (("eval_prompts",), "3", "eval_prompts is str"),
        (("eval_pairs",), 2, "rows_add_up broken: rows_out \\+ eval_pairs \\+ dropped"),
        (("sources", "a", "eval_pairs"), 0, "sources_add_up broken: sources' eval_pairs"),
        (("eval_split",), None, "eval_split broken: eval pairs without an eval split"),
        (("eval_split", "mode"), "random", "eval_split.mode 'random' not in"),
        (("eval_split", "units"), 2, "units <= prompts <= eval_pairs"),
        (("eval_split",), {"mode": "share"}, r"eval_split\. lacks setting"),
    ],
)
def test_curation_report_rules_name_what_is_broken(path: tuple, value: object, rule: str) -> None:
    with pytest.raises(ContractError, match=rule):
        curation_report.validate(_changed(CURATION, path, value), "c.json")
