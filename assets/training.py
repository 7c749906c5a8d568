"""Training assets, run as subprocesses through Dagster Pipes.

The Dagster process never imports torch: `reference_logps` runs `prefpack logps` and
`trained_model` runs `prefpack train` (under `torchrun` when more than one process is
configured), which stream logs and final metrics back through Pipes. The same commands run
by hand or on a cluster.
"""

import hashlib
import json
import sys
from pathlib import Path

import dagster as dg

from assets.configs import ReferenceConfig, TrainingConfig
from assets.resources import ModelResource, StoreResource
from training.report import materialization_metadata, summarize

CODE_VERSION = "1"


def model_args(model: ModelResource) -> list[str]:
    """The model flags of `prefpack train/logps`: a checkpoint folder or a named config."""
    if model.path:
        return ["--model", model.path]
    return ["--config", model.config, "--init-seed", str(model.seed)]


def model_label(model: ModelResource) -> str:
    """A file-name-safe name of the configured model."""
    if model.path:
        digest = hashlib.sha256(str(Path(model.path).resolve()).encode()).hexdigest()[:8]
        return f"{Path(model.path).name}-{digest}"
    return f"{model.config}-seed{model.seed}"


def prefpack_command(nproc: int = 1) -> list[str]:
    """`python -m prefpack`, or torchrun over it for data parallel."""
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "-m",
            "prefpack",
        ]
    return [sys.executable, "-m", "prefpack"]


def config_flags(values: dict) -> list[str]:
    """`--flag value` for each config value, as `prefpack train` names them."""
    flags: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is None:  # not given: the command's default
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list | tuple):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


@dg.asset(
    group_name="training",
    code_version=CODE_VERSION,
    description="Per-pair log-probs of chosen and rejected under the reference model (the "
    "initial policy), computed once per model and shard key and reused by every run.",
)
def reference_logps(
    context: dg.AssetExecutionContext,
    config: ReferenceConfig,
    packed_shards: str,
    model: ModelResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.Output[str]:
    out = store.path("reference", Path(packed_shards).name, model_label(model) + ".arrow")
    command = [
        *prefpack_command(),
        "logps",
        "--shards",
        packed_shards,
        *model_args(model),
        "--out",
        str(out),
        *config_flags({"batch_rows": config.batch_rows, "backend": config.backend}),
        "--no-progress",
    ]
    result = pipes_subprocess_client.run(context=context, command=command).get_materialize_result()
    return dg.Output(str(out), metadata=result.metadata)


@dg.asset(
    group_name="training",
    code_version=CODE_VERSION,
    description="A DPO run on the packed shards (the compact trainer, through Dagster Pipes); "
    "the final model is a Hugging Face folder with the shards' tokenizer.",
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    packed_shards: str,
    reference_logps: str,
    model: ModelResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    # Every setting is in the run key: the process count changes the global batch.
    run_key = hashlib.sha256(
        json.dumps(
            [Path(packed_shards).name, model_label(model), config.model_dump()], sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    values = config.model_dump()
    nproc = values.pop("nproc_per_node")
    precompute = values.pop("precompute_reference")
    out = store.path("models", run_key)
    if (out / "final").exists():
        # The same shards, model and settings trained before: the run is deterministic,
        # so its result is reused rather than recomputed.
        context.log.info(f"reusing the finished run {out}")
        metadata = _typed(materialization_metadata(summarize(out)))
        return dg.MaterializeResult(metadata={**metadata, "reused": True})
    command = [
        *prefpack_command(nproc),
        "train",
        "--shards",
        packed_shards,
        *model_args(model),
        "--out",
        str(out),
        *(["--reference", reference_logps] if precompute else []),
        *config_flags(values),
        "--no-progress",
    ]
    context.log.info(" ".join(command))
    result = pipes_subprocess_client.run(context=context, command=command).get_materialize_result()
    return dg.MaterializeResult(metadata={**result.metadata, "reused": False})


_METADATA_TYPES = {
    "float": dg.MetadataValue.float,
    "int": dg.MetadataValue.int,
    "path": dg.MetadataValue.path,
    "md": dg.MetadataValue.md,
    "text": dg.MetadataValue.text,
}


def _typed(pipes_metadata: dict[str, dict]) -> dict[str, dg.MetadataValue]:
    """Pipes' `{raw_value, type}` metadata as Dagster metadata values."""
    return {k: _METADATA_TYPES[v["type"]](v["raw_value"]) for k, v in pipes_metadata.items()}
