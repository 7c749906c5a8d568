"""The layout definitions on hand-worked rows.

Row of two shared pairs: pair 0 has P=2, C=2, R=1 (tokens 0..4), pair 1 has P=1, C=1,
R=2 (tokens 5..8). Positions: [0 1 | 2 3 | 2] and [0 | 1 | 1 2].
"""

from __future__ import annotations

import numpy as np
import pytest

from data_contracts.packed_row import (
    PackedRow,
    attention_mask,
    pair_tokens,
    position_ids,
    targets,
)


def _row(lens: list[tuple[int, int, int]], layout: str) -> PackedRow:
    sizes = [pair_tokens(p, c, r, layout) for p, c, r in lens]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    p, c, r = (np.array(x, np.int32) for x in zip(*lens, strict=True))
    return PackedRow(
        input_ids=np.arange(sum(sizes), dtype=np.int32),
        pair_start=starts,
        prompt_len=p,
        chosen_len=c,
        rejected_len=r,
        pair_ids=tuple(f"p{i}" for i in range(len(lens))),
    )


def test_shared_positions_restart_rejected_after_prompt() -> None:
    row = _row([(2, 2, 1), (1, 1, 2)], "shared")
    assert position_ids(row, "shared").tolist() == [0, 1, 2, 3, 2, 0, 1, 1, 2]


def test_unshared_positions_restart_per_document() -> None:
    row = _row([(2, 1, 1)], "unshared")
    assert position_ids(row, "unshared").tolist() == [0, 1, 2, 0, 1, 2]


def test_shared_mask_hides_chosen_from_rejected_and_other_pairs() -> None:
    row = _row([(2, 2, 1), (1, 1, 2)], "shared")
    m = attention_mask(row, "shared")
    # Rejected token (4) sees prompt 0, 1 and itself, never chosen 2, 3.
    assert m[4].nonzero()[0].tolist() == [0, 1, 4]
    # Chosen token 3 sees prompt and chosen up to itself.
    assert m[3].nonzero()[0].tolist() == [0, 1, 2, 3]
    # Second pair's last rejected token (8) sees its prompt (5) and rejected 7, 8.
    assert m[8].nonzero()[0].tolist() == [5, 7, 8]
    assert not m[5:, :5].any() and not m[:5, 5:].any()


def test_shared_targets_predict_rejected_start_from_last_prompt_token() -> None:
    row = _row([(2, 2, 1), (1, 1, 2)], "shared")
    t = targets(row, "shared")
    got = sorted(zip(t.label_pos.tolist(), t.logit_pos.tolist(), t.chosen.tolist(), strict=True))
    assert got == [
        (2, 1, True),
        (3, 2, True),
        (4, 1, False),  # rejected token 0 of pair 0 <- last prompt token (1)
        (6, 5, True),
        (7, 5, False),  # rejected token 0 of pair 1 <- last prompt token (5)
        (8, 7, False),
    ]


def test_unshared_targets_follow_each_document() -> None:
    row = _row([(2, 1, 1)], "unshared")  # tokens: p p c | p p r
    t = targets(row, "unshared")
    assert t.label_pos.tolist() == [2, 5] and t.logit_pos.tolist() == [1, 4]


def test_inconsistent_metadata_is_rejected() -> None:
    row = _row([(2, 2, 1)], "shared")
    broken = PackedRow(
        input_ids=row.input_ids[:-1],
        pair_start=row.pair_start,
        prompt_len=row.prompt_len,
        chosen_len=row.chosen_len,
        rejected_len=row.rejected_len,
        pair_ids=row.pair_ids,
    )
    with pytest.raises(ValueError, match="cover 5 tokens but the row holds 4"):
        position_ids(broken, "shared")
