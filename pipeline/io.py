"""Atomic, byte-stable writes of a stage's output directory.

A stage writes into a temporary sibling directory and renames it into place only when
every file is complete, so a crash leaves either the old output or none, never half of one.
Parquet and JSON are written with fixed settings and no timestamps: same data, same bytes.
A stream written in pieces is re-cut into pieces of a fixed size first (`rechunk`), so how
its input was read never shows in the bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PAIRS_FILE = "pairs.parquet"
QUARANTINE_FILE = "quarantine.parquet"
REPORT_FILE = "report.json"


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `out_dir` when the block succeeds.

    Its files are fsynced before the rename. On any exception the temporary directory is
    removed, `out_dir` is left as it was, and the exception propagates.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        for path in tmp.iterdir():
            _fsync(path)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` with fixed settings (zstd, no statistics that vary)."""
    pq.write_table(table, path, compression="zstd")


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
