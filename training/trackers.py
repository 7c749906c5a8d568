"""Experiment trackers: a run's metrics, as `metrics.jsonl` names them, also sent to
TensorBoard, Weights & Biases or MLflow (`prefpack train --report-to NAME`).

The names are the metrics line's (`loss`, `rewards/margins`, `logps/chosen`, `grad_norm`,
`tokens/s`, `eval/loss`, ...), logged at the optimizer step (1-based):

- `tensorboard`: event files in `out_dir/tensorboard` (`tensorboard --logdir OUT`), and the
  run's name and settings as a text summary.
- `wandb`: a W&B run in project `prefpack` (WANDB_PROJECT overrides) under `out_dir/wandb`,
  the settings as its config. WANDB_MODE is obeyed; without it and without credentials
  (WANDB_API_KEY, `wandb login`) the run is offline, with a note, where wandb would
  prompt for a login: `wandb sync` uploads it later.
- `mlflow`: an MLflow run in experiment `prefpack` (MLFLOW_EXPERIMENT_NAME overrides), the
  settings as its params, at MLFLOW_TRACKING_URI, else in a SQLite store of the run's own,
  `out_dir/mlflow.db` (MLflow 3's default store kind; its plain-file store refuses to open
  without MLFLOW_ALLOW_FILE_STORE). MLflow takes names with `/` as they are.

Each is an optional pip extra (`prefpack[tensorboard]`, `prefpack[wandb]`,
`prefpack[mlflow]`; `prefpack[report]` for all three) imported only when its tracker
opens: importing this module imports none of them (nor torch). A name that is asked for
but not installed is refused by `check_trackers` before anything opens.

Only rank 0 opens trackers and logs: the caller checks the rank (the other ranks open
none; `check_trackers` on every rank makes a bad name fail everywhere, before any
collective). Non-finite numbers are sent as they are: all three keep NaN (and
TensorBoard and W&B ±inf); MLflow stores ±inf as ±max float.

    with open_trackers(["tensorboard"], out_dir, "run-1", dataclasses.asdict(config)) as t:
        t.log(metrics, step=metrics["step"])
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import netrc
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlparse

# Each name is also the module its tracker imports and the pip extra that installs it.
TRACKERS = ("tensorboard", "wandb", "mlflow")
NONE = "none"  # `--report-to none`: no tracker
PROJECT = "prefpack"  # the W&B project and the MLflow experiment, unless the env names one
_MLFLOW_MAX_PARAMS = 100  # per `log_batch` call


class Tracker(Protocol):
    """Where a run's metrics go besides `metrics.jsonl`."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record `metrics` at optimizer step `step` (increasing; a step may repeat)."""

    def close(self, failed: bool = False) -> None:
        """Flush and end the run, marked failed when the training raised."""


# -----------------------------------------------------------------------------
# The backends


