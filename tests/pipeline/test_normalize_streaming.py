"""Normalize piece by piece: JSON lines read in blocks and typed files in batches give the
rows, pairs, quarantine, drops, report and bytes of the whole file read at once, hostile
lines, lines longer than a block, gzip and row groups included; a piece holds at most
`batch_rows` rows; file-level checks still see the whole file."""

from __future__ import annotations

import codecs
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ingest
from pipeline.normalize import Normalized, normalize, normalize_to, write_normalized
from pipeline.sample_data import sample_path
from pipeline.sources import SOURCES
from tests.pipeline.test_hostile_input import FILE_CASES, SPECS, _build, _file_cases, _generic

BLOCK = 256  # bytes read at once in these tests: a hostile file is many blocks
FEW = 3  # rows per piece


def _same(a: Normalized, b: Normalized) -> None:
    for name in ("pairs", "quarantine", "dropped"):
        assert getattr(a, name).equals(getattr(b, name), check_metadata=True), name
    assert a.report == b.report


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "BLOCK_BYTES", BLOCK)


def test_json_lines_in_blocks_are_the_file_whole(tmp_path, small_blocks) -> None:
    """A BOM, blank and CRLF lines, a line of many blocks, no newline at the end: the
    blocks read one by one are those pyarrow parses in the whole file (each from the first
    row that starts at or after a multiple of the block size)."""
    lines = [b'{"a": 1}', b"", b'{"a": 2}\r', b"  ", b'{"b": "' + b"x" * 1000 + b'"}']
    lines += [json.dumps({"a": i}).encode() for i in range(3, 150)] + [b"{bad", b'{"a": 150}']
    data = codecs.BOM_UTF8 + b"\n".join(lines)
    for name, payload in (("rows.jsonl", data), ("rows.jsonl.gz", gzip.compress(data))):
        (tmp_path / name).write_bytes(payload)
        [file] = ingest.open_input(tmp_path / name)
        [whole] = file.pieces(None)
        pieces = list(file.pieces(FEW))
        assert [p.rows for p in pieces] == [p.rows for p in ingest._blocks(whole)]
        assert len(pieces) > 5
        index = np.concatenate([p.line_index for p in pieces])
        assert index.tolist() == whole.line_index.tolist()
        got = [p.line(k) for p in pieces for k in range(p.rows)]
        assert got == [whole.line(k) for k in range(whole.rows)]


def _whole(monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """Map `source`'s input whole, as HelpSteer's rating rows are: the run in memory."""
    monkeypatch.setattr(type(SOURCES[source]), "whole_input", True)


@pytest.mark.parametrize("source", list(SPECS))
def test_hostile_file_in_small_pieces_normalizes_as_whole(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_blocks
) -> None:
    path, _, _ = _build(source, tmp_path)
    pieces = normalize(source, path, batch_rows=FEW)
    _whole(monkeypatch, source)
    _same(pieces, normalize(source, path))


@pytest.mark.parametrize("case", FILE_CASES)
def test_file_level_failures_are_the_same_in_pieces(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_blocks
) -> None:
    path, error, _ = _file_cases(tmp_path)[case]
    with pytest.raises(error) as pieces:
        normalize("generic", path, batch_rows=FEW)
    _whole(monkeypatch, "generic")
    with pytest.raises(error) as whole:
        normalize("generic", path)
    assert str(pieces.value) == str(whole.value)


def test_a_column_only_later_rows_hold_is_in_the_file(tmp_path, monkeypatch, small_blocks) -> None:
    """Rows without `rejected` first: quarantined, not a file without the column."""
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}"} for i in range(8)] + _generic(1)
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pieces = normalize("generic", path, batch_rows=FEW)
    _whole(monkeypatch, "generic")
    _same(pieces, normalize("generic", path))
    assert pieces.report["pairs_out"] == 1 and pieces.report["quarantined"]["missing_field"] == 8


def _typed_inputs(tmp_path: Path) -> dict[str, Path]:
    """The binarized sample as Parquet in row groups of 7, and as Arrow IPC file and
    stream in batches of 11."""
    table = pq.read_table(sample_path("ultrafeedback_binarized"))
    paths = {"parquet": tmp_path / "rows.parquet"}
    pq.write_table(table, paths["parquet"], row_group_size=7)
    for kind, open_ in (("file", pa.ipc.new_file), ("stream", pa.ipc.new_stream)):
        paths[kind] = tmp_path / f"rows_{kind}.arrow"
        with pa.OSFile(str(paths[kind]), "wb") as sink, open_(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=11)
    return paths


@pytest.mark.parametrize("kind", ["parquet", "file", "stream"])
def test_typed_files_in_batches_normalize_as_whole(kind: str, tmp_path: Path) -> None:
    path = _typed_inputs(tmp_path)[kind]
    [file] = ingest.open_input(path)
    assert all(piece.rows <= FEW for piece in file.pieces(FEW))
    pieces = normalize("ultrafeedback_binarized", path, batch_rows=FEW)
    _same(pieces, normalize("ultrafeedback_binarized", path, batch_rows=10**6))
    assert pieces.report["pairs_out"] > 100


@pytest.mark.parametrize(
    ("source", "name"),
    [("generic", "hostile"), ("ultrafeedback", "sample"), ("helpsteer", "sample")],
)
def test_normalize_to_writes_the_bytes_of_the_run_in_memory(
    source: str, name: str, tmp_path: Path, small_blocks
) -> None:
    """Piece by piece to disk (HelpSteer's rating rows are read whole) against the whole
    result written at once."""
    path = _build(source, tmp_path)[0] if name == "hostile" else sample_path(source)
    report = normalize_to(tmp_path / "streamed", source, path, batch_rows=FEW)
    whole = write_normalized(normalize(source, path), tmp_path / "whole")
    for output in ("pairs.parquet", "quarantine.parquet", "dropped.parquet", "report.json"):
        assert (tmp_path / "streamed" / output).read_bytes() == (whole / output).read_bytes()
    assert report == json.loads((whole / "report.json").read_text())


def test_batch_rows_bounds_the_rows_mapped_at_once(tmp_path, monkeypatch, small_blocks) -> None:
    """Typed input: at most `batch_rows` rows at once; JSON: one block at once."""
    sizes: list[int] = []
    piece = ingest.Conformer.piece

    def counted(self: ingest.Conformer, raw: ingest.RawFile) -> ingest.Conformed:
        sizes.append(raw.rows if raw.table is not None else len(raw.data))
        return piece(self, raw)

    monkeypatch.setattr(ingest.Conformer, "piece", counted)
    path = _typed_inputs(tmp_path)["parquet"]
    normalize("ultrafeedback_binarized", path, batch_rows=FEW)
    assert max(sizes) <= FEW and sum(sizes) == pq.read_metadata(path).num_rows
    sizes.clear()
    path = _build("generic", tmp_path)[0]
    normalize("generic", path, batch_rows=FEW)
    longest = max(map(len, path.read_bytes().split(b"\n")))
    assert len(sizes) > 10 and max(sizes) <= BLOCK + longest
