"""The eval split of curate: whole prompts (and near-duplicate groups) on one side, by a
seeded content hash or a source's own split; the accounting, the report, the files, and
the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prefpack
from core.settings import SettingError
from data_contracts import curation_report
from pipeline import near_dup
from pipeline.curate import EVAL_PAIRS_FILE, CurateConfig, Curated, curate, write_curated
from pipeline.io import DROPPED_FILE, PAIRS_FILE
from tests.conftest import assert_one_error_line
from tests.pipeline.test_curate import _pairs, _user

# Prompts the rules leave as they are when normalizing (lower case, single spaces), so a
# prompt's text is its unit key here; each base is far from the others, and a base with a
# word added is a near-duplicate of it (character 5-gram Jaccard about 0.9).
BASES = [
    "please explain how a rainbow forms after the summer rain stops",
    "write a short poem about the old lighthouse keeper and his cat",
    "what are three good ways to store fresh basil for a long time",
    "describe the rules of chess for a child who has never played",
    "list five reasons why people enjoy hiking in the mountains",
    "how do i convert a temperature from celsius into fahrenheit",
    "give me a recipe for bread that needs no kneading at all",
    "summarize the causes of the first world war in a paragraph",
]
EXTRAS = ["", " today", " now"]
NEAR = 0.7  # groups a base with its variants, never two bases


def _table(rows: list[tuple[int, str, str]], offset: int = 0) -> pa.Table:
    """Pairs from (base, extra, split); each pair's responses are its own (no rule drops it)."""
    return _pairs(
        *(
            {
                "prompt": _user(BASES[base] + extra),
                "chosen": f"yes {i + offset}",
                "rejected": f"no {i + offset}",
                "split": split,
            }
            for i, (base, extra, split) in enumerate(rows)
        )
    )


rows_strategy = st.lists(
    st.tuples(
        st.integers(0, len(BASES) - 1), st.sampled_from(EXTRAS), st.sampled_from(["train", "test"])
    ),
    min_size=1,
    max_size=40,
)


def _texts(table: pa.Table) -> list[str]:
    return [p[0]["content"] for p in table["prompt"].to_pylist()]


def _groups(texts: list[str], config: CurateConfig) -> dict[str, int]:
    """Text -> its unit: its near-duplicate group (found as curate finds them, among every
    distinct prompt read) or itself."""
    distinct = list(dict.fromkeys(texts))
    if config.near_dup_threshold is None:
        return {t: i for i, t in enumerate(distinct)}
    found = near_dup.near_duplicates(
        pl.Series(distinct), config.near_dup_threshold, config.near_dup_ngram, config.seed
    )
    return {
        t: int(g) if g >= 0 else len(distinct) + i
        for i, (t, g) in enumerate(zip(distinct, found.group, strict=True))
    }


def _curate_or_none(table: pa.Table, config: CurateConfig) -> Curated | None:
    """The result, or None when the split would leave nothing to train on (or, for a
    source's split, finds none of it): both refused by design."""
    try:
        return curate(table, config)
    except ValueError as err:
        assert "none is left to train on" in str(err) or "none of the" in str(err)
        return None


def _assert_one_side_per_unit(table: pa.Table, result: Curated, config: CurateConfig) -> None:
    unit = _groups(_texts(table), config)
    train = {unit[t] for t in _texts(result.pairs)}
    held = {unit[t] for t in _texts(result.eval_pairs)}
    assert not train & held


def _assert_input_order(table: pa.Table, part: pa.Table) -> None:
    ids = table["pair_id"].to_pylist()
    positions = [ids.index(i) for i in part["pair_id"].to_pylist()]
    assert positions == sorted(positions)


MODES = {
    "share": {"eval_share": 0.3},
    "pairs": {"eval_pairs": 5},
    "splits": {"eval_splits": ("test",)},
}


@pytest.mark.parametrize("near", [None, NEAR], ids=["prompts", "near-dup groups"])
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=40)
@given(rows=rows_strategy)
def test_no_prompt_or_near_duplicate_group_is_on_both_sides(
    rows: list, mode: str, near: float | None
) -> None:
    table = _table(rows)
    config = CurateConfig(near_dup_threshold=near, near_dup_max_pairs=100, **MODES[mode])
    result = _curate_or_none(table, config)
    if result is None:
        return
    _assert_one_side_per_unit(table, result, config)
    report = result.report
    accounted = report["rows_out"] + report["eval_pairs"] + sum(report["dropped"].values())
    assert report["rows_in"] == table.num_rows == accounted
    assert (result.pairs.num_rows, result.eval_pairs.num_rows) == (
        report["rows_out"],
        report["eval_pairs"],
    )
    for part in (result.pairs, result.eval_pairs):
        _assert_input_order(table, part)
        assert part.schema == table.schema  # metadata included
    if mode == "splits":
        assert set(result.eval_pairs["split"].to_pylist()) == {"test"}
        assert "test" not in result.pairs["split"].to_pylist()


