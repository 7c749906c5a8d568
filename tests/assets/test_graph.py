"""The whole graph materialized in process on fixtures: accounting across stages, a second
`materialize_all` that launches nothing, `prefpack run --config` running what its file
changes and then nothing, reuse of the shards (each file hashed once) and of
the trained model (with the same metadata), a new key on a changed pack config, new weights
at the same path that make training stale and retrain, and a blocking check that stops the
run.

One graph build is shared by the module (`built`): the tests run in file order on one
instance and store, and the one that corrupts a shard comes last.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.data_version import (
    CachingStaleStatusResolver,
    StaleStatus,
    extract_data_version_from_entry,
)
from dagster._core.loader import LoadingContextForTest

import pipeline.shards
import pipeline.tokenized
import prefpack
from assets import packing, plots, staleness
from assets.definitions import ASSETS, build_definitions
from assets.jobs import STAGE_ASSETS
from assets.resources import ModelResource
from assets.run import UP_TO_DATE, current_metadata, materialize_all, materialized_metadata, summary
from tests.assets.conftest import FIXTURE_INPUTS, TEST_CONFIG
from tests.assets.test_plots import png_bytes, png_size
from tests.conftest import FIXTURES

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


def _agrees_with_dagster(instance: dg.DagsterInstance, defs: dg.Definitions) -> None:
    """`staleness.needs_run` (public API) against Dagster's own stale status (the oracle:
    private API, tests only) on every stage. An asset that needs a run is not fresh to
    Dagster, and one Dagster calls stale needs a run or sits downstream of one that does
    (Dagster does not always carry staleness past an asset whose data version it cannot
    predict; `prefpack run` runs everything downstream anyway)."""
    graph = defs.resolve_asset_graph()
    needs, behind = {}, {}
    for key in (dg.AssetKey(name) for name in STAGE_ASSETS):  # in graph order
        needs[key] = staleness.needs_run(defs, instance, key)
        upstream = [k for k in graph.get(key).parent_keys if k in needs]
        behind[key] = needs[key] or any(behind[k] for k in upstream)
        stale = _status(instance, defs, key.path[-1]) != StaleStatus.FRESH
        assert (not needs[key] or stale) and (not stale or behind[key]), key


def _stage(defs: dg.Definitions, instance, selection, config=TEST_CONFIG, **kwargs):
    return dg.materialize(
        ASSETS,
        selection=selection,
        instance=instance,
        resources=defs.resources,
        run_config={"ops": {k: v for k, v in config["ops"].items() if k in selection}},
        **kwargs,
    )


def _hash_counts(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Count the calls of the store's hashing function by `<stage>/<file>` (a temp
    directory sits beside the final one, so the stage directory names the file)."""
    calls: Counter = Counter()
    real = pipeline.shards.sha256_file

    def counting(path: Path) -> str:
        calls[f"{Path(path).parent.parent.name}/{Path(path).name}"] += 1
        return real(path)

    monkeypatch.setattr(pipeline.shards, "sha256_file", counting)
    monkeypatch.setattr(pipeline.tokenized, "sha256_file", counting)
    return calls


def _materialized_keys(results: list[dg.ExecuteInProcessResult]) -> set[str]:
    return {
        e.asset_key.to_user_string() for r in results for e in r.get_asset_materialization_events()
    }


