"""Stage output helpers: re-cutting a stream of tables into fixed-size pieces."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from pipeline.io import rechunk


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
