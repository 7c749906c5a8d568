"""The difficulty assets materialized in process after the graph, on the fixtures: scores
that cover every packed pair once, a selection that accounts for every scored pair, a
model trained on the selected shards, reuse by key without launching anything, and a new
key (and new scores) for another k.

One graph build and one difficulty run are shared by the module; the tests run in order.
"""

from __future__ import annotations

import copy
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pytest

from assets import plots
from assets.definitions import ASSETS, build_definitions
from assets.jobs import DIFFICULTY_ASSETS, STAGE_ASSETS
from assets.partitions import source_partitions
from assets.run import materialized_metadata
from pipeline.shards import open_shards, read_report, read_scores
from tests.assets.conftest import TEST_CONFIG
from tests.assets.test_plots import png_bytes, png_size

pytestmark = pytest.mark.slow

DIFFICULTY_TEST_CONFIG = {
    "ops": {
        "difficulty_scores": {
            "config": {"folds": 3, "steps": 2, "lr": 1e-3, "warmup_steps": 1, "batch_rows": 2}
        },
        "selected_shards": {"config": {"drop_hardest": 0.25}},
        "selected_model": TEST_CONFIG["ops"]["trained_model"],
    }
}


class NoLaunchPipes(dg.PipesSubprocessClient):
    """A Pipes client that fails the run if anything is launched."""

    def run(self, *, context, command, **kwargs):
        raise AssertionError(f"launched {command[:4]}")


def _materialize(defs: dg.Definitions, instance, selection, config=DIFFICULTY_TEST_CONFIG):
    return dg.materialize(
        ASSETS,
        selection=selection,
        instance=instance,
        resources=defs.resources,
        run_config={"ops": {k: v for k, v in config["ops"].items() if k in selection}},
    )


@pytest.fixture(scope="module")
def graph(instance, resources) -> dg.Definitions:
    """The sample job's graph (the difficulty assets' inputs, trained_model included)."""
    defs = build_definitions(resources)
    sources = defs.resolve_job_def("source_job")
    for partition in source_partitions.get_partition_keys():
        assert sources.execute_in_process(partition_key=partition, instance=instance).success
    assert _materialize(defs, instance, STAGE_ASSETS, TEST_CONFIG).success
    return defs


@pytest.fixture(scope="module")
def first(graph, instance) -> dg.ExecuteInProcessResult:
    return _materialize(graph, instance, DIFFICULTY_ASSETS)


