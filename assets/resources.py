"""Resources: where things live (the store), what the sources read, the tokenizer, the model,
and the precision and device the trainer computes in.

They are the knobs a user turns in the UI's launchpad, in a run config file (`prefpack run
--config`, `dg launch -c`) or in `definitions.py` to point the same graph at the real hub
datasets, local files, a real tokenizer or a real model.

Each checks itself (`check()`), first thing in every asset that uses it: a source name
that is no source, a preset or options its adapter refuses, an input, model or tokenizer
path that is not there fail the step with one line naming the key (`dagster.Failure`),
rather than being ignored (an unknown source's input would leave its partition reading
the bundled sample) or failing deep inside the step. `prefpack run` asks the same
`problems()` before it launches anything. (Not in `setup_for_execution`: a resource that
fails there fails again when `dg launch` reopens the finished run for its result, which
ends in Dagster's own traceback.)
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from core.inputs import is_hub_id
from pipeline.presets import get_preset
from pipeline.sample_data import sample_path
from pipeline.sources import SOURCES, get_source
from training.train_config import Precision


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """` (did you mean X?)` for the closest of `known` to a misspelled `name`, else
    `; known: a, b, ...`."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(known)}"


def fail_on(problems: list[str]) -> None:
    """Raises: dagster.Failure whose description is the problems, on one line."""
    if problems:
        raise dg.Failure(description="; ".join(problems))


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

    def settings_problems(self) -> list[str]:
        """A name under inputs, options or presets that is no source (its setting would
        be ignored), a preset that is unknown or does not cover its source, options the
        source's adapter refuses: one line each, naming the key."""
        problems = [
            f"sources.{field}.{name}: unknown source{did_you_mean(name, SOURCES)}"
            for field in ("inputs", "options", "presets")
            for name in getattr(self, field)
            if name not in SOURCES
        ]
        for name in sorted(SOURCES.keys() & (self.options.keys() | self.presets.keys())):
            preset = self.presets.get(name)
            try:
                chosen = {} if preset is None else get_preset(preset).options_for(name)
            except ValueError as err:
                problems.append(f"sources.presets.{name}: {err}")
                continue
            try:
                get_source(name).make_options(chosen | self.options_for(name))
            except (ValueError, TypeError) as err:  # the adapter names itself first
                problems.append(f"sources.options.{name}: {str(err).removeprefix(name + ': ')}")
        return problems

    def input_problems(self, sources: Iterable[str] | None = None) -> list[str]:
        """An input of `sources` (default: every source named) that is neither a local
        file or directory nor a hub id (`core.inputs.is_hub_id`)."""
        names = self.inputs if sources is None else sources
        return [
            f"sources.inputs.{name}: {self.inputs[name]!r} does not exist (neither a local "
            "file or directory nor a hub id)"
            for name in names
            if name in SOURCES
            and name in self.inputs
            and not is_hub_id(self.inputs[name])
            and not Path(self.inputs[name]).exists()
        ]

    def check(self, source: str) -> None:
        """Fail the step of `source`'s partition on the settings' problems or its input's
        (another source's input is its own partition's business).

        Raises:
            dagster.Failure: the problems, on one line.
        """
        fail_on(self.settings_problems() + self.input_problems([source]))

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

    def problems(self) -> list[str]:
        """A path that is neither a tokenizer.json nor a folder holding one."""
        if self.path is None:
            return []
        path = Path(self.path)
        if not path.exists():
            return [f"tokenizer.path: {self.path!r} does not exist"]
        if path.is_dir() and not (path / "tokenizer.json").is_file():
            return [f"tokenizer.path: {self.path!r} holds no tokenizer.json"]
        return []

    def check(self) -> None:
        """Raises: dagster.Failure naming the path's problem."""
        fail_on(self.problems())


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

    def problems(self) -> list[str]:
        """A path that is not a Hugging Face checkpoint folder (hub ids are not downloaded:
        the weights are fingerprinted by their bytes)."""
        if self.path is None:
            return []
        path = Path(self.path)
        if not path.exists():
            return [f"model.path: {self.path!r} does not exist (a local Hugging Face folder)"]
        if not (path / "config.json").is_file():
            return [f"model.path: {self.path!r} holds no config.json (not a Hugging Face folder)"]
        return []

    def check(self) -> None:
        """Raises: dagster.Failure naming the path's problem."""
        fail_on(self.problems())


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
