"""Raw-source contracts: their rules name the rows they reject."""

from __future__ import annotations

import pyarrow as pa

from data_contracts.raw_sources import (
    COMPLETIONS,
    GENERIC,
    HELPSTEER,
    HELPSTEER2_PREFERENCE,
    ULTRAFEEDBACK,
    ULTRAFEEDBACK_ASPECTS,
    ULTRAFEEDBACK_BINARIZED,
)


def _helpsteer(helpfulness: list[float | None]) -> pa.Table:
    n = len(helpfulness)
    columns = {"prompt": ["p"] * n, "response": ["r"] * n, "helpfulness": helpfulness}
    columns |= {a: [2.0] * n for a in ("correctness", "coherence", "complexity", "verbosity")}
    return HELPSTEER.conform(pa.table(columns))


def test_helpsteer_attributes_stay_within_0_to_4() -> None:
    table = _helpsteer([0.0, 4.0, 4.5, -1.0, None])
    assert HELPSTEER.problems(table) == {"null_helpfulness": 1, "score_out_of_range": 2}


def test_preference_strength_within_minus_3_to_3() -> None:
    table = pa.table(
        {
            "prompt": ["p"] * 3,
            "response_1": ["a"] * 3,
            "response_2": ["b"] * 3,
            "preference_strength": [-3.0, 3.0, 3.5],
        }
    )
    table = table.append_column("split", pa.nulls(3, pa.string()))
    for name in ("preference_statement", "preference_elaboration"):
        table = table.append_column(name, pa.nulls(3, pa.string()))
    assert HELPSTEER2_PREFERENCE.problems(HELPSTEER2_PREFERENCE.conform(table)) == {
        "score_out_of_range": 1
    }


def _completion(rating: str, overall: float | None = 7.0) -> dict:
    aspect = {"Rating": rating, "Rationale": "r"}
    return {
        "annotations": {a: aspect for a in ULTRAFEEDBACK_ASPECTS},
        "response": "x",
        "overall_score": overall,
        "critique": "c",
    }


def test_ultrafeedback_ratings_are_numbers_in_range_or_na() -> None:
    rows = [
        [_completion("5"), _completion("N/A")],  # valid: N/A is allowed
        [_completion("5"), _completion("great")],  # invalid_rating
        [_completion("6"), _completion("1")],  # rating out of 1-5
        [_completion("3", overall=11.0), _completion("3")],  # overall out of 1-10
        [_completion("3")],  # too few completions
    ]
    table = pa.table(
        {
            "source": pa.nulls(len(rows), pa.string()),
            "instruction": ["i"] * len(rows),
            "completions": pa.array(rows, COMPLETIONS),
        }
    )
    assert ULTRAFEEDBACK.problems(table) == {
        "invalid_rating": 1,
        "score_out_of_range": 2,
        "too_few_completions": 1,
    }


def test_binarized_scores_within_1_to_10() -> None:
    messages = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 2
    table = pa.table(
        {
            "prompt": ["q", "q"],
            "prompt_id": [None, None],
            "chosen": messages,
            "rejected": messages,
            "score_chosen": [10.0, 10.5],
            "score_rejected": [1.0, 1.0],
        }
    )
    assert ULTRAFEEDBACK_BINARIZED.problems(ULTRAFEEDBACK_BINARIZED.conform(table)) == {
        "score_out_of_range": 1
    }


def test_generic_scores_must_be_finite() -> None:
    message = [[{"role": "assistant", "content": "a"}]]
    table = pa.table(
        {
            "prompt": pa.nulls(2, GENERIC.schema.field("prompt").type),
            "chosen": message * 2,
            "rejected": message * 2,
            "score_chosen": [1.0, float("nan")],
            "score_rejected": [0.0, 0.0],
        }
    )
    for name in ("split", "domain", "language"):
        table = table.append_column(name, pa.nulls(2, pa.string()))
    assert GENERIC.problems(GENERIC.conform(table)) == {"score_not_finite": 1}
