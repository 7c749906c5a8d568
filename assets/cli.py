"""`prefpack run` (the whole graph in process: on the sample data, or as a run config file
says) and `prefpack ui`.

Both use a project-local Dagster instance (`DAGSTER_HOME`, default `./.dagster`), so the
runs of `prefpack run` show up in the UI's history and the UI's runs persist.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DAGSTER_HOME = ".dagster"
LOCATION = "prefpack"
WORKSPACE = f"""load_from:
  - python_module:
      module_name: assets.definitions
      location_name: {LOCATION}
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `run` and `ui`."""
    run = subparsers.add_parser(
        "run",
        help="materialize what is missing or stale in the asset graph (bundled samples by default)",
        description="Materialize in process what is missing or stale: each source partition "
        "whose input, code or settings changed, then curation, tokenization, packing, "
        "reference log-probs and training from the first stale stage on. With nothing "
        "changed it launches no run and prints 'everything up to date'. Ends with a summary. "
        "Every problem of the config file and the resources is named, one line each, before "
        "anything launches (docs/real-data.md).",
    )
    run.add_argument(
        "--store", type=Path, help="store directory (default: $PREFPACK_STORE or ./store)"
    )
    run.add_argument(
        "--config",
        type=Path,
        metavar="FILE.yaml",
        help="a run config of sample_job (ops: and resources:, as `dg launch --job sample_job "
        "-c FILE.yaml` takes it) in place of the samples' config: real sources, tokenizer, "
        "model and settings",
    )
    run.set_defaults(handler=_run)

    ui = subparsers.add_parser(
        "ui",
        help="start the Dagster UI (webserver + daemon) on the project's instance",
        description="Run `dg dev` (Dagster's project CLI) on assets.definitions with "
        "DAGSTER_HOME=./.dagster (or $DAGSTER_HOME), from any directory.",
    )
    ui.add_argument("--port", type=int, default=3000, help="webserver port")
    ui.add_argument("--host", default="127.0.0.1", help="webserver host")
    ui.set_defaults(handler=_ui)


def _dagster_home() -> Path:
    """The instance directory: $DAGSTER_HOME, else ./.dagster (created, telemetry off)."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(DAGSTER_HOME).resolve())))
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    if not settings.exists():
        settings.write_text("telemetry:\n  enabled: false\n")
    return home


def _run(args: argparse.Namespace) -> int:
    import dagster as dg

    from assets import run_config as file
    from assets.definitions import build_definitions, build_resources
    from assets.jobs import SAMPLE_CONFIG
    from assets.run import materialize_all, summary

    started = time.perf_counter()
    store = args.store or Path(os.environ.get("PREFPACK_STORE", "store"))
    defs = build_definitions(build_resources(store))
    given = {} if args.config is None else file.read_run_config(args.config)
    problems = file.config_problems(defs, given)
    if not problems:
        defs = build_definitions({**defs.resources, **file.configured_resources(defs, given)})
        # Before anything launches; the assets check their resources again as steps start.
        problems = file.launch_problems(defs.resources, given)
    if problems:
        from core.errors import USER_ERROR, error_line

        where = "" if args.config is None else f"{args.config}: "
        for problem in problems:
            print(error_line(args.command, ValueError(where + problem)), file=sys.stderr)
        return USER_ERROR
    _dagster_home()
    instance = dg.DagsterInstance.get()
    config = SAMPLE_CONFIG if args.config is None else file.run_ops(given)
    try:
        results = materialize_all(defs, instance, run_config=config)
    except dg.Failure as err:  # an asset's check (a resource's, the model's tokenizer)
        raise ValueError(err.description or str(err)) from err
    print(summary(instance, results, seconds=time.perf_counter() - started))
    return 0


def _ui(args: argparse.Namespace) -> int:
    home = _dagster_home()
    # The same code location name as `dg dev` run in the repo root ([tool.dg]). Given a
    # workspace file, `dg dev` needs no project directory, so this works wherever prefpack
    # is installed; `dagster dev` would warn that it is superseded by `dg dev`.
    workspace = home / "workspace.yaml"
    workspace.write_text(WORKSPACE)
    command = [sys.executable, "-m", "dagster_dg_cli.cli", "dev", "-w", str(workspace)]
    command += ["--host", args.host, "--port", str(args.port)]
    shown = " ".join(["dg", *command[3:]])
    print(f"prefpack ui: DAGSTER_HOME={home} {shown} (http://{args.host}:{args.port})", flush=True)
    os.execv(sys.executable, command)
    return 0
