"""Presets from the Dagster side: a `preset` on the curation config and per-source presets
on the sources resource, under the values a run config sets."""

import json
from pathlib import Path

import dagster as dg

from assets.configs import CurationConfig, given_values
from assets.curation import curated_pairs, fields_set
from assets.resources import SourcesResource, StoreResource
from assets.sources import normalized_pairs
from pipeline.normalize import normalize, write_normalized
from pipeline.presets import curate_config, get_preset
from tests.conftest import FIXTURES


def _outputs(generator) -> dg.MaterializeResult:
    """The asset's result (its value and metadata), past its check results."""
    return next(event for event in generator if isinstance(event, dg.MaterializeResult))


def test_normalized_pairs_take_the_resource_preset_under_its_options(tmp_path: Path) -> None:
    sources = SourcesResource(
        presets={"ultrafeedback": "argilla-ultrafeedback-clean"},
        options={"ultrafeedback": {"seed": 3}},
    )
    output = _outputs(
        normalized_pairs(
            context=dg.build_asset_context(partition_key="ultrafeedback"),
            raw_source=str(FIXTURES / "ultrafeedback_presets.jsonl"),
            sources=sources,
            store=StoreResource(root=str(tmp_path)),
        )
    )
    report = json.loads((Path(output.value) / "report.json").read_text())
    assert report["preset"] == "argilla-ultrafeedback-clean"
    assert report["options"]["rejected"] == "random_lower" and report["options"]["seed"] == 3
    assert output.metadata["preset"].value == "argilla-ultrafeedback-clean"


def test_curated_pairs_put_the_fields_set_over_the_preset(tmp_path: Path) -> None:
    pairs = tmp_path / "helpsteer3"
    write_normalized(normalize("helpsteer3", FIXTURES / "helpsteer3.jsonl", "air"), pairs)

    def curated(**fields) -> dict:
        output = _outputs(
            curated_pairs(
                context=dg.build_asset_context(),
                config=CurationConfig(sources=["helpsteer3"], **fields),
                normalized_pairs={"helpsteer3": str(pairs)},
                store=StoreResource(root=str(tmp_path / "store")),
            )
        )
        assert output.metadata["preset"].value == fields.get("preset", "(none)")
        return json.loads((Path(output.value) / "report.json").read_text())

    air = curated(preset="air")
    assert air["preset"] == "air" and air["rows_out"] == 1  # margins 2, 3, 3 and a tie
    assert air["dropped"]["margin_above_max"] == 2
    report = curated(preset="air", max_margin=3.0, drop_ties=False)
    assert report["config"]["max_margin"] == 3.0 and report["config"]["min_margin"] == 1.0
    assert report["rows_out"] == 3 and report["dropped"]["margin_below_min"] == 1  # the tie
    assert curated()["rows_out"] == 3  # no preset: the default rules drop only the tie


def test_a_run_config_field_given_at_its_default_goes_over_the_preset() -> None:
    """In a run, Dagster builds the config with only the values that differ from the
    default; the asset reads which fields the run config sets, so `max_margin: null` turns
    the preset's band edge off."""
    table = normalize("helpsteer3", FIXTURES / "helpsteer3.jsonl", "air").pairs
    resolved = {}

    @dg.asset  # (no `from __future__ import annotations` here: Dagster reads these hints)
    def probe(context: dg.AssetExecutionContext, config: CurationConfig) -> None:
        given = given_values(config, fields_set(context, config))
        resolved["config"] = curate_config(get_preset(config.preset), given, table)

    run_config = {"preset": "air", "max_margin": None, "min_margin": 0.5, "dedup": True}
    result = dg.materialize([probe], run_config={"ops": {"probe": {"config": run_config}}})
    assert result.success
    config = resolved["config"]
    assert config.max_margin is None  # given at its default: over the preset's 2.0
    assert config.min_margin == 0.5  # given: over the preset's 1.0
    assert config.drop_ties is True  # not given: the preset's
