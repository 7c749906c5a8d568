"""Contract machinery on the canonical pair: conform, validate and split."""

from __future__ import annotations

import pyarrow as pa
import pytest

from data_contracts import ContractError
from data_contracts.preference_pair import CONTRACT, make_pair_id


def _pairs(prompts: list[list[dict]], margin: list[float | None] | None = None) -> pa.Table:
    n = len(prompts)
    return pa.table(
        {
            "pair_id": [make_pair_id("t", p, "a", "b") for p in prompts],
            "source": ["t"] * n,
            "split": ["train"] * n,
            "prompt": prompts,
            "chosen": ["a"] * n,
            "rejected": ["b"] * n,
            "score_chosen": [None] * n,
            "score_rejected": [None] * n,
            "margin": margin or [None] * n,
            "domain": [None] * n,
            "language": [None] * n,
            "chosen_attributes": [None] * n,
            "rejected_attributes": [None] * n,
            "rationale": [None] * n,
        }
    )


def test_split_labels_each_bad_row_with_its_first_broken_rule() -> None:
    table = _pairs(
        [
            [{"role": "user", "content": "hi"}],
            [],
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            [{"role": "robot", "content": "x"}, {"role": "user", "content": "y"}],
            [{"role": "user", "content": "ok"}],
        ],
        margin=[1.0, None, None, None, -2.0],
    )
    valid, invalid = CONTRACT.split(table)
    assert valid.num_rows == 1
    assert invalid["__row_index"].to_pylist() == [1, 2, 3, 4]
    assert invalid["rule"].to_pylist() == [
        "empty_prompt",
        "no_user_turn",
        "unknown_role",
        "negative_margin",
    ]
    assert CONTRACT.problems(table) == {
        "empty_prompt": 1,
        "negative_margin": 1,
        "no_user_turn": 1,
        "unknown_role": 1,
    }


def test_validate_names_rule_and_first_row() -> None:
    table = _pairs([[{"role": "user", "content": "a"}], []])
    with pytest.raises(ContractError, match=r"empty_prompt: 1 row\(s\), first at row 1"):
        CONTRACT.validate(table, source="x.parquet")


def test_conform_names_file_and_missing_columns() -> None:
    table = _pairs([[{"role": "user", "content": "a"}]]).drop_columns(["chosen", "margin"])
    with pytest.raises(ContractError, match=r"x\.parquet: missing column.*chosen, margin"):
        CONTRACT.conform(table, source="x.parquet")


def test_null_in_required_field_is_a_rule() -> None:
    table = _pairs([[{"role": "user", "content": "a"}]]).set_column(
        4, "chosen", pa.array([None], pa.string())
    )
    assert CONTRACT.problems(table) == {"null_chosen": 1}


def test_pair_id_is_stable_and_content_sensitive() -> None:
    prompt = [{"role": "user", "content": "hi"}]
    assert make_pair_id("s", prompt, "a", "b") == make_pair_id("s", prompt, "a", "b")
    assert make_pair_id("s", prompt, "a", "b") != make_pair_id("s", prompt, "b", "a")
