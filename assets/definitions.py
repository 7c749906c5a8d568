"""The Dagster Definitions of prefpack, loaded by `dagster dev`, `prefpack ui` and
`prefpack run` (`[tool.dagster]` in pyproject.toml points here).

The store directory comes from `PREFPACK_STORE` (default `./store`); the sources read the
bundled samples unless `SourcesResource.inputs` names other files or hub ids.
"""

import os
import warnings
from pathlib import Path

import dagster as dg

from assets import console, curation, difficulty, jobs, packing, sources, training
from assets.io_manager import PathIOManager
from assets.resources import (
    ComputeResource,
    ModelResource,
    SourcesResource,
    StoreResource,
    TokenizerResource,
)

# Assets return `MaterializeResult(value=..., data_version=...)`, whose data version is
# stable (`Output(data_version=...)` is beta and warns on every materialization). Pipes'
# own internals warn about their preview and deprecated calls on every run; not ours.
warnings.filterwarnings("ignore", category=dg.PreviewWarning, module="dagster._core.pipes")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="dagster._core.pipes")


def build_resources(
    store: str | Path,
    sources: SourcesResource | None = None,
    model: ModelResource | None = None,
    compute: ComputeResource | None = None,
) -> dict[str, object]:
    """Every resource the assets need, rooted at `store` (absolute, so runs agree)."""
    root = str(Path(store).resolve())
    return {
        "store": StoreResource(root=root),
        "io_manager": PathIOManager(root=root),
        "sources": sources or SourcesResource(),
        "tokenizer": TokenizerResource(),
        "model": model or ModelResource(),
        "compute": compute or ComputeResource(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }


ASSETS = dg.load_assets_from_modules([sources, curation, packing, training, difficulty])


def build_definitions(resources: dict[str, object]) -> dg.Definitions:
    """The assets, jobs and checks of prefpack bound to `resources`; every job logs to the
    console with errors as one line (`assets.console`)."""
    return dg.Definitions(
        assets=ASSETS,
        jobs=[jobs.source_job, jobs.sample_job, jobs.difficulty_job],
        resources=resources,
        loggers={"console": console.console},
    )


defs = build_definitions(build_resources(os.environ.get("PREFPACK_STORE", "store")))
