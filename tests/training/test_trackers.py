"""Experiment trackers: each backend holds, read back with its own reader, the names,
steps and values that `open_trackers` sent (an `eval/` metric and a NaN among them); a
tracker asked for but not installed is refused in one line naming its pip extra.

Nothing here touches the network: W&B runs offline (and its server, should anything try
it, is a closed port on this machine), MLflow's store is a SQLite file, and neither sends
telemetry. A backend whose package is missing skips its tests, saying which extra
installs it (the dev install has all three).
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.trackers import TRACKERS, check_trackers, open_trackers

REPO = Path(__file__).resolve().parents[2]
RUN_NAME = "tiny-run"
STEPS = 3
# As `dataclasses.asdict(TrainConfig(...))` gives it: a Path, a tuple and a None among them.
CONFIG = {
    "out_dir": Path("runs/tiny"),
    "loss": "sigmoid",
    "beta": 0.1,
    "lr": 1e-6,
    "adam_betas": (0.9, 0.999),
    "warmup_steps": None,
}


def metrics_line(step: int) -> dict[str, float]:
    """Step `step`'s metrics line as `training.train.fit` hands it to `on_step`: the train
    metrics, plus eval metrics on steps 2 and 3, step 3's eval margin a NaN."""
    line = {
        "step": step,
        "lr": 1e-6 * step,
        "loss": 0.7 - 0.1 * step,
        "rewards/chosen": 0.02 * step,
        "rewards/rejected": -0.01 * step,
        "rewards/margins": 0.03 * step,
        "rewards/accuracies": 0.5 + 0.125 * step,
        "logps/chosen": -120.5 + step,
        "logps/rejected": -130.25 - step,
        "grad_norm": 1.5 / step,
        "pairs": 16,
        "tokens": 4096 * step,
        "tokens/s": 8192.5,
    }
    if step >= 2:
        line |= {
            "eval/loss": 0.69 - 0.01 * step,
            "eval/rewards/accuracies": 0.625,
            "eval/rewards/margins": math.nan if step == 3 else 0.02,
        }
    return line


def expected() -> dict[str, list[tuple[int, float]]]:
    """What every tracker should hold: name -> [(step, value)], all but the `step` key."""
    history: dict[str, list[tuple[int, float]]] = {}
    for step in range(1, STEPS + 1):
        for name, value in metrics_line(step).items():
            if name != "step":
                history.setdefault(name, []).append((step, float(value)))
    return history


def log_run(names: list[str], out_dir: Path) -> None:
    """A run's metrics through `open_trackers`, as the train loop sends them on rank 0."""
    with open_trackers(names, out_dir, RUN_NAME, CONFIG) as trackers:
        for step in range(1, STEPS + 1):
            line = metrics_line(step)
            trackers.log(line, line["step"])


def assert_history(held: dict[str, list[tuple[int, float]]], rtol: float = 0.0) -> None:
    """`held` has every name of `expected()`, and nothing else, at the same steps and
    values (NaN where NaN was sent)."""
    want = expected()
    assert sorted(held) == sorted(want)
    for name, points in want.items():
        assert [s for s, _ in held[name]] == [s for s, _ in points], name
        got, sent = [v for _, v in held[name]], [v for _, v in points]
        np.testing.assert_allclose(got, sent, rtol=rtol, equal_nan=True, err_msg=name)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials, tracking server or settings from this machine's environment, and
    no telemetry: W&B's and MLflow's variables are cleared, then set to stay here."""
    for name in [n for n in os.environ if n.startswith(("WANDB_", "MLFLOW_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` key
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # if online: refused at once
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


# -----------------------------------------------------------------------------
# Opening: names, extras, nothing imported before it is asked for


def test_importing_trackers_imports_no_tracker_package() -> None:
    code = "import sys, training.trackers; print(sorted(set(sys.modules) & {*sys.argv[1:]}))"
    shown = subprocess.run(
        [sys.executable, "-c", code, *TRACKERS, "torch"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert shown.stdout.strip() == "[]"


def test_no_tracker_opens_nothing(tmp_path: Path) -> None:
    for names in ([], ["none"]):
        log_run(names, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tracker comet: choose from none, tensorboard"):
        open_trackers(["comet"], tmp_path, RUN_NAME, CONFIG)


@pytest.mark.parametrize("name", TRACKERS)
def test_a_tracker_not_installed_is_refused_naming_its_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    """A module set to None in sys.modules is one Python cannot import: not installed.
    The refusal comes before anything opens (no run folder made)."""
    monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ValueError) as refused:
        open_trackers([name], tmp_path / "run", RUN_NAME, CONFIG)
    assert str(refused.value) == f"{name} is not installed: pip install 'prefpack[{name}]'"
    assert not (tmp_path / "run").exists()


def test_trackers_not_installed_are_refused_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    refusal = r"^wandb and mlflow are not installed: pip install 'prefpack\[wandb,mlflow\]'$"
    with pytest.raises(ValueError, match=refusal):
        check_trackers(["wandb", "none", "mlflow", "wandb"])


def test_every_tracker_has_its_pip_extra_and_report_has_all() -> None:
    """The extra that the refusal names exists, and `prefpack[report]` installs all."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for name in TRACKERS:
        assert extras[name], name
        assert set(extras[name]) <= set(extras["report"]), name


