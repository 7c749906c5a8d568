"""Training assets, run as subprocesses through Dagster Pipes.

The Dagster process never imports torch: `reference_logps` runs `prefpack logps` and
`trained_model` runs `prefpack train` (under `torchrun` when more than one process is
configured), which stream logs and final metrics back through Pipes. The same commands run
by hand or on a cluster.

Both results are stored under a content key (`assets.keys`) that is also their data
version, and both depend on `base_model`, an observable source whose data version is the
model's content fingerprint: new weights at the same path make them stale and give them a
new key. Both commands get the `compute` resource's precision and device.
"""

import json
import sys
import warnings
from pathlib import Path

import dagster as dg

from assets.configs import ReferenceConfig, TrainingConfig
from assets.keys import TRAINER_CODE_VERSION, compute_identity, content_key, model_fingerprint
from assets.plots import loss_plot
from assets.resources import ComputeResource, ModelResource, StoreResource
from pipeline.io import atomic_file
from training.report import materialization_metadata, summarize

# Beside a finished run: what the trainer reported besides its metrics (backend, layout,
# shard key, model), so that reusing the run shows what computing it showed.
REPORTED = "reported.json"


def model_args(model: ModelResource) -> list[str]:
    """The model flags of `prefpack train/logps`: a checkpoint folder or a named config."""
    if model.path:
        return ["--model", model.path]
    return ["--config", model.config, "--init-seed", str(model.seed)]


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


# Observable source assets are beta in dagster 1.13 (and the only way to observe a model's
# content): their warning is silenced for this one definition, nowhere else.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=dg.BetaWarning)

    @dg.observable_source_asset(
        group_name="training",
        description="The policy's starting point, also the DPO reference: a Hugging Face "
        "folder (fingerprinted by its weight files' bytes) or a named config and init seed. "
        "Observing it marks the training assets stale when the weights changed, even at the "
        "same path.",
    )
    def base_model(model: ModelResource) -> dg.DataVersion:
        return dg.DataVersion(model_fingerprint(model))


@dg.asset(
    group_name="training",
    code_version=TRAINER_CODE_VERSION,
    deps=[base_model],
    description="Per-pair log-probs of chosen and rejected under the reference model (the "
    "initial policy), computed once per shard key, model content, precision and device class "
    "and reused by every run.",
)
def reference_logps(
    context: dg.AssetExecutionContext,
    config: ReferenceConfig,
    packed_shards: str,
    model: ModelResource,
    compute: ComputeResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult[str]:
    shard_key = Path(packed_shards).name
    key = content_key(shard_key, model, compute, reference=config.model_dump())
    out = store.path("reference", shard_key, f"{key}-{compute.precision}.arrow")
    command = [
        *prefpack_command(),
        "logps",
        "--shards",
        packed_shards,
        *model_args(model),
        "--out",
        str(out),
        *config_flags(config.model_dump()),
        *compute.flags(),
        "--no-progress",
    ]
    result = pipes_subprocess_client.run(context=context, command=command).get_materialize_result()
    return dg.MaterializeResult(
        value=str(out),
        data_version=dg.DataVersion(key),
        metadata={**result.metadata, "key": key, **compute_identity(compute)},
    )


@dg.asset(
    group_name="training",
    code_version=TRAINER_CODE_VERSION,
    deps=[base_model],
    description="A DPO run on the packed shards (the compact trainer, through Dagster Pipes); "
    "the final model is a Hugging Face folder with the shards' tokenizer. Keyed by shards, "
    "model content, reference, precision, device class and settings: a finished run with the "
    "key is reused.",
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    packed_shards: str,
    reference_logps: str,
    model: ModelResource,
    compute: ComputeResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    precompute = config.precompute_reference
    return run_training(
        context,
        config,
        packed_shards,
        ["--reference", reference_logps] if precompute else [],
        Path(reference_logps).name if precompute else None,
        model,
        compute,
        store,
        pipes_subprocess_client,
    )


def run_training(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    shards: str,
    reference_flags: list[str],
    reference: str | None,
    model: ModelResource,
    compute: ComputeResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """`prefpack train` on `shards` through Pipes, or the finished run with the same key.

    Args:
        reference_flags: how the command gets its reference log-probs (none: a frozen copy
            of the initial model).
        reference: what those flags name, for the run's key (None: the live reference).
    """
    values = config.model_dump()
    nproc = values.pop("nproc_per_node")
    values.pop("precompute_reference")
    # Every setting is in the key: the process count changes the global batch.
    key = content_key(
        Path(shards).name, model, compute, reference=reference, training=config.model_dump()
    )
    out = store.path("models", key)
    reused = (out / "final").is_dir() and (out / REPORTED).is_file()
    if reused:
        # The same shards, model and settings trained before: the run is deterministic,
        # so its result is reused rather than recomputed.
        context.log.info(f"reusing the finished run {out}")
    else:
        command = [
            *prefpack_command(nproc),
            "train",
            "--shards",
            shards,
            *model_args(model),
            "--out",
            str(out),
            *reference_flags,
            *config_flags(values),
            *compute.flags(),
            "--no-progress",
        ]
        context.log.debug(" ".join(command))
        result = pipes_subprocess_client.run(context=context, command=command)
        _save_reported(out, result.get_materialize_result())
    summary = summarize(out)
    metadata = _typed(materialization_metadata(summary, _read_reported(out)))
    return dg.MaterializeResult(
        data_version=dg.DataVersion(key),
        metadata={
            **metadata,
            "run_key": key,
            "model_content": model_fingerprint(model),
            **compute_identity(compute),
            "reused": reused,
            "loss_plot": loss_plot(summary.curve),
        },
    )


def _save_reported(out: Path, result: dg.MaterializeResult) -> None:
    """Keep the text entries of the trainer's report (those its metrics file cannot give)."""
    extra = {k: v.value for k, v in result.metadata.items() if isinstance(v, dg.TextMetadataValue)}
    with atomic_file(out / REPORTED) as tmp:
        tmp.write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")


def _read_reported(out: Path) -> dict[str, str]:
    """What `_save_reported` kept beside the run (the same on every reuse)."""
    return json.loads((out / REPORTED).read_text())


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
