"""Difficulty from the model, after the shards (Selective DPO): `difficulty_scores`,
`selected_shards` and `selected_model`.

- `difficulty_scores` runs `prefpack difficulty` through Dagster Pipes, as `trained_model`
  runs `prefpack train` (under torchrun when `nproc_per_node` > 1): k fold models, each
  trained on the other folds' pairs against the `reference_logps` file, score their own
  fold's pairs. The scores live under `store/difficulty/<key>`, a content key
  (`assets.keys.difficulty_key`) that is also the data version: an unchanged key reuses
  them without launching anything.
- `selected_shards` drops the hardest share of the scored pairs and packs the rest with
  the shards' own settings (`pipeline.selection`): an ordinary shard directory, whose
  cache key is its data version.
- `selected_model` is `trained_model` on the selected shards (the same code path), with
  reference log-probs computed once for those shards (`--reference-cache`), evaluated on
  `trained_model`'s eval shards, so its page shows the two side by side.

A reference-free loss (`simpo`, `orpo`) reads no reference: `difficulty_scores` and
`selected_model` pass none (`assets.training.reads_reference`), and the reference assets
they depend on are materialized but unread.
"""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assets import checks
from assets.configs import DifficultyScoresConfig, SelectionConfig, TrainingConfig
from assets.keys import (
    DIFFICULTY_CODE_VERSION,
    TRAINER_CODE_VERSION,
    compute_identity,
    difficulty_key,
)
from assets.metadata import count_table
from assets.plots import difficulty_plot
from assets.resources import ComputeResource, ModelResource, SourcesResource, StoreResource
from assets.training import (
    base_model,
    card_sources,
    config_flags,
    model_args,
    prefpack_command,
    read_reported,
    reads_reference,
    run_training,
)
from core.settings import config_from
from pipeline.selection import SELECT_VERSION, SelectConfig, build_selected_shards
from pipeline.shards import ShardError, open_shards, read_report, read_scores
from training.report import METRICS, summarize

GROUP = "difficulty"


@dg.asset(
    group_name=GROUP,
    code_version=DIFFICULTY_CODE_VERSION,
    deps=[base_model],
    check_specs=checks.specs("difficulty_scores", checks.ACCOUNTING),
    description="Held-out loss and implicit reward margin of every packed pair, from k fold "
    "models (the compact trainer, through Dagster Pipes) each trained on the other folds' "
    "pairs: the pairs' difficulty as Selective DPO measures it. Keyed by shards, model "
    "content, reference, trainer and scoring code, precision, device class and settings. "
    "A reference-free loss (simpo, orpo) trains and scores the folds without a reference: "
    "reference_logps goes unread (and out of the key).",
)
def difficulty_scores(
    context: dg.AssetExecutionContext,
    config: DifficultyScoresConfig,
    packed_shards: str,
    reference_logps: str,
    model: ModelResource,
    compute: ComputeResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> Iterator[dg.MaterializeResult[str] | dg.AssetCheckResult]:
    model.check()
    shard_key = Path(packed_shards).name
    values = config.model_dump()
    nproc = values.pop("nproc_per_node")
    reference = reference_logps if reads_reference(config.loss) else None
    reference_name = "none" if reference is None else Path(reference).name
    key = difficulty_key(shard_key, model, compute, reference_name, config.model_dump())
    out = store.path("difficulty", key)
    reused = _intact(out)
    if reused:
        context.log.info(f"reusing the scores {out}")
    else:
        command = [
            *prefpack_command(nproc),
            "difficulty",
            "--shards",
            packed_shards,
            *model_args(model, packed_shards),
            *(["--reference", reference] if reference is not None else []),
            "--out",
            str(out),
            *config_flags(values),
            *compute.flags(),
            "--no-progress",
        ]
        context.log.debug(" ".join(command))
        pipes_subprocess_client.run(context=context, command=command)
    report, scores = read_report(out), read_scores(out)
    loss = scores.column("loss").to_numpy()
    margin = scores.column("margin").to_numpy()
    yield dg.MaterializeResult(
        value=str(out),
        data_version=dg.DataVersion(key),
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "key": key,
            "reused": reused,
            "pairs": report["pairs"],
            "folds": len(report["folds"]),
            "by_fold": _fold_table(report["folds"]),
            "held_out_loss_mean": float(loss.mean()),
            "held_out_loss_p50": float(np.median(loss)),
            "held_out_loss_p90": float(np.percentile(loss, 90)),
            "held_out_loss_max": float(loss.max()),
            "held_out_accuracy": float((margin > 0).mean()),
            "difficulty_plot": difficulty_plot(loss, scores.column("fold").to_numpy(), margin),
            "shard_key": shard_key,
            **compute_identity(compute),
        },
    )
    yield _check_scores_cover(scores, report, packed_shards)


