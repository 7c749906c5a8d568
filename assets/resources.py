"""Resources: where things live (the store), what the sources read, the tokenizer, the model,
and the precision and device the trainer computes in.

They are the knobs a user turns in the UI's launchpad or in `definitions.py` to point the
same graph at the real hub datasets, local files, a real tokenizer or a real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from pipeline.sample_data import sample_path
from training.train_config import Precision


class StoreResource(dg.ConfigurableResource):
    """The store directory: every stage's output lives under it, by stage."""

    root: str = Field(default="store", description="store directory (relative to the cwd)")

    def path(self, *parts: str) -> Path:
        """A path under the store (not created)."""
        return Path(self.root, *parts)


class SourcesResource(dg.ConfigurableResource):
    """What each source partition reads: the bundled sample unless told otherwise."""

    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="source -> local file/directory or hub id, e.g. "
        "{'ultrafeedback_binarized': 'HuggingFaceH4/ultrafeedback_binarized'}; "
        "sources not named read their bundled sample",
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="source -> adapter options, e.g. {'ultrafeedback': {'rejected': 'random'}}",
    )
    presets: dict[str, str] = Field(
        default_factory=dict,
        description="source -> preset whose adapter options apply under `options`, e.g. "
        "{'ultrafeedback': 'argilla-ultrafeedback-clean'} (`prefpack normalize --list-presets`)",
    )

    def input_for(self, source: str) -> str:
        return self.inputs.get(source) or str(sample_path(source))

    def preset_for(self, source: str) -> str | None:
        return self.presets.get(source)

    def options_for(self, source: str) -> dict[str, Any]:
        return dict(self.options.get(source, {}))


class TokenizerResource(dg.ConfigurableResource):
    """The tokenizer: a tokenizer.json or a Hugging Face model folder.

    Unset (the sample job, with no model hub), a small byte-level BPE is trained on the
    curated pairs, deterministically.
    """

    path: str | None = Field(default=None, description="tokenizer.json or HF model folder")


class ModelResource(dg.ConfigurableResource):
    """The policy's starting point, which is also the DPO reference model."""

    path: str | None = Field(default=None, description="Hugging Face checkpoint folder")
    config: str = Field(
        default="tiny", description="named model config used from scratch when path is unset"
    )
    seed: int = Field(default=0, description="init seed when starting from scratch")
    allow_tokenizer_mismatch: bool = Field(
        default=False,
        description="train a path whose own tokenizer is not the one the shards were made "
        "with (by content); without it such a run stops before it launches",
    )


class ComputeResource(dg.ConfigurableResource):
    """The precision and device of every trainer command (`prefpack logps` and `train`).

    One resource for both, so the reference log-probs are always computed in the precision
    the policy trains in (a bf16 run against fp32 references would be silently off).
    """

    precision: Precision = Field(
        default="fp32", description="fp32, or bf16 (autocast on CUDA, fp32 master weights)"
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto, cpu, cuda or cuda:N; auto: CUDA when present, else CPU",
    )

    def flags(self) -> list[str]:
        """`--precision P --device D`, as `prefpack logps` and `train` take them."""
        return ["--precision", self.precision, "--device", self.device]
