"""The files of the data stages: their names, and Parquet and JSON written byte-stably.

Parquet and JSON are written with fixed settings and no timestamps: same data, same bytes.
A stream written in pieces is re-cut into pieces of a fixed size first (`rechunk`), so how
its input was read never shows in the bytes. `ParquetRowGroups` writes a table batch by
batch in row groups of exactly `ROW_GROUP` rows, each one contiguous chunk (the writer's
page boundaries follow the chunks it is given): the bytes depend on the rows alone, and a
stage holds one row group at a time, whatever the size of its output. Where and how a
stage's output appears (atomically, keyed, reused) is `core.atomic`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PAIRS_FILE = "pairs.parquet"
QUARANTINE_FILE = "quarantine.parquet"
DROPPED_FILE = "dropped.parquet"  # rows or pairs a stage's rules left out, each with its reason
REPORT_FILE = "report.json"
# Rows per Parquet row group of normalize's and curate's outputs (`ParquetRowGroups`): a
# few hundred MB of pairs at most, held once while written; readers stream by row group.
ROW_GROUP = 65_536


# ------------------------------------------------------------------------ file formats


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` with fixed settings (zstd, no statistics that vary)."""
    pq.write_table(table, path, compression="zstd")


class ParquetRowGroups:
    """A Parquet file written table by table, in row groups of exactly `ROW_GROUP` rows (the
    last holds the rest), each written as one contiguous chunk.

    The bytes depend only on the rows, not on how they were batched, and equal
    `write_parquet`'s for a one-chunk table of at most `ROW_GROUP` rows; a file with no rows
    holds one empty row group, as `write_parquet` writes it. Holds at most one row group
    plus one written table.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        self._schema = schema
        self._pending: list[pa.Table] = []
        self._held = 0
        self.rows = 0  # rows written so far

    def write(self, table: pa.Table) -> None:
        """Append `table`'s rows (its schema is the file's)."""
        self._pending.append(table)
        self._held += table.num_rows
        while self._held >= ROW_GROUP:
            joined = pa.concat_tables(self._pending)
            self._pending, self._held = [joined.slice(ROW_GROUP)], self._held - ROW_GROUP
            self._write_group(joined.slice(0, ROW_GROUP))

    def _write_group(self, group: pa.Table) -> None:
        self._writer.write_table(group.combine_chunks(), row_group_size=ROW_GROUP)
        self.rows += group.num_rows

    def close(self) -> None:
        """Write the last row group (an empty one when no row came) and the footer."""
        if self._held or not self.rows:
            self._write_group(pa.concat_tables([self._schema.empty_table(), *self._pending]))
        self._pending, self._held = [], 0
        self._writer.close()

    def __enter__(self) -> ParquetRowGroups:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.close()
        else:  # a failed stage: its temp directory goes; just release the file
            self._writer.close()


def write_row_groups(table: pa.Table, path: Path) -> None:
    """Write `table` as `ParquetRowGroups` does: the bytes a batch-by-batch write of the same
    rows gives."""
    with ParquetRowGroups(path, table.schema) as out:
        out.write(table)


def write_json(value: Any, path: Path) -> None:
    """Write `value` as indented JSON with a trailing newline."""
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def rechunk(tables: Iterable[pa.Table], size: int) -> Iterator[pa.Table]:
    """Re-cut a stream of tables (one schema) into tables of exactly `size` rows.

    The last one holds the remainder (nothing is yielded for an empty stream). At most
    `size` rows plus one input table are held at once.
    """
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= size:
            joined = pa.concat_tables(pending)
            pending, held = [joined.slice(size)], held - size
            yield joined.slice(0, size)
    if held:
        yield pa.concat_tables(pending)


def pairs_path(path: str | Path) -> Path:
    """`path` itself if it is a file, else the pairs file inside that directory.

    Raises:
        FileNotFoundError: naming the path that does not exist.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PAIRS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pairs file")
    return path