def _fold_table(folds: list[dict]) -> dg.MetadataValue:
    """Each fold model's pairs, loss and accuracy on what it trained on and on what it held
    out, side by side in a cell (the UI cuts a wide table at its edge); steps and rows
    below."""
    lines = [
        "| fold | pairs trained / held out | loss trained / held out | accuracy trained / held out |",
        "| ---: | ---: | ---: | ---: |",
    ]
    slash = "\u00a0/\u00a0"  # no break inside a cell
    for f in folds:
        lines.append(
            f"| {f['fold']} | {f['train_pairs']:,}{slash}{f['held_out_pairs']:,} "
            f"| {f['train_loss']:.3f}{slash}{f['held_out_loss']:.3f} "
            f"| {f['train_accuracy']:.0%}{slash}{f['held_out_accuracy']:.0%} |"
        )
    steps = sorted({f["steps"] for f in folds})
    rows = ", ".join(f"{f['train_rows']:,}" for f in folds)
    lines += ["", f"{'/'.join(map(str, steps))} steps per fold model, on {rows} packed rows"]
    return dg.MetadataValue.md("\n".join(lines))


def _intact(out: Path) -> bool:
    """Whether `out` holds finished scores that prove themselves (report sealed, sha256)."""
    try:
        read_report(out)
    except ShardError:
        return False
    return True


def _check_scores_cover(scores: pa.Table, report: dict, packed_shards: str) -> dg.AssetCheckResult:
    """Every packed pair scored exactly once, by the one fold that held it out: the folds
    are disjoint and cover the shards' pairs (blocking)."""
    packed = pc.list_flatten(open_shards(packed_shards, verify=False).table["pair_ids"])
    scored = scores.column("pair_id")
    unique = len(pc.unique(scored))
    covered = len(packed) == unique == len(scored)
    covered = covered and bool(pc.all(pc.is_in(packed, value_set=scored)).as_py())
    counts = pc.value_counts(scores.column("fold"))
    per_fold = dict(
        zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
    )
    listed = {fold["fold"]: fold["held_out_pairs"] for fold in report["folds"]}
    return dg.AssetCheckResult(
        check_name=checks.ACCOUNTING,
        passed=covered and per_fold == listed,
        metadata={
            "packed_pairs": len(packed),
            "scored_pairs": len(scored),
            "unique_scored": unique,
            "held_out_by_fold": count_table(
                {f"fold {k}": v for k, v in listed.items()}, "fold", unit="pairs"
            ),
        },
    )


@dg.asset(
    group_name=GROUP,
    code_version=SELECT_VERSION,
    check_specs=checks.specs("selected_shards", checks.VERIFIED, checks.ACCOUNTING),
    description="The scored pairs without the hardest share (highest held-out loss), packed "
    "again with the shards' own settings into verified shards under store/shards/<key>; "
    "every dropped pair is in store/selected/<key>/dropped.parquet with its reason.",
)
def selected_shards(
    context: dg.AssetExecutionContext,
    config: SelectionConfig,
    packed_shards: str,
    difficulty_scores: str,
    store: StoreResource,
) -> Iterator[dg.MaterializeResult[str] | dg.AssetCheckResult]:
    result = build_selected_shards(
        packed_shards, difficulty_scores, config_from(SelectConfig, config), store.root
    )
    report, manifest = result.report, result.shards.manifest
    context.log.info(f"{'reused' if result.shards.reused else 'wrote'} {result.shards.directory}")
    scores = read_scores(difficulty_scores)
    yield dg.MaterializeResult(
        value=str(result.shards.directory),
        data_version=dg.DataVersion(result.shards.key),
        metadata={
            "path": dg.MetadataValue.path(str(result.shards.directory)),
            "key": result.shards.key,
            "reused": result.shards.reused,
            "pairs_in": report["pairs_in"],
            "pairs_out": report["pairs_out"],
            "dropped": sum(report["dropped"].values()),
            "dropped_by_reason": count_table(
                report["dropped"], total=report["pairs_in"], unit="pairs"
            ),
            "dropped_path": dg.MetadataValue.path(str(result.directory / "dropped.parquet")),
            "drop_hardest": float(config.drop_hardest),
            "loss_threshold": report["loss_threshold"]
            if report["loss_threshold"] is not None
            else "(nothing dropped)",
            "rows": manifest["stats"]["rows"],
            "fill_ratio": float(manifest["stats"]["fill_ratio"]),
            "selection": report["key"],
            "difficulty_plot": difficulty_plot(
                scores.column("loss").to_numpy(),
                scores.column("fold").to_numpy(),
                scores.column("margin").to_numpy(),
                report["loss_threshold"],
            ),
        },
    )
    yield checks.check_shards_verified(result.shards)
    yield _check_selection_accounting(report, manifest, difficulty_scores)


