"""Every backend computes attention under the definition mask, on raw q/k/v.

The oracle is softmax attention with `packed_row.attention_mask`, row by row, with and
without a sliding window (defined on position ids) and with the default or a given score
scale. `varlen`'s kernel is CUDA-only: on CPU its index construction and window argument
are checked against the definition mask, and the whole backend runs with a CPU emulation of
`varlen_attn` (per-sequence SDPA with a bottom-right causal, windowed mask: FlashAttention's
documented semantics) in the kernel's place. FlexAttention's block lists are checked block
by block against the definition; its kernels run on CUDA only (the `gpu` tests).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.nn.attention.flex_attention import create_mask

from data_contracts.packed_row import PackedRow, attention_mask, position_ids
from tests.training.pairs import pack
from tests.training.varlen_emulation import emulated_varlen
from training.attention import (
    FLAT_BACKENDS,
    CausalAttention,
    SegmentAttention,
    VarlenAttention,
    build_attention,
    dense_mask,
    flat_segments,
    flex_block_mask,
    gqa_causal_varlen,
    length_buckets,
)

BLOCK = 16
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
Spec = list[list[tuple[int, int, int]]]  # per row, the (P, C, R) lengths of its pairs

lengths = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))
rows_of_pairs = st.lists(st.lists(lengths, min_size=1, max_size=4), min_size=1, max_size=3)
windows = st.one_of(st.none(), st.integers(1, 12))  # pairs span up to 18 positions
CPU = torch.device("cpu")


def _rows(spec: Spec, layout: str, block_size: int = BLOCK) -> list[PackedRow]:
    """Rows with the given (P, C, R) lengths; token ids are irrelevant here."""
    rows = []
    for pairs in spec:
        fake = [
            (np.zeros(p, np.int32), np.zeros(c, np.int32), np.zeros(r, np.int32))
            for p, c, r in pairs
        ]
        rows.extend(pack(fake, layout, pairs_per_row=len(pairs), block_size=block_size))
    return rows


def _row_qkv(
    rows: list[PackedRow],
    seed: int = 1,
    head_dim: int = HEAD_DIM,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per row, leaf q (T, 4, head_dim), k and v (T, 2, head_dim) (GQA)."""
    g = torch.Generator().manual_seed(seed)
    return [
        tuple(
            torch.randn(r.num_tokens, h, head_dim, generator=g, dtype=dtype).requires_grad_()
            for h in (HEADS, KV_HEADS, KV_HEADS)
        )
        for r in rows
    ]


def _batched(per_row: list[tuple[Tensor, ...]], flat: bool, length: int) -> list[Tensor]:
    """q, k, v as the model hands them over: (1, sum T, h, hd) for flat backends, else
    (B, length, h, hd) right-padded with zeros."""
    out = []
    for i in range(3):
        parts = [t[i] for t in per_row]
        if flat:
            out.append(torch.cat(parts)[None])
        else:
            pad = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, length - len(p))) for p in parts]
            out.append(torch.stack(pad))
    return out


def _per_row(out: Tensor, rows: list[PackedRow], flat: bool) -> list[Tensor]:
    if flat:
        return list(out[0].split([r.num_tokens for r in rows]))
    return [out[b, : r.num_tokens] for b, r in enumerate(rows)]


def _brute_force(
    rows: list[PackedRow],
    layout: str,
    per_row: list,
    window: int | None = None,
    scale: float | None = None,
) -> list[Tensor]:
    """Softmax attention with the definition mask, each row alone, GQA by repetition."""
    outs = []
    for row, (q, k, v) in zip(rows, per_row, strict=True):
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (h, T, hd)
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, 0) for t in (k, v))
        scores = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        visible = torch.from_numpy(attention_mask(row, layout, window))
        scores = scores.masked_fill(~visible, float("-inf"))
        outs.append((scores.softmax(-1) @ v).transpose(0, 1))
    return outs