class TensorBoardTracker:
    """Scalars in TensorBoard event files under `out_dir/tensorboard`."""

    def __init__(self, out_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        table = "\n".join(f"| {name} | {value} |" for name, value in config.items())
        self.writer.add_text(
            "run", f"**{run_name}**\n\n| setting | value |\n| --- | --- |\n{table}"
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()  # TensorBoard has no run status


class WandbTracker:
    """A W&B run under `out_dir/wandb`; offline when no credentials and no WANDB_MODE."""

    def __init__(self, out_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        import wandb

        # WANDB_MODE read here: wandb reads the environment once a process (at its setup).
        # None: wandb's own default, its settings file (`wandb offline`), else online.
        mode = os.environ.get("WANDB_MODE") or None
        if mode is None and not _wandb_credentials():
            mode = "offline"
            print(
                f"prefpack: wandb: no credentials (WANDB_API_KEY or `wandb login`), so the run "
                f"is offline in {out_dir / 'wandb'}; `wandb sync` uploads it later "
                f"(WANDB_MODE=online to insist)",
                file=sys.stderr,
            )
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run_name,
            dir=out_dir,
            config=dict(config),
            mode=mode,
            reinit="create_new",  # never hand back another open run of this process
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _wandb_credentials() -> bool:
    """Whether wandb would find credentials where `wandb login` and its docs put them:
    WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or a netrc entry (NETRC, else ~/.netrc) for
    the W&B host (WANDB_BASE_URL, else api.wandb.ai). Checked here, without wandb, because
    wandb itself would prompt for a key on a terminal instead of answering."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):  # no netrc, or one wandb could not use either
        return False


class MlflowTracker:
    """An MLflow run at MLFLOW_TRACKING_URI, else in the SQLite store `out_dir/mlflow.db`."""

    def __init__(self, out_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:  # a store of the run's own, beside its metrics.jsonl (artifacts too)
            uri = f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
            artifacts = (out_dir / "mlartifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(name, artifact_location=artifacts)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(key, str(value)) for key, value in config.items()]
        for i in range(0, len(params), _MLFLOW_MAX_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + _MLFLOW_MAX_PARAMS])

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # MLflow's timestamps are in milliseconds
        batch = [Metric(name, value, now, step) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_OPEN = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


# -----------------------------------------------------------------------------
# Opening: all of them or none


class Trackers:
    """Several trackers as one (none: does nothing); as a context manager, closes them
    all, marked failed when the block raised.

    `log` sends the numbers of a metrics line, without its `step` key (the step itself).
    """

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        numbers = {
            name: float(value)
            for name, value in metrics.items()
            if name != "step" and isinstance(value, int | float)
        }
        for tracker in self.trackers:
            tracker.log(numbers, int(step))

    def close(self, failed: bool = False) -> None:
        with contextlib.ExitStack() as stack:  # every tracker closes, even if one raises
            for tracker in self.trackers:
                stack.callback(tracker.close, failed)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(failed=exc is not None)


def check_trackers(names: Sequence[str]) -> None:
    """Refuse unknown tracker names and trackers whose package is not installed, without
    importing any, so that a run fails before it reads any data.

    Raises:
        ValueError: one line naming them, and the pip extra that installs the missing ones.
    """
    unknown = [name for name in names if name not in (*TRACKERS, NONE)]
    if unknown:
        raise ValueError(
            f"unknown tracker {', '.join(unknown)}: choose from {', '.join((NONE, *TRACKERS))}"
        )
    missing = [
        name
        for name in dict.fromkeys(names)
        if name != NONE and importlib.util.find_spec(name) is None
    ]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ValueError(
            f"{' and '.join(missing)} {verb} not installed: pip install "
            f"'prefpack[{','.join(missing)}]'"
        )


def open_trackers(
    names: Sequence[str], out_dir: Path, run_name: str, config: Mapping[str, object]
) -> Trackers:
    """Open the named trackers (rank 0 only), or none for an empty list or `none`.

    Args:
        names: from `TRACKERS`, or `none`; repeats are opened once.
        out_dir: the run folder; each tracker writes under it (MLflow: unless
            MLFLOW_TRACKING_URI is set). Made if missing.
        run_name: the run's name in W&B and MLflow (and TensorBoard's text summary).
        config: the run's settings (e.g. `dataclasses.asdict(train_config)`): W&B's
            config, MLflow's params; values that are not JSON become strings.

    Returns:
        `Trackers`: the opened ones as one `Tracker`; close it (or use it in `with`).

    Raises:
        ValueError: `check_trackers`' refusal, before anything opens.
    """
    check_trackers(names)
    wanted = [name for name in dict.fromkeys(names) if name != NONE]
    if wanted:
        out_dir.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(dict(config), default=str))  # Path, tuple: str, list
    opened = Trackers()
    try:
        for name in wanted:
            opened.trackers.append(_OPEN[name](out_dir, run_name, plain))
    except BaseException:
        opened.close(failed=True)
        raise
    return opened