@settings(max_examples=40)
@given(old=rows_strategy, new=rows_strategy)
def test_adding_data_never_moves_a_prompt_across_sides(old: list, new: list) -> None:
    """eval_share: a prompt's side is a function of its own text and the seed."""
    config = CurateConfig(eval_share=0.4)
    before = _table([(b % 4, e, s) for b, e, s in old])
    grown = pa.concat_tables([before, _table([(b, e, s) for b, e, s in new], offset=1000)])
    first, second = _curate_or_none(before, config), _curate_or_none(grown, config)
    if first is None or second is None:
        return
    for side in ("pairs", "eval_pairs"):
        assert set(_texts(getattr(first, side))) <= set(_texts(getattr(second, side)))


@settings(max_examples=40)
@given(rows=rows_strategy, wanted=st.integers(1, 12))
def test_eval_pairs_takes_whole_prompts_in_hash_order_until_enough(rows: list, wanted: int) -> None:
    table = _table(rows)
    smaller = _curate_or_none(table, CurateConfig(eval_pairs=wanted))
    larger = _curate_or_none(table, CurateConfig(eval_pairs=wanted + 3))
    if smaller is None:
        return
    held = _texts(smaller.eval_pairs)
    assert len(held) >= wanted  # at least N ...
    assert len(held) - max(held.count(t) for t in held) < wanted  # ... and no unit more
    _assert_one_side_per_unit(table, smaller, CurateConfig())
    if larger is not None:  # a prefix of one order: more pairs wanted, a superset held out
        assert set(held) <= set(_texts(larger.eval_pairs))


def test_eval_share_holds_out_about_that_share_of_the_prompts() -> None:
    table = _pairs(*({"prompt": _user(f"question number {i}")} for i in range(2000)))
    report = curate(table, CurateConfig(eval_share=0.1)).report
    assert 150 <= report["eval_split"]["prompts"] <= 250  # 200 expected; sd about 13
    assert report["eval_pairs"] == report["eval_split"]["units"] == report["eval_split"]["prompts"]
    other = curate(table, CurateConfig(eval_share=0.1, seed=1))
    assert set(_texts(other.eval_pairs)) != set(
        _texts(curate(table, CurateConfig(eval_share=0.1)).eval_pairs)
    )


def test_a_source_split_is_the_eval_set_and_its_prompts_leave_training(tmp_path: Path) -> None:
    """Pairs of split `test` are held out; a training pair of the same prompt (case aside),
    or of a near-duplicate prompt, is dropped as shares_eval_prompt and findable."""
    table = _pairs(
        {"prompt": _user(BASES[0]), "split": "test"},
        {"prompt": _user(BASES[0].upper()), "chosen": "Other."},  # the same prompt
        {"prompt": _user(BASES[0] + " today"), "chosen": "Third."},  # a near-duplicate
        {"prompt": _user(BASES[1])},
        {"prompt": _user(BASES[2]), "split": "test"},
    )
    ids = table["pair_id"].to_pylist()
    result = curate(
        table, CurateConfig(eval_splits=("test",), near_dup_threshold=NEAR, near_dup_max_pairs=5)
    )
    assert result.eval_pairs["pair_id"].to_pylist() == [ids[0], ids[4]]
    assert result.pairs["pair_id"].to_pylist() == [ids[3]]
    assert result.report["dropped"]["shares_eval_prompt"] == 2
    assert list(result.report["dropped"])[-1] == "shares_eval_prompt"
    assert result.report["eval_split"] == {
        "mode": "splits", "setting": ["test"], "seed": 0, "prompts": 2, "units": 2,
    }  # fmt: skip
    out = write_curated(result, tmp_path / "curated")
    dropped = pq.read_table(out / DROPPED_FILE)
    assert dropped["pair_id"].to_pylist() == ids[1:3]
    assert dropped["reason"].to_pylist() == ["shares_eval_prompt"] * 2
    # Without the near-duplicate rule only the same prompt goes.
    plain = curate(table, CurateConfig(eval_splits=("test",)))
    assert plain.pairs["pair_id"].to_pylist() == [ids[2], ids[3]]


def test_near_duplicate_group_goes_to_one_side_whole() -> None:
    """Two prompts of one group, with eval_pairs 1: the whole group is held out (2 pairs)."""
    table = _pairs(
        *({"prompt": _user(BASES[0] + extra)} for extra in EXTRAS),
        *({"prompt": _user(b)} for b in BASES[1:]),
    )
    config = CurateConfig(near_dup_threshold=NEAR, near_dup_max_pairs=5)
    counts = []
    for seed in range(12):  # seeds where the group's hash comes first
        result = curate(table, dataclasses.replace(config, eval_pairs=1, seed=seed))
        held = _texts(result.eval_pairs)
        counts.append(len(held))
        assert held == [BASES[0] + e for e in EXTRAS] or len(held) == 1
    assert 3 in counts and 1 in counts  # the group whole, or one other prompt


