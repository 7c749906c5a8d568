"""Packed shards on disk: atomic writer, verifying memory-mapped reader.

A shard directory (named by its cache key) holds:
- `shard-00000.arrow`, ...: uncompressed Arrow IPC *stream* files in the `packed_row`
  schema, each closed once it passes `shard_bytes` (so bounded by that plus one record
  batch). The stream format is what `datasets.Dataset.from_file` and
  `polars.read_ipc_stream` read; memory-mapped, pyarrow reads it without copies.
- `tokenizer.json` and a minimal `tokenizer_config.json` (bos/eos, chat template), so
  training can decode and export the tokenizer with the checkpoint.
- `manifest.json` (`data_contracts.manifest`), written last.

Everything is written into a hidden temp directory beside the final one and renamed into
place, so a shard directory either is complete or does not exist.

A directory proves what it is before anything trusts it (`read_manifest`, then
`verify_files`): the manifest's key is the directory's name and the key of the manifest's
own config and inputs; its checksum covers every other field and the file is exactly the
text written; it lists the size and sha256 of every other file. A mismatch is a
`ShardError` naming the file (and the field) that changed. `open_shards(verify=False)`
skips only the sha256 of the shard files (the bytes that take time to read); every other
check always runs.

Training imports this module (`training -> pipeline.shards -> data_contracts`), so it
depends on numpy, pyarrow and `pipeline.io` only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np
import pyarrow as pa

from data_contracts import manifest as manifest_contract
from data_contracts import packed_row
from data_contracts.contract import ContractError
from data_contracts.packed_row import PackedRow
from pipeline.io import is_file_name, is_hex_key

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER, TOKENIZER_CONFIG)  # listed in the manifest's `files`
SHARD_NAME = "shard-{:05d}.arrow"


class ShardError(ValueError):
    """A store directory (shards, or tokenized pairs) is incomplete or corrupt; the
    message names the file."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _list_total(column: pa.Array) -> int:
    offsets = column.offsets
    return offsets[len(offsets) - 1].as_py() - offsets[0].as_py()


