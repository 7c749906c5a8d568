"""The `README.md` of an exported folder: a Hugging Face model card from a run's facts.

The YAML header holds only what is known (the hub reads `base_model`, `datasets`,
`license`, `library_name`, `tags`); a value that is not known is left out, never guessed.
A LoRA run says so: its merged model is a transformers model with a `lora` tag, and the
folder of the adapter alone is a PEFT one (`library_name: peft`, as PEFT's own cards).
The sections say what the model was trained on (sources, the shards' key and
pairs, the eval shards if any), with which settings, on what hardware for how long, and
the final metrics under the names TRL logs (`rewards/accuracies`, `eval/loss`, ...).

Torch-free, so the Dagster layer can render a card too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from training.report import METRICS  # TRL's names; eval ones are these with "eval/" before

EVAL_PREFIX = "eval/"
TAGS = ("dpo", "prefpack")
LORA_TAG = "lora"


@dataclass(frozen=True)
class ShardFacts:
    """One shard directory as a card names it (from its manifest.json).

    Attributes:
        key: the cache key (the directory's name).
        pairs: pairs packed.
        rows: packed rows.
        tokens: real tokens.
        max_len, layout: the packing.
        template: the chat template's name.
        tokenizer: the tokenizer's name.
        input_name, input_rows: the preference-pair file the tokenize stage read.
    """

    key: str
    pairs: int
    rows: int
    tokens: int
    max_len: int
    layout: str
    template: str
    tokenizer: str
    input_name: str
    input_rows: int

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ShardFacts:
        """The facts of a parsed, verified manifest (`pipeline.shards.read_manifest`)."""
        stats = manifest["stats"]
        return cls(
            key=manifest["key"],
            pairs=stats["pairs"],
            rows=stats["rows"],
            tokens=stats["tokens"],
            max_len=manifest["max_len"],
            layout=manifest["layout"],
            template=manifest["template"]["name"],
            tokenizer=manifest["tokenizer"]["name"],
            input_name=manifest["input"]["name"],
            input_rows=manifest["input"]["rows"],
        )


@dataclass(frozen=True)
class CardFacts:
    """Everything a model card states about a run.

    Attributes:
        title: the card's heading (e.g. the run folder's name).
        start: what training started from, in words ("HuggingFaceTB/SmolLM2-135M",
            "`/models/smol`", "a random init of config tiny, seed 0").
        shards: the training shards.
        settings: the run's settings, field -> value (`dataclasses.asdict(TrainConfig)`).
        device: the accelerator or "cpu", in words.
        processes: processes that trained (the world size).
        train_seconds: time in optimizer steps and evaluations (setup, reference
            passes and checkpoints left out).
        steps: optimizer steps taken.
        metrics: the final metrics: the METRICS names (the last step's) and, when the run
            evaluated, the same with "eval/" (the last evaluation's).
        eval_shards: the eval shards, when the run evaluated on some.
        base_model: the hub id of the base model, for the header; None when the model
            came from a local folder or a config (a path is not a hub id).
        sources: the preference datasets the pairs came from, in words (with the
            curation preset applied to each, when one was).
        datasets: hub ids of those datasets, for the header.
        license: the license, when known (usually the base model's).
        adapter: what a LoRA run's folder holds: `merged` (base + adapter, a full
            model), `adapter` (the adapter alone, PEFT's layout); None: full fine-tuning.
    """

    title: str
    start: str
    shards: ShardFacts
    settings: Mapping[str, Any]
    device: str
    processes: int
    train_seconds: float
    steps: int
    metrics: Mapping[str, float]
    eval_shards: ShardFacts | None = None
    base_model: str | None = None
    sources: Sequence[str] = ()
    datasets: Sequence[str] = ()
    license: str | None = None
    adapter: Literal["merged", "adapter"] | None = None


def render_card(facts: CardFacts) -> str:
    """The README.md text: YAML header, then data, settings, hardware and metrics."""
    return "\n".join(
        [
            _header(facts),
            f"# {facts.title}",
            "",
            f"Trained from {facts.start} on preference pairs with prefpack's DPO trainer "
            "(shared-prefix packed shards; the loss and its settings are below).",
            "",
            *_lora(facts),
            *_data(facts),
            *_settings(facts.settings),
            *_hardware(facts),
            *_metrics(facts),
        ]
    )


def _header(facts: CardFacts) -> str:
    """The YAML front matter; strings as JSON strings (valid YAML double-quoted)."""
    lines = ["---"]
    if facts.base_model:
        lines.append(f"base_model: {_quote(facts.base_model)}")
    lines.append(f"library_name: {'peft' if facts.adapter == 'adapter' else 'transformers'}")
    if facts.license:
        lines.append(f"license: {_quote(facts.license)}")
    lines += _yaml_list("tags", (*TAGS, LORA_TAG) if facts.adapter else TAGS)
    if facts.datasets:
        lines += _yaml_list("datasets", facts.datasets)
    return "\n".join([*lines, "---", ""])


def _lora(facts: CardFacts) -> list[str]:
    """What a LoRA run's folder holds and how to load it."""
    if facts.adapter is None:
        return []
    s = facts.settings
    trained = (
        f"A LoRA run (Hu et al. 2021, arXiv:2106.09685): rank {s.get('lora_rank')}, alpha "
        f"{s.get('lora_alpha')}, on {' '.join(s.get('lora_targets', ()))}; the base weights "
        "stayed frozen."
    )
    if facts.adapter == "merged":
        held = (
            "This folder holds the merged model (base + adapter), loadable as any "
            "transformers model; `adapter/` holds the adapter alone."
        )
    else:
        held = (
            "This folder holds the adapter alone: load it onto its base with "
            "`peft.PeftModel.from_pretrained(base, folder)` (`adapter_config.json` names "
            "the base)."
        )
    return [trained, held, ""]


def _data(facts: CardFacts) -> list[str]:
    s = facts.shards
    lines = ["## Data", ""]
    if facts.sources:
        lines.append(f"- sources: {', '.join(facts.sources)}")
    lines += [
        f"- pairs: {s.pairs:,} of {s.input_rows:,} in `{s.input_name}`, packed into "
        f"{_count(s.rows, 'row')} ({s.tokens:,} tokens, layout `{s.layout}`, "
        f"max_len {s.max_len:,})",
        f"- chat template `{s.template}`, tokenizer `{s.tokenizer}`",
        f"- shards key `{s.key}`",
    ]
    if (e := facts.eval_shards) is not None:
        lines.append(f"- eval: {e.pairs:,} pairs, shards key `{e.key}`")
    return [*lines, ""]


def _settings(settings: Mapping[str, Any]) -> list[str]:
    rows = [f"| `{name}` | {_cell(value)} |" for name, value in settings.items()]
    return ["## Settings", "", "| setting | value |", "| --- | --- |", *rows, ""]


def _hardware(facts: CardFacts) -> list[str]:
    return [
        "## Hardware and time",
        "",
        f"{_count(facts.processes, 'process')} on {facts.device}, "
        f"{_count(facts.steps, 'step')} in {_duration(facts.train_seconds)} of training and evaluation.",
        "",
    ]


def _metrics(facts: CardFacts) -> list[str]:
    m = facts.metrics
    evaluated = any(f"{EVAL_PREFIX}{name}" in m for name in METRICS)
    head = "| metric | train (last step) |" + (" eval |" if evaluated else "")
    rule = "| --- | --- |" + (" --- |" if evaluated else "")
    rows = []
    for name in METRICS:
        row = f"| `{name}` | {_number(m.get(name))} |"
        if evaluated:
            row += f" {_number(m.get(EVAL_PREFIX + name))} |"
        rows.append(row)
    return ["## Results", "", head, rule, *rows, ""]


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _yaml_list(key: str, items: Sequence[str]) -> list[str]:
    return [f"{key}:", *(f"- {_quote(item)}" for item in items)]


def _cell(value: Any) -> str:
    """A table cell: the value as text, pipes escaped."""
    return str(value).replace("|", "\\|")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h ({seconds:,.0f} s)"


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
