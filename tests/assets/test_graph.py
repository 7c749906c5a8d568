"""The whole graph materialized in process on fixtures: accounting across stages, reuse of
the shards, a new key on a changed pack config, and a blocking check that stops the run."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.data_version import (
    CachingStaleStatusResolver,
    StaleStatus,
    extract_data_version_from_entry,
)
from dagster._core.loader import LoadingContextForTest

from assets import packing
from assets.definitions import ASSETS, build_definitions
from assets.run import materialize_all, materialized_metadata, summary
from tests.assets.conftest import TEST_CONFIG

pytestmark = pytest.mark.slow


def _files(directory: str) -> dict[str, tuple[int, int]]:
    """Each file's (inode, mtime_ns): unchanged when nothing was rewritten."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(Path(directory).iterdir())
        if p.is_file()
    }


def _data_version(instance: dg.DagsterInstance, asset: str) -> str:
    record = instance.get_latest_data_version_record(dg.AssetKey(asset))
    assert record is not None
    return extract_data_version_from_entry(record.event_log_entry).value


def _status(instance: dg.DagsterInstance, defs: dg.Definitions, asset: str) -> StaleStatus:
    """What the UI shows as stale or fresh (inputs' data versions against the last run's)."""
    resolver = CachingStaleStatusResolver(
        instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
    )
    return resolver.get_status(dg.AssetKey(asset))


def _stage(defs: dg.Definitions, instance, selection, config=TEST_CONFIG, **kwargs):
    return dg.materialize(
        ASSETS,
        selection=selection,
        instance=instance,
        resources=defs.resources,
        run_config={"ops": {k: v for k, v in config["ops"].items() if k in selection}},
        **kwargs,
    )


@pytest.fixture
def built(instance, resources):
    """The whole graph, materialized once."""
    defs = build_definitions(resources)
    results = materialize_all(defs, instance, run_config=TEST_CONFIG)
    return defs, results


def test_whole_graph_accounts_for_every_row(built, instance) -> None:
    _, results = built
    assert all(r.success for r in results)
    md = materialized_metadata(results)
    normalized = md["normalized_pairs"]
    assert len(normalized) == 7
    for m in normalized:  # rows in = pairs (x rows per pair) + quarantined + dropped
        assert m["rows_in"] >= m["pairs_out"] + m["quarantined"] + m["dropped"]
    curated = md["curated_pairs"][0]
    assert curated["rows_in"] == sum(m["pairs_out"] for m in normalized)
    assert curated["rows_in"] == curated["rows_out"] + curated["dropped"]
    tokenized = md["tokenized_pairs"][0]
    assert tokenized["pairs_in"] == curated["rows_out"]
    packed = md["packed_shards"][0]
    assert packed["pairs"] + packed["dropped"] == tokenized["pairs_out"]
    assert 0 < packed["fill_ratio"] <= 1
    reference = md["reference_logps"][0]
    assert reference["pairs"] == packed["pairs"] and reference["reused"] is False
    assert reference["mean_chosen_logps"] < 0
    trained = md["trained_model"][0]
    assert trained["steps"] == TEST_CONFIG["ops"]["trained_model"]["config"]["steps"]
    assert trained["loss"] == pytest.approx(trained["loss"])  # a number, not NaN
    assert Path(trained["output"], "config.json").is_file()
    text = summary(results, seconds=1.0)  # what `prefpack run` prints
    assert f"{curated['rows_out']:,} pairs" in text and f"loss {trained['loss']:.4f}" in text
    checks = [c for r in results for c in r.get_asset_check_evaluations()]
    assert checks and all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]


def test_second_materialization_reuses_shards(built, instance) -> None:
    defs, results = built
    shard_dir = materialized_metadata(results)["packed_shards"][0]["path"]
    before_files = _files(shard_dir)
    before_version = _data_version(instance, "packed_shards")

    first = materialized_metadata(results)
    again = materialized_metadata([_stage(defs, instance, ["tokenized_pairs", "packed_shards"])])
    packed = again["packed_shards"][0]
    assert packed["reused"] is True
    assert packed["path"] == shard_dir
    assert _files(shard_dir) == before_files  # nothing rewritten
    assert _data_version(instance, "packed_shards") == before_version
    assert _status(instance, defs, "trained_model") == StaleStatus.FRESH  # still in sync

    # Downstream: the same log-probs file and the finished run are reused, not recomputed.
    again = materialized_metadata([_stage(defs, instance, ["reference_logps", "trained_model"])])
    assert again["reference_logps"][0]["reused"] is True
    assert again["trained_model"][0]["reused"] is True
    assert again["trained_model"][0]["loss"] == first["trained_model"][0]["loss"]


def test_changed_max_len_makes_a_new_key_and_keeps_tokens(built, instance) -> None:
    defs, results = built
    first = materialized_metadata(results)
    config = copy.deepcopy(TEST_CONFIG)
    config["ops"]["packed_shards"]["config"]["max_len"] = 384
    again = _stage(defs, instance, ["tokenized_pairs", "packed_shards"], config)
    md = materialized_metadata([again])
    assert md["tokenized_pairs"][0]["reused"] is True  # retokenizing is not needed
    assert md["packed_shards"][0]["key"] != first["packed_shards"][0]["key"]
    assert md["packed_shards"][0]["reused"] is False
    assert _data_version(instance, "packed_shards") == md["packed_shards"][0]["key"]
    assert _status(instance, defs, "trained_model") == StaleStatus.STALE  # needs a new run


def test_training_with_two_processes_runs_torchrun_through_pipes(built, instance) -> None:
    """nproc_per_node 2 with half the batch rows: the asset launches torchrun (gloo on CPU),
    rank 0 reports back, and the same global batch gives the single process's numbers."""
    defs, results = built
    config = copy.deepcopy(TEST_CONFIG)
    train = config["ops"]["trained_model"]["config"]
    train["nproc_per_node"] = 2
    train["batch_rows"] //= 2
    result = _stage(defs, instance, ["trained_model"], config)
    trained = materialized_metadata([result])["trained_model"][0]
    single = materialized_metadata(results)["trained_model"][0]
    assert trained["reused"] is False  # a new run key: other settings
    assert trained["output"] != single["output"]
    assert trained["steps"] == single["steps"] and trained["pairs"] == single["pairs"]
    assert trained["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_failing_blocking_check_stops_downstream(built, instance, monkeypatch) -> None:
    """A shard corrupted after writing fails check_shards_verified; training never runs."""
    defs, _ = built
    real_build = packing.build_shards

    def build_then_corrupt(*args, **kwargs):
        result = real_build(*args, **kwargs)
        shard = sorted(result.directory.glob("*.arrow"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        os.chmod(shard, 0o644)
        shard.write_bytes(bytes(data))
        return result

    monkeypatch.setattr(packing, "build_shards", build_then_corrupt)
    result = _stage(
        defs,
        instance,
        ["packed_shards", "reference_logps", "trained_model"],
        raise_on_error=False,
    )
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["check_shards_verified"] is False
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "reference_logps" not in materialized and "trained_model" not in materialized
