"""Progress off a terminal: plain lines every few percent, with rate and ETA."""

from __future__ import annotations

import io

from core.progress import LineProgress, progress


class Clock:
    """A clock the test moves: `seconds_per_item` per update."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(total: int, seconds_per_item: float, **kw: object) -> list[str]:
    clock, stream = Clock(), io.StringIO()
    bar = LineProgress(range(total), total, "pack", "pair", stream=stream, clock=clock, **kw)
    for _ in bar:
        clock.now += seconds_per_item
    return stream.getvalue().splitlines()


def test_a_line_every_five_percent_with_rate_and_eta() -> None:
    lines = _run(200, 1.0)  # 200 s of work: a line every 10 items is every 10 s
    assert len(lines) == 20
    assert lines[0] == "pack: 5% (10/200 pairs), 1.0 pairs/s, ETA 190 s"
    assert lines[-1] == "pack: 100% (200/200 pairs), 1.0 pairs/s, ETA 0 s"


def test_lines_are_at_least_min_seconds_apart() -> None:
    lines = _run(1000, 0.011)  # 11 s in all, 5% every 0.55 s: 95% is the first after 10 s
    assert lines == ["pack: 95% (950/1,000 pairs), 90.9 pairs/s, ETA 1 s"]
    assert _run(1000, 0.001) == []  # done within min_seconds: silent


def test_resumed_work_counts_its_rate_from_where_it_started() -> None:
    clock, stream = Clock(), io.StringIO()
    bar = LineProgress(None, 100, "train", "step", initial=50, stream=stream, clock=clock)
    bar.set_postfix(loss="0.5")
    clock.now = 20.0
    bar.update(10)  # 10 steps in 20 s, 40 left
    assert stream.getvalue() == "train: 60% (60/100 steps), 2.0 s/step, ETA 80 s, loss 0.5\n"


def test_slow_work_writes_a_line_at_least_every_max_seconds() -> None:
    """100 steps of 30 s: 5% is 150 s, so lines come at 60 s (2 steps), 120 s (4 steps),
    then 5% (150 s), then 60 s later (7 steps), ..."""
    lines = _run(100, 30.0)
    assert lines[:4] == [
        "pack: 2% (2/100 pairs), 30.0 s/pair, ETA 2940 s",
        "pack: 4% (4/100 pairs), 30.0 s/pair, ETA 2880 s",
        "pack: 5% (5/100 pairs), 30.0 s/pair, ETA 2850 s",
        "pack: 7% (7/100 pairs), 30.0 s/pair, ETA 2790 s",
    ]


def test_progress_is_a_line_writer_off_a_terminal_and_silent_when_disabled(capsys) -> None:
    assert isinstance(progress(total=3, desc="x", unit="pair"), LineProgress)
    bar = progress(range(3), total=3, desc="x", unit="pair", enabled=False)
    assert list(bar) == [0, 1, 2]
    assert capsys.readouterr().err == ""
