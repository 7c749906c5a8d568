"""kill -9 at real moments of every writing stage, through the CLI, then a rerun.

Per stage, an uninterrupted run in a base workspace gives the expected bytes and how long
each output's temp entry lived. The same command then runs in a fresh workspace and is
killed (SIGKILL) at chosen points: poll until the output's temp entry appears, then kill at
once or after part of the time the uninterrupted write took. After every kill each output
is absent or byte-identical to the expected one (never partial); the next run that writes
an output says how many bytes of a killed run's leftovers it removed; and a final rerun
gives byte-identical outputs and leaves no temp entry behind.

Inputs are the first lines of the bundled generic sample and a 300-token BPE, so the
module takes about a minute on 2 cores, mostly torch's import in each training process.
A kill point whose write finished before the kill arrived is reported as a warning; each
stage must land at least one kill inside a write.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pipeline" / "sample_data" / "generic.jsonl"
SAMPLE_LINES = 40
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
POLL = 0.001  # seconds between looks for a temp entry
ATTEMPTS = 3  # rounds of kills, until one lands inside a write
TEMP_TAGS = (".tmp-", ".old-")  # core.atomic's temp entries: `.NAME.tmp-...`, `.NAME.old-...`
# DCP writes a fresh uuid (save_id) into the optimizer's .metadata on every save, and the
# model card states the time the run took: the only bytes of any output that differ between
# two uninterrupted runs (the card is compared with its time masked).
VOLATILE = {"optimizer/.metadata"}
MEASURED = {"README.md": re.compile(rb"steps? in [^\n]* of training and evaluation")}


@dataclass(frozen=True)
class Stage:
    """One CLI command and where to kill it.

    Attributes:
        command: the words after `prefpack`, run in the workspace; `{input}`, `{base}` and
            `{shards}` name the sample, the base workspace and its shard directory.
        outputs: globs (relative to the workspace) that each match one output.
        kills: (index into outputs, fraction of that output's write time to wait once its
            temp entry appears), in order.
    """

    command: str
    outputs: tuple[str, ...]
    kills: tuple[tuple[int, float], ...]

    @property
    def name(self) -> str:
        return self.command.split()[0]


STAGES = [
    Stage("normalize --source generic --input {input} --out norm", ("norm",), ((0, 0.5), (0, 0))),
    Stage("curate --pairs {base}/norm --out cur", ("cur",), ((0, 0.5), (0, 0))),
    Stage(  # tokenize, then pack: both stages of `prefpack pack`
        "pack --pairs {base}/cur --out store --bpe-vocab-size 300",
        ("store/tokenized/*", "store/shards/*"),
        ((0, 0), (1, 0.5), (1, 0)),
    ),
    Stage(  # reference log-probs (written as `prefpack logps` writes them), checkpoints, export
        "train --shards {shards} --config tiny --out run --steps 2 --checkpoint-every 1 "
        "--no-progress --reference-cache ref",
        ("ref/*.arrow", "run/checkpoints/step_000001", "run/checkpoints/step_000002", "run/final"),
        ((0, 0), (1, 0.5), (3, 0)),
    ),
]


@dataclass
class Base:
    """The uninterrupted runs: workspace, each stage's outputs, each output's write time."""

    root: Path
    outputs: dict[str, list[str]]
    seconds: dict[str, float]


# ----------------------------------------------------------------------------- running


def _argv(stage: Stage, base: Path) -> list[str]:
    shards = [str(p) for p in (base / "store" / "shards").glob("*")]
    names = {"input": str(base / "sample.jsonl"), "base": str(base), "shards": "".join(shards)}
    return [sys.executable, "-m", "prefpack", *(a.format(**names) for a in stage.command.split())]


def _start(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start the command in `cwd`, its stderr to the file `log` (a pipe nobody reads while
    we poll could fill up and block the child)."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as err:
        return subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=err)


def _temp_names(parent: Path, name: str | None = None) -> list[str]:
    """Temp entries in `parent` (of output `name`, or of any)."""
    if not parent.is_dir():
        return []
    prefixes = tuple(f".{name or ''}{tag}" for tag in TEMP_TAGS)
    return sorted(
        n
        for n in os.listdir(parent)
        if (n.startswith(prefixes) if name else n.startswith(".") and TEMP_TAGS[0] in n)
    )


def _run_watched(argv: list[str], cwd: Path, parents: set[Path], log: Path) -> dict[str, float]:
    """Run to completion, timing how long each output's temp entry was there."""
    proc, seen = _start(argv, cwd, log), {}
    while proc.poll() is None:
        now = time.monotonic()
        for parent in parents:
            for entry in _temp_names(cwd / parent):
                seen.setdefault(entry, [now, now])[1] = now
        time.sleep(POLL)
    assert proc.returncode == 0, log.read_text()
    return {entry[1:].split(TEMP_TAGS[0])[0]: b - a + POLL for entry, (a, b) in seen.items()}


