"""Property: for any mix of good and broken rows of any source, every row is accounted for
(normalize and curate) and the written output is byte-identical across runs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from data_contracts.raw_sources import HELPSTEER_ATTRIBUTES, ULTRAFEEDBACK_ASPECTS
from pipeline.curate import CurateConfig, curate
from pipeline.normalize import normalize, write_normalized
from pipeline.sources import SOURCES

# Few distinct texts, so duplicates, ties and shared prompts happen often.
TEXT = st.sampled_from(["alpha", "beta", "gamma", "delta beta", "Alpha ", ""])
PROMPT = st.sampled_from(
    ["Why?", "How so?", "Tell me more.", "A\n<extra_id_1>Assistant\nB\n<extra_id_1>User\nC"]
)


def _messages(text: str, role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


@st.composite
def good_row(draw: st.DrawFn, source: str) -> dict[str, Any]:
    if source in ("helpsteer", "helpsteer2"):
        row = {"prompt": draw(PROMPT), "response": draw(TEXT)}
        return row | {a: draw(st.integers(0, 4)) for a in HELPSTEER_ATTRIBUTES}
    if source == "helpsteer2_preference":
        return {
            "split": draw(st.sampled_from(["train", "validation"])),
            "prompt": draw(PROMPT),
            "response_1": draw(TEXT),
            "response_2": draw(TEXT),
            "preference_strength": draw(st.integers(-3, 3)),
        }
    if source == "helpsteer3":
        prompt = draw(PROMPT)
        context = draw(st.sampled_from([prompt, _messages(prompt, "user")]))
        return {
            "domain": "general",
            "language": draw(st.sampled_from(["english", "french"])),
            "context": context,
            "response1": draw(TEXT),
            "response2": draw(TEXT),
            "overall_preference": draw(st.integers(-3, 3)),
        }
    if source == "ultrafeedback":
        rating = st.sampled_from(["1", "2", "3", "4", "5", "N/A"])
        completions = [
            {
                "annotations": {a: {"Rating": draw(rating)} for a in ULTRAFEEDBACK_ASPECTS},
                "response": draw(TEXT),
                "overall_score": float(draw(st.integers(1, 10))),
                "critique": "c",
            }
            for _ in range(draw(st.integers(2, 4)))
        ]
        return {"source": "s", "instruction": draw(PROMPT), "completions": completions}
    if source == "ultrafeedback_binarized":
        prompt = _messages(draw(PROMPT), "user")
        score = draw(st.integers(1, 10))
        return {
            "prompt": prompt[0]["content"],
            "chosen": prompt + _messages(draw(TEXT), "assistant"),
            "rejected": prompt + _messages(draw(TEXT), "assistant"),
            "score_chosen": float(score),
            "score_rejected": float(draw(st.integers(1, score))),
        }
    chosen, rejected = draw(TEXT), draw(TEXT)
    as_list = draw(st.booleans())
    return {
        "prompt": draw(PROMPT),
        "chosen": _messages(chosen, "assistant") if as_list else chosen,
        "rejected": rejected,
    }


@st.composite
def broken_row(draw: st.DrawFn, source: str) -> dict[str, Any] | bytes:
    kind = draw(st.sampled_from(["invalid_json", "invalid_utf8", "drop", "wrong_type", "range"]))
    if kind == "invalid_json":
        return b'{"prompt": "cut off", '
    if kind == "invalid_utf8":
        return b'{"prompt": "caf\xe9"}'
    row = draw(good_row(source))
    required = [f.name for f in SOURCES[source].contract.schema if not f.nullable]
    key = draw(st.sampled_from(required))
    if kind == "drop":
        del row[key]
    elif kind == "wrong_type":
        row[key] = 12345 if isinstance(row[key], (str, list)) else "12345"
    else:
        score_key = {
            "helpsteer": "helpfulness",
            "helpsteer2": "correctness",
            "helpsteer2_preference": "preference_strength",
            "helpsteer3": "overall_preference",
            "ultrafeedback_binarized": "score_chosen",
        }.get(source)
        if score_key is None:
            return b"[1, 2, 3]"
        row[score_key] = 11
    return row


@st.composite
def source_file(draw: st.DrawFn) -> tuple[str, list[Any]]:
    source = draw(st.sampled_from(list(SOURCES)))
    good = draw(st.lists(good_row(source), min_size=1, max_size=12))
    broken = draw(st.lists(broken_row(source), max_size=6))
    return source, draw(st.permutations(good + broken))


def _write(rows: list[Any], path: Path) -> None:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")


@settings(max_examples=60)
@given(source_file())
def test_accounting_and_identical_output(case: tuple[str, list[Any]]) -> None:
    source, rows = case
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        _write(rows, tmp_path / "input.jsonl")
        first = normalize(source, tmp_path / "input.jsonl")
        report = first.report
        assert report["rows_in"] == len(rows)
        quarantined = sum(report["quarantined"].values())
        assert quarantined == first.quarantine.num_rows
        assert report["rows_in"] == (
            report["pairs_out"] * SOURCES[source].rows_per_pair
            + quarantined
            + sum(report["dropped"].values())
        )
        write_normalized(first, tmp_path / "a")
        write_normalized(normalize(source, tmp_path / "input.jsonl"), tmp_path / "b")
        for name in ("pairs.parquet", "quarantine.parquet", "report.json"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        curated = curate(first.pairs, CurateConfig(max_pairs_per_prompt=2), ["Tell me more."])
        funnel = curated.report
        assert funnel["rows_in"] == first.pairs.num_rows
        assert funnel["rows_in"] == funnel["rows_out"] + sum(funnel["dropped"].values())
        assert curated.pairs.num_rows == funnel["rows_out"]
