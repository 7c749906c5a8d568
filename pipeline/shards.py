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

A directory of difficulty scores is proven the same way: `prefpack difficulty`
(`training/difficulty.py`) writes `scores.parquet` (`data_contracts.difficulty_scores`,
sorted by pair id) and `report.json` (what the scores depend on, one entry per fold, the
size and sha256 of `scores.parquet`, sealed with a checksum as a manifest is) with
`write_scores`; `read_report` and `read_scores` check and read them without torch, so the
Dagster process and the selection (`pipeline.selection`) can reuse scores without loading
the trainer.

The k-fold split of a shard's pairs, and a fold's pairs packed again by the pack stage's
own packer (`assign_folds`, `unpack_pairs`, `pack_pairs`), serve difficulty scoring.

This is the shard reader through which training reads `pipeline/` (`training ->
pipeline.shards -> data_contracts`; docs/design.md, "Layers"), so it depends on numpy,
pyarrow, `pipeline.io` and the packer only, never torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic import is_file_name, is_hex_key
from data_contracts import difficulty_scores as scores_contract
from data_contracts import manifest as manifest_contract
from data_contracts import packed_row, tokenized_pair
from data_contracts.contract import ContractError
from data_contracts.packed_row import Layout, PackedRow
from pipeline import ragged
from pipeline.io import rechunk, write_parquet
from pipeline.packer import RowPacker

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER, TOKENIZER_CONFIG)  # listed in the manifest's `files`
SHARD_NAME = "shard-{:05d}.arrow"
Validator = Callable[[Any, str], dict]  # a JSON contract's check: (document, source) -> it
SCORES_REPORT = "report.json"  # beside `difficulty_scores.SCORES_FILE`


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
    """Seal, validate and write `manifest.json` (`write_sealed`); returns it as written."""
    return write_sealed(directory / MANIFEST, manifest, manifest_contract.validate)