@pytest.fixture(scope="module")
def built(instance, resources):
    """The whole graph, materialized once for the module."""
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
    assert curated["eval_pairs"] > 0
    assert curated["rows_in"] == curated["rows_out"] + curated["eval_pairs"] + curated["dropped"]
    tokenized = md["tokenized_pairs"][0]
    assert tokenized["pairs_in"] == curated["rows_out"]
    packed = md["packed_shards"][0]
    assert packed["pairs"] + packed["dropped"] == tokenized["pairs_out"]
    assert 0 < packed["fill_ratio"] <= 1
    held = md["eval_shards"][0]
    assert held["pairs"] + held["dropped"] == curated["eval_pairs"]
    assert held["train_shards"] == packed["key"] and held["max_len"] == packed["max_len"]
    reference = md["reference_logps"][0]
    assert reference["pairs"] == packed["pairs"] and reference["reused"] is False
    assert reference["mean_chosen_logps"] < 0
    trained = md["trained_model"][0]
    assert trained["steps"] == TEST_CONFIG["ops"]["trained_model"]["config"]["steps"]
    assert trained["loss"] == pytest.approx(trained["loss"])  # a number, not NaN
    assert Path(trained["output"], "config.json").is_file()
    for key in ("backend", "layout", "shard_key", "model", "run_key", "precision", "device"):
        assert trained[key], key  # what the trainer reported, and the key it ran under
    # Evaluated once, at the end, on the eval shards against their own reference log-probs.
    eval_reference = md["eval_reference_logps"][0]
    assert trained["eval/pairs"] == held["pairs"] == eval_reference["pairs"]
    assert eval_reference["shard_key"] == held["key"]
    lines = [json.loads(x) for x in Path(trained["metrics_file"]).read_text().splitlines()]
    for name in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"):
        assert trained[name] == pytest.approx(lines[-1][name]), name
    assert "## Results" in Path(trained["output"], "README.md").read_text()
    text = summary(instance, results, seconds=1.0)  # what `prefpack run` prints
    assert f"{curated['rows_out']:,} pairs" in text and f"loss {trained['loss']:.4f}" in text
    assert f"{curated['eval_pairs']:,} held out for eval" in text
    assert f"eval         {held['pairs']:,} pairs in {held['rows']:,} rows" in text
    assert f"eval shards  {held['path']}" in text
    assert f"evaluated    loss {trained['eval/loss']:.4f}, reward accuracy" in text
    assert UP_TO_DATE not in text
    head = (
        f"{len(results)} runs: raw_source x7, normalized_pairs x7, curated_pairs, tokenized_pairs"
    )
    assert head in text.splitlines()[0]
    checks = [c for r in results for c in r.get_asset_check_evaluations()]
    assert checks and all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]


def test_each_plot_of_the_run_is_a_png_of_its_drawn_size(built) -> None:
    """What the UI shows: every stage's plot, from this small run (docs/screenshot.js checks
    that the UI renders them)."""
    md = materialized_metadata(built[1])
    drawn = {
        ("curated_pairs", "funnel_plot"): plots.SIZE,
        ("curated_pairs", "length_bias_plot"): plots.TALL,
        ("tokenized_pairs", "length_plot"): plots.SIZE,
        ("packed_shards", "fill_plot"): plots.SIZE,
        ("trained_model", "loss_plot"): plots.TALL,
    }
    shown = {(asset, k) for asset, values in md.items() for k in values[-1] if k.endswith("_plot")}
    assert shown == set(drawn)
    for (asset, key), size in drawn.items():
        assert png_size(png_bytes(md[asset][-1][key])) == size, (asset, key)


def test_second_materialize_all_launches_nothing(built, instance) -> None:
    """Nothing changed: no run, no new history on any asset, and the summary says so."""
    defs, _ = built
    runs = len(instance.get_run_records())
    history = current_metadata(instance)
    results = materialize_all(defs, instance, run_config=TEST_CONFIG)
    assert results == []
    assert len(instance.get_run_records()) == runs
    assert current_metadata(instance) == history
    text = summary(instance, results, seconds=0.1)
    assert UP_TO_DATE in text.splitlines()[0]
    # Nothing was made now: the summary says neither written, trained nor reused.
    assert not any(word in text for word in ("written", "(trained)", "reused"))


def test_prefpack_run_with_a_config_file_runs_what_it_changes_then_nothing(
    built, instance, module_root, tmp_path, monkeypatch, capsys
) -> None:
    """`prefpack run --config FILE.yaml` naming the module's sources and settings but 3
    training steps: one run, of trained_model alone, with the file's settings; the same
    call again launches nothing."""
    config = copy.deepcopy(TEST_CONFIG)
    config["ops"]["trained_model"]["config"]["steps"] = 3
    inputs = {source: str(FIXTURES / name) for source, name in FIXTURE_INPUTS.items()}
    config["resources"] = {"sources": {"config": {"inputs": inputs}}}
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.setenv("DAGSTER_HOME", str(module_root / "dagster_home"))
    argv = ["run", "--config", str(file), "--store", str(module_root / "store")]
    runs = len(instance.get_run_records())
    assert prefpack.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(", 1 runs: trained_model")
    assert len(instance.get_run_records()) == runs + 1
    assert current_metadata(instance)["trained_model"][-1]["steps"] == 3
    assert prefpack.main(argv) == 0
    assert UP_TO_DATE in capsys.readouterr().out.splitlines()[0]
    assert len(instance.get_run_records()) == runs + 1


