"""Curate batch by batch: a pair's fate never depends on the batch size, also for the rules
that look across pairs (exact dedup, near-duplicates, per-prompt cap, chosen-longer share,
the eval split, the --max-pairs sample) when the pairs they compare sit in other batches;
pairs files streamed by `curate_to` give the bytes of the in-memory run; a batch holds at
most `batch_rows` pairs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.curate import (
    CurateConfig,
    Curated,
    Pairs,
    _near_duplicate_cap,
    _near_duplicate_keep,
    _prompt_cap,
    _prompt_cap_keep,
    _rank_within,
    _SeenKeys,
    _slim_columns,
    curate,
    curate_to,
    read_pairs,
    write_curated,
)
from tests.pipeline.test_curate import _pairs, _user
from tests.pipeline.test_curate_eval_split import BASES

FEW = 7  # pairs per batch: the fixture's 160 pairs span 23 batches
# Each row of the fixture: a prompt among 8 bases, as it is, with a word added (a
# near-duplicate) or reworded in case and spaces (the same prompt to the rules).
VARIANTS = ["{}", "{} today", "  {}  ", "{} now"]


@pytest.fixture(scope="module")
def table() -> pa.Table:
    """160 pairs of two sources on other scales, whose rules compare pairs far apart:
    every prompt recurs across the batches (caps, groups, eval units), every 9th pair
    repeats an earlier one in other case and spacing (dedup), chosen is longer for about
    two thirds (the share rule), a tenth are ties, one split is `test`, and attribute
    scores vary."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(160):
        if i % 9 == 8:  # an earlier pair again, as dedup normalizes it
            again = dict(rows[int(rng.integers(0, i - 5))])
            again["chosen"] = again["chosen"].upper() + "  "
            rows.append(again)
            continue
        base = BASES[int(rng.integers(0, len(BASES)))]
        prompt = VARIANTS[int(rng.integers(0, len(VARIANTS)))].format(base)
        source = "a" if rng.random() < 0.6 else "b"
        margin = 0.0 if rng.random() < 0.1 else float(rng.integers(1, 10 if source == "a" else 4))
        words = int(rng.integers(2, 12))
        chosen, rejected = " ".join(["yes"] * words), " ".join(["no"] * int(rng.integers(2, 10)))
        attributes = {"helpfulness": float(rng.integers(0, 5)), "verbosity": 2.0}
        rows.append(
            {
                "source": source,
                "split": "test" if rng.random() < 0.15 else "train",
                "prompt": _user(prompt),
                "chosen": f"{chosen} {i}",
                "rejected": f"{rejected} {i}",
                "margin": margin,
                "chosen_attributes": attributes,
                "rejected_attributes": {"helpfulness": float(rng.integers(0, 5))},
            }
        )
    return _pairs(*rows, metadata={"a": "0-10", "b": "0-3"})


EVAL_PROMPTS = [BASES[3]]  # contaminates one base, whole
CONFIGS = {
    "defaults": (CurateConfig(), []),
    "near-duplicates and caps": (
        CurateConfig(near_dup_threshold=0.7, near_dup_max_pairs=3, max_pairs_per_prompt=2),
        ["duplicate", "near_duplicate", "over_prompt_cap"],
    ),
    "chosen-longer share": (
        CurateConfig(max_chosen_longer_share=0.4, seed=3),
        ["over_chosen_longer_share"],
    ),
    "eval share over groups": (
        CurateConfig(eval_share=0.3, near_dup_threshold=0.7, near_dup_max_pairs=12),
        ["near_duplicate"],
    ),
    "eval pairs": (CurateConfig(eval_pairs=25, max_pairs_per_prompt=6), ["over_prompt_cap"]),
    "eval splits": (
        CurateConfig(eval_splits=("test",), max_pairs_per_prompt=3),
        ["over_prompt_cap", "shares_eval_prompt"],
    ),
    "sample, then all of them": (
        CurateConfig(
            max_pairs=90,
            near_dup_threshold=0.7,
            near_dup_max_pairs=12,
            max_pairs_per_prompt=4,
            max_chosen_longer_share=0.5,
            eval_share=0.25,
        ),
        ["over_max_pairs", "near_duplicate", "over_prompt_cap", "over_chosen_longer_share"],
    ),
}


