"""The block-sparse summary of a packed row's attention mask, derived at pack time.

FlexAttention skips a (query block, key block) square that nothing in it may see, runs a
*full* square without calling the mask_mod, and evaluates the mask_mod only on *partial*
squares. `create_block_mask` finds those squares by evaluating the mask on every token
pair; here they follow from the pair boundaries with numpy, without an L x L mask, and
are stored in the shards so a CUDA trainer builds its `BlockMask` directly.

The row is padded to a multiple of the block size; padding sees nothing and nobody sees
padding (so a block holding padding queries is never full).

How: by `data_contracts.packed_row.attention_mask`, query q of a pair starting at s sees
    I2 = [d, q + 1)  plus, for a shared-layout rejected token,  I1 = [s, s + P)
where d is the start of q's document (s for prompt and chosen tokens and for the first
document of a two-document pair; the rejected segment's start, s+P+C, in the shared
layout; the second document's start otherwise). We cut those segments at block
boundaries into pieces [a, b) with one d and one I1. Over a piece, the union of what its
queries see is [d, b) u I1, and the part every query sees is [d, a + 1) u I1. I1 and I2
are never adjacent (C >= 1 tokens lie between them), so a key block is fully visible to
the piece iff it lies inside one of them. A (query block, key block) square is full iff
full for all its pieces and the query block holds no padding; partial iff some piece sees
part of it and it is not full.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_contracts.packed_row import Layout, PackedRow
from pipeline import ragged


@dataclass(frozen=True)
class BlockSummary:
    """Full and partial key blocks of every query block of a set of rows.

    Attributes:
        blocks_per_row: int64 [rows], ceil(row length / block size).
        full: bool [sum(blocks_per_row), max blocks], row-major (row, query block) x key block.
        partial: bool, same shape.
    """

    blocks_per_row: np.ndarray
    full: np.ndarray
    partial: np.ndarray

    def to_arrow(self) -> tuple[pa.ListArray, pa.ListArray]:
        """The `kv_block_full` and `kv_block_partial` columns (key blocks ascending)."""
        outer = ragged.offsets_of(self.blocks_per_row)
        columns = []
        for matrix in (self.full, self.partial):
            _, key_block = np.nonzero(matrix)  # row-major: ascending within each query block
            inner = ragged.list_array(
                pa.array(key_block.astype(np.int32)), ragged.offsets_of(matrix.sum(axis=1))
            )
            columns.append(ragged.list_array(inner, outer))
        return columns[0], columns[1]

    def row(self, i: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """(full, partial) key block indices per query block of row i."""
        first = int(self.blocks_per_row[:i].sum())
        blocks = range(first, first + int(self.blocks_per_row[i]))
        full = tuple(np.flatnonzero(self.full[b]).astype(np.int32) for b in blocks)
        partial = tuple(np.flatnonzero(self.partial[b]).astype(np.int32) for b in blocks)
        return full, partial


def block_summary(
    row_lengths: np.ndarray,
    pair_row: np.ndarray,
    pair_start: np.ndarray,
    prompt_len: np.ndarray,
    chosen_len: np.ndarray,
    rejected_len: np.ndarray,
    layout: Layout,
    block_size: int,
) -> BlockSummary:
    """Block summary of many rows at once, from their pair boundaries.

    Args:
        row_lengths: tokens per row.
        pair_row, pair_start, prompt_len, chosen_len, rejected_len: per pair, its row and
            boundaries; pairs ordered by row, then by start.
        layout: "shared", "unshared" or "padded" (the last two share the mask).
        block_size: the FlexAttention block size.

    Returns:
        The summary; see `BlockSummary`.
    """
    row_lengths = np.asarray(row_lengths, dtype=np.int64)
    row, s, p, c, r = (
        np.asarray(a, dtype=np.int64)
        for a in (pair_row, pair_start, prompt_len, chosen_len, rejected_len)
    )
    # Two query segments per pair: (start, end, document start d, I1 start, I1 end).
    zero = np.zeros_like(s)
    if layout == "shared":
        second = (s + p + c, s + p + c + r, s + p + c, s, s + p)
    else:
        second = (s + p + c, s + 2 * p + c + r, s + p + c, zero, zero)
    first = (s, s + p + c, s, zero, zero)
    seg = [np.stack([a, b], axis=1).reshape(-1) for a, b in zip(first, second, strict=True)]
    seg_start, seg_end, seg_doc, seg_i1s, seg_i1e = seg
    seg_row = np.repeat(row, 2)

    # Cut segments at block boundaries into pieces [a, b).
    first_block = seg_start // block_size
    pieces_per_seg = (seg_end - 1) // block_size - first_block + 1
    owner, k = ragged.ranges(pieces_per_seg)
    q_block = first_block[owner] + k
    a = np.maximum(seg_start[owner], q_block * block_size)
    b = np.minimum(seg_end[owner], (q_block + 1) * block_size)
    d, i1s, i1e = seg_doc[owner], seg_i1s[owner], seg_i1e[owner]

    blocks_per_row = -(-row_lengths // block_size)
    n_blocks = int(blocks_per_row.max(initial=0))
    kb0 = np.arange(n_blocks, dtype=np.int64)[None, :] * block_size
    kb1 = kb0 + block_size
    col = (slice(None), None)
    has_i1 = (i1e > i1s)[col]
    seen_any = ((d[col] < kb1) & (b[col] > kb0)) | (has_i1 & (i1s[col] < kb1) & (i1e[col] > kb0))
    seen_all = ((kb0 >= d[col]) & (kb1 <= (a + 1)[col])) | (
        has_i1 & (kb0 >= i1s[col]) & (kb1 <= i1e[col])
    )

    # Reduce pieces per (row, query block); pieces arrive in that order.
    group = seg_row[owner] * max(n_blocks, 1) + q_block
    starts = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
    any_seen = np.logical_or.reduceat(seen_any, starts, axis=0)
    all_seen = np.logical_and.reduceat(seen_all, starts, axis=0)
    group_row, group_block = group[starts] // max(n_blocks, 1), group[starts] % max(n_blocks, 1)
    no_padding = (group_block + 1) * block_size <= row_lengths[group_row]
    full = all_seen & no_padding[:, None]
    if len(starts) != int(blocks_per_row.sum()):
        raise ValueError("pairs do not cover their rows: every query block needs a token")
    return BlockSummary(blocks_per_row, full, any_seen & ~full)


def row_block_summary(
    row: PackedRow, layout: Layout, block_size: int
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """(full, partial) key blocks per query block of one row: the trainer's fallback."""
    summary = block_summary(
        np.array([row.num_tokens]),
        np.zeros(row.num_pairs, dtype=np.int64),
        row.pair_start,
        row.prompt_len,
        row.chosen_len,
        row.rejected_len,
        layout,
        block_size,
    )
    return summary.row(0)
