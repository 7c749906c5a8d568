"""Attention backends: one masking rule (DESIGN.md, `data_contracts.packed_row`), three ways
to run it, selected by name. All are exact: they compute the same softmax over the same
visible keys, and differ only in how much of the row's T x T square they touch.

- `dense`: SDPA with the boolean mask of `packed_row.attention_mask`, padded to the batch.
  The reference; O(T^2) memory per row.
- `segments`: per pair, causal SDPA over `prompt | chosen`, then the rejected queries over
  the keys `prompt ++ rejected` with lower-right causal alignment (rejected token i sees
  the whole prompt and rejected tokens 0..i). Never builds a T x T mask; on CPU the cost is
  close to the useful attention FLOPs. In the two-document layouts each document is one
  causal call.
- `flex`: FlexAttention with a `BlockMask` made from the shard's precomputed per-query-block
  lists (`kv_block_full`, `kv_block_partial`) and a `mask_mod` for the partial blocks.
  Training needs CUDA: FlexAttention has no backward on CPU (its forward runs there, which
  the tests use to check it against `dense`).

The `padded` layout (one causal document per sequence, right padding) is what trainers
without packing run: every backend name gives plain causal SDPA there, which is
FlashAttention on CUDA.

A backend object is built per batch from the metadata and called by every layer as
`attention(q, k, v)` with q (B, nh, T, hd), k and v (B, nkv, T, hd) (GQA via `enable_gqa`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from data_contracts.packed_row import Layout, PackedRow, attention_mask, token_roles
from training.train_config import BACKENDS, Backend


@dataclass(frozen=True)
class CausalAttention:
    """Plain causal attention over right-padded single documents (the `padded` layout).

    Padding sits after every real token, so causal masking alone keeps it invisible.
    """

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@dataclass(frozen=True)
class DenseAttention:
    """SDPA with an explicit boolean mask.

    Attributes:
        mask: bool (B, 1, T, T), True where the query may attend the key.
    """

    mask: Tensor

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)


@dataclass(frozen=True)
class SegmentAttention:
    """Per-pair SDPA calls, no T x T mask.

    Attributes:
        calls: per batch row, a list of (q_lo, q_hi, k1_lo, k1_hi, k2_lo, k2_hi): the
            queries [q_lo, q_hi) attend the keys [k1_lo, k1_hi) ++ [k2_lo, k2_hi) with
            lower-right causal alignment. The query ranges tile the row's real tokens in
            order; the rest of the row (batch padding) gets zeros.
    """

    calls: tuple[tuple[tuple[int, int, int, int, int, int], ...], ...]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        _, H, T, D = q.shape  # (B, nh, T, hd)
        rows = []
        for b, calls in enumerate(self.calls):
            pieces = []
            for q_lo, q_hi, k1_lo, k1_hi, k2_lo, k2_hi in calls:
                qs = q[b : b + 1, :, q_lo:q_hi]  # (1, nh, Lq, hd)
                if k2_hi == k2_lo:  # one contiguous causal block: the fast path
                    ks, vs = k[b : b + 1, :, k1_lo:k1_hi], v[b : b + 1, :, k1_lo:k1_hi]
                    pieces.append(
                        F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
                    )
                    continue
                ks = torch.cat([k[b : b + 1, :, k1_lo:k1_hi], k[b : b + 1, :, k2_lo:k2_hi]], 2)
                vs = torch.cat([v[b : b + 1, :, k1_lo:k1_hi], v[b : b + 1, :, k2_lo:k2_hi]], 2)
                bias = causal_lower_right(q_hi - q_lo, ks.shape[2])
                pieces.append(
                    F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, enable_gqa=True)
                )
            tail = T - (calls[-1][1] if calls else 0)
            if tail:
                pieces.append(q.new_zeros(1, H, tail, D))
            rows.append(torch.cat(pieces, dim=2))
        return torch.cat(rows, dim=0)


@cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    """FlexAttention compiled once per process (the fused kernel; eager materialises T x T)."""
    return torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True)
class FlexBlockAttention:
    """FlexAttention over a block-sparse mask.

    Attributes:
        block_mask: the batch's BlockMask (B, 1, T, T) with the layout's mask_mod.
    """

    block_mask: BlockMask

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
            raise RuntimeError(
                "the flex backend trains on CUDA only (FlexAttention has no backward on CPU); "
                "use backend 'segments' or 'dense' on this device"
            )
        fn = _compiled_flex_attention() if q.is_cuda else flex_attention
        return fn(q, k, v, block_mask=self.block_mask, enable_gqa=True)


AttentionBackend = CausalAttention | DenseAttention | SegmentAttention | FlexBlockAttention


# -----------------------------------------------------------------------------
# Building a backend from a batch's metadata


def segment_calls(row: PackedRow, layout: Layout) -> np.ndarray:
    """(calls, 6) int64 SDPA calls for one row of the `shared` or `unshared` layout.

    See `SegmentAttention.calls` for the column meaning.
    """
    s, p, c, r = (
        a.astype(np.int64)
        for a in (row.pair_start, row.prompt_len, row.chosen_len, row.rejected_len)
    )
    none = np.zeros_like(s)
    if layout == "shared":
        # prompt|chosen: causal over itself; rejected: over prompt ++ rejected, lower-right.
        first = np.stack([s, s + p + c, s, s + p + c, none, none], axis=1)
        second = np.stack([s + p + c, s + p + c + r, s, s + p, s + p + c, s + p + c + r], 1)
    else:
        # Two documents per pair, each causal over itself.
        first = np.stack([s, s + p + c, s, s + p + c, none, none], axis=1)
        end = s + 2 * p + c + r
        second = np.stack([s + p + c, end, s + p + c, end, none, none], axis=1)
    return np.stack([first, second], axis=1).reshape(-1, 6)


def dense_mask(rows: Sequence[PackedRow], layout: Layout, length: int) -> np.ndarray:
    """bool (B, 1, length, length): each row's definition mask, zero-padded.

    Padding queries attend to themselves only, so no softmax row is empty (an empty row
    gives NaN, and NaN times a zero gradient is still NaN in the weight gradients).
    """
    mask = np.zeros((len(rows), 1, length, length), dtype=bool)
    for b, row in enumerate(rows):
        n = row.num_tokens
        mask[b, 0, :n, :n] = attention_mask(row, layout)
        mask[b, 0, np.arange(n, length), np.arange(n, length)] = True
    return mask


def _block_lists(lists: Sequence[tuple[np.ndarray, ...]], q_blocks: int) -> tuple[Tensor, Tensor]:
    """Per-row lists of key blocks per query block -> (B, 1, Q) counts, (B, 1, Q, Q) indices."""
    counts = np.zeros((len(lists), 1, q_blocks), dtype=np.int32)
    indices = np.zeros((len(lists), 1, q_blocks, q_blocks), dtype=np.int32)
    for b, per_block in enumerate(lists):
        n = np.fromiter(map(len, per_block), dtype=np.int32, count=len(per_block))
        counts[b, 0, : len(n)] = n
        if n.sum():
            qb = np.repeat(np.arange(len(n)), n)
            slot = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
            indices[b, 0, qb, slot] = np.concatenate(per_block)
    return torch.from_numpy(counts), torch.from_numpy(indices)


def flex_block_mask(
    rows: Sequence[PackedRow], layout: Layout, length: int, block_size: int, device: torch.device
) -> BlockMask:
    """The batch's BlockMask from the rows' precomputed block lists.

    Args:
        rows: rows carrying `kv_block_full` / `kv_block_partial` for `block_size`.
        layout: `shared` or `unshared`.
        length: batch length, a multiple of `block_size`.
        block_size: the shards' mask block size.
        device: where the mask lives.

    Raises:
        ValueError: a row has no block lists, or lists for another block size.
    """
    for i, row in enumerate(rows):
        want = -(-row.num_tokens // block_size)
        if len(row.kv_block_partial) != want or len(row.kv_block_full) != want:
            raise ValueError(
                f"batch row {i}: {len(row.kv_block_partial)} query blocks of kv lists, a "
                f"{row.num_tokens}-token row needs {want} at block size {block_size}; the flex "
                "backend needs shards packed with this mask block size"
            )
    pair = np.full((len(rows), length), -1, dtype=np.int64)
    kind = np.zeros((len(rows), length), dtype=np.int64)
    for b, row in enumerate(rows):
        pair[b, : row.num_tokens], kind[b, : row.num_tokens] = token_roles(row, layout)
    pair_t, kind_t = torch.from_numpy(pair).to(device), torch.from_numpy(kind).to(device)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        # The definition's rule on per-token roles: same pair, causal, and the key is
        # prompt (kind 0) or in the query's own segment / document. Padding has pair -1.
        same_pair = (pair_t[b, q] == pair_t[b, k]) & (pair_t[b, q] >= 0)
        branch = (kind_t[b, k] == 0) | (kind_t[b, k] == kind_t[b, q])
        return same_pair & branch & (k <= q)

    q_blocks = length // block_size
    partial_n, partial_idx = _block_lists([r.kv_block_partial for r in rows], q_blocks)
    full_n, full_idx = _block_lists([r.kv_block_full for r in rows], q_blocks)
    return BlockMask.from_kv_blocks(
        partial_n.to(device),
        partial_idx.to(device),
        full_n.to(device),
        full_idx.to(device),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


def build_attention(
    backend: Backend,
    rows: Sequence[PackedRow],
    layout: Layout,
    length: int,
    block_size: int,
    device: torch.device,
) -> AttentionBackend:
    """The backend object for one batch of `shared` or `unshared` rows.

    Raises:
        ValueError: unknown backend name.
    """
    if backend == "dense":
        return DenseAttention(torch.from_numpy(dense_mask(rows, layout, length)).to(device))
    if backend == "segments":
        calls = tuple(tuple(map(tuple, segment_calls(r, layout).tolist())) for r in rows)
        return SegmentAttention(calls)
    if backend == "flex":
        return FlexBlockAttention(flex_block_mask(rows, layout, length, block_size, device))
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