def test_second_materialization_reuses_shards(built, instance, monkeypatch) -> None:
    defs, results = built
    shard_dir = materialized_metadata(results)["packed_shards"][0]["path"]
    before_files = _files(shard_dir)
    before_version = _data_version(instance, "packed_shards")

    first = materialized_metadata(results)
    hashed = _hash_counts(monkeypatch)
    again = materialized_metadata([_stage(defs, instance, ["tokenized_pairs", "packed_shards"])])
    # Each file once: the curated pairs for the tokenized key, the tokenized files when
    # that directory is reused, the shards when they are; the checks read none again.
    assert {"shards/shard-00000.arrow", "tokenized/tokenized.parquet"} <= set(hashed)
    assert set(hashed.values()) == {1}, hashed
    packed = again["packed_shards"][0]
    assert packed["reused"] is True
    assert packed["path"] == shard_dir
    assert _files(shard_dir) == before_files  # nothing rewritten
    assert _data_version(instance, "packed_shards") == before_version
    assert _status(instance, defs, "trained_model") == StaleStatus.FRESH  # still in sync
    _agrees_with_dagster(instance, defs)

    # Downstream: the same log-probs file and the finished run are reused, not recomputed.
    again = materialized_metadata([_stage(defs, instance, ["reference_logps", "trained_model"])])
    assert again["reference_logps"][0]["reused"] is True
    trained, computed = again["trained_model"][0], first["trained_model"][0]
    assert trained["reused"] is True
    # A reused run shows what computing it showed, from the files beside it.
    assert set(trained) == set(computed)
    assert {k: v for k, v in trained.items() if k != "reused"} == {
        k: v for k, v in computed.items() if k != "reused"
    }


def test_changed_max_len_makes_a_new_key_and_keeps_tokens(built, instance, monkeypatch) -> None:
    """Repacking reads the tokenized pairs as they are (no retokenizing), hashing each
    tokenized file once to check it and each new shard file once as it is written."""
    defs, results = built
    first = materialized_metadata(results)
    config = copy.deepcopy(TEST_CONFIG)
    config["ops"]["packed_shards"]["config"]["max_len"] = 384
    hashed = _hash_counts(monkeypatch)
    md = materialized_metadata([_stage(defs, instance, ["packed_shards"], config)])
    assert {"shards/shard-00000.arrow", "tokenized/tokenized.parquet"} <= set(hashed)
    assert set(hashed.values()) == {1}, hashed
    assert md["packed_shards"][0]["key"] != first["packed_shards"][0]["key"]
    assert md["packed_shards"][0]["reused"] is False
    assert _data_version(instance, "packed_shards") == md["packed_shards"][0]["key"]
    assert _status(instance, defs, "trained_model") == StaleStatus.STALE  # needs a new run
    _agrees_with_dagster(instance, defs)


def test_materialize_all_runs_what_changed_and_downstream(built, instance) -> None:
    """After the hand-run stages above (other settings, untagged), one run brings back
    the configured graph: packing and what depends on it, the first run's model reused;
    the sources and curation are left alone."""
    defs, results = built
    first = materialized_metadata(results)
    runs = len(instance.get_run_records())
    again = materialize_all(defs, instance, run_config=TEST_CONFIG)
    assert len(again) == 1 and len(instance.get_run_records()) == runs + 1
    assert _materialized_keys(again) == {
        "tokenized_pairs",
        "packed_shards",
        "eval_shards",
        "reference_logps",
        "eval_reference_logps",
        "trained_model",
    }
    trained = materialized_metadata(again)["trained_model"][0]
    assert trained["reused"] is True and trained["run_key"] == first["trained_model"][0]["run_key"]
    assert materialize_all(defs, instance, run_config=TEST_CONFIG) == []


