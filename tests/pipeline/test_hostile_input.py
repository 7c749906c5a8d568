"""Hostile input: malformed lines and rows never cost the file, and never a traceback.

For every source, one JSON-lines file mixes good rows with 40-odd kinds of bad lines and
rows (encodings, nesting, separators, sizes, numbers, types, roles). Every row must end up
paired, quarantined or dropped, found by its row index with the expected reason, and the
good rows must still pair. Good rows carry a marker (`m<k>`) that becomes their pair's
chosen text, so the test knows which rows paired without trusting the pipeline's counts.
File-level failures raise a ValueError or OSError naming the path, and the CLI turns them
into one line on stderr.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefpack
from pipeline.normalize import normalize, write_normalized

TEXT, SCORE = "__TEXT__", "__SCORE__"  # placeholders replaced by raw JSON text
DEEP = 100_000
PAIR = None  # expected outcome: part of a pair
MARKER = re.compile(rb'"(m\d+)"')  # a good row's chosen text


@dataclass
class Spec:
    """How to build rows of one source and where to break them.

    Attributes:
        make: k -> the good rows of item k; their pair's chosen text is `m<k>`.
        text: set a required string field of a row (to a placeholder).
        score: set a numeric field of a row (to a placeholder).
        score_reason: the reason for NaN, Infinity or 1e20 in that numeric field.
        rows: source-specific cases: name -> (rows, expected outcome per row).
    """

    make: Callable[[int], list[dict[str, Any]]]
    text: Callable[[dict, Any], None]
    score: Callable[[dict, Any], None]
    score_reason: str | None
    big_int_reason: str | None
    rows: dict[str, tuple[list[dict], list[str | None]]] = field(default_factory=dict)


def _setter(key: str) -> Callable[[dict, Any], None]:
    return lambda row, value: row.__setitem__(key, value)


def _helpsteer(k: int, top: float = 4, low: float = 1) -> list[dict]:
    base = {"prompt": f"prompt {k}", "correctness": 3, "coherence": 3}
    base |= {"complexity": 1, "verbosity": 1}
    return [
        base | {"response": f"m{k}", "helpfulness": top},
        base | {"response": f"worse {k}", "helpfulness": low},
    ]


def _hs2_pref(k: int) -> list[dict]:
    row = {"split": "train", "prompt": f"prompt {k}", "response_1": f"m{k}"}
    return [row | {"response_2": f"worse {k}", "preference_strength": -2}]


def _hs3(k: int) -> list[dict]:
    row = {"domain": "general", "language": "english", "response1": f"m{k}"}
    context = [{"role": "user", "content": f"question {k}"}]
    return [row | {"context": context, "response2": f"worse {k}", "overall_preference": -1}]


def _completion(response: str, rating: str, overall: float) -> dict:
    aspects = ("instruction_following", "honesty", "truthfulness", "helpfulness")
    notes = {a: {"Rating": rating, "Rationale": "ok"} for a in aspects}
    return {"annotations": notes, "critique": "c", "overall_score": overall, "response": response}


def _uf(k: int) -> list[dict]:
    completions = [_completion(f"m{k}", "5", 8.0), _completion(f"worse {k}", "1", 2.0)]
    return [{"source": "evol_instruct", "instruction": f"task {k}", "completions": completions}]


def _uf_score(row: dict, value: Any) -> None:
    for completion in row["completions"]:  # one bool among numbers would read as 1.0
        completion["overall_score"] = value


def _conversation(question: str, answer: str, role: str = "assistant") -> list[dict]:
    return [{"role": "user", "content": question}, {"role": role, "content": answer}]


def _binarized(k: int) -> list[dict]:
    q = f"question {k}"
    return [
        {
            "prompt": q,
            "prompt_id": f"id{k}",
            "chosen": _conversation(q, f"m{k}"),
            "rejected": _conversation(q, f"worse {k}"),
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }
    ]


def _generic(k: int) -> list[dict]:
    return [{"prompt": f"question {k}", "chosen": f"m{k}", "rejected": f"worse {k}"}]


def _with(rows: list[dict], index: int = 0, **values: Any) -> list[dict]:
    rows = copy.deepcopy(rows)
    rows[index].update(values)
    return rows


SPECS: dict[str, Spec] = {
    "helpsteer": Spec(
        _helpsteer,
        _setter("response"),
        _setter("helpfulness"),
        "score_out_of_range",
        "score_out_of_range",
        {
            "one_response": (_helpsteer(900)[:1], ["single_response"]),
            "three_responses": (
                [*_helpsteer(901), _helpsteer(901, top=2)[0] | {"response": "middle"}],
                [PAIR, PAIR, "not_selected"],
            ),
            "identical_responses": (
                _with(_helpsteer(902), 1, response="m902"),
                ["identical_responses", "identical_responses"],
            ),
            "attribute_7": (_with(_helpsteer(903), 0, helpfulness=7)[:1], ["score_out_of_range"]),
            "negative_attribute": (
                _with(_helpsteer(904), 0, verbosity=-1)[:1],
                ["score_out_of_range"],
            ),
        },
    ),
    "helpsteer2_preference": Spec(
        _hs2_pref,
        _setter("response_1"),
        _setter("preference_strength"),
        "score_out_of_range",
        "score_out_of_range",
        {
            "strength_5": (_with(_hs2_pref(900), preference_strength=5), ["score_out_of_range"]),
            "identical": (_with(_hs2_pref(901), response_2="m901"), ["identical_responses"]),
            "unknown_speaker": (
                _with(_hs2_pref(902), prompt="a\n<extra_id_1>Narrator\nb"),
                ["unknown_role"],
            ),
            "split_number": (_with(_hs2_pref(903), split=3), ["wrong_type"]),
        },
    ),
    "helpsteer3": Spec(
        _hs3,
        _setter("response1"),
        _setter("overall_preference"),
        "score_out_of_range",
        "score_out_of_range",
        {
            "string_context": (_with(_hs3(900), context="question 900"), [PAIR]),
            "ends_with_assistant": (
                _with(_hs3(901), context=_conversation("q", "a")),
                ["no_user_turn"],
            ),
            "unknown_role": (
                _with(_hs3(902), context=[{"role": "narrator", "content": "q"}]),
                ["unknown_role"],
            ),
            "null_content": (
                _with(_hs3(903), context=[{"role": "user", "content": None}]),
                ["null_message_content"],
            ),
            "empty_context": (_with(_hs3(904), context=[]), ["empty_prompt"]),
            "preference_4": (_with(_hs3(905), overall_preference=4), ["score_out_of_range"]),
        },
    ),
    "ultrafeedback": Spec(
        _uf,
        _setter("instruction"),
        _uf_score,
        "score_out_of_range",
        "score_out_of_range",
        {
            "rating_five": (
                [_uf(900)[0] | {"completions": [_completion("a", "five", 8.0)] * 2}],
                ["invalid_rating"],
            ),
            "one_completion": (
                [_uf(901)[0] | {"completions": [_completion("a", "5", 8.0)]}],
                ["too_few_completions"],
            ),
            "all_na": (
                [_uf(902)[0] | {"completions": [_completion("a", "N/A", 8.0)] * 2}],
                ["too_few_completions"],
            ),
            "legacy_shape": (
                [
                    {
                        "instruction": "task 903",
                        "completions": [
                            {
                                **c,
                                "annotations": {a: [v] for a, v in c["annotations"].items()},
                            }
                            for c in _uf(903)[0]["completions"]
                        ],
                    }
                ],
                [PAIR],
            ),
            "completions_string": (_with(_uf(904), completions="none"), ["wrong_type"]),
        },
    ),
    "ultrafeedback_binarized": Spec(
        _binarized,
        _setter("prompt"),
        _setter("score_chosen"),
        "score_out_of_range",
        "score_out_of_range",
        {
            "last_turn_user": (
                _with(_binarized(900), chosen=_conversation("q", "a", role="user")),
                ["no_assistant_turn"],
            ),
            "prompt_mismatch": (
                _with(_binarized(901), rejected=_conversation("other", "worse")),
                ["prompt_mismatch"],
            ),
            "score_11": (_with(_binarized(902), score_chosen=11), ["score_out_of_range"]),
            "chosen_lower": (
                _with(_binarized(903), score_chosen=2.0),
                ["chosen_scored_lower"],
            ),
            "identical": (
                _with(_binarized(904), rejected=_conversation("question 904", "m904")),
                ["identical_responses"],
            ),
            "messages_as_string": (_with(_binarized(905), chosen="m905"), ["wrong_type"]),
            "role_missing": (
                _with(_binarized(906), chosen=[{"content": "q"}, {"content": "a"}]),
                ["no_assistant_turn"],
            ),
        },
    ),
    "generic": Spec(
        _generic,
        _setter("chosen"),
        _setter("score_chosen"),
        "score_not_finite",
        PAIR,
        {
            "sharegpt": (
                [
                    {
                        "prompt": [{"from": "human", "value": "q"}],
                        "chosen": [{"from": "gpt", "value": "m900"}],
                        "rejected": [{"from": "gpt", "value": "worse"}],
                    }
                ],
                [PAIR],
            ),
            "unknown_speaker": (
                [
                    {
                        "prompt": [{"from": "narrator", "value": "q"}],
                        "chosen": [{"from": "gpt", "value": "a"}],
                        "rejected": [{"from": "gpt", "value": "b"}],
                    }
                ],
                ["unknown_role"],
            ),
            "conversation_ends_with_user": (
                _with(_generic(902), chosen=_conversation("q", "a", role="user")),
                ["no_assistant_turn"],
            ),
            "chosen_lower": (
                _with(_generic(903), score_chosen=1, score_rejected=2),
                ["chosen_scored_lower"],
            ),
            "identical": (_with(_generic(904), rejected="m904"), ["identical_responses"]),
            "no_prompt": (
                [{"chosen": "m905", "rejected": "worse"}],
                ["missing_field"],
            ),
        },
    ),
}


def _line(rows: list[dict], index: int, put: Callable[[dict, Any], None], raw: str) -> bytes:
    """Row `index` as JSON with the field `put` sets written as the raw JSON text `raw`."""
    row = copy.deepcopy(rows[index])
    put(row, TEXT)
    return json.dumps(row).replace(f'"{TEXT}"', raw).encode()


def _byte_cases(spec: Spec, k: int) -> dict[str, tuple[list[bytes], list[str | None]]]:
    """Malformed lines of every kind, built from item k's first row (pairs keep its rows)."""
    rows = spec.make(k)
    good = [json.dumps(r).encode() for r in rows]
    first = good[0]

    def text(raw: str) -> bytes:
        return _line(rows, 0, spec.text, raw)

    def score(raw: str) -> bytes:
        return _line(rows, 0, spec.score, raw)

    def extra(raw: str) -> list[bytes]:  # an ignored field, on a row that still pairs
        return [first[:-1] + b', "extra": ' + raw.encode() + b"}", *good[1:]]

    pair = [PAIR] * len(rows)
    deep = "[" * DEEP + "]" * DEEP
    cases: dict[str, tuple[list[bytes], list[str | None]]] = {
        "deep_array_line": ([deep.encode()], ["too_deep"]),
        "deep_field": ([text(deep)], ["too_deep"]),
        "deep_object_field": ([text('{"a":' * 20_000 + "1" + "}" * 20_000)], ["too_deep"]),
        "truncated": ([first[: len(first) // 2]], ["invalid_json"]),
        "invalid_utf8": ([text('"bad \xff"').replace(b"\xc3\xbf", b"\xff\xfe")], ["invalid_utf8"]),
        "latin1_text": ([text('"caf\xe9"').replace(b"\xc3\xa9", b"\xe9")], ["invalid_utf8"]),
        "array_line": ([b"[1, 2, 3]"], ["not_an_object"]),
        "string_line": ([b'"just a string"'], ["not_an_object"]),
        "number_line": ([b"42"], ["not_an_object"]),
        "null_line": ([b"null"], ["not_an_object"]),
        "duplicate_key": ([text('"x", "dup": 1, "dup": 2')], ["duplicate_key"]),
        "nested_duplicate_key": ([text('{"k": 1, "k": 2}')], ["duplicate_key"]),
        "bom_mid_file": ([b"\xef\xbb\xbf" + first], ["invalid_json"]),
        "raw_nul": ([text('"a\x00b"')], ["invalid_json"]),
        "raw_tab": ([text('"a\tb"')], ["invalid_json"]),
        "lone_surrogate": ([text('"\\ud800"')], ["invalid_unicode"]),
        "two_objects": ([first + first], ["invalid_json"]),
        "trailing_comma": ([first[:-1] + b", }"], ["invalid_json"]),
        "single_quotes": ([first.replace(b'"', b"'")], ["invalid_json"]),
        "comment": ([first + b" // note"], ["invalid_json"]),
        "sse_prefix": ([b"data: " + first], ["invalid_json"]),
        "lowercase_nan": ([score("nan")], ["invalid_json"]),
        "number_1e400": ([score("1e400")], ["number_out_of_range"]),
        "int_5000_digits": ([score("9" * 5000)], ["number_out_of_range"]),
        "nan_score": ([score("NaN")], [spec.score_reason]),
        "infinity_score": ([score("-Infinity")], [spec.score_reason]),
        "score_as_string": ([score('"3"')], ["wrong_type"]),
        "score_as_bool": ([score("true")], ["wrong_type"]),
        "score_as_list": ([score("[3]")], ["wrong_type"]),
        "text_as_number": ([text("7")], ["wrong_type"]),
        "text_as_object": ([text('{"a": 1}')], ["wrong_type"]),
        "text_as_int_list": ([text("[1, 2]")], ["wrong_type"]),
        "text_null": ([text("null")], ["missing_field"]),
        "empty_object": ([b"{}"], ["missing_field"]),
        "unrelated_keys": ([b'{"foo": 1, "bar": [1, 2]}'], ["missing_field"]),
        "extra_deep_5000": (extra("[" * 5000 + "]" * 5000)[:1], ["too_deep"]),
        # Rows that are fine however odd they look.
        "int_beyond_int64": (
            [score(str(10**20)), *good[1:]]
            if spec.big_int_reason is PAIR
            else [score(str(10**20))],
            pair if spec.big_int_reason is PAIR else [spec.big_int_reason],
        ),
        "crlf": ([first + b"\r", *good[1:]], pair),
        "leading_spaces": ([b"  \t" + first, *good[1:]], pair),
        "escaped_nul": (extra('"a\\u0000b"'), pair),
        "surrogate_pair": (extra('"\\ud83d\\ude00"'), pair),
        "non_ascii": (extra(json.dumps("héllo wörld ✓", ensure_ascii=False)), pair),
        "one_mib_field": (extra(json.dumps("x" * (1 << 20))), pair),
        "many_brackets_in_string": (extra(json.dumps("[" * 3000)), pair),
        "nested_500": (extra("[" * 500 + "]" * 500), pair),
        "unknown_keys": (extra('{"anything": [1, "two", null]}'), pair),
    }
    return cases


def _build(source: str, tmp_path: Path) -> tuple[Path, dict[int, tuple[str, str | None]], set]:
    """The hostile file: a good item before each case, a blank line after it.

    Returns:
        The path, row index -> (case, expected outcome), and the markers that must pair.
    """
    spec = SPECS[source]
    names = list(_byte_cases(spec, 0))
    cases = {name: _byte_cases(spec, 500 + j)[name] for j, name in enumerate(names)}
    for name, (rows, expected) in spec.rows.items():
        cases[name] = ([json.dumps(r, ensure_ascii=False).encode() for r in rows], expected)
    lines, expect, markers = [], {}, set()
    for k, (name, (case_lines, outcomes)) in enumerate(cases.items()):
        for row in spec.make(k):
            expect[len(lines)] = ("good", PAIR)
            lines.append(json.dumps(row).encode())
        markers.add(f"m{k}")
        for line, outcome in zip(case_lines, outcomes, strict=True):
            expect[len(lines)] = (name, outcome)
            lines.append(line)
            if outcome is PAIR:
                markers |= {m.decode() for m in MARKER.findall(line)}
        lines.append(b"")  # blank lines are no rows
    path = tmp_path / f"{source}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expect, markers


@pytest.mark.parametrize("source", list(SPECS))
def test_every_row_is_paired_quarantined_or_dropped_by_index(source: str, tmp_path) -> None:
    path, expect, markers = _build(source, tmp_path)
    assert len({name for name, _ in expect.values()}) >= 30
    result = normalize(source, path)
    quarantined = _by_row(result.quarantine)
    dropped = _by_row(result.dropped)
    assert len(quarantined) == result.quarantine.num_rows  # one place per row
    assert not set(quarantined) & set(dropped)
    outcome = {i: quarantined.get(i, dropped.get(i, PAIR)) for i in expect}
    wrong = {
        f"{name} (row {i})": (want, outcome[i])
        for i, (name, want) in expect.items()
        if outcome[i] != want
    }
    assert not wrong, wrong
    assert set(quarantined) | set(dropped) <= set(expect)  # blank lines are no rows
    assert set(result.pairs["chosen"].to_pylist()) == markers
    report = result.report
    assert report["rows_in"] == len(expect)
    assert report["quarantined"] == _count(quarantined.values())
    assert report["dropped"] == _count(dropped.values())
    lines = path.read_bytes().split(b"\n")
    for row in result.quarantine.to_pylist()[:50]:
        assert row["file"] == str(path)
        assert row["raw"] == lines[row["row_index"]].decode("utf-8", "backslashreplace")


def _by_row(table: pa.Table) -> dict[int, str]:
    rows = table.select(["row_index", "reason"]).to_pylist()
    return {r["row_index"]: r["reason"] for r in rows}


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def test_helpsteer2_rows_like_helpsteer(tmp_path) -> None:
    """HelpSteer2 shares HelpSteer's adapter: the same hostile file, the same outcome."""
    path, _, markers = _build("helpsteer", tmp_path)
    first, second = normalize("helpsteer", path), normalize("helpsteer2", path)
    assert second.quarantine.drop_columns(["source"]).equals(
        first.quarantine.drop_columns(["source"])
    )
    assert set(second.pairs["chosen"].to_pylist()) == markers


def test_output_is_byte_identical(tmp_path) -> None:
    path, _, _ = _build("generic", tmp_path)
    for run in ("a", "b"):
        write_normalized(normalize("generic", path), tmp_path / run)
    for name in ("pairs.parquet", "quarantine.parquet", "dropped.parquet", "report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["dropped_file"] == "dropped.parquet"
    dropped = pq.read_table(tmp_path / "a" / "dropped.parquet")
    assert sum(report["dropped"].values()) == dropped.num_rows > 0


# ---------------------------------------------------------------------------------------
# File-level failures: an error naming the path, never a traceback


def _file_cases(tmp_path: Path) -> dict[str, tuple[Path, type[Exception], str]]:
    good = json.dumps(_generic(1)[0]).encode() + b"\n"
    files = {
        "empty.jsonl": b"",
        "blank.jsonl": b"\n  \n",
        "garbage.jsonl": bytes(range(256)) * 40,
        "all_bad.jsonl": b"not json\n[1]\n",
        "data.csv": b"prompt,chosen,rejected\n",
        "bad.parquet": b"PAR1 not really parquet",
        "truncated.parquet": b"",
        "bad.jsonl.gz": b"not gzip",
        "bad.arrow": b"not arrow",
        "array.json": b'[{"prompt": "q"},',
        "deep.json": b"[" * DEEP + b"]" * DEEP,
        "no_chosen.jsonl": b'{"prompt": "q", "better": "a", "rejected": "b"}\n',
    }
    cases = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        error = ValueError
        cases[name] = (tmp_path / name, error, name)
    table = pa.table({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]})
    pq.write_table(table, tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "ok.jsonl").write_bytes(good)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("no inputs here")
    cases["missing.jsonl"] = (tmp_path / "missing.jsonl", ValueError, "missing.jsonl")
    cases["directory_without_inputs"] = (tmp_path / "nothing", ValueError, "nothing")
    return cases


FILE_CASES = [
    "empty.jsonl",
    "blank.jsonl",
    "garbage.jsonl",
    "all_bad.jsonl",
    "data.csv",
    "bad.parquet",
    "truncated.parquet",
    "bad.jsonl.gz",
    "bad.arrow",
    "array.json",
    "deep.json",
    "no_chosen.jsonl",
    "missing.jsonl",
    "directory_without_inputs",
]


@pytest.mark.parametrize("case", FILE_CASES)
def test_file_level_failures_name_the_path(case: str, tmp_path) -> None:
    path, error, name = _file_cases(tmp_path)[case]
    with pytest.raises(error) as caught:
        normalize("generic", path)
    message = str(caught.value)
    assert str(path) in message and name in message
    assert "\n" not in message


def test_missing_column_names_the_option_and_the_columns(tmp_path) -> None:
    path = _file_cases(tmp_path)["no_chosen.jsonl"][0]
    with pytest.raises(ValueError) as caught:
        normalize("generic", path)
    message = str(caught.value)
    assert "missing column(s) for raw_generic v1: 'chosen'" in message
    assert "the file has: better, prompt, rejected" in message
    assert "-o chosen_column=<column>" in message
    assert len(normalize("generic", path, chosen_column="better").pairs) == 1


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_dotted_column_option_reads_a_struct_field(suffix: str, tmp_path) -> None:
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b", "metadata": {"score_chosen": 9.0}},
        {"prompt": "r", "chosen": "c", "rejected": "d", "metadata": {"score_chosen": 7.5}},
    ]
    path = tmp_path / f"rows.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = normalize("generic", path, score_chosen_column="metadata.score_chosen").pairs
    assert pairs["score_chosen"].to_pylist() == [9.0, 7.5]
    with pytest.raises(ValueError, match=r"'metadata\.score' \(option score_chosen_column="):
        normalize("generic", path, score_chosen_column="metadata.score")
    with pytest.raises(ValueError, match=r"'rating' \(option score_rejected_column=rating\)"):
        normalize("generic", path, score_rejected_column="rating")


def test_an_empty_file_beside_good_ones_is_a_file_with_zero_rows(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps(_generic(1)[0]) + "\n")
    (tmp_path / "b.jsonl").write_bytes(b"")
    report = normalize("generic", tmp_path).report
    assert [f["rows"] for f in report["files"]] == [1, 0]
    assert report["pairs_out"] == 1


# ---------------------------------------------------------------------------------------
# The CLI: one line on stderr, exit status 2


@pytest.mark.parametrize("case", ["garbage.jsonl", "missing.jsonl", "no_chosen.jsonl"])
def test_cli_prints_one_error_line(case: str, tmp_path, capsys) -> None:
    path = _file_cases(tmp_path)[case][0]
    status = prefpack.main(
        ["normalize", "--source", "generic", "--input", str(path), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("prefpack normalize: error: ") and err.count("\n") == 1
    assert str(path) in err and "Traceback" not in err


NORMALIZE = [sys.executable, "-m", "prefpack", "normalize", "--source", "generic"]


def test_cli_in_a_fresh_process_survives_a_deep_line(tmp_path) -> None:
    path, _, _ = _build("generic", tmp_path)
    out = subprocess.run(
        [*NORMALIZE, "--input", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert (tmp_path / "out" / "dropped.parquet").is_file()
    bad = subprocess.run(
        [*NORMALIZE, "--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("prefpack normalize: error: ") and bad.stderr.count("\n") == 1
    assert "nope.jsonl" in bad.stderr and "Traceback" not in bad.stderr
