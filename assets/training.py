"""Training assets, run as subprocesses through Dagster Pipes.

The Dagster process never imports torch: `reference_logps` and `eval_reference_logps` run
`prefpack logps` on the training and the eval shards, and `trained_model` runs `prefpack
train` (under `torchrun` when more than one process is configured), which stream logs and
final metrics back through Pipes. The same commands run by hand or on a cluster.

Both results are stored under a content key (`assets.keys`) that is also their data
version, and both depend on `base_model`, an observable source whose data version is the
model's content fingerprint: new weights at the same path make them stale and give them a
new key. Both commands get the `compute` resource's precision and device.

A reference-free loss (`simpo`, `orpo`: `training.train_config.REFERENCE_FREE_LOSSES`)
reads no reference: `trained_model` passes it neither reference file (`reads_reference`),
so the two reference assets, still its inputs in the graph, are materialized but unused.
"""

import json
import sys
import warnings
from pathlib import Path

import dagster as dg

from assets.configs import ReferenceConfig, TrainingConfig
from assets.keys import TRAINER_CODE_VERSION, compute_identity, content_key, model_fingerprint
from assets.packing import NO_EVAL_SHARDS
from assets.plots import loss_plot
from assets.resources import ComputeResource, ModelResource, SourcesResource, StoreResource
from core.atomic import atomic_file
from core.inputs import is_hub_id
from pipeline.io import REPORT_FILE
from training.report import materialization_metadata, summarize
from training.tokenizer_match import tokenizer_mismatch
from training.train_config import REFERENCE_FREE_LOSSES

CARD_SOURCE = "--card-source"  # a model card's words: repeated, and not in the run's key
# Beside a finished run: what the trainer reported besides its metrics (backend, layout,
# shard key, model), so that reusing the run shows what computing it showed.
REPORTED = "reported.json"


def model_args(model: ModelResource, shards: str) -> list[str]:
    """The model flags of `prefpack train/logps/difficulty` on `shards`: a checkpoint folder
    or a named config. A folder whose own tokenizer is not the one the shards were made
    with (by content, `training.tokenizer_match`) stops here, before anything launches,
    unless the resource allows it.

    Raises:
        dagster.Failure: one line naming both tokenizers.
    """
    if not model.path:
        return ["--config", model.config, "--init-seed", str(model.seed)]
    if model.allow_tokenizer_mismatch:
        return ["--model", model.path, "--allow-tokenizer-mismatch"]
    problem = tokenizer_mismatch(shards, model.path)
    if problem is not None:
        raise dg.Failure(description=problem)
    return ["--model", model.path]


def reads_reference(loss: str) -> bool:
    """Whether a run with `loss` reads reference log-probs: every loss but the
    reference-free ones, which `prefpack train` and `difficulty` refuse them for."""
    return loss not in REFERENCE_FREE_LOSSES


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
        model.check()
        return dg.DataVersion(model_fingerprint(model))


