"""--max-pairs: a seeded sample of at most N of the pairs that pass the per-pair rules, by
content hash (not by input order), counted in the funnel as `over_max_pairs`, before the
rules that compare pairs; deterministic to the byte; its flag errors are one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefpack
from data_contracts import curation_report
from pipeline.curate import CurateConfig, Pairs, curate, curate_to
from tests.conftest import assert_one_error_line
from tests.pipeline.test_curate import NO_RULES, _pairs, _user, sample_key

N = 10


@pytest.fixture(scope="module")
def table() -> pa.Table:
    """40 distinct pairs, then 5 ties and 5 repeats of earlier pairs (dropped before the
    sample, by the default rules)."""
    rows = [{"prompt": _user(f"Question number {i}?"), "chosen": f"Yes {i}."} for i in range(40)]
    rows += [{"margin": 0.0, "chosen": f"Tie {i}."} for i in range(5)]
    rows += [rows[i] for i in range(5)]
    return _pairs(*rows)


def _kept(table: pa.Table, config: CurateConfig) -> set[str]:
    return set(curate(table, config).pairs["pair_id"].to_pylist())


def test_the_sample_is_the_pairs_of_smallest_content_hash(table: pa.Table) -> None:
    report = curate(table, CurateConfig(max_pairs=N)).report
    passing = table.slice(0, 40)["pair_id"].to_pylist()
    assert _kept(table, CurateConfig(max_pairs=N)) == set(sorted(passing, key=sample_key)[:N])
    assert report["dropped"]["over_max_pairs"] == 40 - N
    assert {k: v for k, v in report["dropped"].items() if v} == {
        "tie": 5,
        "duplicate": 5,
        "over_max_pairs": 40 - N,
    }
    assert list(report["dropped"]) == [r for r in curation_report.REASONS if r in report["dropped"]]
    assert report["rows_out"] == N
    assert report["rows_in"] == report["rows_out"] + report["eval_pairs"] + sum(
        report["dropped"].values()
    )


def test_the_sample_does_not_depend_on_the_input_order(table: pa.Table) -> None:
    config = dataclasses.replace(NO_RULES, max_pairs=N)
    distinct = table.slice(0, 40)
    reversed_ = distinct.take(pa.array(range(39, -1, -1)))
    assert _kept(distinct, config) == _kept(reversed_, config)
    assert _kept(distinct, config) != _kept(distinct, dataclasses.replace(config, seed=1))


def test_a_sample_larger_than_the_pairs_drops_none(table: pa.Table) -> None:
    report = curate(table, CurateConfig(max_pairs=1000)).report
    assert report["dropped"]["over_max_pairs"] == 0 and report["rows_out"] == 40
    assert "over_max_pairs" not in curate(table, CurateConfig()).report["dropped"]


def test_rules_that_compare_pairs_see_only_the_sample(table: pa.Table) -> None:
    config = CurateConfig(max_pairs=N, near_dup_threshold=0.8, eval_share=0.3)
    report = curate(table, config).report
    assert report["near_duplicates"]["prompts"] == N
    assert report["rows_out"] + report["eval_pairs"] + report["dropped"]["near_duplicate"] == N
    assert report["eval_pairs"] > 0


def test_same_bytes_twice_and_as_in_memory(table: pa.Table, tmp_path: Path) -> None:
    pq.write_table(table, tmp_path / "pairs.parquet")
    config = CurateConfig(max_pairs=N, eval_pairs=3)
    for run in ("a", "b"):
        curate_to(tmp_path / run, Pairs.open([tmp_path]), config, batch_rows=4)
    for name in ("pairs.parquet", "eval_pairs.parquet", "dropped.parquet", "report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    in_memory = curate(table, config)
    assert pq.read_table(tmp_path / "a" / "pairs.parquet").equals(in_memory.pairs)
    dropped = pq.read_table(tmp_path / "a" / "dropped.parquet")
    assert dropped["reason"].to_pylist().count("over_max_pairs") == 40 - N


def test_cli_flag_samples_and_its_errors_are_one_line(table: pa.Table, tmp_path, cli) -> None:
    pq.write_table(table, tmp_path / "pairs.parquet")
    argv = ["curate", "--pairs", str(tmp_path), "--out", str(tmp_path / "cur")]
    assert prefpack.main([*argv, "--max-pairs", str(N)]) == 0
    report = json.loads((tmp_path / "cur" / "report.json").read_text())
    assert report["config"]["max_pairs"] == N and report["rows_out"] == N
    for value, named in (("0", "--max-pairs must be >= 1, got 0"), ("many", "--max-pairs")):
        status, err = cli([*argv[:-1], str(tmp_path / "bad"), "--max-pairs", value])
        assert_one_error_line(status, err, "curate", named)
        assert not (tmp_path / "bad").exists()
