"""Length bias: the report against a hand count, the length-ratio cap, and the seeded
chosen-longer share rule with its accounting."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.curate import CurateConfig, curate
from tests.pipeline.test_curate import NO_RULES, _pairs, _user


def _lengths(source: str, *lengths: tuple[int, int]) -> list[dict]:
    """Pairs of `source` whose chosen / rejected have these many characters."""
    return [{"source": source, "chosen": "c" * c, "rejected": "r" * r} for c, r in lengths]


def test_length_bias_against_a_hand_count() -> None:
    """a: 10/5, 4/8, 6/6, 9/3 -> 2 chosen longer, 1 rejected longer, 1 equal, share 0.5;
    ratios 0.5, 1, 2, 3, linear quantiles at positions q x 3: p05 = 0.5 + 0.15 x 0.5,
    p25 = 0.5 + 0.75 x 0.5, p50 = 1.5, p75 = 2 + 0.25, p95 = 2 + 0.85.
    b: 3/0 (chosen longer; no ratio: empty rejected), 2/4 -> share 0.5, every quantile 0.5."""
    table = _pairs(
        *_lengths("a", (10, 5), (4, 8), (6, 6), (9, 3)),
        *_lengths("b", (3, 0), (2, 4)),
        metadata={"a": "x", "b": "y"},
    )
    bias = curate(table, NO_RULES).report["length_bias"]
    assert bias["unit"] == "characters"
    assert bias["in"] == bias["out"]
    assert bias["in"]["a"] == {
        "pairs": 4,
        "chosen_longer": 2,
        "rejected_longer": 1,
        "equal": 1,
        "chosen_longer_share": 0.5,
        "ratio_quantiles": {"p05": 0.575, "p25": 0.875, "p50": 1.5, "p75": 2.25, "p95": 2.85},
    }
    assert bias["in"]["b"] == {
        "pairs": 2,
        "chosen_longer": 1,
        "rejected_longer": 1,
        "equal": 0,
        "chosen_longer_share": 0.5,
        "ratio_quantiles": dict.fromkeys(("p05", "p25", "p50", "p75", "p95"), 0.5),
    }


def test_length_bias_out_counts_the_kept_pairs() -> None:
    table = _pairs(*_lengths("a", (10, 5), (4, 8), (30, 3)))
    bias = curate(table, dataclasses.replace(NO_RULES, max_response_chars=20)).report
    assert bias["length_bias"]["in"]["a"]["pairs"] == 3
    assert bias["length_bias"]["out"]["a"]["chosen_longer"] == 1
    assert bias["length_bias"]["out"]["a"]["ratio_quantiles"]["p50"] == pytest.approx(1.25)


def test_length_ratio_cap_drops_only_chosen_much_longer() -> None:
    """Cap 3: 9/3 is exactly 3 (kept), 10/3 is over (dropped), 3/30 is the other way
    (kept: a long rejected does not teach verbosity)."""
    table = _pairs(*_lengths("t", (9, 3), (10, 3), (3, 30)))
    result = curate(table, dataclasses.replace(NO_RULES, max_length_ratio=3.0))
    assert result.report["dropped"] == {"length_ratio_above_max": 1}
    assert result.dropped["position"].to_pylist() == [1]


def _balanced(share: float, seed: int = 0):
    """a: 6 chosen longer, 2 rejected longer, 2 equal; b: 3 chosen longer, 3 rejected."""
    table = _pairs(
        *_lengths("a", *[(20 + i, 10) for i in range(6)], (5, 9), (5, 8), (7, 7), (8, 8)),
        *_lengths("b", *[(30 + i, 10) for i in range(3)], (1, 4), (2, 4), (3, 4)),
        metadata={"a": "x", "b": "y"},
    )
    config = dataclasses.replace(NO_RULES, max_chosen_longer_share=share, seed=seed)
    return table, curate(table, config)


@pytest.mark.parametrize(
    ("share", "kept_longer"),
    [
        # kept = floor(share x others / (1 - share)); a has 4 others, b has 3.
        (0.5, {"a": 4, "b": 3}),
        (0.25, {"a": 1, "b": 1}),
        (0.6, {"a": 6, "b": 3}),  # 0.6 x 4 / 0.4 = 6: a is at the share already
        (0.0, {"a": 0, "b": 0}),
        (1.0, {"a": 6, "b": 3}),
    ],
)
def test_chosen_longer_share_counts(share: float, kept_longer: dict[str, int]) -> None:
    table, result = _balanced(share)
    report = result.report
    out = report["length_bias"]["out"]
    assert {s: out[s]["chosen_longer"] for s in ("a", "b")} == kept_longer
    assert all(out[s]["chosen_longer_share"] <= share for s in out)
    # Only chosen-longer pairs are dropped, each accounted for by row.
    dropped = 9 - sum(kept_longer.values())
    assert report["dropped"] == {"over_chosen_longer_share": dropped}
    assert report["rows_in"] == report["rows_out"] + dropped == table.num_rows
    assert result.dropped.num_rows == dropped
    for row in result.dropped.to_pylist():
        assert len(row["chosen"]) > len(row["rejected"])
        assert row["reason"] == "over_chosen_longer_share"


def test_chosen_longer_share_is_seeded() -> None:
    picks = {
        seed: tuple(_balanced(0.25, seed)[1].dropped["position"].to_pylist()) for seed in range(4)
    }
    assert picks[0] == tuple(_balanced(0.25, 0)[1].dropped["position"].to_pylist())
    assert len(set(picks.values())) > 1  # another seed draws other pairs


WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]


@st.composite
def pair_rows(draw: st.DrawFn) -> list[dict]:
    """Pairs of two sources with prompts from six words (so near-duplicates occur),
    responses of 0-30 characters and margins that may be missing or zero."""
    rows = []
    for _ in range(draw(st.integers(1, 30))):
        prompt = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8)))
        rows.append(
            {
                "source": draw(st.sampled_from(["a", "b"])),
                "prompt": _user(prompt),
                "chosen": "c" * draw(st.integers(0, 30)),
                "rejected": "r" * draw(st.integers(0, 30)),
                "margin": draw(st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5]))),
            }
        )
    return rows


@settings(max_examples=40, deadline=None)
@given(
    rows=pair_rows(),
    threshold=st.sampled_from([0.5, 0.8, 1.0]),
    share=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    ratio=st.one_of(st.none(), st.sampled_from([1.0, 2.0])),
    cap=st.integers(1, 3),
)
def test_every_pair_is_accounted_for_with_the_new_rules_on(
    rows: list[dict], threshold: float, share: float, ratio: float | None, cap: int
) -> None:
    table = _pairs(*rows, metadata={"a": "x", "b": "y"})
    config = CurateConfig(
        near_dup_threshold=threshold,
        near_dup_max_pairs=cap,
        max_length_ratio=ratio,
        max_chosen_longer_share=share,
    )
    result = curate(table, config)
    report = result.report
    assert report["rows_in"] == report["rows_out"] + sum(report["dropped"].values())
    assert result.dropped.num_rows == sum(report["dropped"].values())
    assert Counter(result.dropped["reason"].to_pylist()) == +Counter(report["dropped"])
    positions = result.dropped["position"].to_pylist()
    assert positions == sorted(set(positions)) and all(0 <= p < len(rows) for p in positions)
    for stats in report["length_bias"]["out"].values():
        assert stats["chosen_longer_share"] <= share
    assert curate(table, config).report == report
