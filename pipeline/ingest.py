"""Read one source into Arrow: local files or directories, or a Hugging Face hub id.

Formats: JSON lines (`.jsonl`, `.ndjson`, optionally `.gz`), JSON (`.json`, `.json.gz`: an
array of objects, or JSON lines), Parquet and Arrow IPC (file or stream, as `datasets`
caches). A directory is read file by file in sorted order. A hub id (`owner/name`) loads
through `datasets.load_dataset`; offline that fails with an error naming the id.

`open_input` finds the files; `Input.pieces` reads one in pieces, so that memory does not
grow with it: typed files in batches of rows (Parquet a row group at a time), JSON lines in
the blocks pyarrow parses (below), read from disk and decompressed as they come.

Then `conform` casts each file to a raw contract (see `data_contracts.raw_sources`). Typed
files (Parquet, Arrow, hub) are checked per column: a missing or wrongly typed column stops
the run with the file and column named. JSON is checked per row, and one bad row never
costs the file: a line that is not UTF-8, not JSON, not an object, nested too deep, holds a
duplicate key or a number no double holds, or a value of the wrong type, becomes a row
problem with a reason code, and the run goes on.

JSON lines are parsed by `pyarrow.json` in blocks of `BLOCK_BYTES` (C++, threaded). Lines it
must not see go to Python's parser first: invalid UTF-8 (pyarrow does not check) and lines
with more than `DEEP_BRACKETS` opening brackets (pyarrow crashes on ~10k levels; Python
raises RecursionError, which is caught). A block pyarrow refuses (a bad line, or types that
change between rows) is bisected; pieces of at most `PYTHON_LINES` lines are parsed line by
line in Python, with the same rules as pyarrow (ints beyond int64 become doubles, NaN and
Infinity are numbers, duplicate keys and overflowing numbers are refused). A JSON array is
re-serialized as JSON lines, so both formats share this path.

Column names may be dotted (`metadata.score_chosen`) to reach a field of a struct column.
"""

from __future__ import annotations

import codecs
import gzip
import itertools
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from core.inputs import SUFFIXES, is_hub_id
from data_contracts.contract import Contract, ContractError
from pipeline.io import rechunk

# Split names recognised in file names (e.g. `train_prefs-00000-of-00001.parquet`).
KNOWN_SPLITS = (
    "train",
    "validation",
    "test",
    "dev",
    "train_prefs",
    "test_prefs",
    "train_sft",
    "test_sft",
    "train_gen",
    "test_gen",
)
BLOCK_BYTES = 16 << 20  # one pyarrow.json call, and one read of a JSON file: bounded memory
PARQUET_BUFFER = 1 << 20  # Parquet read through a buffer: a row group is not loaded whole
_SPACE = b" \t\r\n"
_OPENING = np.frombuffer(b"{ \t\r", np.uint8)  # how a JSON object's line may open
DEEP_BRACKETS = 1000  # more `[`/`{` in a line than this: Python's parser only (a bound on depth)
PYTHON_LINES = 16  # a refused piece this small is parsed line by line
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_ARROW_ERRORS = (pa.ArrowException, TypeError, OverflowError, UnicodeError)
_INT64 = (-(2**63), 2**63)

Convert = Callable[[str, pa.Array], pa.Array]
Problem = tuple[int, str, str]  # (row index, reason, message)


class IngestError(ValueError):
    """An input cannot be read at all; the message names the file or hub id."""


@dataclass(frozen=True)
class HubOptions:
    """How to load a hub id with `datasets.load_dataset`.

    Attributes:
        config: the dataset configuration (`name=`), e.g. "preference" for HelpSteer3.
        data_dir: a subfolder of the repository, e.g. "preference" for HelpSteer2.
        split: one split to load; None loads every split.
    """

    config: str | None = None
    data_dir: str | None = None
    split: str | None = None


@dataclass
class RawFile:
    """One input file (or hub split), or a piece of one (`Input.pieces`), as read, before
    any contract check. Row indices are always the file's.

    Attributes:
        label: the path or `hub_id:split`, written to quarantine rows as `file`.
        split: the split its name or the hub gives, or None when unknown.
        rows: rows here (blank JSON lines are not rows).
        table: a typed table (Parquet, Arrow, hub), or None for JSON input.
        first_row: typed input: the file row of the table's first row.
        data: JSON input: the bytes, as JSON lines (an array is re-serialized).
        line_index: JSON input: per row, its 0-based line number (its row index).
        starts, ends: JSON input: per row, the byte range of its line in `data`.
    """

    label: str
    split: str | None
    rows: int
    table: pa.Table | None = None
    first_row: int = 0
    data: bytes = b""
    line_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def line(self, position: int) -> bytes:
        """The bytes of the `position`-th row of JSON input."""
        return self.data[self.starts[position] : self.ends[position]]

    def raw(self, row_indices: Sequence[int]) -> list[str]:
        """The raw rows at `row_indices` as text: the original line, or the row as JSON."""
        if self.table is None:
            positions = np.searchsorted(self.line_index, np.asarray(row_indices, np.int64))
            return [self.line(int(p)).decode("utf-8", "backslashreplace") for p in positions]
        local = np.asarray(row_indices, np.int64) - self.first_row
        rows = self.table.take(pa.array(local, pa.int64())).to_pylist()
        return [json.dumps(r, ensure_ascii=False, default=str) for r in rows]


