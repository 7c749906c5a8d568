"""Atomic writes of a stage's output (a directory, or one file), and keyed outputs.

A stage writes into a hidden temporary sibling, `.NAME.tmp-<host>-<pid>-<token>`, that
replaces `NAME` only when every file is complete and flushed, so a crash (kill -9, power
loss) leaves either the old output or none, never half of one. The owner's host and pid in
the name let the next write of the same output remove what a killed run left behind (and
say how many bytes) without touching a live run's temp directory. Outputs get the ordinary
modes the umask gives (0755 / 0644 under umask 022), and a full disk is reported as one
error naming the output, not the file deep inside it that failed.

An output named by a content key (`keyed_directory`) is reused when it proves itself, else
built and published that way; dead runs' leftovers of the key go either way.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

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
T = TypeVar("T")


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


def keyed_directory(
    out: str | Path,
    verify: Callable[[Path], T],
    build: Callable[[Path], T],
    *,
    invalid: type[Exception] = ValueError,
    stage: Callable[[Path], AbstractContextManager[Path]] | None = None,
    rebuilding: Callable[[Exception], None] | None = None,
) -> tuple[T, bool]:
    """The output of a content key: reused when it proves itself, else built and published.

    Dead runs' leftovers of `out` go first, whether it is then reused or rebuilt. An
    existing `out` that `verify` accepts is reused; one it refuses is rebuilt: `build`
    writes into a temporary sibling that `atomic_directory(out, keep_identical=True)`
    publishes, with its guarantees (kill -9, concurrent runs of one key, a full disk).

    Args:
        out: the output directory, named by its key.
        verify: checks `out` and returns what the caller wants of it (its manifest, say);
            raises `invalid`, naming the problem, when `out` is not a complete output.
        build: writes the output into the directory it is given and returns the same.
        invalid: what `verify` refuses with; other exceptions pass.
        stage: yields the directory `build` writes and publishes it on exit, in place of
            `atomic_directory(out, keep_identical=True)` (e.g. for a command every rank
            of a process group runs).
        rebuilding: told `verify`'s refusal before the rebuild; by default it is logged
            as `rebuilding OUT: PROBLEM`.

    Returns:
        What `verify` or `build` returned, and whether `out` was reused.
    """
    out = Path(out)
    remove_leftovers(out)
    if out.exists():
        try:
            return verify(out), True
        except invalid as problem:
            if rebuilding is None:
                log.warning("rebuilding %s: %s", out, problem)
            else:
                rebuilding(problem)
    with (stage or _keyed_stage)(out) as tmp:
        return build(tmp), False


def _keyed_stage(out: Path) -> AbstractContextManager[Path]:
    return atomic_directory(out, keep_identical=True)


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