# -----------------------------------------------------------------------------
# Each backend, read back


def test_tensorboard_holds_every_metric(tmp_path: Path) -> None:
    pytest.importorskip(
        "tensorboard", reason="tensorboard not installed: pip install 'prefpack[tensorboard]'"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_run(["tensorboard"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    held = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }
    assert_history(held, rtol=1e-6)  # TensorBoard keeps float32
    assert events.Tags()["tensors"] == ["run/text_summary"]  # the name and settings


def wandb_records(log: Path) -> Iterator[Any]:
    """The records of a W&B run's transaction log `run-ID.wandb` (what `wandb sync`
    uploads; wandb ships no reader for it): a 7-byte header (`:W&B`, magic 0xBEE1, format
    version 0), then LevelDB's log format, chunks in 32 KiB blocks (7-byte chunk header:
    CRC32C, length, type 1 full, 2 first, 3 middle, 4 last; a block's tail too short for a
    header is padding), each whole record a protobuf `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    block, data = 32 * 1024, log.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]  # another version: read it anew
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        record += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(record)
            record = b""


def wandb_history_written(log: Path, steps: int, seconds: float = 30.0) -> list[Any]:
    """The log's records once it holds a history row per step: wandb's own process writes
    the log, and on a busy machine the last rows land a moment after `finish()` returns."""
    deadline = time.monotonic() + seconds
    while True:
        records = list(wandb_records(log))
        rows = sum(r.WhichOneof("record_type") == "history" for r in records)
        if rows >= steps or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def by_name(items: Any) -> dict[str, Any]:
    """A W&B record's items (history row, config) by name. wandb fills `key` or
    `nested_key`; a flat name like `rewards/margins` is one part of the latter."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_without_credentials_runs_offline_and_holds_every_metric(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("wandb", reason="wandb not installed: pip install 'prefpack[wandb]'")
    log_run(["wandb"], tmp_path)
    assert "the run is offline" in capsys.readouterr().err

    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    [log] = run_dir.glob("run-*.wandb")
    records = wandb_history_written(log, steps=STEPS)
    rows = [by_name(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    held: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, value in row.items():
            if not name.startswith("_"):  # wandb's own: _step, _runtime, _timestamp
                held.setdefault(name, []).append((row["_step"], value))
    assert_history(held)

    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == (RUN_NAME, "prefpack")
    config = by_name(run.config.update)
    assert (config["adam_betas"], config["out_dir"]) == ([0.9, 0.999], "runs/tiny")
    exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exits == [0]


def test_wandb_mode_is_obeyed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("wandb", reason="wandb not installed: pip install 'prefpack[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log_run(["wandb"], tmp_path)
    assert "offline" not in capsys.readouterr().err
    assert not list((tmp_path / "wandb").glob("*run-*"))


def mlflow_history(
    uri: str, experiment: str = "prefpack"
) -> tuple[Any, dict[str, list[tuple[int, float]]]]:
    """The one run of `experiment` at `uri`, and its metrics' histories."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = {
        name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        for name in run.data.metrics
    }
    return run, history


# MLflow's SQL store uses a SQLAlchemy loader option that SQLAlchemy 2.1 deprecated.
mlflow_sqlalchemy = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
)


@mlflow_sqlalchemy
def test_mlflow_run_in_out_dir_holds_every_metric(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow not installed: pip install 'prefpack[mlflow]'")
    log_run(["mlflow"], tmp_path)
    run, held = mlflow_history(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert_history(held)  # the `/` names as they are
    assert (run.info.run_name, run.info.status) == (RUN_NAME, "FINISHED")
    assert run.data.params["adam_betas"] == "[0.9, 0.999]"
    assert run.data.params["warmup_steps"] == "None"


@mlflow_sqlalchemy
def test_mlflow_tracking_uri_is_obeyed_and_a_failed_run_is_marked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("mlflow", reason="mlflow not installed: pip install 'prefpack[mlflow]'")
    uri = f"sqlite:///{tmp_path / 'server.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dpo-sweeps")
    with (
        pytest.raises(RuntimeError, match="diverged"),
        open_trackers(["mlflow"], tmp_path / "run", RUN_NAME, CONFIG) as trackers,
    ):
        trackers.log(metrics_line(1), step=1)
        raise RuntimeError("diverged")
    assert not (tmp_path / "run" / "mlflow.db").exists()
    run, held = mlflow_history(uri, "dpo-sweeps")
    assert run.info.status == "FAILED"
    assert held["loss"] == [(1, metrics_line(1)["loss"])]
