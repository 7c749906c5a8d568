"""Atomic outputs (kill -9, leftovers, concurrent runs, a full disk, modes), keyed
outputs, and the name and key rules."""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import atomic as io
from core.atomic import atomic_directory, atomic_file, is_file_name, is_hex_key
from pipeline.io import PAIRS_FILE, write_parquet
from tests.conftest import assert_one_error_line

# ------------------------------------------------------------------ atomic outputs

REPO = Path(__file__).resolve().parents[2]

# Enters an atomic write of argv[2] (`dir` or `file` per argv[1]), writes 1000 bytes, then
# kill -9s itself inside the block: a real crash at a known point.
_KILLED_WRITER = """
import os, signal, sys
from core.atomic import atomic_directory, atomic_file
kind, out = sys.argv[1], sys.argv[2]
with (atomic_directory if kind == "dir" else atomic_file)(out) as tmp:
    (tmp / "half.bin" if kind == "dir" else tmp).write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""

# Enters an atomic write of argv[1], prints its temp directory, and finishes when told.
_PAUSED_WRITER = """
import sys
from core.atomic import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (tmp / "theirs").write_text("theirs")
    print(tmp, flush=True)
    sys.stdin.readline()
"""


def _python(code: str, *args: str, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env, **popen)


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _fill(directory: Path, text: str = "same") -> None:
    (directory / "a.txt").write_text(text)
    (directory / "sub").mkdir()
    (directory / "sub" / "b.bin").write_bytes(text.encode() * 3)


def _owned(out: Path, tag: str, pid: int, host: str = io._HOST) -> Path:
    return out.parent / f".{out.name}{tag}{host}-{pid}-0123abcd"


def _age(path: Path, seconds: float) -> None:
    """Set the mtime of `path` and everything in it `seconds` into the past."""
    then = time.time() - seconds
    for entry in [path, *path.rglob("*")]:
        os.utime(entry, (then, then))


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_kill_inside_the_write_leaves_no_output_and_the_next_write_removes_the_leftover(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    assert _python(_KILLED_WRITER, kind, str(out)).wait() == -signal.SIGKILL
    assert not out.exists()
    [leftover] = _hidden(tmp_path)
    assert leftover.startswith(".out.tmp-")
    with caplog.at_level(logging.WARNING, logger="core.atomic"):
        if kind == "dir":
            with atomic_directory(out) as tmp:
                _fill(tmp)
        else:
            with atomic_file(out) as tmp:
                tmp.write_text("done")
    assert _hidden(tmp_path) == []
    assert f"{out}: removed 1 leftover(s) of interrupted runs, 1000 bytes" in caplog.messages


def test_a_live_runs_temp_directory_is_never_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = _python(_PAUSED_WRITER, str(out), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert other.stdout is not None and other.stdin is not None
    theirs = Path(other.stdout.readline().decode().strip())
    with atomic_directory(out) as tmp:
        (tmp / "ours").write_text("ours")
    assert (theirs / "theirs").read_text() == "theirs"  # still there, still theirs
    other.stdin.write(b"go\n")
    other.stdin.close()
    assert other.wait() == 0
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]  # the later rename wins
    assert _hidden(tmp_path) == []


def test_leftovers_go_when_their_owner_is_gone_or_they_are_stale(tmp_path: Path) -> None:
    out = tmp_path / "out"
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = os.getppid()
    entries = {
        _owned(out, ".tmp-", gone.pid): False,  # owner exited
        _owned(out, ".old-", os.getpid()): False,  # ours (a reused pid) and not in use
        _owned(out, ".tmp-", live): True,  # a live process of this host
        _owned(out, ".tmp-", live, host="elsewhere"): True,  # another host: cannot ask
        out.parent / ".out.tmp-ab_cd123": True,  # legacy mkdtemp name, fresh
        out.parent / ".out.tmp-not-a-name-we-make": True,
    }
    stale = {
        _owned(out, ".tmp-", os.getppid(), host="elsewhere2"): False,  # idle for 2 days
        out.parent / ".out.old-zz_zz999": False,  # legacy, idle for 2 days
        out.parent / ".out.tmp-also-not-ours": True,  # idle, but not a name we make
    }
    for path in [*entries, *stale]:
        path.mkdir()
        (path / "f").write_bytes(b"x" * 10)
    for path in stale:
        _age(path, 2 * 24 * 3600)
    assert io.remove_leftovers(out) == 10 * 4
    assert _hidden(tmp_path) == sorted(p.name for p, kept in {**entries, **stale}.items() if kept)


def _winner_installs_after_our_look(
    monkeypatch: pytest.MonkeyPatch, out: Path, text: str
) -> list[int]:
    """Make another run rename its `out` in right after ours found `out` absent: the
    moment a second run of one key used to die with `[Errno 39] Directory not empty`.

    Returns:
        A list that receives the inode of the winner's directory once it is installed.
    """
    real, installed = io._claim, []

    def claim_then_lose_the_race(path: Path, owner: Path) -> Path | None:
        monkeypatch.setattr(io, "_claim", real)
        claimed = real(path, owner)
        with atomic_directory(out) as theirs:
            _fill(theirs, text)
        installed.append(out.stat().st_ino)
        return claimed

    monkeypatch.setattr(io, "_claim", claim_then_lose_the_race)
    return installed


def test_the_second_of_two_identical_runs_keeps_the_winners_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "key"
    winner = _winner_installs_after_our_look(monkeypatch, out, "same")
    with atomic_directory(out, keep_identical=True) as tmp:
        _fill(tmp, "same")
    assert winner and out.stat().st_ino == winner[0]
    assert (out / "a.txt").read_text() == "same"
    assert _hidden(tmp_path) == []
    with atomic_directory(out, keep_identical=True) as tmp:  # no race: identical kept too
        _fill(tmp, "same")
    assert out.stat().st_ino == winner[0]


def test_without_keep_identical_the_later_run_replaces_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "normalized"
    winner = _winner_installs_after_our_look(monkeypatch, out, "theirs")
    with atomic_directory(out) as tmp:
        _fill(tmp, "ours")
    assert winner and (out / "a.txt").read_text() == "ours"
    assert _hidden(tmp_path) == []


def test_keep_identical_replaces_a_directory_with_other_bytes(tmp_path: Path) -> None:
    out = tmp_path / "key"
    with atomic_directory(out) as tmp:
        _fill(tmp, "corrupt")
    with atomic_directory(out, keep_identical=True) as tmp:
        _fill(tmp, "good")
    assert (out / "sub" / "b.bin").read_bytes() == b"goodgoodgood"
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("intact", [True, False], ids=["reused", "rebuilt"])
def test_a_keyed_directory_removes_a_killed_runs_leftover_whether_reused_or_rebuilt(
    tmp_path: Path, intact: bool, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "0123abcd"

    def verify(directory: Path) -> str:
        if (directory / "a.txt").read_text() != "same":
            raise ValueError(f"{directory / 'a.txt'}: edited")
        return "verified"

    def build(tmp: Path) -> str:
        _fill(tmp)
        return "built"

    assert io.keyed_directory(out, verify, build) == ("built", False)
    if not intact:
        (out / "a.txt").write_text("edited")
    # Another run of the same key, killed inside its write, left its temp directory.
    assert _python(_KILLED_WRITER, "dir", str(out)).wait() == -signal.SIGKILL
    [leftover] = _hidden(tmp_path)
    assert leftover.startswith(f".{out.name}.tmp-")
    with caplog.at_level(logging.WARNING, logger="core.atomic"):
        again = io.keyed_directory(out, verify, build)
    assert again == (("verified", True) if intact else ("built", False))
    assert _hidden(tmp_path) == []
    assert (out / "a.txt").read_text() == "same"
    assert f"{out}: removed 1 leftover(s) of interrupted runs, 1000 bytes" in caplog.messages
    assert (f"rebuilding {out}: {out / 'a.txt'}: edited" in caplog.messages) is not intact


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_error_naming_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)  # every Parquet write
    out = tmp_path / "curated"
    with pytest.raises(OSError) as raised, atomic_directory(out) as tmp:
        write_parquet(pa.table({"x": [1]}), tmp / PAIRS_FILE)
    assert (raised.value.errno, raised.value.filename) == (code, str(out))
    assert raised.value.strerror == os.strerror(code)
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_pass_unchanged(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as raised, atomic_file(tmp_path / "f") as tmp:
        (tmp.parent / "missing" / "x").write_text("")
    assert raised.value.filename == str(tmp_path / "missing" / "x")


def test_the_cli_prints_a_full_disk_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli, fixtures_dir: Path
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)  # every Parquet write
    out = tmp_path / "normalized"
    status, err = cli(
        ["normalize", "--source", "generic", "--input", str(fixtures_dir / "generic.jsonl"),
         "--out", str(out)]
    )  # fmt: skip
    assert_one_error_line(status, err, "normalize", f"{out}: No space left on device")


@pytest.mark.parametrize(("umask", "dirs", "files"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_get_the_modes_the_umask_gives(
    tmp_path: Path, umask: int, dirs: int, files: int
) -> None:
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            _fill(tmp)
            fd, name = tempfile.mkstemp(dir=tmp)  # 0600, as mkstemp and safetensors make them
            os.close(fd)
        with atomic_file(tmp_path / "file") as tmp:
            tmp.write_text("x")
            tmp.chmod(0o600)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes == {p: dirs if p.is_dir() else files for p in modes}
    assert Path(name).name in {p.name for p in modes}
    assert stat.S_IMODE((tmp_path / "file").stat().st_mode) == files


# ------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "plain"),
    [("shard-00000.arrow", True), (".metadata", True), ("../../etc/passwd", False),
     ("/etc/passwd", False), ("a/b", False), ("..", False), (".", False), ("", False),
     ("a\\b", False), (7, False), (None, False)],
)  # fmt: skip
def test_only_plain_file_names_pass(name: object, plain: bool) -> None:
    assert is_file_name(name) is plain


@pytest.mark.parametrize(
    ("key", "hex_"),
    [("0a5c27de83", True), ("0A5C", False), ("../x", False), ("", False), ("k", False),
     ("ab cd", False), (12, False)],
)  # fmt: skip
def test_only_hex_keys_pass(key: object, hex_: bool) -> None:
    assert is_hex_key(key) is hex_
