"""What a run reports: the summary of its metrics, and the bridge to Dagster Pipes.

`summarize` reads a run's `metrics.jsonl` into a `RunSummary` (final loss and rewards,
the last evaluation's, throughput over the logged steps, the train and eval curves);
`format_summary` is what `prefpack train` prints at the end.

When Dagster launches `prefpack train` through Pipes (`DAGSTER_PIPES_CONTEXT` is set in the
environment), `pipes_reporter()` opens the Pipes context on rank 0 and yields a
`PipesReporter`: a metrics sink for `train(on_step=...)` that streams progress as Pipes log
lines, then `materialize` reports the asset materialization with the final metrics as
typed metadata. `dagster_pipes` is the small, dependency-free half of Pipes (not Dagster:
`training/` never imports dagster); it is imported only in that case.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch-free at run time
    from training.reference import ReferenceKey

PIPES_CONTEXT_ENV = "DAGSTER_PIPES_CONTEXT"  # set by every Dagster Pipes client
# The loss and reward metrics of a run, as TRL names them (evaluation adds `eval/`).
METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)


@dataclass(frozen=True)
class RunSummary:
    """A run at a glance.

    Attributes:
        steps: the last logged optimizer step.
        final: the last step's metrics line (loss, rewards/*, logps/*, ...).
        evaluation: the `eval/*` metrics of the last step that evaluated ({}: none did).
        pairs, tokens, seconds: summed over the logged steps.
        eval_seconds: the time the evaluations took, summed.
        curve: (step, loss, rewards/accuracies, rewards/margins) of every logged step.
        eval_curve: the same, from the eval metrics, of every step that evaluated.
        metrics_file: the run's metrics.jsonl.
        output: the exported Hugging Face folder.
    """

    steps: int
    final: dict[str, float]
    evaluation: dict[str, float]
    pairs: int
    tokens: int
    seconds: float
    eval_seconds: float
    curve: list[tuple[int, float, float, float]]
    eval_curve: list[tuple[int, float, float, float]]
    metrics_file: Path
    output: Path

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def summarize(out_dir: str | Path) -> RunSummary:
    """Summarize the run in `out_dir` from its metrics.jsonl.

    Raises:
        FileNotFoundError: the run logged no metrics.
    """
    out_dir = Path(out_dir)
    path = out_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    if not lines:
        raise FileNotFoundError(f"{path}: no steps logged")
    evaluated = [m for m in lines if "eval/loss" in m]
    return RunSummary(
        steps=int(lines[-1]["step"]),
        final=lines[-1],
        evaluation={k: v for k, v in (evaluated or [{}])[-1].items() if k.startswith("eval/")},
        pairs=sum(m["pairs"] for m in lines),
        tokens=sum(m["tokens"] for m in lines),
        seconds=sum(m["seconds"] for m in lines),
        eval_seconds=sum(m["eval/seconds"] for m in evaluated),
        curve=[_point(m, "") for m in lines],
        eval_curve=[_point(m, "eval/") for m in evaluated],
        metrics_file=path,
        output=out_dir / "final",
    )


def _point(metrics: dict[str, float], prefix: str) -> tuple[int, float, float, float]:
    """(step, loss, reward accuracy, reward margin) of a metrics line, train or `eval/`."""
    return (
        metrics["step"],
        metrics[f"{prefix}loss"],
        metrics[f"{prefix}rewards/accuracies"],
        metrics[f"{prefix}rewards/margins"],
    )


def format_summary(summary: RunSummary) -> str:
    """The lines `prefpack train` prints when it is done."""
    f, e = summary.final, summary.evaluation
    lines = [
        f"trained {summary.steps} steps: {summary.pairs} pairs, {summary.tokens} tokens "
        f"in {summary.seconds:.1f} s",
        f"final    loss {f['loss']:.4f}  reward accuracy {f['rewards/accuracies']:.3f}  "
        f"reward margin {f['rewards/margins']:.4f}",
    ]
    if e:
        lines.append(
            f"eval     loss {e['eval/loss']:.4f}  reward accuracy "
            f"{e['eval/rewards/accuracies']:.3f}  reward margin {e['eval/rewards/margins']:.4f}"
            f"  ({e['eval/pairs']} held-out pairs)"
        )
    lines += [
        f"speed    {summary.pairs_per_s:.2f} pairs/s  {summary.tokens_per_s:.0f} tokens/s",
        f"metrics  {summary.metrics_file}",
        f"model    {summary.output}",
    ]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Dagster Pipes


def _float(value: float) -> dict[str, Any]:
    return {"raw_value": float(value), "type": "float"}


def _int(value: int) -> dict[str, Any]:
    return {"raw_value": int(value), "type": "int"}


def materialization_metadata(
    summary: RunSummary, extra: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """The metadata of the training asset's materialization, typed for Pipes.

    Keys: `loss`, `rewards/accuracies`, `rewards/margins`, `rewards/chosen`,
    `rewards/rejected`, `logps/chosen`, `logps/rejected` (the final step's), the same with
    `eval/` from the last evaluation (when the run had an eval set) and `eval/pairs`,
    `pairs/s`, `tokens/s`, `steps`, `pairs`, `tokens`, `seconds`, `output` and
    `metrics_file` (paths), plus `extra` as text. (The asset draws the loss curve from
    `metrics.jsonl`, every step.)
    """
    f, e = summary.final, summary.evaluation
    metadata = {name: _float(f[name]) for name in METRICS}
    if e:
        metadata |= {f"eval/{name}": _float(e[f"eval/{name}"]) for name in METRICS}
        metadata["eval/pairs"] = _int(e["eval/pairs"])
    metadata |= {
        "pairs/s": _float(summary.pairs_per_s),
        "tokens/s": _float(summary.tokens_per_s),
        "steps": _int(summary.steps),
        "pairs": _int(summary.pairs),
        "tokens": _int(summary.tokens),
        "seconds": _float(summary.seconds),
        "output": {"raw_value": str(summary.output), "type": "path"},
        "metrics_file": {"raw_value": str(summary.metrics_file), "type": "path"},
    }
    for name, value in (extra or {}).items():
        metadata[name] = {"raw_value": str(value), "type": "text"}
    return metadata


class PipesReporter:
    """Streams a run to Dagster through an open Pipes context (rank 0 only).

    Args:
        context: the open `dagster_pipes.PipesContext`.
        steps: the run's total steps (for the progress lines).
        log_every: a progress line every this many steps (default: about 20 lines a run).
        max_seconds: and one at least every this many seconds of steps (slow steps).
    """

    def __init__(
        self, context: Any, steps: int, log_every: int | None = None, max_seconds: float = 60.0
    ) -> None:
        self.context = context
        self.steps = steps
        self.log_every = log_every or max(1, steps // 20)
        self.max_seconds = max_seconds
        self.seen = self.pairs = self.tokens = 0  # over the steps this process ran
        self.seconds = self.since_line = 0.0

    def __call__(self, metrics: Mapping[str, float]) -> None:
        """The `on_step` sink: a log line every `log_every` steps or `max_seconds`, with
        throughput since the start and the time left at that pace, and one for each
        evaluation. None at the last step: the materialization that follows carries its
        numbers (and `prefpack run` prints them once)."""
        step = int(metrics["step"])
        self.seen += 1
        self.pairs += int(metrics["pairs"])
        self.tokens += int(metrics["tokens"])
        self.seconds += float(metrics["seconds"])
        self.since_line += float(metrics["seconds"])
        if "eval/loss" in metrics and step != self.steps:
            self.context.log.info(
                f"step {step}/{self.steps} eval loss {metrics['eval/loss']:.4f} "
                f"acc {metrics['eval/rewards/accuracies']:.3f} "
                f"margin {metrics['eval/rewards/margins']:.4f} "
                f"({metrics['eval/pairs']} held-out pairs)"
            )
        due = step % self.log_every == 0 or self.since_line >= self.max_seconds
        if not due or step == self.steps:
            return
        self.since_line = 0.0
        left = (self.steps - step) * self.seconds / self.seen
        self.context.log.info(
            f"step {step}/{self.steps} loss {metrics['loss']:.4f} "
            f"acc {metrics['rewards/accuracies']:.3f} margin {metrics['rewards/margins']:.4f}, "
            f"{self.pairs / self.seconds:.1f} pairs/s {self.tokens / self.seconds:,.0f} tokens/s, "
            f"ETA {left:.0f} s"
        )

    def materialize(self, summary: RunSummary, extra: Mapping[str, str] | None = None) -> None:
        """Report the asset materialization with the run's final metrics."""
        self.context.report_asset_materialization(metadata=materialization_metadata(summary, extra))


@contextlib.contextmanager
def pipes_context() -> Iterator[Any | None]:
    """The open `dagster_pipes` context when this process was launched by Dagster Pipes and
    is rank 0; None otherwise (and dagster_pipes is not imported).

    An exception raised inside the block is reported to Dagster (the context closes with
    it) and then propagates.
    """
    if PIPES_CONTEXT_ENV not in os.environ or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as context:
        yield context


@contextlib.contextmanager
def pipes_reporter(steps: int) -> Iterator[PipesReporter | None]:
    """A `PipesReporter` in `pipes_context()`, or None outside Pipes."""
    with pipes_context() as context:
        yield None if context is None else PipesReporter(context, steps)


def reference_metadata(
    path: Path, table: Any, key: ReferenceKey, reused: bool
) -> dict[str, dict[str, Any]]:
    """The metadata of the reference log-probs' materialization, typed for Pipes."""
    return {
        "path": {"raw_value": str(path), "type": "path"},
        "pairs": _int(table.num_rows),
        "mean_chosen_logps": _float(np.mean(table.column("chosen_logps").to_numpy())),
        "mean_rejected_logps": _float(np.mean(table.column("rejected_logps").to_numpy())),
        "model_fingerprint": {"raw_value": key.model_fingerprint, "type": "text"},
        "shard_key": {"raw_value": key.shard_key, "type": "text"},
        "precision": {"raw_value": key.precision, "type": "text"},
        "reference_version": {"raw_value": key.reference_version, "type": "text"},
        "reused": {"raw_value": reused, "type": "bool"},
    }
