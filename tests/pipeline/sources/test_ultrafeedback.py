"""UltraFeedback raw (both annotation shapes) and binarized, on fixture rows.

Fixture row 0 (`ultrafeedback_dict.jsonl`), aspect ratings and overall scores:
c0 5,5,5,4 -> mean 4.75, overall 8; c1 2,N/A,2,2 -> 2.0, overall 4;
c2 4,4,4,4 -> 4.0, overall 9; c3 1,3,1,1 -> 1.5, overall 2.
Row 1: c0 3,3,3,3 and c1 3,N/A,3,3: both 3.0, a tie. Row 2: one completion is all N/A.
Row 3: a Rating of "five".
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.normalize import normalize
from tests.conftest import FIXTURES

UF_DICT = FIXTURES / "ultrafeedback_dict.jsonl"
UF_LIST = FIXTURES / "ultrafeedback_list.jsonl"


def test_fine_grained_mean_best_vs_worst() -> None:
    result = normalize("ultrafeedback", UF_DICT)
    first, tie = result.pairs.to_pylist()
    assert (first["chosen"], first["rejected"]) == ("Red, yellow and blue.", "I like turtles.")
    assert (first["score_chosen"], first["score_rejected"], first["margin"]) == (4.75, 1.5, 3.25)
    assert first["prompt"] == [{"role": "user", "content": "Name three primary colours."}]
    assert first["domain"] == "evol_instruct"
    assert first["rationale"] == "chosen: Correct and concise.\n\nrejected: Off topic."
    assert dict(first["rejected_attributes"]) == {
        "instruction_following": 1.0,
        "honesty": 3.0,
        "truthfulness": 1.0,
        "helpfulness": 1.0,
    }
    # N/A is left out of the mean and of the attributes; equal means make a tie.
    assert (tie["chosen"], tie["rejected"], tie["margin"]) == (
        "You are doing great.",
        "Have a lovely day.",
        0.0,
    )
    assert "honesty" not in dict(tie["rejected_attributes"])
    assert result.report["quarantined"] == {"invalid_rating": 1, "too_few_completions": 1}


def test_overall_score_option() -> None:
    result = normalize("ultrafeedback", UF_DICT, score="overall")
    first = result.pairs.to_pylist()[0]
    assert (first["chosen"], first["rejected"], first["margin"]) == (
        "Red, blue, yellow.",
        "I like turtles.",
        7.0,
    )
    assert "overall_score" in result.report["score_scale"]


def test_random_rejected_is_seeded_and_never_the_chosen() -> None:
    others = {"Red, green and purple.", "Red, blue, yellow.", "I like turtles."}
    seen = set()
    for seed in range(30):
        first = normalize("ultrafeedback", UF_DICT, rejected="random", seed=seed)
        again = normalize("ultrafeedback", UF_DICT, rejected="random", seed=seed)
        assert first.pairs.equals(again.pairs)
        pair = first.pairs.to_pylist()[0]
        assert pair["chosen"] == "Red, yellow and blue."
        assert pair["rejected"] in others
        seen.add(pair["rejected"])
    assert seen == others  # every other completion gets drawn for some seed


def test_list_of_one_annotation_shape_gives_the_same_pairs() -> None:
    as_dict = normalize("ultrafeedback", UF_DICT)
    as_list = normalize("ultrafeedback", UF_LIST)
    assert as_list.pairs.equals(as_dict.pairs)
    assert as_list.report["quarantined"] == as_dict.report["quarantined"]


def test_list_shape_from_parquet(tmp_path) -> None:
    """A typed file in the older shape converts column-wise."""
    table = pa.Table.from_pylist([json.loads(line) for line in UF_LIST.open()])
    pq.write_table(table, tmp_path / "train.parquet")
    result = normalize("ultrafeedback", tmp_path / "train.parquet")
    assert result.pairs.drop_columns(["pair_id"]).equals(
        normalize("ultrafeedback", UF_DICT).pairs.drop_columns(["pair_id"])
    )


def test_binarized_from_jsonl_and_parquet(tmp_path) -> None:
    result = normalize("ultrafeedback_binarized", FIXTURES / "ultrafeedback_binarized.jsonl")
    rows = result.pairs.to_pylist()
    assert [(r["chosen"], r["rejected"], r["margin"]) for r in rows] == [
        ("100 °C at sea level.", "50 °C.", 5.5),
        ("Apple.", "Pear.", 0.0),
    ]
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is the boiling point of water?"}]
    assert result.report["quarantined"] == {
        "no_assistant_turn": 1,
        "prompt_mismatch": 1,
        "score_out_of_range": 1,
    }
    assert {r["split"] for r in rows} == {"train_prefs"}  # the source's default split

    lines = (FIXTURES / "ultrafeedback_binarized.jsonl").read_text().splitlines()
    table = pa.Table.from_pylist([json.loads(line) for line in lines])
    path = tmp_path / "test_prefs-00000-of-00001.parquet"
    pq.write_table(table, path)
    from_parquet = normalize("ultrafeedback_binarized", path)
    assert from_parquet.pairs["chosen"].to_pylist() == [r["chosen"] for r in rows]
    assert set(from_parquet.pairs["split"].to_pylist()) == {"test_prefs"}  # from the file name
    assert from_parquet.report["quarantined"] == result.report["quarantined"]
