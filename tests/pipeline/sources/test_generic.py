"""The generic adapter: strings, role/content, ShareGPT, inline turn markers, scores."""

from __future__ import annotations

import json

from pipeline.normalize import normalize
from tests.conftest import FIXTURES

GENERIC = FIXTURES / "generic.jsonl"


def test_every_message_shape_maps() -> None:
    result = normalize("generic", GENERIC)
    rows = result.pairs.to_pylist()
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("Good answer.", "Bad answer."),
        ("Brief.", "A long, rambling answer."),
        ("Yes.", "No."),
        ("Answer to the second turn.", "Off topic."),
    ]
    strings, conversation, sharegpt, markers = rows
    assert (strings["score_chosen"], strings["score_rejected"], strings["margin"]) == (8, 3, 5)
    assert strings["prompt"] == [{"role": "user", "content": "Plain strings."}]
    assert conversation["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Role and content."},
    ]
    assert sharegpt["prompt"] == [{"role": "user", "content": "ShareGPT style."}]
    assert markers["prompt"] == [
        {"role": "user", "content": "First turn."},
        {"role": "assistant", "content": "A reply."},
        {"role": "user", "content": "Second turn."},
    ]
    assert conversation["margin"] is None  # no scores, no margin
    assert result.report["quarantined"] == {"chosen_scored_lower": 1, "missing_field": 1}
    assert result.report["dropped"] == {"identical_responses": 1}
    assert result.quarantine.to_pylist()[1]["message"] == "field 'chosen' is missing or null"


def test_turn_markers_can_be_kept_as_text() -> None:
    result = normalize("generic", GENERIC, turn_markers=False)
    prompt = result.pairs.to_pylist()[3]["prompt"]
    assert len(prompt) == 1 and "<extra_id_1>Assistant" in prompt[0]["content"]


def test_column_names_are_options(tmp_path) -> None:
    path = tmp_path / "custom.json"
    rows = [{"question": "Q?", "better": "A.", "worse": "B.", "s1": 2, "s2": 1}]
    path.write_text(json.dumps(rows))
    result = normalize(
        "generic",
        path,
        prompt_column="question",
        chosen_column="better",
        rejected_column="worse",
        score_chosen_column="s1",
        score_rejected_column="s2",
    )
    (pair,) = result.pairs.to_pylist()
    assert (pair["prompt"][0]["content"], pair["chosen"], pair["margin"]) == ("Q?", "A.", 1.0)


def test_unknown_sharegpt_speaker_is_quarantined(tmp_path) -> None:
    path = tmp_path / "x.jsonl"
    row = {
        "prompt": [{"from": "narrator", "value": "Who?"}],
        "chosen": [{"from": "gpt", "value": "Me."}],
        "rejected": [{"from": "gpt", "value": "You."}],
    }
    path.write_text(json.dumps(row) + "\n")
    assert normalize("generic", path).report["quarantined"] == {"unknown_role": 1}
