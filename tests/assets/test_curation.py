"""`curated_pairs` called as a function on two bundled samples, with near-duplicates and
the chosen-longer share on: the UI's funnel lists every rule in the order it ran, the
length-bias and near-duplicate reports are in the metadata, and attribute agreement is a
narrow table of shares. The contamination check runs only against eval prompts a config
names: sample_job's names the bundled ones, and curates as before."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from assets.configs import CurationConfig
from assets.curation import curated_pairs
from assets.jobs import SAMPLE_CONFIG
from assets.resources import StoreResource
from data_contracts import curation_report
from pipeline.curate import CurateConfig, curate, load_eval_prompts, read_pairs
from pipeline.io import PAIRS_FILE
from pipeline.normalize import normalize, write_normalized
from pipeline.sample_data import eval_prompts_path, sample_path
from tests.assets.test_plots import PNG_SIGNATURE, png_bytes

SOURCES = ("helpsteer3", "ultrafeedback")


@pytest.fixture(scope="module")
def normalized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("normalized")
    return {s: str(write_normalized(normalize(s, sample_path(s)), root / s)) for s in SOURCES}


def _curate(normalized: dict[str, str], config: CurationConfig, store: Path) -> dict:
    events = list(
        curated_pairs(
            context=dg.build_asset_context(),
            config=config,
            normalized_pairs=normalized,
            store=StoreResource(root=str(store)),
        )
    )
    output = next(e for e in events if isinstance(e, dg.MaterializeResult))
    assert Path(output.value, "report.json").is_file()
    return output.metadata


@pytest.fixture(scope="module")
def metadata(normalized: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    config = CurationConfig(
        sources=list(SOURCES), near_dup_threshold=0.8, max_chosen_longer_share=0.6
    )
    return _curate(normalized, config, tmp_path_factory.mktemp("store"))


def test_funnel_lists_the_rules_that_ran_in_order(metadata: dict) -> None:
    lines = metadata["funnel"].md_str.splitlines()[2:]
    rules = [line.split("|")[1].strip() for line in lines]
    assert rules[0] == "(pairs in)"
    assert rules[1:] == [r for r in curation_report.REASONS if r in rules]
    assert {"near_duplicate", "over_chosen_longer_share"} <= set(rules)
    left = [int(line.split("|")[3].strip().replace(",", "")) for line in lines]
    assert left[0] == metadata["rows_in"] and left[-1] == metadata["rows_out"]
    share = lines[-1].split("|")[4].strip()
    assert share == f"{metadata['rows_out'] / metadata['rows_in']:.1%}"


def test_length_bias_and_near_duplicates_are_shown(metadata: dict) -> None:
    assert png_bytes(metadata["length_bias_plot"])[:8] == PNG_SIGNATURE
    table = metadata["length_bias"].md_str
    assert table.splitlines()[0].startswith("| source | stage | pairs | chosen longer |")
    assert all(f"| {source} | in |" in table for source in SOURCES)
    assert 0 <= metadata["chosen_longer_share"].value <= 0.6
    near = metadata["near_duplicates"].md_str
    assert "| threshold |" in near and "Largest groups" in near and "\n1. " in near


def test_attribute_agreement_is_a_narrow_table_of_shares_per_source(
    normalized: dict[str, str], tmp_path: Path
) -> None:
    metadata = _curate(normalized, CurationConfig(sources=list(SOURCES)), tmp_path)
    report = json.loads(Path(metadata["path"].value, "report.json").read_text())
    agreement = report["attribute_agreement"]["ultrafeedback"]
    lines = metadata["attribute_agreement"].md_str.splitlines()
    assert lines[0] == "| attribute | pairs | agree | conflict | tie |"
    rows = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert "**ultrafeedback**" in rows and "**helpsteer3**" not in rows  # no rated attributes
    for name, stats in agreement.items():
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        n = stats["pairs"]
        assert cells[0] == f"{n:,}"
        assert cells[1:] == [f"{stats[k] / n:.0%}" for k in ("agree", "conflict", "tie")]


def test_eval_split_is_counted_in_the_funnel_metadata_and_plot(
    normalized: dict[str, str], metadata: dict, tmp_path: Path
) -> None:
    """The held-out pairs are the funnel's last step (what is left trains), a number, a
    table column, and a bar of the plot; the accounting check uses the new identity."""
    config = CurationConfig(
        sources=list(SOURCES), near_dup_threshold=0.8, max_chosen_longer_share=0.6, eval_pairs=20
    )
    events = list(
        curated_pairs(
            context=dg.build_asset_context(),
            config=config,
            normalized_pairs=normalized,
            store=StoreResource(root=str(tmp_path)),
        )
    )
    held = next(e for e in events if isinstance(e, dg.MaterializeResult)).metadata
    checks = {e.check_name: e.passed for e in events if isinstance(e, dg.AssetCheckResult)}
    assert checks == {"check_schema": True, "check_accounting": True}
    assert held["eval_pairs"] >= 20 and held["rows_in"] == metadata["rows_in"]
    assert held["rows_out"] + held["eval_pairs"] == metadata["rows_out"]  # same rules, split
    assert held["eval_split"].text.startswith("pairs 20 (seed 0): ")
    assert 0 < held["eval_units"] <= held["eval_pairs"]
    lines = held["funnel"].md_str.splitlines()
    last = [c.strip() for c in lines[-1].split("|")[1:-1]]
    assert last == [
        "(held out for eval)",
        f"{held['eval_pairs']:,}",
        f"{held['rows_out']:,}",
        f"{held['rows_out'] / held['rows_in']:.1%}",
    ]
    by_source = held["by_source"].md_str
    assert by_source.splitlines()[0] == "| source | pairs in | pairs out | eval pairs |"
    assert png_bytes(held["funnel_plot"]) != png_bytes(metadata["funnel_plot"])
    assert "(off: set eval_share" in metadata["eval_split"].text and metadata["eval_pairs"] == 0


def _report(metadata: dict) -> dict:
    return json.loads(Path(metadata["path"].value, "report.json").read_text())


def test_the_sample_job_curates_as_before_its_eval_prompts_moved_to_its_config(
    normalized: dict[str, str], tmp_path: Path
) -> None:
    """sample_job's config names the bundled eval prompts, which were the asset's default:
    the same pairs, drops and eval split as curating with them directly."""
    sample = SAMPLE_CONFIG["ops"]["curated_pairs"]["config"]
    assert sample["eval_prompts"] == str(eval_prompts_path())
    metadata = _curate(normalized, CurationConfig(sources=list(SOURCES), **sample), tmp_path)
    before = curate(
        read_pairs([normalized[s] for s in SOURCES]),
        CurateConfig(eval_share=sample["eval_share"]),
        load_eval_prompts(eval_prompts_path()),
    )
    report = _report(metadata)
    assert report["dropped"] == before.report["dropped"] and report["dropped"]["contaminated"] > 0
    assert report["eval_pairs"] == before.report["eval_pairs"] > 0
    curated = pq.read_table(Path(metadata["path"].value, PAIRS_FILE))
    assert curated["pair_id"].to_pylist() == before.pairs["pair_id"].to_pylist()
    assert metadata["eval_prompts"].text == str(eval_prompts_path())


def test_a_config_without_eval_prompts_checks_no_contamination(
    normalized: dict[str, str], tmp_path: Path
) -> None:
    """A user's config that names no eval prompts: no contamination rule in the funnel or
    the report, and the metadata says it is off."""
    metadata = _curate(normalized, CurationConfig(sources=list(SOURCES), eval_share=0.1), tmp_path)
    report = _report(metadata)
    assert report["eval_prompts"] is None and "contaminated" not in report["dropped"]
    assert "contaminated" not in metadata["funnel"].md_str
    assert metadata["eval_prompts"].text == "(off)"