class ShardWriter:
    """Writes `packed_row` record batches into size-bounded IPC stream files."""

    def __init__(self, directory: Path, shard_bytes: int) -> None:
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.shards: list[dict] = []
        self._sink: pa.OSFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._current: dict = {}

    def write(self, batch: pa.RecordBatch) -> None:
        """Append rows; start a new shard once the current one passes `shard_bytes`."""
        if batch.num_rows == 0:
            return
        if self._writer is None:
            name = SHARD_NAME.format(len(self.shards))
            self._sink = pa.OSFile(str(self.directory / name), "wb")
            self._writer = pa.ipc.new_stream(self._sink, packed_row.SCHEMA)
            self._current = {"file": name, "rows": 0, "pairs": 0, "tokens": 0}
        self._writer.write_batch(batch)
        self._current["rows"] += batch.num_rows
        self._current["pairs"] += _list_total(batch.column("pair_start"))
        self._current["tokens"] += _list_total(batch.column("input_ids"))
        assert self._sink is not None
        if self._sink.tell() >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._writer is not None and self._sink is not None
        self._writer.close()
        self._sink.close()
        path = self.directory / self._current["file"]
        self.shards.append(
            {**self._current, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
        self._writer = self._sink = None

    def close(self) -> list[dict]:
        """Finish the last shard; return the manifest's `shards` entries."""
        if self._writer is not None:
            self._close_shard()
        return self.shards


def file_entries(directory: Path, names: Iterable[str]) -> list[dict]:
    """`{file, bytes, sha256}` per named file of `directory`, for a manifest or report."""
    return [
        {
            "file": name,
            "bytes": (directory / name).stat().st_size,
            "sha256": sha256_file(directory / name),
        }
        for name in names
    ]


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Seal (add the checksum), validate and write `manifest.json` (deterministic bytes).

    Returns:
        The manifest as written, checksum included.
    """
    sealed = {**manifest, "checksum": manifest_contract.checksum(manifest)}
    manifest_contract.validate(sealed, str(directory / MANIFEST))
    (directory / MANIFEST).write_text(manifest_contract.text(sealed), encoding="utf-8")
    return sealed


# ---------------------------------------------------------------------------- reading


class _Chunk:
    """Numpy views of one record batch's buffers (no copies)."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        def parts(name: str) -> tuple[np.ndarray, np.ndarray]:
            column = batch.column(name)
            return column.values.to_numpy(), column.offsets.to_numpy()

        self.input_ids = parts("input_ids")
        self.pair_columns = [
            parts(n) for n in ("pair_start", "prompt_len", "chosen_len", "rejected_len")
        ]
        self.pair_ids = batch.column("pair_ids")
        self.blocks = []
        for name in ("kv_block_full", "kv_block_partial"):
            outer = batch.column(name)
            inner = outer.values
            self.blocks.append(
                (outer.offsets.to_numpy(), inner.offsets.to_numpy(), inner.values.to_numpy())
            )

    def row(self, j: int) -> PackedRow:
        values, offsets = self.input_ids
        pairs = [v[o[j] : o[j + 1]] for v, o in self.pair_columns]
        blocks = []
        for outer, inner, values_ in self.blocks:
            bounds = inner[outer[j] : outer[j + 1] + 1]
            blocks.append(tuple(values_[a:b] for a, b in itertools.pairwise(bounds.tolist())))
        return PackedRow(
            input_ids=values[offsets[j] : offsets[j + 1]],
            pair_start=pairs[0],
            prompt_len=pairs[1],
            chosen_len=pairs[2],
            rejected_len=pairs[3],
            pair_ids=tuple(self.pair_ids[j].values.to_pylist()),
            kv_block_full=blocks[0],
            kv_block_partial=blocks[1],
        )


def table_rows(table: pa.Table) -> list[PackedRow]:
    """Every row of a `packed_row` table held in memory (e.g. pairs packed again for a
    fold, `pipeline.folds`) as `PackedRow` views of its buffers."""
    return [
        chunk.row(j)
        for chunk in (_Chunk(b) for b in table.to_batches() if b.num_rows)
        for j in range(len(chunk.pair_ids))
    ]


class ShardReader(Sequence[PackedRow]):
    """Random access to the rows of a shard directory, as numpy views of the mmapped files.

    Attributes:
        directory: the shard directory.
        manifest: the parsed `manifest.json`.
        layout, block_size, max_len, key: from the manifest.
        tokenizer_path: the `tokenizer.json` the rows were made with.
        table: all rows as one Arrow table (zero copy over the memory maps).
        row_tokens: int64 [rows], tokens per row (for token-budget batching).
    """

    def __init__(self, directory: Path, manifest: dict, tables: list[pa.Table]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.layout: str = manifest["layout"]
        self.block_size: int = manifest["mask_block_size"]
        self.max_len: int = manifest["max_len"]
        self.key: str = manifest["key"]
        self.tokenizer_path = directory / manifest["tokenizer"]["path"]
        self.table = pa.concat_tables(tables) if tables else packed_row.SCHEMA.empty_table()
        self._chunks = [_Chunk(b) for b in self.table.to_batches() if b.num_rows]
        sizes = np.array([b.num_rows for b in self.table.to_batches() if b.num_rows], np.int64)
        self._chunk_start = np.concatenate([[0], np.cumsum(sizes)])
        self.row_tokens = np.concatenate(
            [np.diff(c.input_ids[1]).astype(np.int64) for c in self._chunks] or [np.zeros(0)]
        ).astype(np.int64)

    def __len__(self) -> int:
        return int(self._chunk_start[-1])

    @overload
    def __getitem__(self, i: int) -> PackedRow: ...
    @overload
    def __getitem__(self, i: slice) -> list[PackedRow]: ...
    def __getitem__(self, i: int | slice) -> PackedRow | list[PackedRow]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        chunk = int(np.searchsorted(self._chunk_start, i, side="right")) - 1
        return self._chunks[chunk].row(i - int(self._chunk_start[chunk]))

    def __iter__(self) -> Iterator[PackedRow]:
        for chunk, start, stop in zip(
            self._chunks, self._chunk_start[:-1], self._chunk_start[1:], strict=True
        ):
            for j in range(int(stop - start)):
                yield chunk.row(j)


def read_manifest(directory: str | Path) -> dict:
    """Parse a shard directory's manifest and check it proves its own content.

    Cheap (reads only manifest.json): the contract, plain names, the key (the directory's
    name, and the key of the manifest's config and inputs), the checksum, and that the file
    is exactly the text written.

    Raises:
        ShardError: naming manifest.json (and the field) when it is missing, not JSON, not
            a manifest of this version, lists a file name or key that could reach outside the
            directory, or was edited.
    """
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_bytes().decode("utf-8")  # as written: no newline translation
        manifest = manifest_contract.validate(json.loads(raw), str(path))
    except FileNotFoundError as err:
        raise ShardError(f"{path}: missing; not a complete shard directory") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not valid JSON: {err}") from err
    except ContractError as err:
        raise ShardError(str(err)) from err
    _check_names(manifest, path)
    _check_key(manifest, path)
    check_sealed(manifest, raw, path)
    return manifest


def _check_names(manifest: dict, path: Path) -> None:
    """Refuse a manifest whose file names or keys would reach outside its directory
    (`../../etc/passwd`, `/etc/passwd`), before any listed file is opened.

    Raises:
        ShardError: naming the manifest and the bad name.
    """
    names = [shard["file"] for shard in manifest["shards"]]
    names += [entry["file"] for entry in manifest["files"]]
    names.append(manifest["tokenizer"].get("path"))
    for name in names:
        if not is_file_name(name):
            raise ShardError(f"{path}: {name!r} is not a plain file name")
    for field, key in (("key", manifest["key"]), ("tokenized.key", manifest["tokenized"]["key"])):
        if not is_hex_key(key):
            raise ShardError(f"{path}: {field} {key!r} is not a hex key")
    listed = sorted(entry["file"] for entry in manifest["files"])
    if listed != sorted(TOKENIZER_FILES) or manifest["tokenizer"].get("path") != TOKENIZER:
        raise ShardError(
            f"{path}: files lists {listed} and tokenizer.path is "
            f"{manifest['tokenizer'].get('path')!r}; a shard directory's are "
            f"{sorted(TOKENIZER_FILES)} and {TOKENIZER!r}"
        )


def _check_key(manifest: dict, path: Path) -> None:
    """The key names this directory and is the key of the manifest's own settings.

    Raises:
        ShardError: naming the manifest and the key that disagrees (an edited setting, or a
            directory renamed or copied under another key).
    """
    name = path.parent.resolve().name
    if manifest["key"] != name:
        raise ShardError(f"{path}: key {manifest['key']!r} is not the directory's name {name!r}")
    recomputed = manifest_contract.shard_key(
        manifest["tokenized"]["key"], manifest["config"], manifest["contracts"], manifest["packer"]
    )
    if recomputed != manifest["key"]:
        raise ShardError(
            f"{path}: key {manifest['key']!r} is not the key of its config, tokenized.key, "
            f"packer and contracts ({recomputed!r}): one of them was edited"
        )


def check_sealed(document: dict, raw: str, path: Path) -> None:
    """Check a sealed JSON document (manifest or report) is unedited.

    Args:
        document: the parsed document; its `checksum` field is checked.
        raw: the file's text, which must be exactly what was written.
        path: the file, named in the error.

    Raises:
        ShardError: naming `path` when the checksum is absent or does not match the
            content (an edited value, a listed sha256 included), or only the bytes differ.
    """
    stored = document.get("checksum")
    if not isinstance(stored, str):
        raise ShardError(f"{path}: no checksum; written by an older prefpack, build it again")
    actual = manifest_contract.checksum(document)
    if actual != stored:
        raise ShardError(
            f"{path}: content does not match its checksum ({actual[:12]}... != stored "
            f"{stored[:12]}...): {path.name} was edited"
        )
    if raw != manifest_contract.text(document):
        raise ShardError(f"{path}: not the text that was written: {path.name} was edited")


def verify_files(directory: str | Path, manifest: dict, hash_shards: bool = True) -> None:
    """Check the size and sha256 of tokenizer.json, tokenizer_config.json and every shard.

    Args:
        hash_shards: also hash the shard files (the other files are small: always hashed).

    Raises:
        ShardError: naming the first file that is missing or differs from the manifest.
    """
    check_files(directory, [(f["file"], f["bytes"], f["sha256"]) for f in manifest["files"]])
    shards = [(s["file"], s["bytes"], s["sha256"]) for s in manifest["shards"]]
    check_files(directory, shards, hash_=hash_shards)


def check_files(
    directory: str | Path, expected: Iterable[tuple[str, int, str]], hash_: bool = True
) -> None:
    """Check that each listed file exists with its size and sha256.

    Args:
        directory: where the files are.
        expected: (file name, bytes, sha256 hex) per file.
        hash_: False checks names and sizes only (reads no data).

    Raises:
        ShardError: naming the first file that is missing or differs from its listing, or
            a listed name that is not a plain file name (checked before it is opened).
    """
    directory = Path(directory)
    for name, size, digest in expected:
        if not is_file_name(name):
            raise ShardError(f"{directory}: listed file {name!r} is not a plain file name")
        path = directory / name
        if not path.is_file():
            raise ShardError(f"{path}: listed but missing")
        if path.stat().st_size != size:
            raise ShardError(f"{path}: {path.stat().st_size} bytes, listed as {size}")
        if not hash_:
            continue
        actual = sha256_file(path)
        if actual != digest:
            raise ShardError(f"{path}: sha256 {actual[:12]}... != listed {digest[:12]}...")


def open_shards(directory: str | Path, verify: bool = True) -> ShardReader:
    """Open a shard directory for reading (memory-mapped, zero copy).

    Args:
        directory: a directory written by `pipeline.pack.build_shards`.
        verify: hash the shard files too (reads every byte once); the manifest's own
            checks and the tokenizer files' sha256 run either way.

    Raises:
        ShardError: naming the file (and field) that is missing, edited, corrupt or not in
            the packed_row schema.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest, hash_shards=verify)
    tables = []
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        try:
            table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        except (OSError, pa.ArrowInvalid) as err:
            raise ShardError(f"{path}: not a readable Arrow IPC stream: {err}") from err
        if not table.schema.equals(packed_row.SCHEMA, check_metadata=False):
            raise ShardError(f"{path}: schema is not packed_row v{packed_row.VERSION}")
        if table.num_rows != shard["rows"]:
            raise ShardError(f"{path}: {table.num_rows} rows, manifest says {shard['rows']}")
        tables.append(table)
    return ShardReader(directory, manifest, tables)
