"""Curation rules, the funnel, contamination and attribute agreement on hand-made pairs."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import curation_report, preference_pair
from pipeline.curate import (
    RULES,
    CurateConfig,
    contaminated,
    curate,
    load_eval_prompts,
    read_pairs,
    write_curated,
)
from pipeline.normalize import normalize, write_normalized
from pipeline.sample_data import sample_path

BASE = {
    "source": "t",
    "split": "train",
    "prompt": [{"role": "user", "content": "What is the capital of France?"}],
    "chosen": "Paris.",
    "rejected": "Lyon.",
    "score_chosen": 8.0,
    "score_rejected": 4.0,
    "margin": 4.0,
    "domain": "general",
    "language": "english",
    "chosen_attributes": None,
    "rejected_attributes": None,
    "rationale": None,
}
NO_RULES = CurateConfig(
    drop_empty=False,
    drop_identical=False,
    drop_ties=False,
    dedup=False,
    max_prompt_chars=None,
    max_response_chars=None,
)


def _pairs(*changes: dict, metadata: dict | None = None) -> pa.Table:
    rows = []
    for i, change in enumerate(changes):
        row = BASE | {"prompt": [{"role": "user", "content": f"Question {i}?"}]} | change
        row["pair_id"] = preference_pair.make_pair_id(
            row["source"], row["prompt"], row["chosen"], row["rejected"]
        )
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=preference_pair.SCHEMA)
    scale = {b"score_scale": json.dumps(metadata or {"t": "0-10"})}
    return table.replace_schema_metadata({**preference_pair.SCHEMA.metadata, **scale})


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    ("rule", "change", "config"),
    [
        ("empty_response", {"rejected": " \n\t"}, {"drop_empty": True}),
        ("identical_responses", {"rejected": "  PARIS. "}, {"drop_identical": True}),
        ("tie", {"margin": 0.0, "score_rejected": 8.0}, {"drop_ties": True}),
        ("language_not_included", {"language": "French"}, {"languages": ("english",)}),
        ("language_excluded", {"language": "French"}, {"exclude_languages": ("french",)}),
        ("domain_not_included", {"domain": "code"}, {"domains": ("general",)}),
        ("domain_excluded", {"domain": "code"}, {"exclude_domains": ("code",)}),
        ("prompt_too_long", {"prompt": _user("x" * 50)}, {"max_prompt_chars": 49}),
        ("response_too_short", {"rejected": "No"}, {"min_response_chars": 3}),
        ("response_too_long", {"chosen": "y" * 21}, {"max_response_chars": 20}),
        ("length_ratio_above_max", {"chosen": "y" * 11}, {"max_length_ratio": 2.0}),
        ("margin_below_min", {"margin": 0.5}, {"min_margin": 1.0}),
        ("margin_above_max", {"margin": 9.0}, {"max_margin": 5.0}),
        ("score_below_min", {"score_chosen": 3.0}, {"min_chosen_score": 5.0}),
        ("near_duplicate", {"prompt": _user("Question 0!")}, {"near_dup_threshold": 0.5}),
    ],
)
def test_each_rule_drops_what_it_names(rule: str, change: dict, config: dict) -> None:
    table = _pairs({}, change)
    result = curate(table, dataclasses.replace(NO_RULES, **config))
    assert result.report["dropped"] == {rule: 1}
    assert result.pairs["pair_id"].to_pylist() == [table["pair_id"][0].as_py()]
    # The same rule switched off keeps both.
    assert curate(table, NO_RULES).pairs.num_rows == 2


def test_defaults_drop_empty_identical_ties_and_duplicates_first_rule_wins() -> None:
    table = _pairs(
        {},
        {"chosen": "", "margin": 0.0},  # empty and a tie: counted once, as empty
        {"chosen": "Lyon."},  # identical to rejected
        {"margin": 0.0},
        {"prompt": _user("Question 0?"), "chosen": "paris.", "rejected": "LYON."},  # dup of 0
    )
    report = curate(table, CurateConfig()).report
    assert {k: v for k, v in report["dropped"].items() if v} == {
        "empty_response": 1,
        "identical_responses": 1,
        "tie": 1,
        "duplicate": 1,
    }
    assert report["rows_in"] == 5 and report["rows_out"] == 1
    assert report["rows_in"] == report["rows_out"] + sum(report["dropped"].values())


def test_every_dropped_pair_is_written_with_its_rule(tmp_path) -> None:
    table = _pairs(
        {},
        {"chosen": "", "margin": 0.0},
        {"chosen": "Lyon."},
        {"margin": 0.0},
        {"prompt": _user("Question 0?"), "chosen": "paris.", "rejected": "LYON."},
    )
    out = write_curated(curate(table, CurateConfig()), tmp_path / "curated")
    dropped = pq.read_table(out / "dropped.parquet")
    assert dropped["position"].to_pylist() == [1, 2, 3, 4]
    assert dropped["reason"].to_pylist() == [
        "empty_response",
        "identical_responses",
        "tie",
        "duplicate",
    ]
    assert dropped["pair_id"].to_pylist() == table["pair_id"].take([1, 2, 3, 4]).to_pylist()
    kept = pq.read_table(out / "pairs.parquet")["pair_id"].to_pylist()
    assert sorted(kept + dropped["pair_id"].to_pylist()) == sorted(table["pair_id"].to_pylist())
    report = json.loads((out / "report.json").read_text())
    assert report["dropped_file"] == "dropped.parquet"


def test_rules_do_not_apply_to_null_columns() -> None:
    table = _pairs({"margin": None, "score_chosen": None, "language": None, "domain": None})
    config = dataclasses.replace(
        NO_RULES, min_margin=1.0, min_chosen_score=5.0, languages=("x",), domains=("y",)
    )
    assert curate(table, config).pairs.num_rows == 1


def test_prompt_cap_keeps_the_largest_margins() -> None:
    same = _user("Shared prompt?")
    table = _pairs(
        {"prompt": same, "chosen": "a", "margin": 1.0},
        {"prompt": same, "chosen": "b", "margin": 3.0},
        {"prompt": same, "chosen": "c", "margin": None},
        {"prompt": same, "chosen": "d", "margin": 3.0},
        {"chosen": "other prompt", "margin": 0.5},
    )
    result = curate(table, dataclasses.replace(NO_RULES, max_pairs_per_prompt=2))
    assert result.pairs["chosen"].to_pylist() == ["b", "d", "other prompt"]  # input order kept
    assert result.report["dropped"] == {"over_prompt_cap": 2}


def test_contamination_by_ngram_and_by_short_prompt() -> None:
    sentence = "the quick brown fox jumps over the lazy dog near the quiet river bank today"
    words = sentence.split()
    evals = [" ".join(words[:13]), "Capital of Spain?"]
    prompts = [
        "Tell me: " + " ".join(words[:13]).upper() + " please",  # shares a 13-gram
        " ".join(words[1:13]) + " and more",  # shares only 12 words in a row
        "capital of   SPAIN?",  # equals a short eval prompt after normalization
        "What is the capital of Spain and France?",  # contains it, but is not equal
    ]
    normalized = pl.Series([" ".join(p.lower().split()) for p in prompts])
    hit = contaminated(normalized, evals, n=13)
    assert hit.tolist() == [True, False, True, False]
    table = _pairs(*({"prompt": _user(p)} for p in prompts))
    result = curate(table, NO_RULES, eval_prompts=evals)
    assert result.report["dropped"] == {"contaminated": 2}
    assert result.report["eval_prompts"] == 2
    assert "contaminated" not in curate(table, NO_RULES).report["dropped"]


def test_attribute_agreement_counts() -> None:
    """helpfulness: 4>1 agree, 2<3 conflict; verbosity: 1=1 tie, 2>0 agree."""
    table = _pairs(
        {
            "chosen_attributes": [("helpfulness", 4.0), ("verbosity", 1.0)],
            "rejected_attributes": [("helpfulness", 1.0), ("verbosity", 1.0)],
        },
        {
            "chosen_attributes": [("helpfulness", 2.0), ("verbosity", 2.0)],
            "rejected_attributes": [("helpfulness", 3.0), ("verbosity", 0.0)],
        },
    )
    agreement = curate(table, NO_RULES).report["attribute_agreement"]
    assert agreement == {
        "t": {
            "helpfulness": {"pairs": 2, "agree": 1, "conflict": 1, "tie": 0, "agree_rate": 0.5},
            "verbosity": {"pairs": 2, "agree": 1, "conflict": 0, "tie": 1, "agree_rate": 0.5},
        }
    }


def test_output_keeps_schema_and_metadata_and_writes_atomically(tmp_path) -> None:
    table = _pairs({}, {"margin": 0.0})
    result = curate(table, CurateConfig())
    assert result.pairs.schema.equals(table.schema, check_metadata=True)
    write_curated(result, tmp_path / "a")
    write_curated(curate(table, CurateConfig()), tmp_path / "b")
    for name in ("pairs.parquet", "dropped.parquet", "report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_invalid_pairs_are_refused() -> None:
    table = _pairs({"prompt": []})
    with pytest.raises(ValueError, match="empty_prompt: 1 row"):
        curate(table, CurateConfig())


def test_read_pairs_merges_sources(tmp_path) -> None:
    for source in ("helpsteer3", "ultrafeedback"):
        write_normalized(normalize(source, sample_path(source)), tmp_path / source)
    table = read_pairs([tmp_path / "helpsteer3", tmp_path / "ultrafeedback" / "pairs.parquet"])
    scale = json.loads(table.schema.metadata[b"score_scale"])
    assert sorted(scale) == ["helpsteer3", "ultrafeedback"]
    report = curate(table, CurateConfig()).report
    assert sorted(report["sources"]) == ["helpsteer3", "ultrafeedback"]
    assert "ultrafeedback" in report["attribute_agreement"]
    with pytest.raises(FileNotFoundError, match="no such pairs file"):
        read_pairs([tmp_path / "nothing"])


def test_every_config_field_is_documented_and_every_rule_named() -> None:
    for f in dataclasses.fields(CurateConfig):
        assert f.metadata["help"], f.name
    assert tuple(RULES) == curation_report.REASONS  # the contract's vocabulary, in order


LONG = "Explain how photosynthesis works in plants, step by step, for a ten year old child."


def sample_key(pair_id: str, seed: int = 0) -> int:
    """A pair's key in the --max-pairs sample (the smallest are kept): blake2b of the seed
    and the pair id."""
    digest = hashlib.blake2b(f"{seed}\0{pair_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def test_funnel_shows_every_rule_in_order_with_counts() -> None:
    """Every rule on, one pair made for each: each is counted once, under its own name,
    and the report lists them in the order they ran; two pairs are left, and one held out.
    (`shares_eval_prompt` runs but cannot drop beside a prompt cap of 1: a prompt keeps one
    pair; test_curate_eval_split.py makes it drop.)"""
    rows = (
        {"prompt": _user(LONG), "margin": 4.0},  # kept
        {"rejected": " "},
        {"rejected": "PARIS."},
        {"margin": 0.0},
        {"prompt": _user(LONG)},  # the same pair as the first
        {"language": "german"},
        {"language": "french"},
        {"domain": "math"},
        {"domain": "code"},
        {"prompt": _user("x" * 101)},
        {"rejected": "No"},
        {"chosen": "y" * 21},
        {"chosen": "y" * 11},
        {"margin": 0.5},
        {"margin": 9.0},
        {"score_chosen": 3.0},
        {"prompt": _user("Who wrote  HAMLET?")},
        {"prompt": _user("Capital of Spain?")},
        {"prompt": _user(LONG.replace(".", "!")), "margin": 3.0},  # near the first
        {"prompt": _user("Name three colors."), "chosen": "Red.", "rejected": "Purple."},
        {"prompt": _user("Name three colors."), "chosen": "Blue.", "margin": 2.0},
        {"prompt": _user("Summarize Hamlet.")},  # chosen longer, like the first
        # held out: a source of its own, chosen as long as rejected (no length rule moves)
        {"prompt": _user("Name a prime."), "chosen": "Nine.", "source": "u", "split": "test"},
    )
    # The pairs that pass every per-pair rule; one more, of a larger sample key than
    # theirs, is the one a sample of their number leaves out.
    passing = _pairs(*rows).take([0, 18, 19, 20, 21, 22])["pair_id"].to_pylist()
    largest = max(map(sample_key, passing))
    extra = next(
        row
        for row in ({"prompt": _user(f"Left out of the sample {k}?")} for k in range(64))
        if sample_key(_pairs(*rows, row)["pair_id"][-1].as_py()) > largest
    )
    table = _pairs(*rows, extra)
    config = CurateConfig(
        languages=("english", "french"),
        exclude_languages=("french",),
        domains=("general", "code"),
        exclude_domains=("code",),
        max_prompt_chars=100,
        min_response_chars=3,
        max_response_chars=20,
        max_length_ratio=2.0,
        min_margin=1.0,
        max_margin=5.0,
        min_chosen_score=5.0,
        max_pairs=len(passing),
        near_dup_threshold=0.9,
        max_pairs_per_prompt=1,
        max_chosen_longer_share=0.5,  # 1 chosen shorter kept: 1 of 2 chosen longer goes
        eval_splits=("test",),
    )
    report = curate(
        table, config, eval_prompts=["Capital of Spain?"], benchmark_prompts=["who wrote hamlet?"]
    ).report
    assert report["dropped"] == {
        **dict.fromkeys(curation_report.REASONS, 1),
        "shares_eval_prompt": 0,
    }
    assert list(report["dropped"]) == list(RULES)
    assert report["rows_out"] == 2 and report["eval_pairs"] == 1


def test_eval_prompts_from_text_and_jsonl(tmp_path) -> None:
    (tmp_path / "e.txt").write_text("one\n\ntwo\n")
    (tmp_path / "e.jsonl").write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    assert load_eval_prompts(tmp_path / "e.txt") == load_eval_prompts(tmp_path / "e.jsonl")
    (tmp_path / "q.jsonl").write_text('{"question": "one", "category": "x"}\n{"question": "two"}\n')
    assert load_eval_prompts(tmp_path / "q.jsonl") == ["one", "two"]  # TruthfulQA's column
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: prompts need a 'prompt' or 'question'"):
        load_eval_prompts(tmp_path / "bad.jsonl")