def test_without_a_split_nothing_is_held_out_and_an_empty_eval_file_is_written(tmp_path) -> None:
    table = _table([(0, "", "train"), (1, "", "test")])
    result = curate(table, CurateConfig())
    assert result.eval_pairs.num_rows == 0 and result.eval_pairs.schema == table.schema
    report = result.report
    assert report["eval_split"] is None and report["eval_pairs"] == 0
    assert report["eval_file"] == EVAL_PAIRS_FILE
    out = write_curated(result, tmp_path / "curated")
    assert pq.read_table(out / EVAL_PAIRS_FILE).num_rows == 0


def test_same_bytes_twice_and_the_report_counts_the_split(tmp_path: Path) -> None:
    table = _table([(b % 8, EXTRAS[b % 3], "train") for b in range(30)])
    config = CurateConfig(eval_share=0.3, near_dup_threshold=NEAR)
    first = write_curated(curate(table, config), tmp_path / "a")
    second = write_curated(curate(table, config), tmp_path / "b")
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted([PAIRS_FILE, EVAL_PAIRS_FILE, DROPPED_FILE, "report.json"])
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    report = json.loads((first / "report.json").read_text())
    assert report["version"] == curation_report.VERSION == "3"
    assert report["eval_pairs"] == pq.read_metadata(first / EVAL_PAIRS_FILE).num_rows > 0
    assert report["config"]["eval_share"] == 0.3
    per_source = report["sources"]["t"]
    assert per_source == {
        "rows_in": 30, "rows_out": report["rows_out"], "eval_pairs": report["eval_pairs"],
    }  # fmt: skip
    split = report["eval_split"]
    assert split["mode"] == "share" and split["setting"] == 0.3
    assert split["units"] <= split["prompts"] <= report["eval_pairs"]


@pytest.mark.parametrize(
    ("settings_", "named"),
    [
        ({"eval_share": 0.1, "eval_pairs": 5}, "--eval-share and --eval-pairs"),
        ({"eval_pairs": 5, "eval_splits": ("test",)}, "--eval-pairs and --eval-splits"),
        ({"eval_share": 1.0}, "--eval-share must be > 0 and < 1"),
        ({"eval_pairs": 0}, "--eval-pairs must be >= 1"),
    ],
)
def test_impossible_settings_name_their_flags(settings_: dict, named: str) -> None:
    with pytest.raises(SettingError, match=named):
        CurateConfig(**settings_)


def test_a_split_that_leaves_nothing_to_train_on_or_holds_nothing_is_refused() -> None:
    table = _table([(0, "", "train"), (1, "", "train")])
    with pytest.raises(ValueError, match=r"--eval-pairs\) holds all 2 pairs .* none is left"):
        curate(table, CurateConfig(eval_pairs=2))
    with pytest.raises(ValueError, match=r"--eval-splits test: none of the 2 pairs .*: train\)"):
        curate(table, CurateConfig(eval_splits=("test",)))


# -----------------------------------------------------------------------------
# The CLI


def _write(table: pa.Table, path: Path) -> Path:
    pq.write_table(table, path)
    return path


def test_curate_cli_prints_the_eval_count_and_writes_the_eval_file(tmp_path, capsys) -> None:
    pairs = _write(
        _table([(b % 8, EXTRAS[b % 3], "train") for b in range(40)]), tmp_path / "p.parquet"
    )
    argv = ["curate", "--pairs", str(pairs), "--out", str(tmp_path / "cur"), "--eval-pairs", "4"]
    assert prefpack.main(argv) == 0
    report = json.loads((tmp_path / "cur" / "report.json").read_text())
    held = report["eval_pairs"]
    assert held >= 4
    out = capsys.readouterr().out
    assert f"{report['rows_out']} out, {held} eval (pairs 4) -> " in out


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--eval-share", "0.1", "--eval-splits", "test"], "--eval-share and --eval-splits"),
        (["--eval-share", "2"], "--eval-share must be > 0 and < 1, got 2.0"),
        (["--eval-splits", "test_prefs"], "--eval-splits test_prefs: none of the"),
    ],
)
def test_curate_cli_eval_errors_are_one_line(tmp_path, cli, flags: list, named: str) -> None:
    pairs = _write(_table([(0, "", "train"), (1, "", "train")]), tmp_path / "p.parquet")
    status, err = cli(["curate", "--pairs", str(pairs), "--out", str(tmp_path / "cur"), *flags])
    assert_one_error_line(status, err, "curate", named)
    assert not (tmp_path / "cur").exists()
