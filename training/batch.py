"""Collate packed rows into one model-ready batch (tensors + attention backend + targets).

Everything here follows the executable definition in `data_contracts.packed_row`
(`position_ids`, `token_roles`, `targets`): this module only pads and flattens it.

- `shared` / `unshared` with a flat backend (`segments`, `varlen`): the packed rows
  concatenated into one sequence, no padding (the attention backend keeps pairs apart).
- `shared` / `unshared` with `dense`: one batch row per packed row, right-padded to the
  longest row; with `flex`: padded to `pad_to` (the shards' max_len) rounded up to the mask
  block size, so every batch has the one shape FlexAttention was compiled for.
- `padded`: each packed row is split into its documents (prompt+chosen, prompt+rejected),
  one batch row per document, padded to the longest one: what trainers without packing do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from data_contracts.packed_row import (
    LAYOUTS,
    Layout,
    PackedRow,
    position_ids,
    targets,
    token_roles,
)
from pipeline.shards import ShardReader
from training.attention import (
    FLAT_BACKENDS,
    AttentionBackend,
    Backend,
    CausalAttention,
    build_attention,
)
from training.ranks import agree


@dataclass(frozen=True)
class PackedRows(Sequence[PackedRow]):
    """Packed rows held in memory with the settings they were packed with: what a
    `ShardReader` gives for shards on disk (a fold's pairs packed again, test rows).

    Attributes:
        rows: the rows.
        layout: their layout: `shared`, `unshared` or `padded`.
        block_size: their mask block size (used by the flex backend).
        max_len: their row length limit (checked per row; flex pads to it).
        key: the shard key they stand for (recorded in checkpoints), or None.
    """

    rows: Sequence[PackedRow]
    layout: Layout
    block_size: int
    max_len: int
    key: str | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> PackedRow:  # slices too, as the rows take them
        return self.rows[i]


# What training reads: shards on disk or rows in memory, each with its packing settings.
PackedData = ShardReader | PackedRows


@dataclass(frozen=True)
class Batch:
    """One micro-batch on its device.

    Attributes:
        input_ids: (B, T) int64, zero-padded.
        position_ids: (B, T) int64 RoPE positions.
        attention: the backend object every layer calls.
        logit_index: (M,) int64, flat index into B*T of the logits predicting each
            response token (M = all chosen and rejected tokens of the batch).
        labels: (M,) int64, the predicted token ids.
        pair_index: (M,) int64, the pair of each token, 0..N-1 in batch order.
        is_rejected: (M,) int64, 0 for chosen tokens and 1 for rejected ones.
        chosen_tokens: (N,) int64, chosen lengths (`response_lengths`).
        rejected_tokens: (N,) int64, rejected lengths (the per-token losses need both).
        pair_ids: the N pair ids in batch order.
        num_tokens: real tokens the layout spends on these pairs (no padding).
    """

    input_ids: Tensor
    position_ids: Tensor
    attention: AttentionBackend
    logit_index: Tensor
    labels: Tensor
    pair_index: Tensor
    is_rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    pair_ids: tuple[str, ...]
    num_tokens: int

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)


def rows_table(rows: Sequence[PackedRow]) -> pa.Table:
    """The rows' `input_ids` and `pair_ids` as Arrow columns, for checks over all rows at
    once: a shard reader's own table (zero copy over the memory maps), or one built from
    rows held in memory."""
    if isinstance(rows, ShardReader):
        return rows.table
    return pa.table(
        {
            "input_ids": pa.array([r.input_ids for r in rows], pa.list_(pa.int32())),
            "pair_ids": pa.array([list(r.pair_ids) for r in rows], pa.list_(pa.string())),
        }
    )


def response_lengths(rows: Sequence[PackedRow]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 chosen and rejected lengths in tokens of every pair of `rows`, in row
    order: what the per-token losses and the SFT term divide by, in a batch
    (`Batch.chosen_tokens`) as over an eval set (`training.logps.table_logps`)."""
    chosen = np.concatenate([r.chosen_len for r in rows]).astype(np.int64)
    rejected = np.concatenate([r.rejected_len for r in rows]).astype(np.int64)
    return chosen, rejected


def check_rows(
    rows: Sequence[PackedRow],
    max_len: int | None,
    vocab_size: int,
) -> None:
    """Fail before any work, naming the row, on rows the model cannot take: rank 0 checks
    every row at once, vectorised over the rows' Arrow table, and every rank raises its
    verdict (`training.ranks.agree`).

    Raises:
        ValueError: a row is longer than `max_len` (when given), or holds a token id
            outside [0, `vocab_size`).
    """
    agree(lambda: _row_problem(rows_table(rows)["input_ids"], max_len, vocab_size))


def _row_problem(input_ids: pa.ChunkedArray, max_len: int | None, vocab_size: int) -> str | None:
    """The first problem of `check_rows`, or None."""
    lengths = pc.list_value_length(input_ids).to_numpy()
    too_long = np.flatnonzero(lengths > max_len) if max_len is not None else []
    if len(too_long):
        row = int(too_long[0])
        return f"row {row}: {lengths[row]} tokens exceed max_len {max_len}"
    first_row = 0
    for chunk in input_ids.chunks:  # one shard batch at a time: bounded temporaries
        ids = pc.list_flatten(chunk).to_numpy()
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            i = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
            ends = np.cumsum(pc.list_value_length(chunk).to_numpy())
            row = first_row + int(np.searchsorted(ends, i, side="right"))
            return (
                f"row {row}: token id {ids[i]} is outside the model's vocabulary "
                f"({vocab_size}); shards and model use different tokenizers"
            )
        first_row += len(chunk)
    return None


def collate(
    rows: Sequence[PackedRow],
    layout: Layout,
    backend: Backend,
    block_size: int,
    device: torch.device | str = "cpu",
    pad_to: int | None = None,
) -> Batch:
    """Pad `rows` into a batch with its attention backend and log-prob targets.

    Args:
        rows: packed rows of `layout`.
        layout: `shared`, `unshared` or `padded`.
        backend: `dense`, `segments`, `varlen` or `flex`, resolved (not `auto`); `padded`
            always runs causal attention.
        block_size: the shards' mask block size (used by `flex`).
        device: where the tensors go.
        pad_to: `flex` pads every batch to this length (rounded up to `block_size`) when
            given, else to its longest row.

    Returns:
        The batch.

    Raises:
        ValueError: unknown layout or backend; metadata inconsistent with the layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    device = torch.device(device)
    pair_offset = np.concatenate([[0], np.cumsum([r.num_pairs for r in rows])]).astype(np.int64)
    tok_doc, tok_col, tok_ids, tok_pos = [], [], [], []  # each real token: where and what
    logit_doc, logit_col, labels, pair, rejected = [], [], [], [], []
    num_docs = 0
    flat = layout != "padded" and backend in FLAT_BACKENDS
    row_offset = np.cumsum([0] + [r.num_tokens for r in rows])
    for b, row in enumerate(rows):
        pos = position_ids(row, layout)
        if layout == "padded":
            # Documents are numbered 2*pair (prompt+chosen) and 2*pair+1 (prompt+rejected);
            # positions restart per document, so a token's column is its position id.
            pair_of, kind = token_roles(row, layout)
            doc, col = num_docs + 2 * pair_of + (kind == 4), pos
            num_docs += 2 * row.num_pairs
        elif flat:
            doc, col = np.zeros(row.num_tokens, np.int64), row_offset[b] + np.arange(row.num_tokens)
            num_docs = 1
        else:
            doc, col = np.full(row.num_tokens, b), np.arange(row.num_tokens)
            num_docs += 1
        tok_doc.append(doc)
        tok_col.append(col)
        tok_ids.append(row.input_ids)
        tok_pos.append(pos)
        t = targets(row, layout)
        logit_doc.append(doc[t.logit_pos])
        logit_col.append(col[t.logit_pos])
        labels.append(row.input_ids[t.label_pos])
        pair.append(t.pair + pair_offset[b])
        rejected.append(~t.chosen)

    doc, col = np.concatenate(tok_doc), np.concatenate(tok_col)
    length = int(col.max()) + 1
    if backend == "flex" and layout != "padded":
        length = -(-max(length, pad_to or 0) // block_size) * block_size
    input_ids = np.zeros((num_docs, length), dtype=np.int64)
    input_ids[doc, col] = np.concatenate(tok_ids)
    positions = np.zeros((num_docs, length), dtype=np.int64)
    positions[doc, col] = np.concatenate(tok_pos)
    if layout == "padded":
        attention: AttentionBackend = CausalAttention()
    else:
        attention = build_attention(backend, rows, layout, length, block_size, device)

    def tensor(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    chosen_tokens, rejected_tokens = response_lengths(rows)
    return Batch(
        input_ids=tensor(input_ids),
        position_ids=tensor(positions),
        attention=attention,
        logit_index=tensor(np.concatenate(logit_doc) * length + np.concatenate(logit_col)),
        labels=tensor(np.concatenate(labels)),
        pair_index=tensor(np.concatenate(pair)),
        is_rejected=tensor(np.concatenate(rejected)),
        chosen_tokens=tensor(chosen_tokens),
        rejected_tokens=tensor(rejected_tokens),
        pair_ids=tuple(pid for r in rows for pid in r.pair_ids),
        num_tokens=int(sum(r.num_tokens for r in rows)),
    )
