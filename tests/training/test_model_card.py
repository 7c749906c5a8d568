"""`render_card`: a YAML header the hub parses, holding only what is known, and sections
that state the data, settings, hardware and final metrics (eval ones only when given)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.shards import read_manifest
from training.model_card import METRICS, CardFacts, ShardFacts, render_card
from training.train_config import TrainConfig

TRAIN = {name: 0.5 + i / 100 for i, name in enumerate(METRICS)}  # 0.5000, 0.5100, ...
EVAL = {f"eval/{name}": 0.25 + i / 100 for i, name in enumerate(METRICS)}  # 0.2500, ...


@pytest.fixture
def facts(tiny_shards: Path, tmp_path: Path) -> CardFacts:
    return CardFacts(
        title="smol-dpo",
        start="HuggingFaceTB/SmolLM2-135M",
        shards=ShardFacts.from_manifest(read_manifest(tiny_shards)),
        settings=dataclasses.asdict(TrainConfig(out_dir=tmp_path / "run", steps=7)),
        device="NVIDIA H100 80GB HBM3",
        processes=8,
        train_seconds=5400.0,
        steps=7,
        metrics=TRAIN,
        base_model="HuggingFaceTB/SmolLM2-135M",
        sources=("HelpSteer3 (preference, preset helpsteer3-strict)",),
        datasets=("nvidia/HelpSteer3",),
        license="apache-2.0",
    )


def _header(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def _metric_row(card: str, name: str) -> list[str]:
    results = card[card.index("## Results") :]
    line = next(x for x in results.splitlines() if x.startswith(f"| `{name}` |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_header_parses_with_the_known_keys(facts: CardFacts) -> None:
    assert _header(render_card(facts)) == {
        "base_model": "HuggingFaceTB/SmolLM2-135M",
        "library_name": "transformers",
        "license": "apache-2.0",
        "tags": ["dpo", "prefpack"],
        "datasets": ["nvidia/HelpSteer3"],
    }


def test_unknown_header_values_are_left_out(facts: CardFacts) -> None:
    """A model from a local folder or a config has no hub id: no base_model, no guess."""
    bare = dataclasses.replace(facts, base_model=None, datasets=(), license=None)
    assert _header(render_card(bare)) == {
        "library_name": "transformers",
        "tags": ["dpo", "prefpack"],
    }


def test_header_quotes_what_yaml_would_misread(facts: CardFacts) -> None:
    odd = dataclasses.replace(facts, base_model='org/model: v2 # "x"', datasets=("yes",))
    header = _header(render_card(odd))
    assert header["base_model"] == 'org/model: v2 # "x"' and header["datasets"] == ["yes"]


def test_sections_state_the_data_settings_and_hardware(facts: CardFacts, tiny_shards: Path) -> None:
    card = render_card(facts)
    manifest = read_manifest(tiny_shards)
    assert f"shards key `{manifest['key']}`" in card
    assert f"- pairs: {manifest['stats']['pairs']:,} of {manifest['input']['rows']:,}" in card
    assert "- sources: HelpSteer3 (preference, preset helpsteer3-strict)" in card
    for name, value in facts.settings.items():
        assert f"| `{name}` | {value} |" in card
    assert "8 processes on NVIDIA H100 80GB HBM3, 7 steps in 1.50 h (5,400 s)" in card
    assert "eval:" not in card  # no eval shards given


def test_eval_numbers_appear_when_given(facts: CardFacts, tiny_shards: Path) -> None:
    evaluated = dataclasses.replace(
        facts,
        metrics={**TRAIN, **EVAL},
        eval_shards=dataclasses.replace(facts.shards, key="e" * 20, pairs=12),
    )
    card = render_card(evaluated)
    assert "| metric | train (last step) | eval |" in card
    for i, name in enumerate(METRICS):
        assert _metric_row(card, name) == [
            f"`{name}`",
            f"{0.5 + i / 100:.4f}",
            f"{0.25 + i / 100:.4f}",
        ]
    assert f"- eval: 12 pairs, shards key `{'e' * 20}`" in card


def test_eval_numbers_are_absent_not_nan_without_eval(facts: CardFacts) -> None:
    card = render_card(facts)
    assert "nan" not in card.lower() and "| eval |" not in card
    for i, name in enumerate(METRICS):
        assert _metric_row(card, name) == [f"`{name}`", f"{0.5 + i / 100:.4f}"]