def _check_selection_accounting(
    report: dict, manifest: dict, scores_dir: str
) -> dg.AssetCheckResult:
    """Scored pairs = kept + dropped by reason, and the selected shards hold the kept."""
    scored = read_report(scores_dir)["pairs"]
    dropped = sum(report["dropped"].values())
    packed = manifest["stats"]["pairs"]
    return dg.AssetCheckResult(
        check_name=checks.ACCOUNTING,
        passed=scored == report["pairs_in"] == report["pairs_out"] + dropped
        and packed == report["pairs_out"],
        metadata={
            "scored_pairs": scored,
            "kept_plus_dropped": report["pairs_out"] + dropped,
            "pairs_in_selected_shards": packed,
        },
    )


@dg.asset(
    group_name=GROUP,
    code_version=TRAINER_CODE_VERSION,
    deps=[base_model],
    description="trained_model's DPO run (the same code path and settings) on the selected "
    "shards, against reference log-probs computed once for them (none for a reference-free "
    "loss: simpo, orpo), evaluated on the same eval shards as trained_model, whose numbers "
    "it shows beside its own; keyed like trained_model.",
)
def selected_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    curated_pairs: str,
    selected_shards: str,
    eval_shards: str | None,
    eval_reference_logps: str | None,
    trained_model: str,
    model: ModelResource,
    sources: SourcesResource,
    compute: ComputeResource,
    store: StoreResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult[str]:
    precompute = config.precompute_reference and reads_reference(config.loss)
    cache = store.path("reference", Path(selected_shards).name)
    result = run_training(
        context,
        config,
        selected_shards,
        {
            "--reference-cache": str(cache) if precompute else None,
            "--eval-shards": eval_shards,
            "--eval-reference": eval_reference_logps if precompute else None,
            "--card-source": card_sources(curated_pairs, sources),
        },
        model,
        compute,
        store,
        pipes_subprocess_client,
    )
    comparison = _against_trained(Path(result.value), Path(trained_model))
    return dg.MaterializeResult(
        value=result.value,
        data_version=result.data_version,
        metadata={**result.metadata, "against_trained_model": comparison},
    )


def _against_trained(selected_run: Path, trained_run: Path) -> dg.MetadataValue:
    """selected_model's numbers beside trained_model's: on the eval shards (the claim of
    Selective DPO: better on held-out pairs), then on each run's own last training step."""
    selected, trained = summarize(selected_run), summarize(trained_run)
    rows = [
        "| metric | selected_model | trained_model |",
        "| --- | ---: | ---: |",
    ]
    for prefix, source in (("eval/", "evaluation"), ("", "final")):
        for name in METRICS[:3]:
            ours, theirs = (getattr(run, source).get(prefix + name) for run in (selected, trained))
            if ours is None or theirs is None:
                continue
            rows.append(f"| {prefix}{name} | {ours:.4f} | {theirs:.4f} |")
    keys = [read_reported(run).get("eval_shard_key") for run in (selected_run, trained_run)]
    note = (
        f"on the same {selected.evaluation['eval/pairs']:,} held-out pairs (eval shards {keys[0]})"
        if keys[0] is not None and keys[0] == keys[1]
        else "no shared eval set: only the training numbers compare (set an eval split, "
        "and materialize trained_model with it)"
    )
    return dg.MetadataValue.md("\n".join([*rows, "", note]))