# ---------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Input:
    """One input file or hub split, not read yet: `pieces` reads it.

    Attributes:
        label: the path or `hub_id:split`, as `RawFile.label`.
        split: the split its name or the hub gives, or None when unknown.
        kind: one of `SUFFIXES`, or "hub".
        path: the file (None for a hub split).
        table: a hub split as `datasets` maps it from its cache (None for a file).
    """

    label: str
    split: str | None
    kind: str
    path: Path | None = None
    table: pa.Table | None = None

    def pieces(self, rows: int | None) -> Iterator[RawFile]:
        """The input in row order, in pieces (None: the whole input as one piece).

        A typed input (Parquet, Arrow, hub) comes in pieces of at most `rows` rows, at
        least one (empty when it has no rows, so its columns are checked). JSON comes in
        the blocks of about `BLOCK_BYTES` that pyarrow parses at once (`_blocks`), so each
        row parses as it does in the whole file: JSON lines are read a block at a time
        (gzip decompressed as they are read); a JSON array is parsed whole (Python's
        parser has no streaming mode).

        Raises:
            IngestError: naming the file when it cannot be read (also midway, e.g. a
                truncated gzip), or is not a valid JSON array.
        """
        try:
            if self.table is not None:
                size = rows or max(self.table.num_rows, 1)
                yield from _table_pieces(self, rechunk([self.table], size))
            elif self.kind == ".parquet":
                yield from _parquet_pieces(self, rows)
            elif self.kind == ".arrow":
                yield from _arrow_pieces(self, rows)
            else:
                yield from _json_pieces(self, rows)
        except (OSError, EOFError, zlib.error, pa.ArrowInvalid) as err:
            raise IngestError(f"{self.label}: cannot read as {self.kind}: {err}") from err


def open_input(input: str | Path, hub: HubOptions | None = None) -> list[Input]:
    """Find the files of a local file or directory, or load a hub id's splits.

    Args:
        input: a file, a directory (every supported file below it, sorted), or a hub id.
        hub: how to load a hub id (ignored for local input).

    Returns:
        One `Input` per file or hub split, in a stable order; nothing is read yet.

    Raises:
        IngestError: a missing path, an unknown format or an empty directory (naming the
            path), or a hub id that cannot be loaded (naming the id).
    """
    if is_hub_id(input):
        return _open_hub(str(input), hub or HubOptions())
    path = Path(input)
    if not path.exists():
        raise IngestError(f"{path}: no such file or directory")
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _format(p) is not None)
        if not found:
            raise IngestError(f"{path}: no {', '.join(SUFFIXES)} (optionally .gz) files inside")
        return [_open_file(p) for p in found]
    return [_open_file(path)]


def no_rows(input: str | Path) -> IngestError:
    """The error for a local input whose files hold no row at all."""
    path = Path(input)
    return IngestError(f"{path}: no rows (empty file{'s' if path.is_dir() else ''})")


def read(input: str | Path, hub: HubOptions | None = None) -> list[RawFile]:
    """Read a local file or directory, or a hub id, each file whole (see `open_input`).

    Returns:
        One `RawFile` per file or hub split, in a stable order.

    Raises:
        IngestError: as `open_input` and `Input.pieces`, or an input without rows.
    """
    files = [piece for i in open_input(input, hub) for piece in i.pieces(None)]
    if not any(f.rows for f in files) and not is_hub_id(input):
        raise no_rows(input)
    return files


