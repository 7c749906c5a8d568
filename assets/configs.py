"""Run configs of the assets, built from the pipeline's own config dataclasses.

The CLI builds its flags from the same dataclasses (`core.settings`), so the UI's
launchpad, the CLI and the library share one set of names, defaults, help texts and
ranges; `dagster_config` turns a dataclass into a `dagster.Config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, create_model

from core.settings import without_none
from pipeline.curate import CurateConfig
from pipeline.pack import PackConfig
from pipeline.presets import PRESETS
from pipeline.selection import SelectConfig
from pipeline.sources import SOURCES
from pipeline.tokenized import TokenizeConfig
from training.difficulty_config import FOLD_UNUSED_FIELDS, DifficultyConfig
from training.train_config import TrainConfig


def _config_type(annotation: Any) -> Any:
    """Dagster config has lists, not tuples, and strings, not paths."""
    base, optional = without_none(annotation)
    if typing.get_origin(base) is tuple:
        base = list[typing.get_args(base)[0]]
    elif base is Path:
        base = str
    return typing.Optional[base] if optional else base  # noqa: UP045


def given_values(config: Any, names: typing.Iterable[str]) -> types.SimpleNamespace:
    """The fields `names` of a config made by `dagster_config` (those its run config sets),
    for `core.settings.config_from` to put over a preset's settings."""
    return types.SimpleNamespace(**{name: getattr(config, name) for name in names})


def dagster_config(cls: type, name: str, exclude: tuple[str, ...] = (), **extra: Any) -> type:
    """A `dagster.Config` with the fields of `cls` (but `exclude`), their defaults, help
    texts and ranges (checked by the launchpad), plus `extra` pydantic fields."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {
        f.name: (
            _config_type(hints[f.name]),
            Field(
                default=list(f.default) if isinstance(f.default, tuple) else f.default,
                description=f.metadata.get("help"),
                **(
                    {}
                    if typing.get_origin(hints[f.name]) is tuple
                    else f.metadata.get("bounds", {})
                ),
            ),
        )
        for f in dataclasses.fields(cls)
        if f.name not in exclude
    }
    fields.update(extra)
    return create_model(name, __base__=dg.Config, __doc__=cls.__doc__, **fields)


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