def _torch_2_10_varlen(
    q: Tensor, k: Tensor, v: Tensor, *lengths: object, is_causal: bool = False
) -> Tensor:
    """The first release's `varlen_attn`: `is_causal`, and as many kv heads as queries."""
    assert is_causal and k.shape[1] == q.shape[1] == HEADS
    return emulated_varlen(q, k, v, *lengths, window_size=(-1, 0), enable_gqa=True)


def test_varlen_is_adapted_to_a_torch_without_gqa_or_window_size() -> None:
    rows = _rows([[(40, 30, 50), (9, 20, 7)], [(5, 60, 31)]], "shared")
    length = max(r.num_tokens for r in rows)
    qkv = _batched(_row_qkv(rows), True, length)
    attention = build_attention("varlen", rows, "shared", length, BLOCK, CPU)
    old = dataclasses.replace(attention, kernel=gqa_causal_varlen(_torch_2_10_varlen))
    new = dataclasses.replace(attention, kernel=emulated_varlen)
    assert gqa_causal_varlen(emulated_varlen) is emulated_varlen  # 2.13's: called as it is
    torch.testing.assert_close(old(*qkv), new(*qkv))
    # A window it cannot take is refused, naming it, never run as full causal attention.
    with pytest.raises(RuntimeError, match="takes no window_size"):
        old(*qkv, window=16)


def _attention(backend: str, rows: list[PackedRow], layout: str, length: int):
    attention = build_attention(backend, rows, layout, length, BLOCK, CPU)
    if backend == "varlen":
        attention = dataclasses.replace(attention, kernel=emulated_varlen)
    return attention


@pytest.mark.parametrize("layout", ["shared", "unshared"])
@given(spec=rows_of_pairs, window=windows, scale=st.sampled_from([None, 0.2]))
def test_dense_segments_and_varlen_equal_brute_force_forward_and_backward(
    spec: Spec, layout: str, window: int | None, scale: float | None
) -> None:
    """With and without a sliding window (1 to 12 positions against pairs of up to 18),
    with the default and with another score scale (Gemma's `query_pre_attn_scalar`)."""
    rows = _rows(spec, layout)
    length = max(r.num_tokens for r in rows)
    # float64: what is compared is which keys each query sees, not fp32's summation order
    # (which differs from the brute force's by up to ~1e-5 on longer rows)
    per_row = _row_qkv(rows, dtype=torch.float64)
    leaves = [t for qkv in per_row for t in qkv]
    want = _brute_force(rows, layout, per_row, window, scale)
    want_grads = torch.autograd.grad(sum(w.square().sum() for w in want), leaves)
    for backend in ("dense", "segments", "varlen"):
        flat = backend in FLAT_BACKENDS
        attention = _attention(backend, rows, layout, length)
        out = attention(*_batched(per_row, flat, length), window=window, scale=scale)
        got = _per_row(out, rows, flat)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(sum(g.square().sum() for g in got), leaves)
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _flat_definition_mask(
    rows: list[PackedRow], layout: str, window: int | None = None
) -> np.ndarray:
    """The definition mask of the concatenated rows: block-diagonal over rows."""
    n = sum(r.num_tokens for r in rows)
    mask, lo = np.zeros((n, n), dtype=bool), 0
    for row in rows:
        rows_mask = attention_mask(row, layout, window)
        mask[lo : lo + row.num_tokens, lo : lo + row.num_tokens] = rows_mask
        lo += row.num_tokens
    return mask