def _latest(instance, asset: str) -> dict:
    record = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def test_scores_select_and_train(first, instance) -> None:
    assert first.success
    checks = {
        (c.asset_key.to_user_string(), c.check_name): c.passed
        for c in first.get_asset_check_evaluations()
    }
    assert checks == {
        ("difficulty_scores", "check_accounting"): True,
        ("selected_shards", "check_accounting"): True,
        ("selected_shards", "check_shards_verified"): True,
    }
    md = materialized_metadata([first])
    scores, selected, model = (md[name][0] for name in DIFFICULTY_ASSETS)
    packed = _latest(instance, "packed_shards")
    assert scores["pairs"] == packed["pairs"] and scores["folds"] == 3
    assert scores["reused"] is False
    for asset in (scores, selected):  # the distribution, then with the drop threshold
        assert png_size(png_bytes(asset["difficulty_plot"])) == plots.SIZE
    assert png_size(png_bytes(model["loss_plot"])) == plots.TALL
    # One row per fold model, trained and held-out numbers side by side in 4 columns.
    rows = [line.split("|")[1:-1] for line in scores["by_fold"].splitlines()[2:5]]
    for cells, fold in zip(rows, read_report(scores["path"])["folds"], strict=True):
        pairs, loss, accuracy = ([x.strip() for x in cell.split("/")] for cell in cells[1:])
        assert int(cells[0]) == fold["fold"]
        assert pairs == [str(fold["train_pairs"]), str(fold["held_out_pairs"])]
        assert [float(x) for x in loss] == [
            round(fold["train_loss"], 3),
            round(fold["held_out_loss"], 3),
        ]
        assert accuracy == [f"{fold['train_accuracy']:.0%}", f"{fold['held_out_accuracy']:.0%}"]

    # Every packed pair scored once, by one of the 3 folds.
    table = read_scores(scores["path"])
    packed_ids = pc.list_flatten(open_shards(packed["path"]).table["pair_ids"])
    assert sorted(table["pair_id"].to_pylist()) == sorted(packed_ids.to_pylist())
    assert set(table["fold"].to_pylist()) == {0, 1, 2}

    dropped = int(0.25 * scores["pairs"])
    assert selected["pairs_in"] == scores["pairs"]
    assert selected["dropped"] == dropped > 0
    assert selected["pairs_out"] == scores["pairs"] - dropped
    assert open_shards(selected["path"]).manifest["stats"]["pairs"] == selected["pairs_out"]
    hardest = table.sort_by([("loss", "descending"), ("pair_id", "ascending")])
    assert set(pc.list_flatten(open_shards(selected["path"]).table["pair_ids"]).to_pylist()) == set(
        hardest["pair_id"].to_pylist()[dropped:]
    )

    assert model["shard_key"] == selected["key"] and model["reused"] is False
    assert Path(model["output"], "config.json").is_file()

    # Evaluated on trained_model's eval shards, and shown beside it on the same pairs.
    trained = _latest(instance, "trained_model")
    assert model["eval/pairs"] == trained["eval/pairs"] == _latest(instance, "eval_shards")["pairs"]
    table = model["against_trained_model"].splitlines()
    assert table[0] == "| metric | selected_model | trained_model |"
    for name in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "loss"):
        row = next(line for line in table if line.startswith(f"| {name} |"))
        assert row == f"| {name} | {model[name]:.4f} | {trained[name]:.4f} |"
    eval_key = _latest(instance, "eval_shards")["key"]
    assert (
        table[-1]
        == f"on the same {trained['eval/pairs']:,} held-out pairs (eval shards {eval_key})"
    )


def test_a_second_materialization_reuses_everything_without_launching(
    graph, first, instance, resources
) -> None:
    defs = build_definitions({**resources, "pipes_subprocess_client": NoLaunchPipes()})
    again = _materialize(defs, instance, DIFFICULTY_ASSETS)
    md, before = materialized_metadata([again]), materialized_metadata([first])
    for name in DIFFICULTY_ASSETS:
        assert md[name][0]["reused"] is True, name
    assert md["difficulty_scores"][0]["key"] == before["difficulty_scores"][0]["key"]
    assert md["selected_shards"][0]["path"] == before["selected_shards"][0]["path"]
    record = instance.get_latest_data_version_record(dg.AssetKey("difficulty_scores"))
    assert (
        record.asset_materialization.tags["dagster/data_version"]
        == md["difficulty_scores"][0]["key"]
    )


def test_recomputed_scores_are_byte_identical(graph, first, instance, tmp_path) -> None:
    """The scores moved away, the same key computes them again: the same bytes."""
    scores = Path(materialized_metadata([first])["difficulty_scores"][0]["path"])
    kept = tmp_path / "first"
    scores.rename(kept)
    again = _materialize(graph, instance, ["difficulty_scores"])
    md = materialized_metadata([again])["difficulty_scores"][0]
    assert md["reused"] is False and Path(md["path"]) == scores
    for name in ("scores.parquet", "report.json"):
        assert (scores / name).read_bytes() == (kept / name).read_bytes(), name


def test_another_k_is_another_key_and_new_scores(graph, first, instance) -> None:
    config = copy.deepcopy(DIFFICULTY_TEST_CONFIG)
    config["ops"]["difficulty_scores"]["config"]["folds"] = 2
    result = _materialize(graph, instance, ["difficulty_scores", "selected_shards"], config)
    md, before = materialized_metadata([result]), materialized_metadata([first])
    scores = md["difficulty_scores"][0]
    assert scores["reused"] is False and scores["folds"] == 2
    assert scores["key"] != before["difficulty_scores"][0]["key"]
    assert len(read_report(scores["path"])["folds"]) == 2
    assert Path(before["difficulty_scores"][0]["path"], "scores.parquet").is_file()  # kept
    assert md["selected_shards"][0]["key"] != before["selected_shards"][0]["key"]
