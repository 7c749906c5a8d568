"""Atomic, byte-stable writes of a stage's output (a directory, or one file).

A stage writes into a hidden temporary sibling, `.NAME.tmp-<host>-<pid>-<token>`, that
replaces `NAME` only when every file is complete and flushed, so a crash (kill -9, power
loss) leaves either the old output or none, never half of one. The owner's host and pid in
the name let the next write of the same output remove what a killed run left behind (and
say how many bytes) without touching a live run's temp directory. Outputs get the ordinary
modes the umask gives (0755 / 0644 under umask 022), and a full disk is reported as one
error naming the output, not the file deep inside it that failed.

Parquet and JSON are written with fixed settings and no timestamps: same data, same bytes.
A stream written in pieces is re-cut into pieces of a fixed size first (`rechunk`), so how
its input was read never shows in the bytes. `ParquetRowGroups` writes a table batch by
batch in row groups of exactly `ROW_GROUP` rows, each one contiguous chunk (the writer's
page boundaries follow the chunks it is given): the bytes depend on the rows alone, and a
stage holds one row group at a time, whatever the size of its output.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
QUARANTINE_FILE = "quarantine.parquet"
DROPPED_FILE = "dropped.parquet"  # rows or pairs a stage's rules left out, each with its reason
REPORT_FILE = "report.json"
# Rows per Parquet row group of normalize's and curate's outputs (`ParquetRowGroups`): a
# few hundred MB of pairs at most, held once while written; readers stream by row group.
ROW_GROUP = 65_536

TMP_TAG = ".tmp-"  # `.NAME.tmp-...`: being written
OLD_TAG = ".old-"  # `.NAME.old-...`: a replaced output or a claimed leftover, being removed
# A leftover whose owner cannot be checked (another host, or a reused pid) is removed once
# nothing in it changed for this long: no single write of an output idles a day.
STALE_SECONDS = 24 * 3600
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_OWNED = re.compile(r"(?P<host>[A-Za-z0-9._]+)-(?P<pid>[0-9]+)-[0-9a-f]{8}")
_LEGACY = re.compile(r"[a-z0-9_]{8}")  # tempfile.mkdtemp's suffix, from before owners
_ACTIVE: set[Path] = set()  # this process's temp entries in use: never leftovers
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_RACE = (errno.ENOTEMPTY, errno.EEXIST)  # rename onto a directory another run installed
_INSTALL_TRIES = 100
_HEX = re.compile(r"[0-9a-f]+")


# ---------------------------------------------------------------------------- writing


@contextmanager
def atomic_directory(out_dir: str | Path, *, keep_identical: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `out_dir` when the block succeeds.

    Args:
        out_dir: the output directory.
        keep_identical: for content-addressed outputs (named by a key of their bytes):
            when `out_dir` already holds the same names and bytes at the end (another run
            of the same key finished first), it is kept and the temporary one dropped, so
            concurrent runs never crash on the rename nor pull a complete output away from
            a reader. Otherwise an existing `out_dir` is replaced.

    Raises:
        OSError: ENOSPC / EDQUOT with `filename` = `out_dir`; others as they come. On any
            exception the temporary directory is removed and `out_dir` left as it was.
    """
    out_dir = Path(out_dir)
    with _staged(out_dir, _make_directory) as (tmp, mode):
        yield tmp
        _settle(tmp, mode)
        _install_directory(tmp, out_dir, keep_identical)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling file path that replaces `path` when the block succeeds.

    The same guarantees as `atomic_directory`, for an output that is one file; a
    concurrent writer of the same file just replaces it (a rename over a file is atomic).
    """
    path = Path(path)
    with _staged(path, _make_file) as (tmp, mode):
        yield tmp
        _settle(tmp, mode)
        os.replace(tmp, path)
        _fsync(path.parent)


@contextmanager
def _staged(out: Path, make: Callable[[Path], int]) -> Iterator[tuple[Path, int]]:
    """Create a fresh temp entry for `out` (after removing dead runs' leftovers), yield it
    with its mode, and remove whatever of it is left at the end.

    A full disk anywhere inside, the caller's writes included, becomes an OSError naming
    `out`, the path the user knows.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)
        tmp = _owned_name(out, TMP_TAG)
        _ACTIVE.add(tmp)
        try:
            yield tmp, make(tmp)
        finally:
            _remove(tmp)
            _ACTIVE.discard(tmp)
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise OSError(err.errno, os.strerror(err.errno), str(out)) from err
        raise


def _make_directory(path: Path) -> int:
    """Create `path` with the default mode; return the mode the umask (or ACL) gave it."""
    os.mkdir(path)
    return stat.S_IMODE(path.stat().st_mode) & 0o777


