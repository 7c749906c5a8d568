"""Run summary and the Pipes reporter's cadence (the real Pipes round trip is in test_cli)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.report import (
    PIPES_CONTEXT_ENV,
    PipesReporter,
    materialization_metadata,
    pipes_reporter,
    summarize,
)


def _write_metrics(out_dir: Path, steps: int) -> list[dict]:
    """Step s: loss 1/s, 10 pairs and 1000 tokens in s/10 seconds."""
    lines = [
        {
            "step": s,
            "loss": 1 / s,
            "rewards/accuracies": 0.5,
            "rewards/margins": 0.01 * s,
            "rewards/chosen": 0.02 * s,
            "rewards/rejected": 0.01 * s,
            "logps/chosen": -10.0,
            "logps/rejected": -12.0,
            "pairs": 10,
            "tokens": 1000,
            "seconds": s / 10,
            "pairs/s": 100 / s,
            "tokens/s": 10_000 / s,
        }
        for s in range(1, steps + 1)
    ]
    out_dir.mkdir()
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return lines


def test_summary_totals_and_throughput(tmp_path: Path) -> None:
    """4 steps: 40 pairs, 4000 tokens in 0.1+0.2+0.3+0.4 = 1.0 s, so 40 pairs/s (the mean of
    the per-step rates, 100, 50, 33.3, 25, would be 52)."""
    _write_metrics(tmp_path / "run", 4)
    summary = summarize(tmp_path / "run")
    assert (summary.steps, summary.pairs, summary.tokens) == (4, 40, 4000)
    assert summary.pairs_per_s == pytest.approx(40.0)
    assert summary.tokens_per_s == pytest.approx(4000.0)
    assert summary.final["loss"] == 0.25
    assert summary.output == tmp_path / "run" / "final"
    metadata = materialization_metadata(summary, {"backend": "segments"})
    assert metadata["pairs/s"] == {"raw_value": pytest.approx(40.0), "type": "float"}
    assert metadata["steps"] == {"raw_value": 4, "type": "int"}
    assert metadata["backend"] == {"raw_value": "segments", "type": "text"}


class _Recorder:
    """Stands in for a PipesContext: records log lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.log = self

    def info(self, message: str) -> None:
        self.lines.append(message)


def test_pipes_reporter_logs_about_twenty_lines_but_not_the_last_step(tmp_path: Path) -> None:
    lines = _write_metrics(tmp_path / "run", 45)
    context = _Recorder()
    reporter = PipesReporter(context, steps=45)
    for metrics in lines:
        reporter(metrics)
    logged = [int(line.split()[1].split("/")[0]) for line in context.lines]
    assert logged == [*range(2, 45, 2)]  # the materialization reports step 45
    # Step 10: 100 pairs and 10,000 tokens in 0.1 + ... + 1.0 = 5.5 s so far, 0.55 s a step,
    # so 35 steps left take 19.25 s.
    assert context.lines[4].endswith(", 18.2 pairs/s 1,818 tokens/s, ETA 19 s")


def test_pipes_reporter_logs_slow_steps_at_least_every_max_seconds(tmp_path: Path) -> None:
    """Steps of s/10 seconds: steps 1..13 sum to 9.1 s, 14..19 to 9.9 s, 20..24 to 11 s."""
    lines = _write_metrics(tmp_path / "run", 1000)
    context = _Recorder()
    reporter = PipesReporter(context, steps=1000, max_seconds=9.0)
    for metrics in lines[:24]:
        reporter(metrics)
    assert [int(line.split()[1].split("/")[0]) for line in context.lines] == [13, 19, 24]


def test_no_pipes_without_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PIPES_CONTEXT_ENV, raising=False)
    with pipes_reporter(steps=3) as reporter:
        assert reporter is None
    monkeypatch.setenv(PIPES_CONTEXT_ENV, "x")
    monkeypatch.setenv("RANK", "1")  # only rank 0 talks to Dagster
    with pipes_reporter(steps=3) as reporter:
        assert reporter is None