def test_edited_eval_prompts_make_curation_and_downstream_stale(
    built, instance, monkeypatch
) -> None:
    """The bundled eval prompts read as other bytes (as after an edit in place): curation
    and every stage after it need a run, the sources do not; nothing runs here."""
    defs, _ = built
    assert staleness.stale_stages(defs, instance, TEST_CONFIG) == []
    real = staleness.sha256_file
    monkeypatch.setattr(
        staleness,
        "sha256_file",
        lambda path: "edited" if Path(path).name == "eval_prompts.txt" else real(path),
    )
    assert staleness.stale_partitions(defs, instance, TEST_CONFIG) == []
    stale = staleness.stale_stages(defs, instance, TEST_CONFIG)
    assert [key.path[-1] for key in stale] == [
        "curated_pairs",
        "tokenized_pairs",
        "packed_shards",
        "eval_shards",
        "reference_logps",
        "eval_reference_logps",
        "trained_model",
    ]


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
    # The summary of this call says what it made, and nothing of the stages it did not run.
    lines = summary(instance, [result], seconds=1.0).splitlines()
    assert next(x for x in lines if x.startswith("  trained ")).endswith("(trained)")
    stages = [x for x in lines if x.startswith(("  packed ", "  eval   "))]
    assert len(stages) == 2 and not any(x.endswith(("written", "reused")) for x in stages)


def _nudge_weights(folder: Path) -> None:
    """Change the lowest byte of the first float32 weight in model.safetensors, in place
    (same path, same size: a different model the path alone cannot tell apart)."""
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    begin = min(t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    data[8 + header_len + begin] ^= 0x01
    file.write_bytes(bytes(data))


def test_new_weights_at_the_same_path_make_training_stale_and_retrain(
    built, instance, resources, tmp_path
) -> None:
    """A checkpoint folder as the model: edited weights at the same path are observed as a
    new base_model version, the training assets show stale before anything runs, and the
    next run computes new reference log-probs and trains under a new run key."""
    _, results = built
    folder = tmp_path / "policy"
    folder.mkdir()
    exported = Path(materialized_metadata(results)["trained_model"][0]["output"])
    for file in exported.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    defs = build_definitions({**resources, "model": ModelResource(path=str(folder))})
    first = materialized_metadata(materialize_all(defs, instance, run_config=TEST_CONFIG))
    # The data stages are fresh; both reference files and the model depend on the weights.
    assert set(first) == {"reference_logps", "eval_reference_logps", "trained_model"}

    _nudge_weights(folder)
    assert staleness.observe_model(defs, instance) is True
    assert _status(instance, defs, "reference_logps") == StaleStatus.STALE
    assert _status(instance, defs, "trained_model") == StaleStatus.STALE
    _agrees_with_dagster(instance, defs)
    again = materialized_metadata(materialize_all(defs, instance, run_config=TEST_CONFIG))
    assert set(again) == {"reference_logps", "eval_reference_logps", "trained_model"}
    trained, before = again["trained_model"][0], first["trained_model"][0]
    assert trained["reused"] is False and trained["run_key"] != before["run_key"]
    assert trained["model_content"] != before["model_content"]
    assert again["reference_logps"][0]["path"] != first["reference_logps"][0]["path"]
    assert _status(instance, defs, "trained_model") == StaleStatus.FRESH
    _agrees_with_dagster(instance, defs)


def test_failing_blocking_check_stops_downstream(built, instance, monkeypatch) -> None:
    """A shard cut short after the build fails check_shards_verified; training never
    runs. (Last: it leaves a damaged shard directory in the module's store.)"""
    defs, _ = built
    real_build = packing.build_shards

    def build_then_corrupt(*args, **kwargs):
        result = real_build(*args, **kwargs)
        shard = sorted(result.directory.glob("*.arrow"))[0]
        os.chmod(shard, 0o644)
        shard.write_bytes(shard.read_bytes()[:-1])
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