def _same(a: Curated, b: Curated) -> None:
    assert a.pairs.equals(b.pairs, check_metadata=True)
    assert a.eval_pairs.equals(b.eval_pairs, check_metadata=True)
    assert a.dropped.equals(b.dropped, check_metadata=True)
    assert a.report == b.report


@pytest.mark.parametrize("name", CONFIGS)
def test_small_batches_give_the_pairs_and_counts_of_one_batch(table: pa.Table, name: str) -> None:
    config, crossing = CONFIGS[name]
    whole = curate(table, config, EVAL_PROMPTS, batch_rows=table.num_rows)
    _same(curate(table, config, EVAL_PROMPTS, batch_rows=FEW), whole)
    report = whole.report
    assert all(report["dropped"][rule] > 0 for rule in crossing), report["dropped"]
    assert report["dropped"]["contaminated"] > 0
    if config.eval_field is not None:
        assert 0 < report["eval_pairs"] < report["rows_in"]
    assert report["rows_in"] == report["rows_out"] + report["eval_pairs"] + sum(
        report["dropped"].values()
    )


@pytest.mark.parametrize("name", ["near-duplicates and caps", "sample, then all of them"])
def test_pairs_files_streamed_give_the_bytes_of_the_run_in_memory(
    table: pa.Table, name: str, tmp_path: Path
) -> None:
    """Two files, read batch by batch (the first ends inside a batch), against the same
    pairs read whole and curated in memory; the report also names the preset (none)."""
    config, _ = CONFIGS[name]
    files = [tmp_path / "one.parquet", tmp_path / "two.parquet"]
    pq.write_table(table.slice(0, 61), files[0])
    pq.write_table(table.slice(61), files[1])
    streamed = tmp_path / "streamed"
    report = curate_to(streamed, Pairs.open(files), config, EVAL_PROMPTS, batch_rows=FEW)
    whole = write_curated(curate(read_pairs(files), config, EVAL_PROMPTS), tmp_path / "whole")
    for output in ("pairs.parquet", "eval_pairs.parquet", "dropped.parquet"):
        assert (streamed / output).read_bytes() == (whole / output).read_bytes(), output
    written = json.loads((streamed / "report.json").read_text())
    assert written == report and written.pop("preset") is None
    assert written == json.loads((whole / "report.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one.parquet",
        "streamed",
        "two.parquet",
        "whole",
    ]


def test_batch_rows_bounds_the_pairs_read_at_once(
    table: pa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pass (the rules, the prompts for near-duplicates and the eval split, the
    writing) reads every pair once, in batches of at most `batch_rows`."""
    sizes: list[int] = []
    batches = Pairs.batches

    def counted(self: Pairs, columns: list[str] | None, size: int):
        for offset, batch in batches(self, columns, size):
            sizes.append(batch.num_rows)
            yield offset, batch

    monkeypatch.setattr(Pairs, "batches", counted)
    config, _ = CONFIGS["eval share over groups"]
    curate(table, config, batch_rows=FEW)
    assert max(sizes) <= FEW
    assert sum(sizes) == 3 * table.num_rows


def test_what_is_kept_of_a_pair_across_batches_is_what_the_rules_on_need() -> None:
    """The slim row of a pair that passes the per-pair rules: nothing by default (the length
    bias keeps 12 bytes of every pair), else its position and source and what each rule
    that compares pairs needs."""
    assert _slim_columns(CurateConfig()) == []
    assert _slim_columns(CurateConfig(max_pairs_per_prompt=2)) == [
        "__position",
        "source",
        "margin",
        "__prompt_id",
    ]
    everything = CurateConfig(
        max_pairs=5,
        near_dup_threshold=0.8,
        max_chosen_longer_share=0.5,
        eval_splits=("test",),
    )
    assert set(_slim_columns(everything)) == {
        "__position",
        "source",
        "__sample_key",
        "margin",
        "__prompt_id",
        "__random",
        "__chosen_longer",
        "split",
    }


@settings(max_examples=60)
@given(
    rows=st.lists(
        st.tuples(st.one_of(st.none(), st.integers(0, 5)), st.sampled_from([0.5, 1.0, 2.0])),
        max_size=40,
    ),
    seed=st.integers(0, 9),
)
def test_rank_within_a_group_is_the_window_it_replaces(rows: list, seed: int) -> None:
    """Groups with nulls, keys that tie but for the position, rows in any order."""
    positions = np.random.default_rng(seed).permutation(len(rows))
    frame = pl.DataFrame(
        {
            "g": [g for g, _ in rows],
            "k": [k for _, k in rows],
            "__position": positions,
        },
        schema={"g": pl.UInt32, "k": pl.Float64, "__position": pl.Int64},
    )
    keys = [pl.col("k").neg(), pl.col("__position")]
    window = pl.int_range(pl.len()).over("g", order_by=keys)
    assert frame.select(_rank_within("g", *keys).cast(pl.Int64)).to_series().to_list() == (
        frame.select(window.cast(pl.Int64)).to_series().to_list()
    )


@settings(max_examples=60)
@given(
    rows=st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(0, 4)),
            st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5])),
            st.sampled_from(["a", "b"]),
        ),
        max_size=40,
    ),
    cap=st.integers(1, 3),
    seed=st.integers(0, 9),
)
def test_keeps_that_rank_only_crowded_pairs_are_the_rules_expressions(
    rows: list, cap: int, seed: int
) -> None:
    """Pairs without a group, margins missing or tied, two sources: the masks that sort only
    the grouped pairs (near-duplicates) or those of prompts over the cap are the rules'
    expressions over all of them."""
    positions = np.sort(np.random.default_rng(seed).choice(1000, len(rows), replace=False))
    frame = pl.DataFrame(
        {
            "__near_dup_group": [g for g, _, _ in rows],
            "margin": [m for _, m, _ in rows],
            "source": [s for _, _, s in rows],
            "__position": positions,
        },
        schema={
            "__near_dup_group": pl.UInt32,
            "margin": pl.Float64,
            "source": pl.Categorical,
            "__position": pl.UInt32,
        },
    )
    rule = _near_duplicate_cap(CurateConfig(near_dup_threshold=0.8, near_dup_max_pairs=cap))
    assert rule is not None
    expected = frame.select(rule.fill_null(True)).to_series().to_list()
    assert _near_duplicate_keep(frame, cap).to_list() == expected
    # The per-prompt cap, the groups taken as prompts (no prompt without one).
    prompts = frame.with_columns(pl.col("__near_dup_group").fill_null(9).cast(pl.UInt64))
    prompts = prompts.rename({"__near_dup_group": "__prompt_id"})
    rule = _prompt_cap(CurateConfig(max_pairs_per_prompt=cap))
    assert rule is not None
    expected = prompts.select(rule.fill_null(True)).to_series().to_list()
    assert _prompt_cap_keep(prompts, cap).to_list() == expected


def test_seen_keys_across_batches_match_a_set() -> None:
    rng = np.random.default_rng(0)
    seen, reference = _SeenKeys(), set()
    assert seen.first_seen(np.array([5, 3, 5, 9], np.uint64)).tolist() == [1, 1, 0, 1]
    reference |= {5, 3, 9}
    for size in rng.integers(0, 40, 60):
        keys = rng.integers(0, 300, size).astype(np.uint64)
        fresh = seen.first_seen(keys)
        expected = []
        for key in keys.tolist():
            expected.append(key not in reference)
            reference.add(key)
        assert fresh.tolist() == expected


def test_no_pairs_at_all(table: pa.Table) -> None:
    config = dataclasses.replace(CONFIGS["near-duplicates and caps"][0], eval_share=0.5)
    result = curate(table.slice(0, 0), config, batch_rows=FEW)
    assert result.report["rows_in"] == result.pairs.num_rows == result.dropped.num_rows == 0
