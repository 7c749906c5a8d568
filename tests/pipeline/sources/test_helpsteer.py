"""HelpSteer (v1), HelpSteer2, its preference subset and HelpSteer3 on fixture rows.

Expected values are worked out by hand from `tests/fixtures/*.jsonl` (see each test).
"""

from __future__ import annotations

from pipeline.normalize import normalize
from tests.conftest import FIXTURES


def _by_chosen(result) -> dict[str, dict]:
    return {row["chosen"]: row for row in result.pairs.to_pylist()}


def test_helpsteer_pairs_best_and_worst_response_of_each_prompt() -> None:
    """Prime prompt: helpfulness 4, 1, 2 -> 4 vs 1 (margin 3), the 2 is not selected.
    "2 + 2" has one response; "Say hello" ties at 2 and 2 (input order decides)."""
    result = normalize("helpsteer", FIXTURES / "helpsteer.jsonl")
    pairs = _by_chosen(result)
    assert set(pairs) == {"7 is prime.", "Hello!"}
    prime = pairs["7 is prime."]
    assert prime["rejected"] == "9 is prime."
    assert (prime["score_chosen"], prime["score_rejected"], prime["margin"]) == (4.0, 1.0, 3.0)
    assert dict(prime["chosen_attributes"]) == {
        "helpfulness": 4.0,
        "correctness": 4.0,
        "coherence": 4.0,
        "complexity": 1.0,
        "verbosity": 1.0,
    }
    assert prime["prompt"] == [{"role": "user", "content": "Name a prime number."}]
    tie = pairs["Hello!"]
    assert (tie["rejected"], tie["margin"]) == ("Hi there.", 0.0)
    report = result.report
    assert report["dropped"] == {"not_selected": 1, "single_response": 1}
    assert report["quarantined"] == {
        "invalid_json": 1,
        "missing_field": 1,
        "score_out_of_range": 1,
        "wrong_type": 1,
    }
    assert (report["rows_in"], report["rows_paired"], report["rows_per_pair"]) == (10, 4, 2)
    assert result.quarantine["row_index"].to_pylist() == [6, 7, 8, 9]


def test_helpsteer_weights_change_the_ranking() -> None:
    """Correctness alone: prime rows score 4, 0, 4 -> first 4 (input order) vs the 0;
    hello rows 3 vs 4 -> "Hi there." wins by 1."""
    result = normalize("helpsteer", FIXTURES / "helpsteer.jsonl", weights={"correctness": 1.0})
    pairs = _by_chosen(result)
    assert pairs["7 is prime."]["rejected"] == "9 is prime."
    assert pairs["7 is prime."]["margin"] == 4.0
    assert pairs["Hi there."]["rejected"] == "Hello!"
    assert pairs["Hi there."]["margin"] == 1.0
    assert "correctness" in result.report["score_scale"]


def test_helpsteer2_turn_markers_become_messages() -> None:
    result = normalize("helpsteer2", FIXTURES / "helpsteer2.jsonl")
    pairs = _by_chosen(result)
    cat = pairs["Sir Pounce-a-Lot."]
    assert cat["prompt"] == [
        {"role": "user", "content": "I want a name for my cat."},
        {"role": "assistant", "content": "How about Miso?"},
        {"role": "user", "content": "Something longer, please."},
    ]
    assert (cat["rejected"], cat["margin"]) == ("Cat.", 2.0)
    gravity = pairs[
        "Gravity is a force that pulls objects toward each other, like the Earth pulling an "
        "apple down."
    ]
    assert gravity["rejected"] == "Masses attract each other."
    # The "Hello / Assistant: Hi!" prompt ends with the assistant: both rows quarantined.
    assert result.report["quarantined"] == {"no_user_turn": 2}
    assert result.report["pairs_out"] == 2


def test_helpsteer2_preference_sign_tie_split_and_rationale() -> None:
    result = normalize("helpsteer2_preference", FIXTURES / "helpsteer2_preference.jsonl")
    rows = result.pairs.to_pylist()
    assert [(r["chosen"], r["rejected"], r["margin"]) for r in rows] == [
        ("Steeped: Notes on Tea", "Tea Blog", 2.0),  # -2: response_1 better
        ("Sorry, it is 21.", "Yes, 20.", 3.0),  # 3: response_2 better
        ("Blue.", "Green.", 0.0),  # tie kept for curation to decide
    ]
    assert [r["split"] for r in rows] == ["train", "train", "validation"]
    assert rows[0]["rationale"] == (
        "@Response 1 is better than @Response 2.\n\nResponse 1 is more evocative."
    )
    assert rows[2]["rationale"] == "Both are equally good."
    assert [m["role"] for m in rows[1]["prompt"]] == ["user", "assistant", "user"]
    assert rows[0]["score_chosen"] is None
    assert result.report["quarantined"] == {"score_out_of_range": 1}


def test_helpsteer3_context_as_list_and_as_string() -> None:
    result = normalize("helpsteer3", FIXTURES / "helpsteer3.jsonl")
    rows = result.pairs.to_pylist()
    assert len(rows) == 4
    code, book, joke, tie = rows
    assert (code["chosen"], code["margin"], code["domain"], code["language"]) == (
        "Use s[::-1].",
        2.0,
        "code",
        "python",
    )
    assert code["rationale"] == (
        "@Response 1 is correct; strings have no reverse().\n\n@Response 2 would raise an error."
    )
    # The context string is the user's only turn.
    assert book["prompt"] == [{"role": "user", "content": "Recommend a book about the sea."}]
    assert book["chosen"] == "Moby-Dick, by Herman Melville."
    assert [m["role"] for m in joke["prompt"]] == ["system", "user", "assistant", "user"]
    assert joke["rationale"] is None and joke["language"] == "french"
    assert (tie["chosen"], tie["margin"]) == ("No, 1 is not prime.", 0.0)
    assert result.report["quarantined"] == {"no_user_turn": 1}
