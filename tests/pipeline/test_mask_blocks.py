"""The pack-time block summary against FlexAttention's own `create_block_mask` (CPU).

The oracle's mask_mod evaluates `data_contracts.packed_row.attention_mask` (the
definition) over the row padded to a multiple of the block size, where padding sees
nothing and is seen by nothing; Q_LEN = KV_LEN = the padded length.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

from data_contracts.packed_row import PackedRow, attention_mask, pair_tokens
from pipeline.mask_blocks import block_summary, row_block_summary


def _row(lengths: list[tuple[int, int, int]], layout: str) -> PackedRow:
    sizes = [pair_tokens(p, c, r, layout) for p, c, r in lengths]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    p, c, r = (np.array(x, np.int32) for x in zip(*lengths, strict=True))
    return PackedRow(
        input_ids=np.zeros(sum(sizes), np.int32),
        pair_start=starts,
        prompt_len=p,
        chosen_len=c,
        rejected_len=r,
        pair_ids=tuple(str(i) for i in range(len(lengths))),
    )


def _flex_blocks(row: PackedRow, layout: str, block: int):
    t = row.num_tokens
    padded_len = -(-t // block) * block
    dense = torch.zeros(padded_len, padded_len, dtype=torch.bool)
    dense[:t, :t] = torch.from_numpy(attention_mask(row, layout))

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[q_idx, kv_idx]

    mask = create_block_mask(
        mask_mod,
        B=None,
        H=None,
        Q_LEN=padded_len,
        KV_LEN=padded_len,
        device="cpu",
        BLOCK_SIZE=block,
    )

    def lists(counts, indices):
        counts, indices = counts[0, 0], indices[0, 0]
        return [indices[i, : counts[i]].tolist() for i in range(len(counts))]

    return (
        lists(mask.full_kv_num_blocks, mask.full_kv_indices),
        lists(mask.kv_num_blocks, mask.kv_indices),
    )


@settings(max_examples=40)
@given(
    lengths=st.lists(st.tuples(*[st.integers(1, 20)] * 3), min_size=1, max_size=4),
    layout=st.sampled_from(["shared", "unshared", "padded"]),
    block=st.sampled_from([2, 4, 8, 16]),
)
def test_block_summary_matches_create_block_mask(lengths, layout, block) -> None:
    if layout == "padded":
        lengths = lengths[:1]
    row = _row(lengths, layout)
    full, partial = row_block_summary(row, layout, block)
    flex_full, flex_partial = _flex_blocks(row, layout, block)
    assert [x.tolist() for x in full] == flex_full
    assert [x.tolist() for x in partial] == flex_partial


def test_a_real_block_size_on_a_long_row() -> None:
    """128-token blocks over a 1000-token row of mixed pairs, rejected spanning blocks."""
    row = _row([(300, 50, 200), (10, 5, 5), (100, 200, 130)], "shared")
    full, partial = row_block_summary(row, "shared", 128)
    flex_full, flex_partial = _flex_blocks(row, "shared", 128)
    assert [x.tolist() for x in full] == flex_full
    assert [x.tolist() for x in partial] == flex_partial
    # Pair 0's rejected queries (tokens 350..549) see prompt block 0 (0..127) whole.
    assert 0 in full[3].tolist()


def test_many_rows_at_once_equal_one_row_at_a_time() -> None:
    rows = [_row([(5, 3, 4), (2, 2, 2)], "shared"), _row([(30, 1, 1)], "shared")]
    pair_row = np.repeat(np.arange(2), [r.num_pairs for r in rows])
    summary = block_summary(
        np.array([r.num_tokens for r in rows]),
        pair_row,
        *(
            np.concatenate([getattr(r, k) for r in rows])
            for k in ("pair_start", "prompt_len", "chosen_len", "rejected_len")
        ),
        "shared",
        4,
    )
    for i, row in enumerate(rows):
        one = row_block_summary(row, "shared", 4)
        both = summary.row(i)
        assert [[x.tolist() for x in part] for part in one] == [
            [x.tolist() for x in part] for part in both
        ]


def test_rows_not_tiled_by_their_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="do not cover"):
        block_summary(
            np.array([20]),
            np.array([0]),
            np.array([0]),
            np.array([2]),
            np.array([2]),
            np.array([2]),
            "shared",
            4,
        )
