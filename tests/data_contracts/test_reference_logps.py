"""The reference_logps contract's rules on hand-made tables."""

from __future__ import annotations

import pyarrow as pa

from data_contracts.reference_logps import CONTRACT


def test_rules_flag_positive_nan_and_duplicate_rows() -> None:
    table = pa.table(
        {
            "pair_id": ["a", "b", "c", "d", "d"],
            "chosen_logps": pa.array([-1.0, 0.5, float("nan"), -2.0, -2.0], pa.float32()),
            "rejected_logps": pa.array([-1.0, -1.0, -1.0, -3.0, -3.0], pa.float32()),
        }
    )
    valid, invalid = CONTRACT.split(table)
    assert valid["pair_id"].to_pylist() == ["a"]
    assert invalid["rule"].to_pylist() == [
        "logps_positive_or_nan",
        "logps_positive_or_nan",
        "duplicate_pair_id",
        "duplicate_pair_id",
    ]