def _format(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def split_from_name(name: str) -> str | None:
    """The split a file name states (`train.jsonl.gz`, `test_prefs-00000-of-00001.parquet`)."""
    stem = name.split(".")[0].split("-")[0]
    return stem if stem in KNOWN_SPLITS else None


def _open_file(path: Path) -> Input:
    kind = _format(path)
    if kind is None:
        raise IngestError(f"{path}: unknown format; expected one of {', '.join(SUFFIXES)}")
    return Input(str(path), split_from_name(path.name), kind, path=path)


def _table_pieces(input: Input, tables: Iterable[pa.Table]) -> Iterator[RawFile]:
    """Typed pieces, each knowing the file row of its first row; one (empty) at least."""
    first, pieces = 0, 0
    for table in tables:
        yield RawFile(input.label, input.split, table.num_rows, table=table, first_row=first)
        first, pieces = first + table.num_rows, pieces + 1
    if not pieces:
        yield RawFile(input.label, input.split, 0, table=_typed_schema(input).empty_table())


def _typed_schema(input: Input) -> pa.Schema:
    if input.table is not None:
        return input.table.schema
    assert input.path is not None
    if input.kind == ".parquet":
        return pq.read_schema(input.path)
    with pa.OSFile(str(input.path)) as source:
        return _arrow_batches(source)[0]


def _parquet_pieces(input: Input, rows: int | None) -> Iterator[RawFile]:
    assert input.path is not None
    if rows is None:
        yield from _table_pieces(input, [pq.ParquetFile(input.path).read()])
    else:
        yield from _table_pieces(input, parquet_batches(input.path, rows))


def parquet_batches(path: Path, rows: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A Parquet file's `columns` (None: all) in tables of at most `rows` rows, in order.

    Each row group is read by a reader of its own: one reader over the whole file keeps
    every row group it has read until it ends (pyarrow 26: memory grew by the input), and
    through a buffer, so a row group's pages are read as they are decoded, not all at once.
    """
    file = pq.ParquetFile(path, buffer_size=PARQUET_BUFFER)
    for group in range(file.num_row_groups):
        for batch in file.iter_batches(batch_size=rows, row_groups=[group], columns=columns):
            yield pa.Table.from_batches([batch])


def _arrow_batches(source: pa.NativeFile) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The schema and batches of an Arrow IPC file or stream (as `datasets` caches)."""
    try:
        reader = pa.ipc.open_file(source)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        stream = pa.ipc.open_stream(source)
        return stream.schema, iter(stream)


def _arrow_pieces(input: Input, rows: int | None) -> Iterator[RawFile]:
    assert input.path is not None
    with pa.OSFile(str(input.path)) as source:
        schema, batches = _arrow_batches(source)
        if rows is None:
            yield from _table_pieces(input, [pa.Table.from_batches(list(batches), schema)])
        else:
            tables = (pa.Table.from_batches([b]) for b in batches)
            yield from _table_pieces(input, rechunk(tables, rows))


def _json_pieces(input: Input, rows: int | None) -> Iterator[RawFile]:
    """JSON in pieces of one block each (`_blocks`), or whole when `rows` is None; JSON
    lines are read a block at a time, a JSON array is parsed whole."""
    assert input.path is not None
    opener = gzip.open if input.path.name.lower().endswith(".gz") else open
    with opener(input.path, "rb") as stream:
        data = stream.read(BLOCK_BYTES)
        if input.kind == ".json" and data.lstrip(_SPACE + codecs.BOM_UTF8).startswith(b"["):
            whole = _from_array(input.label, input.split, data + stream.read())
            yield from ([whole] if rows is None else (b for b in _blocks(whole) if b.rows))
            return
        if rows is None:
            yield _from_json_lines(input.label, input.split, data + stream.read())
            return
        base = line = 0  # file offset and line number of data[0], a line start
        while data:
            # The next block opens with the first line that starts at or after the next
            # multiple of BLOCK_BYTES: the one after the first newline from a byte before.
            start = (base // BLOCK_BYTES + 1) * BLOCK_BYTES - 1 - base
            newline = data.find(b"\n", start)
            while newline < 0 and (more := stream.read(BLOCK_BYTES)):
                searched, data = max(start, len(data)), data + more
                newline = data.find(b"\n", searched)
            cut = len(data) if newline < 0 else newline + 1
            block = _from_json_lines(input.label, input.split, data[:cut], line, base == 0)
            if block.rows:
                yield block
            line += data.count(b"\n", 0, cut)
            base, data = base + cut, data[cut:]
            if len(data) < BLOCK_BYTES:
                data += stream.read(BLOCK_BYTES)


def _blocks(raw: RawFile) -> Iterator[RawFile]:
    """JSON input in the blocks `_json_chunks` parses at once (the rows that start from one
    multiple of `BLOCK_BYTES` on, until the next), each holding only its own lines: the
    rows of a block read alone parse as they do in the whole file."""
    bounds = np.searchsorted(raw.starts, np.arange(0, len(raw.data), BLOCK_BYTES))
    for low, high in itertools.pairwise(np.unique(np.append(bounds, raw.rows))):
        begin, end = int(raw.starts[low]), int(raw.ends[high - 1])
        yield RawFile(
            raw.label,
            raw.split,
            int(high - low),
            data=raw.data[begin:end],
            line_index=raw.line_index[low:high],
            starts=raw.starts[low:high] - begin,
            ends=raw.ends[low:high] - begin,
        )


def _from_array(label: str, split: str | None, data: bytes) -> RawFile:
    """A JSON array, each element re-serialized as one JSON line (element i is row i)."""
    try:
        elements = json.loads(data)
    except RecursionError:
        raise IngestError(
            f"{label}: JSON nested too deep for Python's parser; as JSON lines, only the deep "
            "rows would be quarantined"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IngestError(f"{label}: not a valid JSON array: {err}") from None
    lines = [_dumps(element) for element in elements]
    return _from_json_lines(label, split, b"\n".join(lines))


def _dumps(value: Any) -> bytes:
    """One JSON line; lone surrogates (which UTF-8 cannot hold) stay escaped."""
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value).encode("ascii")


def _from_json_lines(
    label: str, split: str | None, data: bytes, first_line: int = 0, at_start: bool = True
) -> RawFile:
    """Find the rows (non-blank lines) of JSON lines, vectorised; nothing is parsed yet.

    Args:
        data: whole lines of the file, from line `first_line` on; `at_start` when they
            open the file (a BOM there is no part of row 0).
    """
    buffer = np.frombuffer(data, np.uint8)
    newlines = np.flatnonzero(buffer == ord("\n"))
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    ends = np.concatenate([newlines, [len(data)]]).astype(np.int64)
    if at_start and data.startswith(codecs.BOM_UTF8):
        starts[0] = len(codecs.BOM_UTF8)
    # Rows start with "{" almost always; only the others are checked for being blank.
    first = buffer[np.minimum(starts, max(len(data) - 1, 0))] if len(data) else starts
    maybe_blank = np.flatnonzero((starts >= ends) | (first != ord("{")))
    blank = [i for i in maybe_blank if not data[starts[i] : ends[i]].strip(b" \t\r")]
    keep = np.ones(len(starts), bool)
    keep[np.asarray(blank, np.int64)] = False
    line_index = np.flatnonzero(keep).astype(np.int64) + first_line
    return RawFile(
        label,
        split,
        len(line_index),
        data=data,
        line_index=line_index,
        starts=starts[keep],
        ends=ends[keep],
    )


def _open_hub(hub_id: str, hub: HubOptions) -> list[Input]:
    try:
        import datasets  # heavy; only needed for hub ids

        loaded = datasets.load_dataset(
            hub_id, name=hub.config, data_dir=hub.data_dir, split=hub.split
        )
    except Exception as err:  # any failure to load is reported with the id, then re-raised
        raise IngestError(
            f"{hub_id}: cannot load from the Hugging Face hub "
            f"(config={hub.config!r}, data_dir={hub.data_dir!r}, split={hub.split!r}): "
            f"{type(err).__name__}: {err}. Offline? Pass a local file or directory instead."
        ) from err
    splits = {hub.split: loaded} if hub.split is not None else dict(sorted(loaded.items()))
    return [
        Input(f"{hub_id}:{split}", split, "hub", table=dataset.with_format("arrow")[:])
        for split, dataset in splits.items()
    ]


# ---------------------------------------------------------------------------------------
# Casting to a raw contract


def conforms(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether values of type `src` can be read as `dst` without reinterpreting them.

    Integers widen to floats; strings never become numbers; a struct needs at least one of
    the target's fields (by name) and takes nulls for the others; lists conform by values.
    """
    if pa.types.is_null(src):
        return True
    if pa.types.is_string(dst) or pa.types.is_large_string(dst):
        return pa.types.is_string(src) or pa.types.is_large_string(src)
    if pa.types.is_floating(dst):
        return pa.types.is_floating(src) or pa.types.is_integer(src)
    if pa.types.is_integer(dst):
        return pa.types.is_integer(src)
    if pa.types.is_boolean(dst):
        return pa.types.is_boolean(src)
    if pa.types.is_list(dst) or pa.types.is_large_list(dst):
        is_list = pa.types.is_list(src) or pa.types.is_large_list(src)
        return is_list and conforms(src.value_type, dst.value_type)
    if pa.types.is_struct(dst):
        if not pa.types.is_struct(src):
            return False
        names = {src.field(i).name: src.field(i).type for i in range(src.num_fields)}
        shared = [dst.field(i) for i in range(dst.num_fields) if dst.field(i).name in names]
        return bool(shared) and all(conforms(names[f.name], f.type) for f in shared)
    return src == dst


@dataclass
class Conformed:
    """A file cast to a raw contract.

    Attributes:
        table: the contract's columns, one row per parsed row (bad values as nulls).
        row_index: int64, each table row's index in the file.
        problems: (row index, reason, message) for rows that failed to parse or to cast;
            rows that failed to cast are also in `table`, and must be set aside.
    """

    table: pa.Table
    row_index: pa.Array
    problems: list[Problem]


@dataclass(frozen=True)
class _Target:
    """One contract field, the input column (maybe dotted) it is read from, its types."""

    field: pa.Field
    column: str
    accepted: tuple[pa.DataType, ...]


@dataclass
class _Chunk:
    """Some rows of a JSON file, cast.

    Attributes:
        table, row_index, problems: as in `Conformed`, for these rows.
        present: the target columns some of these rows hold.
        columns: the columns (and `column.field` of objects) these rows hold, for messages.
    """

    table: pa.Table
    row_index: np.ndarray
    problems: list[Problem]
    present: set[str]
    columns: set[str]


def conform(
    raw: RawFile,
    contract: Contract,
    shapes: dict[str, tuple[pa.DataType, ...]],
    convert: Convert,
    columns: Mapping[str, str] | None = None,
    column_options: Mapping[str, str] | None = None,
) -> Conformed:
    """Cast the whole file `raw` to `contract`'s schema (see `Conformer`).

    Raises:
        ContractError, IngestError: as `Conformer.piece` and `Conformer.finish`.
    """
    conformer = Conformer(contract, shapes, convert, columns, column_options)
    conformed = conformer.piece(raw)
    conformer.finish()
    return conformed


class Conformer:
    """Cast the pieces of one file to a raw contract, converting fields that arrive in
    another shape, then check the file as a whole (`finish`).

    A typed file's columns are checked with its first piece. JSON rows differ in their keys,
    so a required column must be in some row of the file: that, and that some row of a
    JSON file parsed at all, is known only after its last piece.

    Args:
        contract: the source's raw contract.
        shapes: field -> other accepted types (`data_contracts.raw_sources.SHAPES`).
        convert: (field name, array of an accepted other type) -> array of the field's type.
        columns: contract field -> the input column (dotted for a struct field) the user
            chose; such a column must exist, even for an optional field.
        column_options: contract field -> the source option that names its column, for
            error messages (`-o chosen_column=...`).
    """

    def __init__(
        self,
        contract: Contract,
        shapes: dict[str, tuple[pa.DataType, ...]],
        convert: Convert,
        columns: Mapping[str, str] | None = None,
        column_options: Mapping[str, str] | None = None,
    ) -> None:
        self.contract, self.convert = contract, convert
        self.columns, self.column_options = dict(columns or {}), column_options
        self.targets = [
            _Target(f, self.columns.get(f.name, f.name), (f.type, *shapes.get(f.name, ())))
            for f in contract.schema
        ]
        self._json: RawFile | None = None  # a JSON piece with rows, once one was cast
        self._rows = self._parsed = 0
        self._first_problem: Problem | None = None
        self._present: set[str] = set()
        self._has: set[str] = set()

    def piece(self, raw: RawFile) -> Conformed:
        """Cast one piece of the file, in row order.

        Raises:
            ContractError: a typed file without a required or chosen column (naming the
                file, the columns it has and the option that maps them), or with a column
                whose type fits neither the contract nor an accepted shape.
        """
        if raw.table is not None:
            present = {
                t.column for t in self.targets if _typed_column(raw.table, t.column) is not None
            }
            self._check_columns(raw, present, _table_paths(raw.table))
            return _conform_table(raw, self.contract, self.targets, self.convert)
        if not raw.rows:
            empty = pa.schema([t.field for t in self.targets]).empty_table()
            return Conformed(empty, pa.array([], pa.int64()), [])
        chunks = [
            c
            for c in _json_chunks(raw, self.targets, self.convert)
            if len(c.row_index) or c.problems
        ]
        problems = [p for c in chunks for p in c.problems]
        self._json, self._rows = raw, self._rows + raw.rows
        self._parsed += sum(len(c.row_index) for c in chunks)
        if self._first_problem is None and problems:  # pieces come in row order
            self._first_problem = min(problems)
        self._present = self._present.union(*(c.present for c in chunks))
        self._has = self._has.union(*(c.columns for c in chunks))
        table = pa.concat_tables([c.table for c in chunks]).combine_chunks()
        row_index = np.concatenate([c.row_index for c in chunks])
        if len(row_index) > 1 and np.any(np.diff(row_index) < 0):
            order = np.argsort(row_index, kind="stable")
            table, row_index = table.take(pa.array(order)), row_index[order]
        return Conformed(table, pa.array(row_index, pa.int64()), sorted(problems))

    def finish(self) -> None:
        """Check a JSON file once its last piece is cast.

        Raises:
            IngestError: no row of a file with rows could be read.
            ContractError: no row holds a required column, or the column an option names.
        """
        if self._json is None:
            return
        if not self._parsed:
            row, reason, message = self._first_problem or (0, "", "")
            raise IngestError(
                f"{self._json.label}: no row could be read as a JSON object ({self._rows} "
                f"rows; first, row {row}: {reason}: {message})"
            )
        self._check_columns(self._json, self._present, self._has)

    def _check_columns(self, raw: RawFile, present: set[str], has: set[str]) -> None:
        _check_columns(
            raw, self.contract, self.targets, self.columns, self.column_options, present, has
        )


def _check_columns(
    raw: RawFile,
    contract: Contract,
    targets: list[_Target],
    columns: Mapping[str, str],
    column_options: Mapping[str, str] | None,
    present: set[str],
    has: set[str],
) -> None:
    """Refuse a file without a required column, or without a column the user chose."""
    absent = [
        t
        for t in targets
        if t.column not in present and (not t.field.nullable or t.field.name in columns)
    ]
    if not absent:
        return
    options = column_options or {}
    listed = sorted(has)
    shown = ", ".join(listed[:40]) + (f", ... ({len(listed)} in all)" if len(listed) > 40 else "")
    what = "; ".join(
        f"{t.column!r}"
        + (f" (option {options[t.field.name]}={t.column})" if t.field.name in columns else "")
        for t in absent
    )
    maps = [f"-o {options[t.field.name]}=<column>" for t in absent if t.field.name in options]
    hint = f"; map one with {', '.join(maps)}" if maps else ""
    raise ContractError(
        f"{raw.label}: missing column(s) for {contract.name} v{contract.version}: {what}; "
        f"the file has: {shown or 'no columns'}{hint}"
    )


def _table_paths(table: pa.Table) -> set[str]:
    """Column names, and `column.field` for the fields of struct columns (one level)."""
    paths = set(table.column_names)
    for f in table.schema:
        if pa.types.is_struct(f.type):
            paths |= {f"{f.name}.{f.type.field(i).name}" for i in range(f.type.num_fields)}
    return paths


def _typed_column(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    """The column `name`, or the struct field a dotted `name` reaches; None when absent."""
    if name in table.column_names:
        return table.column(name)
    root, *path = name.split(".")
    if not path or root not in table.column_names:
        return None
    column, kind, indices = table.column(root), table.schema.field(root).type, []
    for part in path:
        if not pa.types.is_struct(kind) or kind.get_field_index(part) < 0:
            return None
        indices.append(kind.get_field_index(part))
        kind = kind.field(part).type
    return pc.struct_field(column, indices)


def _conform_table(
    raw: RawFile, contract: Contract, targets: list[_Target], convert: Convert
) -> Conformed:
    """A typed file, column by column: a type that fits nothing stops the run."""
    assert raw.table is not None
    arrays = []
    for t in targets:
        column = _typed_column(raw.table, t.column)
        if column is None:
            arrays.append(pa.nulls(raw.table.num_rows, t.field.type))
            continue
        array = column.combine_chunks()
        target = next((a for a in t.accepted if conforms(array.type, a)), None)
        if target is None:
            raise ContractError(
                f"{raw.label}: column {t.column!r} has type {array.type}; "
                f"{contract.name} needs {t.field.type}"
            )
        arrays.append(_as_field(array, target, t.field, convert))
    table = pa.Table.from_arrays(arrays, schema=contract.schema)
    first = raw.first_row
    return Conformed(table, pa.array(range(first, first + raw.table.num_rows), pa.int64()), [])


# ---------------------------------------------------------------------------------------
# JSON lines: pyarrow.json in blocks, Python's parser around what it refuses


def _json_chunks(raw: RawFile, targets: list[_Target], convert: Convert) -> Iterator[_Chunk]:
    """Every row of `raw`, block by block, in chunks the fast or the slow path cast."""
    bounds = np.searchsorted(raw.starts, np.arange(0, len(raw.data), BLOCK_BYTES))
    bounds = np.unique(np.append(bounds, raw.rows))
    for low, high in itertools.pairwise(bounds):
        positions = np.arange(low, high, dtype=np.int64)
        slow = _needs_python(raw, positions)
        yield from _arrow_or_bisect(raw, positions[~slow], targets, convert)
        if slow.any():
            yield _python_chunk(raw, positions[slow], targets, convert)


def _needs_python(raw: RawFile, positions: np.ndarray) -> np.ndarray:
    """Per row: True when pyarrow must not parse it (deep nesting, not UTF-8, or no object:
    pyarrow 26 crashes on a block that opens with a `null` line)."""
    low, high = int(raw.starts[positions[0]]), int(raw.ends[positions[-1]])
    view = memoryview(raw.data)[low:high]
    buffer = np.frombuffer(view, np.uint8)
    opens = (buffer == ord("[")) | (buffer == ord("{"))
    # Brackets from each row's start to the next one's (blank lines have none).
    per_row = np.add.reduceat(opens, raw.starts[positions] - low, dtype=np.int64)
    slow = (per_row > DEEP_BRACKETS) | ~np.isin(buffer[raw.starts[positions] - low], _OPENING)
    try:
        codecs.utf_8_decode(view, "strict", True)
    except UnicodeDecodeError:
        for k, position in enumerate(positions):
            try:
                raw.line(int(position)).decode("utf-8")
            except UnicodeDecodeError:
                slow[k] = True
    return slow


def _arrow_or_bisect(
    raw: RawFile, positions: np.ndarray, targets: list[_Target], convert: Convert
) -> Iterator[_Chunk]:
    """Cast `positions` with pyarrow; if refused, halve, down to pieces for Python."""
    if not len(positions):
        return
    chunk = _arrow_chunk(raw, positions, targets, convert)
    if chunk is not None:
        yield chunk
    elif len(positions) <= PYTHON_LINES:
        yield _python_chunk(raw, positions, targets, convert)
    else:
        half = len(positions) // 2
        yield from _arrow_or_bisect(raw, positions[:half], targets, convert)
        yield from _arrow_or_bisect(raw, positions[half:], targets, convert)


def _arrow_chunk(
    raw: RawFile, positions: np.ndarray, targets: list[_Target], convert: Convert
) -> _Chunk | None:
    """Rows parsed by pyarrow.json and cast per column; None when pyarrow refuses them or
    a column's type is ambiguous (rows of different shapes merged into one struct)."""
    first, last = int(positions[0]), int(positions[-1])
    if last - first + 1 == len(positions):  # contiguous: no copy
        payload = pa.py_buffer(memoryview(raw.data)[raw.starts[first] : raw.ends[last]])
    else:
        payload = pa.py_buffer(b"\n".join(raw.line(int(p)) for p in positions))
    longest = int((raw.ends[positions] - raw.starts[positions]).max())
    options = pa_json.ReadOptions(block_size=min(max(1 << 20, 2 * longest + 2), 2**31 - 1))
    try:
        table_read = pa_json.read_json(pa.BufferReader(payload), read_options=options)
    except pa.ArrowException:
        return None
    if table_read.num_rows != len(positions):  # e.g. two objects on one line
        return None
    row_index = raw.line_index[positions]
    arrays, problems, present = [], [], set()
    for t in targets:
        column = _typed_column(table_read, t.column)
        if column is None or pa.types.is_null(column.type):
            arrays.append(pa.nulls(table_read.num_rows, t.field.type))
            present |= {t.column} if column is not None else set()
            continue
        present.add(t.column)
        array = column.combine_chunks()
        matches = [a for a in t.accepted if conforms(array.type, a)]
        if len(matches) > 1:
            return None
        if not matches:
            bad = np.flatnonzero(array.is_valid().to_numpy(zero_copy_only=False))
            message = f"field {t.field.name!r}: {array.type} is not {t.field.type}"
            problems += [(int(row_index[i]), "wrong_type", message) for i in bad]
            arrays.append(pa.nulls(table_read.num_rows, t.field.type))
            continue
        try:
            arrays.append(_as_field(array, matches[0], t.field, convert))
        except _ARROW_ERRORS:
            return None
    schema = pa.schema([t.field for t in targets])
    table = pa.Table.from_arrays(arrays, schema=schema)
    return _Chunk(table, row_index, problems, present, _table_paths(table_read))


class _Refused(ValueError):
    """A line Python's parser reads but pyarrow's would not; `reason` is the code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused("duplicate_key", f"key {twice!r} appears twice in one object")
    return obj


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused("number_out_of_range", f"{text[:40]} does not fit a double")
    return value


def _int(text: str) -> int | float:
    """As pyarrow: an int beyond int64 becomes a double."""
    try:
        value = int(text)
    except ValueError:  # more digits than Python converts
        raise _Refused("number_out_of_range", f"{text[:40]}... does not fit a double") from None
    return value if _INT64[0] <= value < _INT64[1] else _float(text)


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_float=_float, parse_int=_int)


def parse_line(line: bytes) -> tuple[dict[str, Any] | None, str, str]:
    """One JSON line by Python's parser: (object, "", "") or (None, reason, message)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "invalid_utf8", str(err)
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        return None, "too_deep", "nested deeper than the parser's recursion limit"
    except _Refused as err:
        return None, err.reason, str(err)
    except json.JSONDecodeError as err:
        return None, "invalid_json", str(err)
    if not isinstance(value, dict):
        return None, "not_an_object", f"expected a JSON object, got {type(value).__name__}"
    if _SURROGATE_ESCAPE.search(line):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "invalid_unicode", "a string holds a lone UTF-16 surrogate"
    return value, "", ""


def _python_chunk(
    raw: RawFile, positions: np.ndarray, targets: list[_Target], convert: Convert
) -> _Chunk:
    """Rows parsed one by one; values are cast per column, then per value where they mix."""
    records, index, problems = [], [], []
    for position in positions:
        row = int(raw.line_index[position])
        record, reason, message = parse_line(raw.line(int(position)))
        if record is None:
            problems.append((row, reason, f"line {row + 1}: {message}"))
        else:
            records.append(record)
            index.append(row)
    arrays, present = [], set()
    for t in targets:
        found = [_lookup(r, t.column) for r in records]
        present |= {t.column} if any(ok for ok, _ in found) else set()
        values = [value for _, value in found]
        array, bad = _column_from_values(values, t.field, t.accepted, convert)
        problems += [(index[i], "wrong_type", message) for i, message in bad]
        arrays.append(array)
    schema = pa.schema([t.field for t in targets])
    table = pa.Table.from_arrays(arrays, schema=schema)
    return _Chunk(table, np.asarray(index, np.int64), problems, present, _record_paths(records))


def _record_paths(records: list[dict[str, Any]]) -> set[str]:
    """Keys, and `key.field` for the fields of object values (one level)."""
    paths: set[str] = set()
    for record in records:
        paths.update(record)
        paths.update(f"{k}.{sub}" for k, v in record.items() if isinstance(v, dict) for sub in v)
    return paths


def _lookup(record: dict[str, Any], name: str) -> tuple[bool, Any]:
    """(found, value) of key `name`, or of the nested field a dotted `name` reaches."""
    if name in record:
        return True, record[name]
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return "." in name, value


def _as_field(array: pa.Array, target: pa.DataType, f: pa.Field, convert: Convert) -> pa.Array:
    array = array.cast(target)
    return array if target == f.type else convert(f.name, array)


def _column_from_values(
    values: list[Any], f: pa.Field, accepted: tuple[pa.DataType, ...], convert: Convert
) -> tuple[pa.Array, list[tuple[int, str]]]:
    """One column from parsed JSON values: whole-column inference first, then per value.

    Returns:
        The array (nulls where a value fits no accepted type) and (position, message) of
        each such value.
    """
    try:
        inferred = pa.array(values)
        matches = [t for t in accepted if conforms(inferred.type, t)]
        if pa.types.is_null(inferred.type):
            return pa.nulls(len(values), f.type), []
        if len(matches) == 1:
            return _as_field(inferred, matches[0], f, convert), []
    except _ARROW_ERRORS:
        pass  # mixed types, or shapes merged into one struct: sort the values one by one
    groups: dict[int, list[int]] = {}
    bad: list[tuple[int, str]] = []
    for i, value in enumerate(values):
        target = _fitting_type(value, accepted)
        if target is None:
            bad.append((i, _wrong_type(f, value)))
        else:
            groups.setdefault(target, []).append(i)
    parts, positions = [], []
    for k, members in groups.items():
        try:
            part = pa.array([values[i] for i in members], type=accepted[k])
            parts.append(_as_field(part, accepted[k], f, convert))
            positions += members
        except _ARROW_ERRORS:
            bad += [(i, _wrong_type(f, values[i])) for i in members]
    parts += [pa.nulls(1, f.type)] * (len(values) - len(positions))
    positions += [i for i, _ in bad]
    merged = pa.concat_arrays(parts) if parts else pa.nulls(0, f.type)
    order = sorted(range(len(positions)), key=positions.__getitem__)
    return merged.take(pa.array(order, pa.int64())), sorted(bad)


def _fitting_type(value: Any, accepted: tuple[pa.DataType, ...]) -> int | None:
    """The index of the first accepted type `value` conforms to, or None."""
    if value is None:
        return 0
    try:
        kind = pa.array([value]).type
    except _ARROW_ERRORS:
        return None
    return next((k for k, t in enumerate(accepted) if conforms(kind, t)), None)


def _wrong_type(f: pa.Field, value: Any) -> str:
    shown = json.dumps(value, ensure_ascii=False, default=str)[:80]
    return f"field {f.name!r}: {shown} is not {f.type}"
