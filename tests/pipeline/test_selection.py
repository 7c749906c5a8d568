"""The drop-hardest rule, and the kept pairs packed into shards of their own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from data_contracts import difficulty_scores
from pipeline.pack import PackConfig, build_shards
from pipeline.selection import SelectConfig, build_selected_shards, select_by_difficulty
from pipeline.shards import assign_folds, open_shards, read_manifest, unpack_pairs, write_scores
from pipeline.tokenized import TokenizeConfig, build_tokenized, read_tokenized, select_tokenized
from tests.conftest import assert_one_error_line


def _scores(losses: list[float], ids: list[str] | None = None) -> pa.Table:
    ids = ids or [f"p{i:03d}" for i in range(len(losses))]
    loss = np.asarray(losses, dtype=np.float32)
    zeros = np.zeros(len(ids), np.float32)
    table = pa.table(
        {
            "pair_id": ids,
            "fold": pa.array(assign_folds(ids, 2), pa.int32()),
            "loss": loss,
            "margin": -loss,  # any numbers: the rule reads the loss
            "chosen_reward": zeros,
            "rejected_reward": zeros,
            "chosen_logps": zeros - 1,
            "rejected_logps": zeros - 1,
        }
    )
    return difficulty_scores.CONTRACT.validate(table)


def test_drop_hardest_drops_the_highest_losses_by_count() -> None:
    losses = [0.1, 2.0, 0.5, 3.0, 0.7, 0.7, 0.2, 1.5, 0.05, 0.9]
    selection = select_by_difficulty(_scores(losses), SelectConfig(drop_hardest=0.3))
    dropped = selection.dropped
    assert dropped["pair_id"].to_pylist() == ["p003", "p001", "p007"]  # 3.0, 2.0, 1.5
    assert dropped["rank"].to_pylist() == [1, 2, 3]
    assert set(dropped["reason"].to_pylist()) == {"difficulty"}
    assert selection.loss_threshold == pytest.approx(1.5)
    assert len(selection.kept) == 7
    assert set(selection.kept.to_pylist()) | set(dropped["pair_id"].to_pylist()) == {
        f"p{i:03d}" for i in range(10)
    }


def test_ties_at_the_cut_are_broken_by_pair_id_and_zero_drops_nothing() -> None:
    scores = _scores([1.0, 1.0, 1.0, 0.0], ids=["c", "a", "b", "d"])
    assert select_by_difficulty(scores, SelectConfig(0.5)).dropped["pair_id"].to_pylist() == [
        "a",
        "b",
    ]
    nothing = select_by_difficulty(scores, SelectConfig(0.0))
    assert nothing.dropped.num_rows == 0 and nothing.loss_threshold is None
    assert nothing.kept.to_pylist() == ["a", "b", "c", "d"]
    # 0.29 of 100 pairs is 29 pairs (not the 28 that 0.29 * 100 = 28.999... floors to).
    many = select_by_difficulty(_scores(list(np.linspace(0, 1, 100))), SelectConfig(0.29))
    assert many.dropped.num_rows == 29


@given(
    losses=st.lists(st.floats(0, 10, width=32), min_size=1, max_size=80),
    share=st.floats(0, 0.99),
)
def test_rule_accounts_for_every_pair_and_drops_no_easier_one(losses, share) -> None:
    selection = select_by_difficulty(_scores(losses), SelectConfig(share))
    dropped, kept = selection.dropped, selection.kept.to_pylist()
    assert dropped.num_rows == int(np.floor(round(share * len(losses), 9)))
    assert dropped.num_rows + len(kept) == len(losses)
    assert not set(kept) & set(dropped["pair_id"].to_pylist())
    by_id = {f"p{i:03d}": loss for i, loss in enumerate(np.float32(losses))}
    if dropped.num_rows and kept:
        assert min(dropped["loss"].to_pylist()) >= max(by_id[k] for k in kept)


def test_settings_out_of_range_are_refused() -> None:
    for share in (-0.1, 1.0):
        with pytest.raises(ValueError, match="--drop-hardest"):
            SelectConfig(drop_hardest=share)


# -----------------------------------------------------------------------------
# Selected shards


@pytest.fixture
def scored_shards(pairs_path, tiny_tokenizer_path, tmp_path) -> tuple[Path, Path, Path]:
    """(store, shards, scores): shards of the fixture pairs with truncated ones among them,
    and a scores directory for them as `prefpack difficulty` writes it (losses made up)."""
    store = tmp_path / "store"
    tokenized = build_tokenized(pairs_path, tiny_tokenizer_path, TokenizeConfig(), store)
    config = PackConfig(max_len=96, min_response_len=8, mask_block_size=16)
    shards = build_shards(tokenized.directory, config, store)
    assert shards.manifest["stats"]["truncated"] > 0
    ids = sorted(unpack_pairs(open_shards(shards.directory).table, "shared")["pair_id"].to_pylist())
    losses = np.random.default_rng(0).exponential(size=len(ids)).tolist()
    scores = _scores(losses, ids)
    folds = [
        {
            "fold": f,
            "train_pairs": len(ids) - n,
            "train_rows": 1,
            "held_out_pairs": n,
            "steps": 1,
            "train_loss": 0.6,
            "train_accuracy": 0.5,
            "held_out_loss": 0.7,
            "held_out_accuracy": 0.5,
            "curve": [],
        }
        for f, n in enumerate(np.bincount(scores["fold"].to_numpy(), minlength=2).tolist())
    ]
    identity = {"inputs": {"shard_key": shards.key}, "settings": {}, "code": {}}
    (tmp_path / "scores").mkdir()
    write_scores(tmp_path / "scores", scores, folds, identity)
    return store, shards.directory, tmp_path / "scores"


def test_selected_shards_hold_the_kept_pairs_token_for_token(scored_shards) -> None:
    store, shards, scores = scored_shards
    result = build_selected_shards(shards, scores, SelectConfig(0.25), store)
    report = result.report
    selection = select_by_difficulty(pq.read_table(scores / "scores.parquet"), SelectConfig(0.25))
    kept = set(selection.kept.to_pylist())
    assert report["pairs_out"] + report["dropped"]["difficulty"] == report["pairs_in"]
    assert report["dropped"]["difficulty"] == selection.dropped.num_rows > 0

    parent = open_shards(shards)
    selected = open_shards(result.shards.directory)  # verifies key, checksum, every sha256
    assert selected.manifest["config"] == parent.manifest["config"]
    assert selected.manifest["stats"]["pairs"] == len(kept)
    # The kept pairs, truncated ones included, exactly as the parent packed them.
    before = unpack_pairs(parent.table, "shared").sort_by("pair_id")
    before = before.filter(pc.is_in(before["pair_id"], value_set=pa.array(sorted(kept))))
    assert unpack_pairs(selected.table, "shared").sort_by("pair_id").equals(before)

    dropped = pq.read_table(result.directory / "dropped.parquet")
    assert dropped.equals(selection.dropped)
    assert json.loads((result.directory / "report.json").read_text()) == report
    tokenized = read_tokenized(store / "tokenized" / report["tokenized_key"])  # proves itself
    assert tokenized["stats"]["pairs_out"] == len(kept)


def test_the_same_selection_reuses_and_another_share_makes_new_shards(scored_shards) -> None:
    store, shards, scores = scored_shards
    first = build_selected_shards(shards, scores, SelectConfig(0.25), store)
    again = build_selected_shards(shards, scores, SelectConfig(0.25), store)
    assert again.shards.reused and again.shards.key == first.shards.key
    other = build_selected_shards(shards, scores, SelectConfig(0.5), store)
    assert other.shards.key != first.shards.key and not other.shards.reused
    assert other.report["pairs_out"] < first.report["pairs_out"]


def test_scores_of_other_shards_are_refused(scored_shards, tmp_path) -> None:
    store, shards, scores = scored_shards
    parent = read_manifest(shards)
    other = build_shards(
        store / parent["tokenized"]["directory"], PackConfig(max_len=128, min_response_len=8), store
    )
    with pytest.raises(ValueError, match="score these shards first"):
        build_selected_shards(other.directory, scores, SelectConfig(0.1), store)


def test_select_tokenized_refuses_ids_it_does_not_hold(scored_shards) -> None:
    store, shards, _ = scored_shards
    tokenized = store / read_manifest(shards)["tokenized"]["directory"]
    with pytest.raises(ValueError, match="not tokenized there"):
        select_tokenized(tokenized, pa.array(["no such pair"]), "ab" * 10, store)


def test_select_command(scored_shards, cli) -> None:
    store, shards, scores = scored_shards
    argv = ["select", "--shards", str(shards), "--scores", str(scores), "--out", str(store)]
    status, err = cli([*argv, "--drop-hardest", "0.2"])
    assert status == 0, err
    assert "dropped {'difficulty':" in err
    status, err = cli([*argv, "--drop-hardest", "1"])
    assert_one_error_line(status, err, "select", "--drop-hardest", "< 1")
