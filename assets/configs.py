"""Run configs of the assets, built from the pipeline's own config dataclasses.

The CLI builds its flags from the same dataclasses, so the UI's launchpad, the CLI and the
library share one set of names, defaults and help texts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, create_model

from pipeline.curate import CurateConfig
from pipeline.pack import PackConfig
from pipeline.sources import SOURCES
from pipeline.tokenized import TokenizeConfig
from training.train_config import TrainConfig


def _config_type(annotation: Any) -> Any:
    """Dagster config has lists, not tuples, and strings, not paths:
    `tuple[str, ...] | None` -> `list[str] | None`, `Path` -> `str`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.Optional[_config_type(typing.get_args(annotation)[0])]  # noqa: UP045
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    if annotation is Path:
        return str
    return annotation


def config_from_dataclass(
    cls: type, name: str, exclude: tuple[str, ...] = (), **extra: Any
) -> type[dg.Config]:
    """A `dg.Config` with the dataclass's fields (but `exclude`), defaults and help texts,
    plus `extra` fields."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {
        f.name: (
            _config_type(hints[f.name]),
            Field(
                default=list(f.default) if isinstance(f.default, tuple) else f.default,
                description=f.metadata.get("help"),
            ),
        )
        for f in dataclasses.fields(cls)
        if f.name not in exclude
    }
    fields.update(extra)
    return create_model(name, __base__=dg.Config, __doc__=cls.__doc__, **fields)


def to_dataclass(config: dg.Config, cls: type, **given: Any) -> Any:
    """The pipeline dataclass for a config built by `config_from_dataclass`; `given`
    supplies the excluded fields."""
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name not in given:
            value = getattr(config, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


CurationConfig = config_from_dataclass(
    CurateConfig,
    "CurationConfig",
    sources=(
        list[str],
        Field(
            default=list(SOURCES),
            description="normalized source partitions to curate together",
        ),
    ),
    use_eval_prompts=(
        bool,
        Field(
            default=True,
            description="check contamination against the bundled (or given) eval prompts",
        ),
    ),
    eval_prompts=(
        str | None,
        Field(default=None, description="eval prompts file; unset = the bundled sample's"),
    ),
)


TokenizationConfig = config_from_dataclass(
    TokenizeConfig,
    "TokenizationConfig",
    min_boundary_agreement=(
        float,
        Field(default=0.99, description="check_boundary_agreement warns below this rate"),
    ),
)

PackingConfig = config_from_dataclass(
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

TrainingConfig = config_from_dataclass(
    TrainConfig,
    "TrainingConfig",
    exclude=("out_dir", "progress"),
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