def write_sealed(path: Path, document: dict, validate: Validator) -> dict:
    """Seal `document` (add its `checksum`), check it with `validate` and write it to `path`
    as `read_sealed` expects it: a manifest or report, in deterministic bytes.

    Returns:
        The document as written, checksum included.
    """
    sealed = {**document, "checksum": manifest_contract.checksum(document)}
    validate(sealed, str(path))
    path.write_text(manifest_contract.text(sealed), encoding="utf-8")
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
    fold, `pack_pairs`) as `PackedRow` views of its buffers."""
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

    def validate(document: Any, source: str) -> dict:
        manifest = manifest_contract.validate(document, source)
        _check_names(manifest, path)
        _check_key(manifest, path)
        return manifest

    return read_sealed(path, validate, "shard")


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


def read_sealed(path: Path, validate: Validator, kind: str) -> dict:
    """Read a sealed JSON document (a manifest or report, `write_sealed`) and check that it
    proves itself: JSON, accepted by `validate`, then unedited.

    Args:
        path: the file.
        validate: its contract's check (`manifest.validate`, ...), called with the parsed
            document and `str(path)`; it may check more (names, the key) and raise
            ShardError, before the checksum is looked at.
        kind: the directory `path` completes, named when it is missing ("shard").

    Returns:
        The document, as `validate` returns it.

    Raises:
        ShardError: naming `path` when it is missing, not JSON, refused by `validate`, has
            no checksum or one that does not match its content (an edited value, a listed
            sha256 included), or is not the exact text written.
    """
    try:
        raw = path.read_bytes().decode("utf-8")  # as written: no newline translation
        document = validate(json.loads(raw), str(path))
    except FileNotFoundError as err:
        raise ShardError(f"{path}: missing; not a complete {kind} directory") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not valid JSON: {err}") from err
    except ContractError as err:
        raise ShardError(str(err)) from err
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
    return document


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


# ---------------------------------------------------------------------------------------
# Difficulty scores


def write_scores(
    directory: Path, scores: pa.Table, folds: Sequence[dict[str, Any]], identity: dict[str, Any]
) -> dict[str, Any]:
    """Write `scores.parquet` and then the sealed `report.json` into `directory`.

    Args:
        directory: an existing (temporary) directory.
        scores: a `difficulty_scores` table.
        folds: one `difficulty_scores.FOLD_FIELDS` entry per fold.
        identity: `inputs`, `settings` and `code`: what the scores depend on.

    Returns:
        The report as written.
    """
    scores_file = scores_contract.SCORES_FILE
    scores = scores_contract.CONTRACT.validate(scores, source=str(directory / scores_file))
    write_parquet(scores, directory / scores_file)
    report = {
        "contract": "difficulty_report",
        "version": scores_contract.VERSION,
        **identity,
        "pairs": scores.num_rows,
        "folds": list(folds),
        "files": file_entries(directory, [scores_file]),
    }
    return write_sealed(directory / SCORES_REPORT, report, scores_contract.validate_report)


def read_report(directory: str | Path) -> dict[str, Any]:
    """The report of a scores directory, after checking that it is unedited and that
    `scores.parquet` is the file it lists (size and sha256).

    Raises:
        ShardError: naming the file that is missing, edited or not what the report lists.
    """
    path = Path(directory) / SCORES_REPORT
    report = read_sealed(path, scores_contract.validate_report, "scores")
    listed = [(f["file"], f["bytes"], f["sha256"]) for f in report["files"]]
    if [name for name, _, _ in listed] != [scores_contract.SCORES_FILE]:
        raise ShardError(f"{path}: files must list {scores_contract.SCORES_FILE} alone")
    check_files(directory, listed)
    return report


def read_scores(directory: str | Path) -> pa.Table:
    """The scores of a directory that `read_report` accepted, checked by their contract.

    Raises:
        ContractError: naming the file and the broken rules.
    """
    path = Path(directory) / scores_contract.SCORES_FILE
    return scores_contract.CONTRACT.validate(pq.read_table(path), source=str(path))


# ----------------------------------------------------------------------------- folds
# K-fold splits of packed pairs, and the pairs of some folds packed again into rows.
#
# Difficulty scoring (`training/difficulty.py`, after Selective DPO) trains one model per fold
# on the other folds' pairs and scores the fold's own pairs with it, so every pair is scored
# by a model that never saw it. Here, torch-free:
#
# - `assign_folds`: fold of each pair id. The ids are ordered by a seeded hash of the id
#   alone and dealt round-robin, so the folds are disjoint, cover every pair, differ in size
#   by at most one (none is empty when there are at least k pairs), and do not depend on the
#   order the pairs come in. They do depend on the set of ids: a new pair moves others, as
#   any balanced split must (the shard key changes then too, so nothing stale is reused).
# - `unpack_pairs`: the `tokenized_pair` rows inside packed rows, exactly as packed (after the
#   length policy), read back from the token layout of `data_contracts.packed_row`.
# - `pack_pairs`: pairs packed again by the pack stage's own packer (`pipeline.packer.RowPacker`,
#   same layout, max_len and block size).


def assign_folds(pair_ids: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """The fold (0..k-1) of each pair id, in the order given.

    Args:
        pair_ids: unique pair ids.
        k: number of folds (>= 2).
        seed: salts the hash: another seed, another split.

    Returns:
        int64 fold per id.

    Raises:
        ValueError: k < 2, or a pair id given twice (it would sit in two folds).
    """
    if k < 2:
        raise ValueError(f"folds must be at least 2, got {k}")
    ids = list(pair_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("pair ids must be unique to split them into folds")
    salt = seed.to_bytes(8, "little", signed=False)
    # One hash per id: Python at the id boundary (about a microsecond each); the digest is
    # stable across machines and versions, unlike a dataframe library's row hash.
    digests = [
        hashlib.blake2b(pid.encode("utf-8"), digest_size=8, salt=salt).digest() for pid in ids
    ]
    order = sorted(range(len(ids)), key=lambda i: (digests[i], ids[i]))
    folds = np.empty(len(ids), dtype=np.int64)
    folds[order] = np.arange(len(ids)) % k
    return folds


def unpack_pairs(rows: pa.Table, layout: Layout) -> pa.Table:
    """The pairs of `packed_row` rows as `tokenized_pair` rows, in row order.

    Shared rows hold `prompt | chosen | rejected`; unshared and padded rows hold
    `prompt | chosen | prompt | rejected` (the second prompt copy is skipped).
    """
    tokens, row_offsets = ragged.list_parts(rows.column("input_ids"))
    starts, pair_offsets = ragged.list_parts(rows.column("pair_start"))
    p, c, r = (
        ragged.list_parts(rows.column(name))[0].astype(np.int64)
        for name in ("prompt_len", "chosen_len", "rejected_len")
    )
    owner_row = np.repeat(np.arange(len(pair_offsets) - 1), np.diff(pair_offsets))
    start = row_offsets[owner_row] + starts.astype(np.int64)
    rejected_start = start + p + c if layout == "shared" else start + 2 * p + c
    columns = [
        ragged.list_array(pa.array(ragged.gather(tokens, s, n)), ragged.offsets_of(n))
        for s, n in ((start, p), (start + p, c), (rejected_start, r))
    ]
    ids = rows.column("pair_ids").combine_chunks().flatten()
    return pa.Table.from_arrays([ids, *columns], schema=tokenized_pair.SCHEMA)


def pack_pairs(
    pairs: pa.Table, layout: Layout, max_len: int, block_size: int, window: int
) -> pa.Table:
    """`tokenized_pair` rows (each within max_len) packed into `packed_row` rows as the pack
    stage packs them, `window` pairs at a time (`PackConfig.pack_window`); the trainer takes
    them as `pipeline.shards.table_rows`."""
    packer = RowPacker(layout, max_len, block_size)
    batches = [b for part in rechunk([pairs], window) for b in packer.add(part)]
    batches += packer.finish()
    return pa.Table.from_batches(batches, schema=packed_row.SCHEMA)