@pytest.mark.parametrize("layout", ["shared", "unshared"])
@given(spec=rows_of_pairs, window=windows)
def test_varlen_indices_give_exactly_the_definition_mask(
    spec: Spec, layout: str, window: int | None
) -> None:
    """What the two varlen calls let each query see, read off their index tensors,
    cu_seqlens and the `window_size` they pass with FlashAttention's rule (bottom-right
    causal, at most `left` key slots back), is the definition mask; and every token's
    output comes from exactly one call."""
    rows = _rows(spec, layout)
    attention = build_attention("varlen", rows, layout, 0, BLOCK, CPU)
    assert isinstance(attention, VarlenAttention)
    assert len(attention.calls) == (2 if layout == "shared" else 1)
    passed = []

    def recording(*args: object, **kwargs: object) -> Tensor:
        passed.append(kwargs["window_size"])
        return emulated_varlen(*args, **kwargs)

    n = sum(r.num_tokens for r in rows)
    qkv = _batched([tuple(t.detach() for t in x) for x in _row_qkv(rows)], True, n)
    dataclasses.replace(attention, kernel=recording)(*qkv, window=window)
    seen = np.zeros((n, n), dtype=bool)
    answered = []
    for call, (left, right) in zip(attention.calls, passed, strict=True):
        assert right == 0
        q_index = call.q_index.numpy()
        k_index = q_index if call.k_index is None else call.k_index.numpy()
        cu_q, cu_k = call.cu_seq_q.numpy(), call.cu_seq_k.numpy()
        assert call.max_q == np.diff(cu_q).max() and call.max_k == np.diff(cu_k).max()
        for i in range(len(cu_q) - 1):
            qs, ks = q_index[cu_q[i] : cu_q[i + 1]], k_index[cu_k[i] : cu_k[i + 1]]
            a, b = np.arange(len(qs))[:, None], np.arange(len(ks))[None, :]
            back = len(ks) - len(qs) + a - b
            seen[np.ix_(qs, ks)] |= (back >= 0) & ((back <= left) | (left == -1))
        answered.append(q_index)
    assert np.array_equal(seen, _flat_definition_mask(rows, layout, window))
    order = np.concatenate(answered)
    assert sorted(order) == list(range(n))
    assert np.array_equal(order[attention.out_index.numpy()], np.arange(n))


