"""normalize: accounting for every source, stable ids, atomic and byte-identical output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_contracts import preference_pair, quarantine
from pipeline import io as pipeline_io
from pipeline.normalize import normalize, write_normalized
from pipeline.sample_data import sample_path
from pipeline.sources import SOURCES
from tests.conftest import FIXTURES

FIXTURE_FILES = {
    "helpsteer": "helpsteer.jsonl",
    "helpsteer2": "helpsteer2.jsonl",
    "helpsteer2_preference": "helpsteer2_preference.jsonl",
    "helpsteer3": "helpsteer3.jsonl",
    "ultrafeedback": "ultrafeedback_list.jsonl",
    "ultrafeedback_binarized": "ultrafeedback_binarized.jsonl",
    "generic": "generic.jsonl",
}
CASES = [(s, FIXTURES / f) for s, f in FIXTURE_FILES.items()] + [
    (s, sample_path(s)) for s in SOURCES
]


def _records_in(path: Path) -> int:
    """Rows in, counted independently of the pipeline: non-blank lines or table rows."""
    if path.suffix == ".parquet":
        return pq.read_metadata(path).num_rows
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return sum(1 for line in data.split(b"\n") if line.strip())


@pytest.mark.parametrize(("source", "path"), CASES, ids=[f"{s}-{p.parent.name}" for s, p in CASES])
def test_every_row_is_accounted_for(source: str, path: Path) -> None:
    result = normalize(source, path)
    report = result.report
    assert report["rows_in"] == _records_in(path)
    assert report["pairs_out"] == result.pairs.num_rows > 0
    assert sum(report["quarantined"].values()) == result.quarantine.num_rows
    assert report["rows_paired"] == report["pairs_out"] * SOURCES[source].rows_per_pair
    assert report["rows_in"] == (
        report["rows_paired"]
        + sum(report["quarantined"].values())
        + sum(report["dropped"].values())
    )
    preference_pair.CONTRACT.validate(result.pairs)
    quarantine.CONTRACT.validate(result.quarantine)
    # Ties never become pairs with chosen == rejected.
    assert all(
        c != r
        for c, r in zip(
            result.pairs["chosen"].to_pylist(), result.pairs["rejected"].to_pylist(), strict=True
        )
    )


@pytest.mark.parametrize("source", list(SOURCES))
def test_pair_ids_and_scale_metadata(source: str) -> None:
    pairs = normalize(source, sample_path(source)).pairs
    for row in pairs.to_pylist()[:20]:
        expected = preference_pair.make_pair_id(
            source, row["prompt"], row["chosen"], row["rejected"]
        )
        assert row["pair_id"] == expected
    scale = json.loads(pairs.schema.metadata[b"score_scale"])
    assert list(scale) == [source] and scale[source]
    assert pairs.schema.metadata[b"contract"] == b"preference_pair"


def test_quarantine_keeps_the_raw_line() -> None:
    q = normalize("helpsteer", FIXTURES / "helpsteer.jsonl").quarantine.to_pylist()
    lines = (FIXTURES / "helpsteer.jsonl").read_text().splitlines()
    assert [row["raw"] for row in q] == [lines[row["row_index"]] for row in q]
    assert q[0]["file"].endswith("helpsteer.jsonl")


def test_output_is_byte_identical_across_runs(tmp_path) -> None:
    for run in ("a", "b"):
        write_normalized(normalize("helpsteer3", sample_path("helpsteer3")), tmp_path / run)
    for name in ("pairs.parquet", "quarantine.parquet", "report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["pairs_out"] == pq.read_metadata(tmp_path / "a" / "pairs.parquet").num_rows


def test_a_crash_mid_write_leaves_the_old_output(tmp_path, monkeypatch) -> None:
    result = normalize("generic", FIXTURES / "generic.jsonl")
    out = write_normalized(result, tmp_path / "out")
    before = (out / "pairs.parquet").read_bytes()
    calls = []

    def failing_json(value, path) -> None:
        calls.append(path)
        raise OSError("disk full")

    monkeypatch.setattr("pipeline.normalize.write_json", failing_json)
    with pytest.raises(OSError, match="disk full"):
        write_normalized(normalize("helpsteer3", FIXTURES / "helpsteer3.jsonl"), out)
    assert calls  # the parquet files were already written to the temp dir
    assert (out / "pairs.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left
    with pytest.raises(OSError):
        write_normalized(result, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert pipeline_io.PAIRS_FILE == "pairs.parquet"


def test_split_option_names_every_pair() -> None:
    result = normalize(
        "helpsteer2_preference", FIXTURES / "helpsteer2_preference.jsonl", split="dev"
    )
    assert set(result.pairs["split"].to_pylist()) == {"dev"}


def test_unknown_source_and_option_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown source 'helpsteer4'; known: helpsteer"):
        normalize("helpsteer4", FIXTURES / "helpsteer.jsonl")
    with pytest.raises(ValueError, match=r"unknown option.*rejected; known:"):
        normalize("helpsteer3", FIXTURES / "helpsteer3.jsonl", rejected="random")
    with pytest.raises(ValueError, match="option rejected='best' is not one of 'worst', 'random'"):
        normalize("ultrafeedback", FIXTURES / "ultrafeedback_dict.jsonl", rejected="best")
    with pytest.raises(ValueError, match="weights need at least one non-zero attribute"):
        normalize("helpsteer", FIXTURES / "helpsteer.jsonl", weights={"kindness": 1.0})