@dg.asset(
    group_name="training",
    code_version=TRAINER_CODE_VERSION,
    deps=[base_model],
    description="Per-pair log-probs of chosen and rejected under the reference model (the "
    "initial policy), computed once per shard key, model content, precision and device class "
    "and reused by every run. With a reference-free loss (simpo, orpo) it is still "
    "materialized as an input of trained_model and difficulty_scores, but neither reads it.",
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
    return _reference_file(
        context, config, packed_shards, model, compute, store, pipes_subprocess_client
    )


@dg.asset(
    group_name="training",
    code_version=TRAINER_CODE_VERSION,
    deps=[base_model],
    description="reference_logps of the eval shards: computed once, reused by every run "
    "that evaluates on them (trained_model and selected_model alike). None without eval "
    "shards. Materialized but unread with a reference-free loss (simpo, orpo).",
)
def eval_reference_logps(
    context: dg.AssetExecutionContext,
    config: ReferenceConfig,
    eval_shards: str | None,
    model: ModelResource,
    compute: ComputeResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult[str | None]:
    if eval_shards is None:
        return dg.MaterializeResult(
            value=None,
            data_version=dg.DataVersion(NO_EVAL_SHARDS),
            metadata={"status": "no eval shards: nothing to compute"},
        )
    return _reference_file(
        context, config, eval_shards, model, compute, store, pipes_subprocess_client
    )


def _reference_file(
    context: dg.AssetExecutionContext,
    config: ReferenceConfig,
    shards: str,
    model: ModelResource,
    compute: ComputeResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult[str]:
    """`prefpack logps` on `shards` through Pipes, into a file keyed by the shards, the
    model's content and the settings (the command reuses it when it holds that key)."""
    model.check()
    shard_key = Path(shards).name
    key = content_key(shard_key, model, compute, reference=config.model_dump())
    out = store.path("reference", shard_key, f"{key}-{compute.precision}.arrow")
    command = [
        *prefpack_command(),
        "logps",
        "--shards",
        shards,
        *model_args(model, shards),
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
    description="A DPO run on the packed shards (the compact trainer, through Dagster Pipes), "
    "evaluated on the eval shards; the final model is a Hugging Face folder with the base "
    "model's tokenizer files (or the shards') and a model card. Keyed by shards, model "
    "content, references, eval set, precision, device class and settings: a finished run "
    "with the key is reused. Its value is the run folder. A reference-free loss (simpo, "
    "orpo) is given no reference: reference_logps and eval_reference_logps go unread (and "
    "out of its key), and no frozen reference model is held either.",
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    curated_pairs: str,
    packed_shards: str,
    reference_logps: str,
    eval_shards: str | None,
    eval_reference_logps: str | None,
    model: ModelResource,
    sources: SourcesResource,
    compute: ComputeResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult[str]:
    precompute = config.precompute_reference and reads_reference(config.loss)
    return run_training(
        context,
        config,
        packed_shards,
        {
            "--reference": reference_logps if precompute else None,
            "--eval-shards": eval_shards,
            "--eval-reference": eval_reference_logps if precompute else None,
            "--card-source": card_sources(curated_pairs, sources),
        },
        model,
        compute,
        store,
        pipes_subprocess_client,
    )


def card_sources(curated_pairs: str, sources: SourcesResource) -> list[str]:
    """The model card's sources (`--card-source NAME[=HUB_ID]`): each source that kept pairs
    in the curated set, with the presets applied, and its hub id when it was read from one."""
    report = json.loads((Path(curated_pairs) / REPORT_FILE).read_text())
    cards = []
    for name, counts in report["sources"].items():
        if not counts["rows_out"]:
            continue
        presets = [p for p in (sources.preset_for(name), report.get("preset")) if p]
        text = name + (f" (preset {', '.join(presets)})" if presets else "")
        given = sources.inputs.get(name)
        if given and is_hub_id(given):  # read from the hub, not from local files
            text += f"={given}"
        cards.append(text)
    return cards


def run_training(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    shards: str,
    inputs: dict[str, str | list[str] | None],
    model: ModelResource,
    compute: ComputeResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult[str]:
    """`prefpack train` on `shards` through Pipes, or the finished run with the same key.

    Args:
        inputs: flag -> file or directory (or a list, for a repeated flag) that the command
            reads besides the shards and the model: the reference log-probs (no
            `--reference` or `--reference-cache`: a frozen copy of the initial model, or
            no reference for a reference-free loss), the eval shards and theirs, the model
            card's sources; None leaves a flag out. The names of the files are part of
            the run's key (the card's words are not: they change no number).
    """
    model.check()
    values = config.model_dump()
    nproc = values.pop("nproc_per_node")
    values.pop("precompute_reference")
    given = {flag: value for flag, value in inputs.items() if value}
    named = {flag: Path(value).name for flag, value in given.items() if flag != CARD_SOURCE}
    # Every setting is in the key: the process count changes the global batch.
    key = content_key(Path(shards).name, model, compute, inputs=named, training=config.model_dump())
    out = store.path("models", key)
    reused = (out / "final").is_dir() and (out / REPORTED).is_file()
    if reused:
        # The same shards, model and settings trained before: the run is deterministic,
        # so its result is reused rather than recomputed.
        context.log.info(f"reusing the finished run {out}")
    else:
        flags = [
            part
            for flag, value in given.items()
            for item in (value if isinstance(value, list) else [value])
            for part in (flag, item)
        ]
        command = [
            *prefpack_command(nproc),
            "train",
            "--shards",
            shards,
            *model_args(model, shards),
            "--out",
            str(out),
            *flags,
            *config_flags(values),
            *compute.flags(),
            "--no-progress",
        ]
        context.log.debug(" ".join(command))
        result = pipes_subprocess_client.run(context=context, command=command)
        _save_reported(out, result.get_materialize_result())
    summary = summarize(out)
    metadata = _typed(materialization_metadata(summary, read_reported(out)))
    return dg.MaterializeResult(
        value=str(out),
        data_version=dg.DataVersion(key),
        metadata={
            **metadata,
            "run_key": key,
            "model_content": model_fingerprint(model),
            **compute_identity(compute),
            "reused": reused,
            "loss_plot": loss_plot(summary.curve, summary.eval_curve),
        },
    )


def _save_reported(out: Path, result: dg.MaterializeResult) -> None:
    """Keep the text entries of the trainer's report (those its metrics file cannot give)."""
    extra = {k: v.value for k, v in result.metadata.items() if isinstance(v, dg.TextMetadataValue)}
    with atomic_file(out / REPORTED) as tmp:
        tmp.write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")


def read_reported(out: Path) -> dict[str, str]:
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
