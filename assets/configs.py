"""Run configs of the assets, built from the pipeline's own config dataclasses.

The CLI builds its flags from the same dataclasses (`pipeline.flags`), so the UI's
launchpad, the CLI and the library share one set of names, defaults, help texts and
ranges.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from pipeline.curate import CurateConfig
from pipeline.flags import dagster_config
from pipeline.pack import PackConfig
from pipeline.presets import PRESETS
from pipeline.selection import SelectConfig
from pipeline.sources import SOURCES
from pipeline.tokenized import TokenizeConfig
from training.difficulty_config import FOLD_UNUSED_FIELDS, DifficultyConfig
from training.train_config import TrainConfig

CurationConfig = dagster_config(
    CurateConfig,
    "CurationConfig",
    sources=(
        list[str],
        Field(
            default=list(SOURCES),
            description="normalized source partitions to curate together",
        ),
    ),
    eval_prompts=(
        str | None,
        Field(
            default=None,
            description="eval prompts (.txt, or .jsonl/.parquet with 'prompt' or 'question'): "
            "a pair whose prompt shares a contamination_ngram with one is dropped as "
            "contaminated; unset = no contamination check (sample_job sets the bundled "
            "sample's)",
        ),
    ),
    benchmark_prompts=(
        str | None,
        Field(
            default=None,
            description="a benchmark's questions (.txt, or .jsonl/.parquet with 'prompt' or "
            "'question', e.g. TruthfulQA's): a pair with a user turn equal to one is dropped "
            "as benchmark_prompt; unset = off",
        ),
    ),
    preset=(
        str | None,
        Field(
            default=None,
            description=f"a public cleaning recipe, one of {', '.join(PRESETS)} (`prefpack "
            "curate --list-presets`): its rule settings apply under the fields set here, "
            "which win (even at their default)",
        ),
    ),
)


TokenizationConfig = dagster_config(
    TokenizeConfig,
    "TokenizationConfig",
    min_boundary_agreement=(
        float,
        Field(default=0.99, description="check_boundary_agreement warns below this rate"),
    ),
)

PackingConfig = dagster_config(
    PackConfig,
    "PackingConfig",
    min_fill_ratio=(
        float,
        Field(
            default=0.9,
            description="check_fill_ratio warns below this (packed layouts; padded is exempt)",
        ),
    ),
)

TrainingConfig = dagster_config(
    TrainConfig,
    "TrainingConfig",
    # precision and device are the `compute` resource's, shared with reference_logps
    exclude=("out_dir", "progress", "precision", "device"),
    nproc_per_node=(
        int,
        Field(
            default=1,
            description="processes; more than 1 launches through torchrun (DDP or FSDP, by parallel)",
        ),
    ),
    precompute_reference=(
        bool,
        Field(
            default=True,
            description="train against the reference_logps asset instead of a frozen "
            "reference model in memory",
        ),
    ),
)


class ReferenceConfig(dg.Config):
    """How the reference log-probs are computed (once per model and shard key)."""

    batch_rows: int = Field(default=8, description="packed rows per forward pass")
    backend: str = Field(
        default="auto", description="attention backend of the forward pass (auto: by device)"
    )


class DifficultyScoresConfig(
    dagster_config(DifficultyConfig, "FoldsConfig"),
    dagster_config(
        TrainConfig,
        "FoldTrainingConfig",
        # precision and device: the `compute` resource's; nor what fold models do not take
        exclude=("out_dir", "progress", "precision", "device", *FOLD_UNUSED_FIELDS),
    ),
):
    """The k-fold split, the scoring pass, and how each fold model trains (`prefpack
    difficulty`'s flags)."""

    nproc_per_node: int = Field(
        default=1,
        description="processes; more than 1 launches through torchrun (DDP or FSDP, by parallel)",
    )


SelectionConfig = dagster_config(SelectConfig, "SelectionConfig")