def _kill_while_writing(argv: list[str], cwd: Path, output: str, delay: float, log: Path) -> int:
    """Start the command, wait until `output`'s temp entry appears, wait `delay`, kill -9.

    Returns:
        The exit status of the process, reaped (so a leftover's owner is dead, as after a
        real crash): -SIGKILL, or 0 when it finished first.
    """
    proc, parent, name = _start(argv, cwd, log), (cwd / output).parent, Path(output).name
    while proc.poll() is None and not _temp_names(parent, name):
        time.sleep(POLL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


# ---------------------------------------------------------------------------- checking


def _snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file's bytes under `path` (or of the file `path`); None if it is absent."""
    if path.is_file():
        return {"": path.read_bytes()}
    if not path.is_dir():
        return None
    files = (p for p in sorted(path.rglob("*")) if p.is_file())
    return {
        rel: _masked(rel, p.read_bytes())
        for p in files
        if (rel := p.relative_to(path).as_posix()) not in VOLATILE
    }


def _masked(rel: str, data: bytes) -> bytes:
    """`data` with what a run measures (not what it computes) replaced by a placeholder."""
    pattern = MEASURED.get(rel)
    if pattern is None:
        return data
    masked, found = pattern.subn(b"<time>", data)
    assert found == 1, f"{rel}: no measured time where the card states it"
    return masked


def _leftovers(work: Path, outputs: list[str]) -> dict[str, list[str]]:
    found = {o: _temp_names((work / o).parent, Path(o).name) for o in outputs}
    return {o: names for o, names in found.items() if names}


def _removal_reported(output: str, stderr: str) -> bool:
    line = (
        rf"{re.escape(Path(output).name)}: removed \d+ leftover\(s\) of interrupted runs, \d+ bytes"
    )
    return re.search(line, stderr) is not None


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """Every stage, uninterrupted, in order (each reads the one before), timed."""
    root = tmp_path_factory.mktemp("base")
    lines = SAMPLE.read_text().splitlines(keepends=True)[:SAMPLE_LINES]
    (root / "sample.jsonl").write_text("".join(lines))
    outputs, seconds = {}, {}
    for stage in STAGES:
        parents = {Path(o).parent for o in stage.outputs}
        log = root.parent / f"{stage.name}.err"
        seconds.update(_run_watched(_argv(stage, root), root, parents, log))
        found = [sorted(root.glob(o)) for o in stage.outputs]
        assert all(len(f) == 1 for f in found), found
        outputs[stage.name] = [f[0].relative_to(root).as_posix() for f in found]
    return Base(root, outputs, seconds)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_kill_9_never_leaves_a_partial_output_and_the_rerun_gives_the_same_bytes(
    stage: Stage, base: Base, tmp_path: Path
) -> None:
    argv, outputs = _argv(stage, base.root), base.outputs[stage.name]
    expected = {o: _snapshot(base.root / o) for o in outputs}
    work = tmp_path / "work"
    # Kills are timed, and a busy machine can let every write finish first: then the round
    # starts again from an empty workspace, up to ATTEMPTS rounds.
    for _ in range(ATTEMPTS):
        shutil.rmtree(work, ignore_errors=True)
        logs: list[Path] = []
        left: list[dict[str, list[str]]] = []  # the leftovers after each kill
        for index, fraction in stage.kills:
            output = outputs[index]
            delay = fraction * base.seconds.get(Path(output).name, 0.0)
            logs.append(tmp_path / f"kill-{len(logs)}.err")
            status = _kill_while_writing(argv, work, output, delay, logs[-1])
            for o in outputs:  # never partial: absent, or the very bytes of a complete run
                assert _snapshot(work / o) in (None, expected[o]), (stage.name, o)
            left.append(_leftovers(work, outputs))
            if status != -signal.SIGKILL or output not in left[-1]:
                warnings.warn(
                    f"{stage.name}: the kill in {output}'s write came after it", stacklevel=1
                )
        if any(left):
            break
    assert any(left), f"{stage.name}: no kill landed inside a write in {ATTEMPTS} rounds"

    rerun = subprocess.run(argv, cwd=work, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert {o: _snapshot(work / o) for o in outputs} == expected
    assert _leftovers(work, outputs) == {}
    later = [*(log.read_text() for log in logs), rerun.stderr]
    for run, leftovers in enumerate(left):  # the next run that writes an output reports it
        for output in leftovers:
            assert any(_removal_reported(output, err) for err in later[run + 1 :]), output
