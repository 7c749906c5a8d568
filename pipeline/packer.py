"""Bin-packing pairs into rows: best-fit decreasing over a stream of windows, and the
rows' token layout and mask metadata.

`BestFitPacker` packs pair sizes over windows so memory stays bounded on millions of pairs;
rows that are still under-filled when a window ends carry over into the next window
instead of closing (up to `MAX_CARRY` of them), which keeps the fill ratio of one huge
window. `assemble_rows` lays out the chosen rows as `data_contracts.packed_row` defines,
and `RowPacker` joins the two over `tokenized_pair` tables. The pack stage
(`pipeline.pack`) and the difficulty folds (`pipeline.shards.pack_pairs`) pack with it, so
a fold's rows are the rows the pack stage would write.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from data_contracts import packed_row, tokenized_pair
from data_contracts.packed_row import Layout, pair_tokens
from pipeline import ragged
from pipeline.mask_blocks import block_summary

BATCH_TOKENS = 1 << 20  # about this many tokens per written record batch
MAX_CARRY = 512  # under-filled rows carried from one packing window to the next


class BestFitPacker:
    """Best-fit decreasing bin packing over a stream of windows.

    Within a window, items go in decreasing size (stable), each into the open bin with
    the least free room that still fits it, else into a new bin. When a window closes,
    the bins that could still take an item of the window's smallest size carry over (at
    most `max_carry`, the emptiest first); the rest are emitted in creation order.

    The per-item loop is Python on purpose: best fit is sequential, and with a sorted
    list of free capacities each step is a bisect (about a microsecond).
    """

    def __init__(self, capacity: int, max_carry: int = MAX_CARRY) -> None:
        self.capacity = capacity
        self.max_carry = max_carry
        self._items: dict[int, list[int]] = {}  # open bin id -> item indices, by creation
        self._free: dict[int, int] = {}  # open bin id -> free room
        self._by_free: dict[int, list[int]] = {}  # free room -> open bins with it (a stack)
        self._frees: list[int] = []  # sorted free rooms that have bins
        self._next_bin = 0
        self._smallest = capacity

    def _push(self, bin_id: int, free: int) -> None:
        self._free[bin_id] = free
        stack = self._by_free.get(free)
        if stack is None:
            self._by_free[free] = [bin_id]
            bisect.insort(self._frees, free)
        else:
            stack.append(bin_id)

    def add(self, sizes: np.ndarray, first_item: int = 0) -> None:
        """Place items `first_item + i` of the given sizes (each <= capacity)."""
        if len(sizes) == 0:
            return
        self._smallest = min(self._smallest, int(sizes.min()))
        order = np.argsort(-sizes, kind="stable")
        for item, size in zip((order + first_item).tolist(), sizes[order].tolist(), strict=True):
            i = bisect.bisect_left(self._frees, size)
            if i == len(self._frees):
                bin_id, free = self._next_bin, self.capacity
                self._next_bin += 1
                self._items[bin_id] = []
            else:
                free = self._frees[i]
                stack = self._by_free[free]
                bin_id = stack.pop()
                if not stack:
                    del self._by_free[free]
                    del self._frees[i]
            self._items[bin_id].append(item)
            self._push(bin_id, free - size)

    def close(self, final: bool) -> tuple[list[list[int]], np.ndarray]:
        """End a window.

        Returns:
            (emitted bins as item lists, in creation order; the carried items, in the
            order they are renumbered 0..k-1 for the next window).
        """
        carry: list[int] = []
        if not final:
            roomy = [b for b, free in self._free.items() if free >= self._smallest]
            roomy.sort(key=lambda b: (-self._free[b], b))
            carry = sorted(roomy[: self.max_carry])
        carried = set(carry)
        emitted = [items for b, items in self._items.items() if b not in carried]
        carried_items = [i for b in carry for i in self._items[b]]
        renumber = {old: new for new, old in enumerate(carried_items)}
        kept = {b: ([renumber[i] for i in self._items[b]], self._free[b]) for b in carry}
        self._items, self._free, self._by_free, self._frees = {}, {}, {}, []
        for b, (items, free) in kept.items():
            self._items[b] = items
            self._push(b, free)
        self._smallest = self.capacity
        return emitted, np.array(carried_items, dtype=np.int64)


def assemble_rows(
    pairs: pa.Table, rows: list[list[int]], layout: Layout, block_size: int
) -> pa.RecordBatch:
    """Lay out whole pairs into `packed_row` rows, with the block-sparse summary.

    Args:
        pairs: `tokenized_pair` rows that fit the layout's budget.
        rows: per row, the indices of its pairs in `pairs`, in row order.
        layout: shared (P|C|R) or unshared/padded (P|C|P|R).
        block_size: the mask summary's block size.
    """
    items = np.array([i for row in rows for i in row], dtype=np.int64)
    per_row = np.array([len(row) for row in rows], dtype=np.int64)
    sub = pairs.take(pa.array(items))
    (pv, po), (cv, co), (rv, ro) = (
        ragged.list_parts(sub.column(n)) for n in ("prompt_ids", "chosen_ids", "rejected_ids")
    )
    p, c, r = np.diff(po), np.diff(co), np.diff(ro)
    sizes = pair_tokens(p, c, r, layout)
    row_of_pair = np.repeat(np.arange(len(rows)), per_row)
    pair_offsets = ragged.offsets_of(per_row)
    token_end = np.cumsum(sizes)
    row_token_offsets = np.concatenate([[0], token_end[pair_offsets[1:] - 1]])
    pair_start = token_end - sizes - row_token_offsets[row_of_pair]

    # Every pair is a run of segments gathered from one flat buffer of all tokens.
    flat = np.concatenate([pv, cv, rv])
    ps, cs, rs = po[:-1], len(pv) + co[:-1], len(pv) + len(cv) + ro[:-1]
    if layout == "shared":
        starts, lengths = np.stack([ps, cs, rs], axis=1), np.stack([p, c, r], axis=1)
    else:
        starts, lengths = np.stack([ps, cs, ps, rs], axis=1), np.stack([p, c, p, r], axis=1)
    input_ids = ragged.gather(flat, starts.reshape(-1), lengths.reshape(-1))

    blocks = block_summary(
        np.diff(row_token_offsets), row_of_pair, pair_start, p, c, r, layout, block_size
    )
    full, partial = blocks.to_arrow()
    per_pair = [
        ragged.list_array(pa.array(v.astype(np.int32)), pair_offsets) for v in (pair_start, p, c, r)
    ]
    pair_ids = ragged.list_array(sub.column("pair_id").combine_chunks(), pair_offsets)
    return pa.RecordBatch.from_arrays(
        [
            ragged.list_array(pa.array(input_ids), row_token_offsets),
            *per_pair,
            pair_ids,
            full,
            partial,
        ],
        schema=packed_row.SCHEMA,
    )


class RowPacker:
    """Streams windows of pairs into packed record batches (see module docstring)."""

    def __init__(self, layout: Layout, max_len: int, block_size: int) -> None:
        self.layout = layout
        self.max_len = max_len
        self.block_size = block_size
        self.rows_per_batch = max(1, BATCH_TOKENS // max_len)
        self._packer = BestFitPacker(max_len)
        self._carry = tokenized_pair.SCHEMA.empty_table()

    def _emit(self, pairs: pa.Table, rows: list[list[int]]) -> Iterator[pa.RecordBatch]:
        for i in range(0, len(rows), self.rows_per_batch):
            chunk = rows[i : i + self.rows_per_batch]
            yield assemble_rows(pairs, chunk, self.layout, self.block_size)

    def add(self, pairs: pa.Table) -> Iterator[pa.RecordBatch]:
        """Pack one window of `tokenized_pair` rows.

        Raises:
            ValueError: a pair does not fit max_len (apply the length policy first).
        """
        p, c, r = (
            ragged.lengths_of(pairs.column(n)) for n in ("prompt_ids", "chosen_ids", "rejected_ids")
        )
        sizes = pair_tokens(p, c, r, self.layout)
        if (sizes > self.max_len).any():
            worst = int(np.argmax(sizes))
            raise ValueError(
                f"pair {pairs.column('pair_id')[worst]} has {sizes[worst]} tokens "
                f"({self.layout}), more than max_len {self.max_len}"
            )
        if self.layout == "padded":
            yield from self._emit(pairs, [[i] for i in range(pairs.num_rows)])
            return
        # One contiguous copy, so taking rows out of it never re-concatenates chunks.
        window = pa.concat_tables([self._carry, pairs]).combine_chunks()
        self._packer.add(sizes, first_item=self._carry.num_rows)
        rows, carried = self._packer.close(final=False)
        self._carry = window.take(pa.array(carried, pa.int64()))
        yield from self._emit(window, rows)

    def finish(self) -> Iterator[pa.RecordBatch]:
        """Emit the rows still carried."""
        rows, _ = self._packer.close(final=True)
        carry, self._carry = self._carry, tokenized_pair.SCHEMA.empty_table()
        yield from self._emit(carry, rows)