def _make_file(path: Path) -> int:
    """Create an empty `path` with the default mode; return the mode it got."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return stat.S_IMODE(path.stat().st_mode) & 0o777


def _settle(root: Path, mode: int) -> None:
    """Give every entry under `root` the ordinary mode and flush it to disk, deepest first.

    Writers such as mkstemp or safetensors create files 0600; outputs are shared data, so
    directories get `mode` (what a new directory gets here) and files its rw bits.
    """
    for path in _tree(root):
        os.chmod(path, mode if path.is_dir() else mode & 0o666)
        _fsync(path)


def _tree(root: Path) -> Iterator[Path]:
    """`root` and every entry below it except symlinks, children before parents."""
    if root.is_dir():
        for parent, _, files in os.walk(root, topdown=False):
            yield from (Path(parent, f) for f in files if not Path(parent, f).is_symlink())
            yield Path(parent)
    else:
        yield root


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install_directory(tmp: Path, out_dir: Path, keep_identical: bool) -> None:
    """Rename `tmp` onto `out_dir`, replacing or (`keep_identical`) keeping what is there.

    Lock-free: when another run installs `out_dir` between our look and our rename, the
    rename fails with ENOTEMPTY and we look again.
    """
    for _ in range(_INSTALL_TRIES):
        if keep_identical and _same_tree(tmp, out_dir):
            return
        old = _claim(out_dir, out_dir)
        try:
            tmp.rename(out_dir)
            _fsync(out_dir.parent)
            return
        except OSError as err:
            if err.errno not in _RACE:
                raise
        finally:
            if old is not None:
                _remove(old)
                _ACTIVE.discard(old)
    raise OSError(errno.EBUSY, "other runs keep replacing it", str(out_dir))


def _same_tree(a: Path, b: Path) -> bool:
    """Whether directories `a` and `b` hold the same names with the same bytes."""
    try:
        names = sorted(p.relative_to(a) for p in a.rglob("*"))
        if not b.is_dir() or names != sorted(p.relative_to(b) for p in b.rglob("*")):
            return False
        return all(_same_bytes(a / n, b / n) for n in names if (a / n).is_file())
    except FileNotFoundError:  # another run is replacing `b` right now
        return False


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while chunk := fa.read(1 << 20):
            if chunk != fb.read(len(chunk)):
                return False
    return True


# -------------------------------------------------------------------------- leftovers


def _owned_name(out: Path, tag: str) -> Path:
    """A fresh hidden sibling of `out` that names this process as its owner."""
    return out.parent / f".{out.name}{tag}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _claim(path: Path, out: Path) -> Path | None:
    """Atomically rename `path` to a fresh `.old-` name of `out` owned by this process.

    Returns the new name, or None when `path` is gone (another run claimed it first), so
    two runs never remove the same entry, and a kill mid-removal leaves a leftover that
    the next run removes.
    """
    claimed = _owned_name(out, OLD_TAG)
    _ACTIVE.add(claimed)
    try:
        path.rename(claimed)
    except FileNotFoundError:
        _ACTIVE.discard(claimed)
        return None
    return claimed


def remove_leftovers(out: str | Path) -> int:
    """Remove the temp entries of `out` that killed runs left, and log how many bytes.

    An entry goes when this process owns it but no longer uses it, when its owner is a
    process of this host that no longer runs, or when nothing in it changed for
    `STALE_SECONDS`; a live run's entry is never touched.

    Returns:
        The bytes removed.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return 0
    removed, size = 0, 0
    for path in _leftovers(out):
        claimed = _claim(path, out)
        if claimed is not None:
            size += sum(p.lstat().st_size for p in _tree(claimed) if p.is_file())
            _remove(claimed)
            _ACTIVE.discard(claimed)
            removed += 1
    if removed:
        log.warning("%s: removed %d leftover(s) of interrupted runs, %d bytes", out, removed, size)
    return size


def _leftovers(out: Path) -> list[Path]:
    """The temp entries of `out` that no live run owns, in name order."""
    prefixes = [f".{out.name}{tag}" for tag in (TMP_TAG, OLD_TAG)]
    return sorted(
        path
        for path in out.parent.iterdir()
        for prefix in prefixes
        if path.name.startswith(prefix) and _abandoned(path, path.name[len(prefix) :])
    )


def _abandoned(path: Path, suffix: str) -> bool:
    """Whether the temp entry `path`, named `.NAME.<tag><suffix>`, has no live owner."""
    if path in _ACTIVE:
        return False
    owner = _OWNED.fullmatch(suffix)
    if owner is None:  # a legacy mkdtemp name (no owner to ask), or not a name we make
        return bool(_LEGACY.fullmatch(suffix)) and _idle_seconds(path) > STALE_SECONDS
    pid = int(owner["pid"])
    if owner["host"] == _HOST and (pid == os.getpid() or not _alive(pid)):
        return True
    return _idle_seconds(path) > STALE_SECONDS


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _idle_seconds(path: Path) -> float:
    """Seconds since anything in `path` last changed (0 while it is being removed)."""
    try:
        return time.time() - max(p.lstat().st_mtime for p in _tree(path))
    except FileNotFoundError:
        return 0.0


def _remove(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ names


def is_file_name(name: object) -> bool:
    """Whether `name` is a plain file name: a listed name may not reach outside its
    directory (`../x`, `/etc/x`, `a/b`), so manifests are checked before any file opens."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def is_hex_key(key: object) -> bool:
    """Whether `key` is a lowercase hex cache key, safe to use as a path component."""
    return isinstance(key, str) and _HEX.fullmatch(key) is not None


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
