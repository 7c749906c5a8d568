"""The data stages' files: re-cutting a stream of tables into fixed-size pieces, and
Parquet row groups whose bytes do not depend on how the rows came."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import io
from pipeline.io import rechunk, write_parquet


@given(sizes=st.lists(st.integers(0, 20), max_size=10), size=st.integers(1, 12))
def test_rechunk_keeps_every_row_in_order_in_pieces_of_exactly_size(sizes, size) -> None:
    start, tables = 0, []
    for n in sizes:
        tables.append(pa.table({"x": pa.array(range(start, start + n), pa.int64())}))
        start += n
    pieces = list(rechunk(iter(tables), size))
    assert [v for p in pieces for v in p.column("x").to_pylist()] == list(range(start))
    assert all(p.num_rows == size for p in pieces[:-1])
    assert not pieces or 0 < pieces[-1].num_rows <= size


@given(cuts=st.lists(st.integers(0, 60), max_size=6))
def test_row_groups_do_not_depend_on_how_the_rows_came(cuts: list[int]) -> None:
    """However the 60 rows are cut into writes, the file has the same bytes: row groups of
    exactly ROW_GROUP rows (here 7, the last holds the rest), each one chunk."""
    table = pa.table(
        {"x": pa.array(range(60), pa.int64()), "s": [f"row {i}" * i for i in range(60)]}
    )
    bounds = [0, *sorted(cuts), 60]
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(io, "ROW_GROUP", 7)
        with io.ParquetRowGroups(Path(tmp, "cut.parquet"), table.schema) as out:
            for low, high in itertools.pairwise(bounds):
                out.write(table.slice(low, high - low))
        io.write_row_groups(table, Path(tmp, "whole.parquet"))
        assert Path(tmp, "cut.parquet").read_bytes() == Path(tmp, "whole.parquet").read_bytes()
        metadata = pq.read_metadata(Path(tmp, "cut.parquet"))
        assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [
            *[7] * 8,
            4,
        ]


def test_row_groups_of_a_small_or_empty_table_are_write_parquet_bytes(tmp_path: Path) -> None:
    table = pa.table({"x": pa.array(range(50), pa.int64())})
    for name, part in (("small", table), ("empty", table.slice(0, 0))):
        write_parquet(part, tmp_path / f"{name}.a.parquet")
        io.write_row_groups(part, tmp_path / f"{name}.b.parquet")
        a, b = (tmp_path / f"{name}.{k}.parquet" for k in "ab")
        assert a.read_bytes() == b.read_bytes(), name
