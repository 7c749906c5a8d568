"""`eval_shards` materialized with Dagster on two bundled samples: the curated eval pairs
packed with the training shards' tokenizer, template and settings, its checks, its data
version (the cache key) and reuse; and None, with the reason, when curation holds no eval
pairs out.

The normalized pairs are written by the pipeline and handed to Dagster through the IO
manager's files, so only the stages from curation on run (one build, shared by the module).
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from assets.definitions import ASSETS, build_resources
from assets.packing import NO_EVAL_SHARDS
from pipeline.curate import EVAL_PAIRS_FILE
from pipeline.normalize import normalize, write_normalized
from pipeline.sample_data import sample_path
from pipeline.shards import open_shards

pytestmark = pytest.mark.slow

SOURCES = ("helpsteer2_preference", "ultrafeedback_binarized")
STAGES = ["curated_pairs", "tokenized_pairs", "packed_shards", "eval_shards"]
CONFIG = {
    "curated_pairs": {"config": {"sources": list(SOURCES), "eval_share": 0.2}},
    "tokenized_pairs": {"config": {"bpe_vocab_size": 400}},
    "packed_shards": {"config": {"max_len": 512, "min_fill_ratio": 0.0}},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose normalized_pairs partitions of SOURCES are materialized."""
    root = tmp_path_factory.mktemp("eval") / "store"
    for source in SOURCES:
        out = write_normalized(normalize(source, sample_path(source)), root / "normalized" / source)
        io = root / ".io" / "normalized_pairs" / f"{source}.json"
        io.parent.mkdir(parents=True, exist_ok=True)
        io.write_text(json.dumps({"path": str(out)}))
    return root


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory):
    with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("home"))) as instance:
        yield instance


def _materialize(store: Path, instance, selection: list[str], ops: dict = CONFIG):
    return dg.materialize(
        ASSETS,
        selection=selection,
        instance=instance,
        resources=build_resources(store),
        run_config={"ops": {k: v for k, v in ops.items() if k in selection}},
    )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (event,) = [
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.materialization.asset_key.to_user_string() == asset
    ]
    return {k: v.value for k, v in event.metadata.items()}


def _data_version(instance, asset: str) -> str:
    record = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return record.asset_materialization.tags["dagster/data_version"]


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {
        c.check_name: c.passed
        for c in result.get_asset_check_evaluations()
        if c.asset_key.to_user_string() == "eval_shards"
    }


@pytest.fixture(scope="module")
def first(store, instance) -> dg.ExecuteInProcessResult:
    return _materialize(store, instance, STAGES)


def test_eval_shards_are_packed_as_the_training_shards(first, instance) -> None:
    assert first.success
    curated, packed, evals = (
        _metadata(first, a) for a in ("curated_pairs", "packed_shards", "eval_shards")
    )
    assert curated["eval_pairs"] == evals["eval_pairs"] > 0
    assert evals["pairs"] + evals["dropped"] == curated["eval_pairs"]
    assert evals["reused"] is False and evals["train_shards"] == packed["key"]
    assert _data_version(instance, "eval_shards") == evals["key"]
    assert first.output_for_node("eval_shards") == evals["path"]
    train, held = open_shards(packed["path"]), open_shards(evals["path"])
    for entry in ("tokenizer", "template", "config"):
        assert held.manifest[entry] == train.manifest[entry], entry
    ids = pc.list_flatten(held.table["pair_ids"]).to_pylist()
    assert sorted(ids) == sorted(
        pq.read_table(Path(curated["path"], EVAL_PAIRS_FILE))["pair_id"].to_pylist()
    )
    assert not set(ids) & set(pc.list_flatten(train.table["pair_ids"]).to_pylist())
    assert _checks(first) == {
        "check_shards_verified": True,
        "check_accounting": True,
        "check_disjoint_from_train": True,
    }


def test_a_second_materialization_reuses_the_eval_shards(first, store, instance) -> None:
    before = _metadata(first, "eval_shards")
    again = _materialize(store, instance, ["eval_shards"])
    evals = _metadata(again, "eval_shards")
    assert evals["reused"] is True
    assert (evals["path"], evals["key"]) == (before["path"], before["key"])
    assert _data_version(instance, "eval_shards") == before["key"]
    assert all(_checks(again).values())


def test_without_an_eval_split_the_value_is_none_and_says_why(first, store, instance) -> None:
    ops = {**CONFIG, "curated_pairs": {"config": {"sources": list(SOURCES)}}}
    result = _materialize(store, instance, ["curated_pairs", "eval_shards"], ops)
    assert result.success
    assert result.output_for_node("eval_shards") is None
    evals = _metadata(result, "eval_shards")
    assert evals["eval_pairs"] == evals["pairs"] == 0
    assert evals["status"].startswith("no eval split configured")
    assert _data_version(instance, "eval_shards") == NO_EVAL_SHARDS
    assert json.loads((store / ".io" / "eval_shards" / "__all__.json").read_text()) == {
        "path": None
    }
    assert all(_checks(result).values())


def test_eval_shards_sharing_a_prompt_with_training_fail_the_check(first, tmp_path) -> None:
    """The disjointness check compares prompts, token for token: eval shards packed from a
    copy of one training pair under another id (its prompt trained on) fail it."""
    from assets.checks import check_disjoint
    from pipeline.pack import PackConfig, build_shards
    from pipeline.tokenized import tokenize_like

    packed = _metadata(first, "packed_shards")
    train = open_shards(packed["path"])
    pairs = pq.read_table(Path(_metadata(first, "curated_pairs")["path"], "pairs.parquet"))
    leaked = pairs.slice(0, 1).set_column(0, "pair_id", [["leaked"]])
    pq.write_table(leaked, tmp_path / "leaked.parquet")
    store = Path(packed["path"]).parents[1]
    tokenized = tokenize_like(
        tmp_path / "leaked.parquet", store / train.manifest["tokenized"]["directory"], store
    )
    config = PackConfig(**train.manifest["config"])
    leaky = build_shards(tokenized.directory, config, store).directory
    assert check_disjoint(leaky, packed["path"]).passed is False
    assert check_disjoint(_metadata(first, "eval_shards")["path"], packed["path"]).passed
