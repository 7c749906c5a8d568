"""Read one source into Arrow: local files or directories, or a Hugging Face hub id.

Formats: JSON lines (`.jsonl`, `.ndjson`, optionally `.gz`), JSON (`.json`, `.json.gz`: an
array of objects, or JSON lines), Parquet and Arrow IPC (file or stream, as `datasets`
caches). A directory is read file by file in sorted order. A hub id (`owner/name`) loads
through `datasets.load_dataset`; offline that fails with an error naming the id.

Then `conform` casts each file to a raw contract (see `data_contracts.raw_sources`). Typed
files (Parquet, Arrow, hub) are checked per column: a missing or wrongly typed column stops
the run with the file and column named. JSON files are checked per row: a line that is not
UTF-8, not JSON or not an object, or a value of the wrong type, becomes a row problem with a
reason code, and the run goes on.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.contract import Contract, ContractError

JSON_LINES = (".jsonl", ".ndjson")
SUFFIXES = (*JSON_LINES, ".json", ".parquet", ".arrow")
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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError)

Convert = Callable[[str, pa.Array], pa.Array]


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
    """One input file (or hub split) as read, before any contract check.

    Attributes:
        label: the path or `hub_id:split`, written to quarantine rows as `file`.
        split: the split its name or the hub gives, or None when unknown.
        rows: rows seen, parsed or not (blank JSON lines are not rows).
        table: a typed table (Parquet, Arrow, hub), or None for JSON input.
        records: JSON input: the parsed objects, in file order.
        row_index: JSON input: the 0-based row (line) index of each record.
        failures: rows that could not be parsed: (row index, reason, message).
        raw_lines: JSON lines input: the undecoded line of each row index.
    """

    label: str
    split: str | None
    rows: int
    table: pa.Table | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    row_index: list[int] = field(default_factory=list)
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    raw_lines: list[bytes] | None = None

    def raw(self, row_indices: Sequence[int]) -> list[str]:
        """The raw rows at `row_indices` as text: the original line, or the row as JSON."""
        if self.raw_lines is not None:
            return [self.raw_lines[i].decode("utf-8", "backslashreplace") for i in row_indices]
        if self.table is not None:
            rows = self.table.take(pa.array(row_indices, pa.int64())).to_pylist()
        else:
            position = {r: i for i, r in enumerate(self.row_index)}
            rows = [self.records[position[i]] if i in position else None for i in row_indices]
        return [json.dumps(r, ensure_ascii=False, default=str) for r in rows]


# ---------------------------------------------------------------------------------------
# Reading


def is_hub_id(input: str | Path) -> bool:
    """True when `input` is no local path but looks like `owner/name` without a file suffix."""
    text = str(input)
    return (
        not Path(text).exists()
        and _HUB_ID.match(text) is not None
        and not text.lower().endswith((*SUFFIXES, ".gz"))
    )


def read(input: str | Path, hub: HubOptions | None = None) -> list[RawFile]:
    """Read a local file or directory, or a hub id.

    Args:
        input: a file, a directory (every supported file below it, sorted), or a hub id.
        hub: how to load a hub id (ignored for local input).

    Returns:
        One `RawFile` per file or hub split, in a stable order.

    Raises:
        IngestError: a missing path, an unknown format, an unreadable file or an empty
            directory (naming the path), or a hub id that cannot be loaded (naming the id).
    """
    if is_hub_id(input):
        return _read_hub(str(input), hub or HubOptions())
    path = Path(input)
    if not path.exists():
        raise IngestError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _format(p) is not None)
        if not files:
            raise IngestError(f"{path}: no {', '.join(SUFFIXES)} (optionally .gz) files inside")
        return [_read_file(p) for p in files]
    return [_read_file(path)]


def _format(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def split_from_name(name: str) -> str | None:
    """The split a file name states (`train.jsonl.gz`, `test_prefs-00000-of-00001.parquet`)."""
    stem = name.split(".")[0].split("-")[0]
    return stem if stem in KNOWN_SPLITS else None


def _read_file(path: Path) -> RawFile:
    kind = _format(path)
    if kind is None:
        raise IngestError(f"{path}: unknown format; expected one of {', '.join(SUFFIXES)}")
    label, split = str(path), split_from_name(path.name)
    try:
        if kind == ".parquet":
            table = pq.read_table(path)
            return RawFile(label, split, table.num_rows, table=table)
        if kind == ".arrow":
            table = _read_arrow(path)
            return RawFile(label, split, table.num_rows, table=table)
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, pa.ArrowInvalid) as err:
        raise IngestError(f"{path}: cannot read as {kind}: {err}") from err
    if kind == ".json":
        try:
            whole = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = None  # not one JSON document: read it as JSON lines
        if whole is not None:
            if not isinstance(whole, list):
                raise IngestError(f"{path}: expected a JSON array of objects or JSON lines")
            return _from_objects(label, split, whole)
    return _from_json_lines(label, split, data)


def _read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()


def _from_objects(label: str, split: str | None, objects: list[Any]) -> RawFile:
    raw = RawFile(label, split, len(objects))
    for i, obj in enumerate(objects):
        if isinstance(obj, dict):
            raw.records.append(obj)
            raw.row_index.append(i)
        else:
            raw.failures.append((i, "not_an_object", f"row {i}: expected an object"))
    return raw


def _from_json_lines(label: str, split: str | None, data: bytes) -> RawFile:
    """Parse line by line (the JSON parser is the batch boundary), keeping bad lines apart."""
    lines = data.split(b"\n")
    raw = RawFile(label, split, 0, raw_lines=lines)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        raw.rows += 1
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raw.failures.append((i, "invalid_utf8", f"line {i + 1}: {err}"))
            continue
        except json.JSONDecodeError as err:
            raw.failures.append((i, "invalid_json", f"line {i + 1}: {err}"))
            continue
        if not isinstance(obj, dict):
            raw.failures.append((i, "not_an_object", f"line {i + 1}: expected a JSON object"))
            continue
        raw.records.append(obj)
        raw.row_index.append(i)
    return raw


def _read_hub(hub_id: str, hub: HubOptions) -> list[RawFile]:
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
    files = []
    for split, dataset in splits.items():
        table = dataset.with_format("arrow")[:]
        files.append(RawFile(f"{hub_id}:{split}", split, table.num_rows, table=table))
    return files


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
    problems: list[tuple[int, str, str]]


def conform(
    raw: RawFile,
    contract: Contract,
    shapes: dict[str, tuple[pa.DataType, ...]],
    convert: Convert,
    columns: dict[str, str] | None = None,
) -> Conformed:
    """Cast `raw` to `contract`'s schema, converting fields that arrive in another shape.

    Args:
        raw: the file as read.
        contract: the source's raw contract.
        shapes: field -> other accepted types (`data_contracts.raw_sources.SHAPES`).
        convert: (field name, array of an accepted other type) -> array of the field's type.
        columns: contract field -> column name in the input, where they differ.

    Raises:
        ContractError: naming the file and every missing required column, or a typed
            column whose type fits neither the contract nor an accepted shape.
    """
    if raw.table is not None:
        present = set(raw.table.column_names)
    else:
        present = {key for record in raw.records for key in record}
    columns = columns or {}
    name = {f.name: columns.get(f.name, f.name) for f in contract.schema}
    missing = [
        name[f.name] for f in contract.schema if not f.nullable and name[f.name] not in present
    ]
    if missing and (raw.table is not None or raw.records):
        raise ContractError(
            f"{raw.label}: missing column(s) for {contract.name} v{contract.version}: "
            + ", ".join(missing)
        )
    problems = list(raw.failures)
    arrays = []
    for f in contract.schema:
        accepted = (f.type, *shapes.get(f.name, ()))
        if raw.table is None:
            values = [record.get(name[f.name]) for record in raw.records]
            array, bad = _column_from_values(values, f, accepted, convert)
            problems += [(raw.row_index[i], "wrong_type", message) for i, message in bad]
        elif name[f.name] not in present:
            array = pa.nulls(raw.table.num_rows, f.type)
        else:
            array = raw.table.column(name[f.name]).combine_chunks()
            target = next((t for t in accepted if conforms(array.type, t)), None)
            if target is None:
                raise ContractError(
                    f"{raw.label}: column {name[f.name]!r} has type {array.type}; "
                    f"{contract.name} needs {f.type}"
                )
            array = _as_field(array, target, f, convert)
        arrays.append(array)
    table = pa.Table.from_arrays(arrays, schema=contract.schema)
    if raw.table is None:
        row_index = pa.array(raw.row_index, pa.int64())
    else:
        row_index = pa.array(range(raw.table.num_rows), pa.int64())
    return Conformed(table, row_index, problems)


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
        target = next((t for t in accepted if conforms(inferred.type, t)), None)
        if target is not None:
            return _as_field(inferred, target, f, convert), []
    except (*_ARROW_ERRORS, OverflowError):
        pass  # mixed types: find the values that fit, one by one
    groups: dict[int, list[int]] = {}
    bad: list[tuple[int, str]] = []
    for i, value in enumerate(values):
        try:
            kind = pa.array([value]).type
        except (*_ARROW_ERRORS, OverflowError):
            kind = None
        target = (
            None
            if kind is None
            else next((k for k, t in enumerate(accepted) if conforms(kind, t)), None)
        )
        if target is None:
            shown = json.dumps(value, ensure_ascii=False, default=str)[:80]
            bad.append((i, f"field {f.name!r}: {shown} is not {f.type}"))
        else:
            groups.setdefault(target, []).append(i)
    parts, positions = [], []
    for k, members in groups.items():
        part = pa.array([values[i] for i in members], type=accepted[k])
        parts.append(_as_field(part, accepted[k], f, convert))
        positions += members
    for i, _ in bad:
        parts.append(pa.nulls(1, f.type))
        positions.append(i)
    merged = pa.concat_arrays(parts) if parts else pa.nulls(0, f.type)
    order = sorted(range(len(positions)), key=positions.__getitem__)
    return merged.take(pa.array(order, pa.int64())), bad