def test_calls_per_layer_do_not_grow_with_pairs() -> None:
    """Rows of 4096 tokens with 4 to 256 pairs each: varlen makes 2 calls, segments at most
    one per (kind, length bucket), bounded by the row length, not by the pairs."""
    rng = np.random.default_rng(0)
    bound = 2 * (int(np.log2(4096)) + 1)
    for pairs_per_row in (4, 16, 64, 256):
        spec = []
        for _ in range(4):
            size = 4096 // pairs_per_row
            p = rng.integers(1, size // 2, pairs_per_row)
            c = rng.integers(1, size // 4 + 1, pairs_per_row)
            spec.append(list(zip(p, c, size - p - c, strict=True)))
        rows = _rows(spec, "shared")
        segments = build_attention("segments", rows, "shared", 0, BLOCK, CPU)
        varlen = build_attention("varlen", rows, "shared", 0, BLOCK, CPU)
        assert isinstance(segments, SegmentAttention) and isinstance(varlen, VarlenAttention)
        assert len(segments.groups) <= bound and len(varlen.calls) == 2
        # A sliding window masks the same calls; it adds none.
        assert len(segments.masks(64)) == len(segments.groups)


def test_length_buckets_keep_lengths_within_a_factor_of_two() -> None:
    lengths = np.arange(1, 5000)
    buckets = length_buckets(lengths)
    for b in np.unique(buckets):
        inside = lengths[buckets == b]
        assert inside.max() < 2 * inside.min() or inside.min() == 1


@given(spec=rows_of_pairs)
def test_flat_segments_tile_the_batch_in_order(spec: Spec) -> None:
    for layout in ("shared", "unshared"):
        rows = _rows(spec, layout)
        segments = flat_segments(rows, layout)
        ends = segments.q_lo + segments.q_len
        assert segments.q_lo[0] == 0 and ends[-1] == sum(r.num_tokens for r in rows)
        assert (segments.q_lo[1:] == ends[:-1]).all()


def test_dense_mask_padding_queries_see_only_themselves() -> None:
    rows = _rows([[(2, 1, 1)], [(3, 3, 3)]], "shared")
    mask = dense_mask(rows, "shared", 9)[0, 0]
    assert np.array_equal(mask[4:, 4:], np.eye(5, dtype=bool)) and not mask[4:, :4].any()


@pytest.mark.parametrize("layout", ["shared", "unshared"])
@given(spec=rows_of_pairs, window=windows)
def test_flex_mask_mod_equals_the_definition(spec: Spec, layout: str, window: int | None) -> None:
    rows = _rows(spec, layout)
    length = -(-max(r.num_tokens for r in rows) // BLOCK) * BLOCK
    block_mask = flex_block_mask(rows, layout, length, BLOCK, CPU, window)
    grid = create_mask(block_mask.mask_mod, len(rows), 1, length, length, device="cpu")
    want = torch.from_numpy(dense_mask(rows, layout, length, window))
    for b, row in enumerate(rows):
        n = row.num_tokens
        assert grid[b, 0, :n, :n].equal(want[b, 0, :n, :n])
        assert not grid[b, 0, n:].any() and not grid[b, 0, :, n:].any()


def _as_blocks(block_mask, rows: list[PackedRow], length: int, block: int) -> np.ndarray:
    """bool (B, length, length): what a BlockMask lets through, block by block as the kernel
    reads it: full blocks whole, partial blocks through the mask_mod, other blocks not."""
    grid = create_mask(block_mask.mask_mod, len(rows), 1, length, length, device="cpu")[:, 0]
    grid = grid.numpy()
    out = np.zeros_like(grid)
    lists = (
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True),
        (block_mask.kv_num_blocks, block_mask.kv_indices, False),
    )
    for counts, indices, full in lists:
        for b in range(len(rows)):
            for qb in range(length // block):
                for kb in indices[b, 0, qb, : counts[b, 0, qb]].tolist():
                    q, k = slice(qb * block, (qb + 1) * block), slice(kb * block, (kb + 1) * block)
                    out[b, q, k] = True if full else grid[b, q, k]
    return out


@pytest.mark.parametrize("layout", ["shared", "unshared"])
@given(spec=rows_of_pairs, window=windows)
def test_flex_block_lists_under_a_window_are_exact(
    spec: Spec, layout: str, window: int | None
) -> None:
    """4-token blocks, so pairs span many: the narrowed lists (`window_block_lists`) keep
    every visible token in a listed block, and a block stays full only if all of it is
    visible; a window only ever removes blocks."""
    block = 4
    rows = _rows(spec, layout, block)
    length = -(-max(r.num_tokens for r in rows) // block) * block
    block_mask = flex_block_mask(rows, layout, length, block, CPU, window)
    got = _as_blocks(block_mask, rows, length, block)
    want = dense_mask(rows, layout, length, window)[:, 0]
    for b, row in enumerate(rows):
        n = row.num_tokens
        assert np.array_equal(got[b, :n, :n], want[b, :n, :n])
    unwindowed = flex_block_mask(rows, layout, length, block, CPU)
    listed = block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()
    assert listed <= unwindowed.kv_num_blocks.sum() + unwindowed.full_kv_num_blocks.sum()


def test_a_short_window_drops_most_blocks_of_a_long_pair() -> None:
    """One pair of 300 + 200 + 100 tokens in 16-token blocks: under a 32-position window a
    query block inside one branch reaches at most 4 key blocks (3 of the band, one more when
    the band straddles the prompt's end), instead of all earlier ones. The block where
    chosen ends and rejected begins keeps more: its position range spans both branches."""
    rows = _rows([[(300, 200, 100)]], "shared")
    length = -(-rows[0].num_tokens // BLOCK) * BLOCK
    full = flex_block_mask(rows, "shared", length, BLOCK, CPU)
    narrow = flex_block_mask(rows, "shared", length, BLOCK, CPU, window=32)
    per_query_block = (narrow.kv_num_blocks + narrow.full_kv_num_blocks)[0, 0]  # (Q,)
    straddling = 500 // BLOCK  # tokens 496..511: chosen's last four, rejected's first 12
    assert per_query_block[np.arange(len(per_query_block)) != straddling].max() <= 4
    assert per_query_block.sum() * 4 < (full.kv_num_blocks + full.full_kv_num_blocks).sum()


def test_padded_layout_window_is_a_band_of_columns() -> None:
    """`padded` rows are single documents from position 0: the window counts columns."""
    row = _rows([[(5, 9, 3)]], "padded")[0]
    n, window = 14, 4  # the prompt+chosen document alone
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, HEAD_DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    got = CausalAttention()(q, k, v, window=window, scale=0.3)
    assert position_ids(row, "padded")[:n].tolist() == list(range(n))  # columns
    k, v = (t.repeat_interleave(HEADS // KV_HEADS, 2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    back = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    scores = scores.masked_fill(~((back >= 0) & (back < window)), float("-inf"))
    want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("layout", ["shared", "unshared"])
def test_flex_forward_equals_dense_on_cpu(layout: str, window: int | None) -> None:
    """FlexAttention's eager forward runs on CPU (no backward there): rows of several pairs
    spanning several 16-token blocks, so full, partial and empty blocks all occur."""
    rows = _rows([[(9, 7, 5), (3, 8, 2), (6, 1, 9)], [(4, 4, 4)], [(2, 9, 9), (9, 9, 1)]], layout)
    length = -(-max(r.num_tokens for r in rows) // BLOCK) * BLOCK
    qkv = _batched([tuple(t.detach() for t in x) for x in _row_qkv(rows)], False, length)
    dense = build_attention("dense", rows, layout, length, BLOCK, CPU)(*qkv, window=window)
    with warnings.catch_warnings():  # eager flex warns that it is unfused; we know
        warnings.simplefilter("ignore", UserWarning)
        flex = build_attention("flex", rows, layout, length, BLOCK, CPU)(*qkv, window=window)
    for g, w in zip(_per_row(flex, rows, False), _per_row(dense, rows, False), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_flex_refuses_to_train_on_cpu() -> None:
    rows = _rows([[(3, 2, 2)]], "shared")
    qkv = _batched(_row_qkv(rows), False, BLOCK)
    attention = build_attention("flex", rows, "shared", BLOCK, BLOCK, CPU)
    with pytest.raises(RuntimeError, match="flex backend trains on CUDA only"):
        attention(*qkv)


def test_flex_needs_block_lists_for_its_block_size() -> None:
    rows = _rows([[(9, 9, 9)]], "shared")  # lists for 16-token blocks: 2 query blocks
    with pytest.raises(ValueError, match="needs 4 at block size 8"):
        flex_block_mask(rows, "shared", 32, 8, CPU)


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'sparse'"):
        build_attention("sparse", _rows([[(1, 1, 1)]], "shared"), "shared", 3, BLOCK, CPU)


# -----------------------------------------------------------------------------
# CUDA: the real kernels against dense


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex and varlen kernels need CUDA")
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("layout", ["shared", "unshared"])
@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_cuda_kernels_forward_and_backward_equal_dense(
    backend: str, layout: str, window: int | None
) -> None:
    """bf16 q/k/v (FlashAttention has no fp32 kernel); dense runs on the same bf16 inputs.
    FlexAttention's CUDA kernels want mask blocks of whole 128-token tiles and head
    dimensions of 16 or more (`training.device.flex_problems`). A 37-position window cuts
    every long pair, and leaves whole 128-token blocks in and out of reach."""
    spec = [[(40, 30, 50), (100, 20, 7)], [(9, 200, 31)], [(64, 64, 64), (1, 1, 1)]]
    block, cuda = 128, torch.device("cuda")
    rows = _rows(spec, layout, block)
    length = -(-max(r.num_tokens for r in rows) // block) * block
    per_row = [
        tuple(t.detach().to(cuda, torch.bfloat16).requires_grad_() for t in x)
        for x in _row_qkv(rows, head_dim=16)
    ]
    leaves = [t for qkv in per_row for t in qkv]
    results = []
    for name in ("dense", backend):
        flat = name in FLAT_BACKENDS
        attention = build_attention(name, rows, layout, length, block, cuda)
        out = attention(*_batched(per_row, flat, length), window=window, scale=0.2)
        real = _per_row(out, rows, flat)
        grads = torch.autograd.grad(sum(r.float().square().sum() for r in real), leaves)
        results.append((real, grads))
    (dense_out, dense_grads), (out, grads) = results
    for g, w in zip(out + list(grads), dense_out + list(dense_grads), strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
