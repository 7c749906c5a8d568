"""The settings hash that `prefpack run` compares with the last run's: it changes when a
file the settings name is edited in place (eval and benchmark prompts, tokenizer files, a
chat template), and not for files the asset does not read."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import dagster as dg
import pytest

from assets.definitions import build_definitions, build_resources
from assets.jobs import SAMPLE_CONFIG
from assets.resources import SourcesResource, TokenizerResource
from assets.staleness import named_files, settings_version
from pipeline.presets import PRESETS
from tests.conftest import FIXTURES

CURATED = dg.AssetKey("curated_pairs")
TOKENIZED = dg.AssetKey("tokenized_pairs")


@pytest.fixture
def defs(tmp_path: Path) -> dg.Definitions:
    """Definitions whose tokenizer is a copy of the chatml fixture folder, plus a weights
    file the tokenizer never reads."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(FIXTURES / "chatml_tokenizer", folder)
    (folder / "model.safetensors").write_bytes(b"weights")
    resources = build_resources(tmp_path / "store")
    return build_definitions({**resources, "tokenizer": TokenizerResource(path=str(folder))})


def _ops(asset: str, **config: object) -> dict:
    return {"ops": {asset: {"config": config}}}


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


def test_edited_eval_and_benchmark_prompts_change_curation_settings(defs, tmp_path) -> None:
    evals, bench = tmp_path / "evals.txt", tmp_path / "bench.txt"
    evals.write_text("What is the capital of France?\n", encoding="utf-8")
    bench.write_text("Do you turn into a pumpkin at midnight?\n", encoding="utf-8")
    run_config = _ops("curated_pairs", eval_prompts=str(evals), benchmark_prompts=str(bench))
    before = settings_version(defs, CURATED, run_config)
    assert settings_version(defs, CURATED, run_config) == before  # same bytes, same hash

    _append(evals, "Name a prime number.\n")
    after_evals = settings_version(defs, CURATED, run_config)
    assert after_evals != before
    _append(bench, "Can sharks get cancer?\n")
    assert settings_version(defs, CURATED, run_config) not in (before, after_evals)


def test_eval_prompts_count_only_when_named(defs, tmp_path) -> None:
    """No file by default (no contamination check), so no edit anywhere calls for a rerun;
    the file named when set, as the sample job's config names the bundled one."""
    evals = tmp_path / "evals.txt"
    evals.write_text("What is the capital of France?\n", encoding="utf-8")
    assert named_files(defs, CURATED, {}) == []
    sample = SAMPLE_CONFIG["ops"]["curated_pairs"]["config"]
    bundled = named_files(defs, CURATED, sample)
    assert len(bundled) == 1 and bundled[0].name == "eval_prompts.txt" and bundled[0].is_file()

    named = _ops("curated_pairs", eval_prompts=str(evals))
    assert named_files(defs, CURATED, named["ops"]["curated_pairs"]["config"]) == [evals]
    before = settings_version(defs, CURATED, _ops("curated_pairs"))
    _append(evals, "Name a prime number.\n")
    assert settings_version(defs, CURATED, _ops("curated_pairs")) == before


def test_edited_tokenizer_files_and_template_change_tokenization_settings(defs, tmp_path) -> None:
    folder = Path(defs.resources["tokenizer"].path)
    template = tmp_path / "mine.jinja"
    template.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    run_config = _ops("tokenized_pairs", template=str(template))
    assert {p.name for p in named_files(defs, TOKENIZED, {"template": str(template)})} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "mine.jinja",
    }
    seen = {settings_version(defs, TOKENIZED, run_config)}

    (folder / "model.safetensors").write_bytes(b"other weights")  # not read by tokenizing
    assert settings_version(defs, TOKENIZED, run_config) in seen
    for edit in (folder / "tokenizer_config.json", folder / "tokenizer.json", template):
        _append(edit, "\n")
        version = settings_version(defs, TOKENIZED, run_config)
        assert version not in seen, edit.name
        seen.add(version)
    (folder / "chat_template.jinja").write_text("{{ 1 }}", encoding="utf-8")  # a new file
    assert settings_version(defs, TOKENIZED, run_config) not in seen


def test_builtin_template_and_trained_tokenizer_name_no_file(tmp_path, monkeypatch) -> None:
    """No tokenizer path (a BPE is trained) and a built-in template: nothing to read,
    even with a tokenizer.json in the working directory."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(FIXTURES / "chatml_tokenizer" / "tokenizer.json", tmp_path)
    defs = build_definitions(build_resources(tmp_path / "store"))
    assert named_files(defs, TOKENIZED, {"template": "chatml"}) == []
    assert named_files(defs, TOKENIZED, {}) == []


def test_a_changed_recipe_changes_the_settings_of_what_names_it(defs, monkeypatch) -> None:
    """A preset that sets something else under the same name (a new prefpack version):
    curation naming it, and the sources whose resource names it, have other settings."""
    run_config = _ops("curated_pairs", preset="helpsteer3-no-ties")
    sources = build_definitions(
        {**defs.resources, "sources": SourcesResource(presets={"helpsteer3": "helpsteer3-no-ties"})}
    )
    normalized = dg.AssetKey("normalized_pairs")
    before = settings_version(defs, CURATED, run_config), settings_version(sources, normalized, {})
    unrelated = settings_version(defs, CURATED, _ops("curated_pairs", preset="air"))
    changed = dataclasses.replace(PRESETS["helpsteer3-no-ties"], curate={"drop_ties": False})
    monkeypatch.setitem(PRESETS, "helpsteer3-no-ties", changed)
    after = settings_version(defs, CURATED, run_config), settings_version(sources, normalized, {})
    assert after[0] != before[0] and after[1] != before[1]
    assert settings_version(defs, CURATED, _ops("curated_pairs", preset="air")) == unrelated


def test_a_source_partition_s_settings_are_what_the_resource_says_of_it(defs) -> None:
    """Another source's options, input or preset do not change this source's settings."""
    normalized = dg.AssetKey("normalized_pairs")

    def version(partition: str, **resource: dict) -> str:
        sources = build_definitions({**defs.resources, "sources": SourcesResource(**resource)})
        return settings_version(sources, normalized, {}, partition)

    base = {"options": {"ultrafeedback": {"rejected": "random"}}}
    other = {"options": {"ultrafeedback": {"rejected": "random"}, "helpsteer3": {"x": 1}}}
    assert version("ultrafeedback", **base) == version("ultrafeedback", **other)
    assert version("helpsteer3", **base) != version("helpsteer3", **other)
    assert version("ultrafeedback", **base) != version(
        "ultrafeedback", options={"ultrafeedback": {"rejected": "worst"}}
    )
    preset = {"presets": {"helpsteer3": "helpsteer3-no-ties"}}
    assert version("ultrafeedback") == version("ultrafeedback", **preset)
    assert version("helpsteer3") != version("helpsteer3", **preset)
