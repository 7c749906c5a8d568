"""The difficulty_scores and difficulty_selection contracts on hand-made rows and reports."""

from __future__ import annotations

import copy

import pyarrow as pa
import pytest

from data_contracts import difficulty_scores, difficulty_selection
from data_contracts.contract import ContractError


def test_score_rules_flag_duplicates_negative_folds_and_non_finite_losses() -> None:
    n = 5
    table = pa.table(
        {
            "pair_id": ["a", "b", "c", "d", "d"],
            "fold": pa.array([0, -1, 1, 1, 1], pa.int32()),
            "loss": pa.array([0.5, 0.5, float("nan"), 0.2, 0.2], pa.float32()),
            **{
                name: pa.array([0.0] * n, pa.float32())
                for name in ("margin", "chosen_reward", "rejected_reward")
            },
            "chosen_logps": pa.array([-1.0] * n, pa.float32()),
            "rejected_logps": pa.array([-1.0] * n, pa.float32()),
        }
    )
    valid, invalid = difficulty_scores.CONTRACT.split(table)
    assert valid["pair_id"].to_pylist() == ["a"]
    assert invalid["rule"].to_pylist() == [
        "negative_fold",
        "loss_not_finite",
        "duplicate_pair_id",
        "duplicate_pair_id",
    ]


def _fold(fold: int, train: int, held: int) -> dict:
    return {
        "fold": fold,
        "train_pairs": train,
        "train_rows": 1,
        "held_out_pairs": held,
        "steps": 1,
        "train_loss": 0.6,
        "train_accuracy": 0.5,
        "held_out_loss": 0.7,
        "held_out_accuracy": 0.5,
        "curve": [],
    }


REPORT = {
    "contract": "difficulty_report",
    "version": difficulty_scores.VERSION,
    "inputs": {},
    "settings": {},
    "code": {},
    "pairs": 5,
    "folds": [_fold(0, 2, 3), _fold(1, 3, 2)],
    "files": [],
    "checksum": "",
}


def test_report_accounts_for_every_pair_in_every_fold() -> None:
    assert difficulty_scores.validate_report(copy.deepcopy(REPORT))
    split = copy.deepcopy(REPORT)
    split["folds"][0]["train_pairs"] = 3  # a pair both trained on and held out
    with pytest.raises(ContractError, match="fold_splits_pairs"):
        difficulty_scores.validate_report(split)
    uncovered = {**copy.deepcopy(REPORT), "pairs": 6}
    uncovered["folds"] = [_fold(0, 3, 3), _fold(1, 4, 2)]  # one pair in no fold
    with pytest.raises(ContractError, match="folds_cover_pairs"):
        difficulty_scores.validate_report(uncovered)


def test_selection_report_adds_up_and_names_known_reasons() -> None:
    report = {
        "contract": "difficulty_selection",
        "version": difficulty_selection.VERSION,
        "key": "k",
        "config": {"drop_hardest": 0.2},
        "shard_key": "s",
        "scores": "c",
        "pairs_in": 10,
        "pairs_out": 8,
        "dropped": {"difficulty": 2},
        "loss_threshold": 1.5,
        "tokenized_key": "t",
        "selected_shard_key": "u",
    }
    assert difficulty_selection.validate_report(dict(report))
    with pytest.raises(ContractError, match="pairs_add_up"):
        difficulty_selection.validate_report({**report, "pairs_out": 9})
    with pytest.raises(ContractError, match="unknown_reason"):
        difficulty_selection.validate_report({**report, "dropped": {"too_hard": 2}})
    assert difficulty_selection.validate_report(
        {**report, "loss_threshold": None, "pairs_out": 10, "dropped": {"difficulty": 0}}
    )
