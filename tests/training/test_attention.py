"""Every backend computes attention under the definition mask, on raw q/k/v."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_mask

from data_contracts.packed_row import PackedRow, attention_mask
from tests.training.pairs import pack
from training.attention import build_attention, dense_mask, flex_block_mask, segment_calls

BLOCK = 16
Spec = list[list[tuple[int, int, int]]]  # per row, the (P, C, R) lengths of its pairs

lengths = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))
rows_of_pairs = st.lists(st.lists(lengths, min_size=1, max_size=4), min_size=1, max_size=3)


def _rows(spec: Spec, layout: str) -> list[PackedRow]:
    """Rows with the given (P, C, R) lengths; token ids are irrelevant here."""
    rows = []
    for pairs in spec:
        fake = [
            (np.zeros(p, np.int32), np.zeros(c, np.int32), np.zeros(r, np.int32))
            for p, c, r in pairs
        ]
        rows.extend(pack(fake, layout, pairs_per_row=len(pairs), block_size=BLOCK))
    return rows


def _qkv(batch: int, length: int, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """q with 4 heads, k and v with 2 (GQA)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(batch, 4, length, 8), (batch, 2, length, 8), (batch, 2, length, 8)]
    return tuple(torch.randn(s, generator=g).requires_grad_(requires_grad) for s in shapes)


def _real(rows: list[PackedRow], out: torch.Tensor) -> list[torch.Tensor]:
    return [out[b, :, : r.num_tokens] for b, r in enumerate(rows)]


def _brute_force(
    rows: list[PackedRow], layout: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> list[torch.Tensor]:
    """Softmax attention with the definition mask, each row alone, GQA by repetition."""
    outs = []
    for b, row in enumerate(rows):
        n = row.num_tokens
        qb, kb, vb = (
            q[b, :, :n],
            k[b, :, :n].repeat_interleave(2, 0),
            v[b, :, :n].repeat_interleave(2, 0),
        )
        scores = qb @ kb.transpose(-1, -2) / 8**0.5
        scores = scores.masked_fill(~torch.from_numpy(attention_mask(row, layout)), float("-inf"))
        outs.append(scores.softmax(-1) @ vb)
    return outs


@pytest.mark.parametrize("layout", ["shared", "unshared"])
@given(spec=rows_of_pairs)
def test_dense_and_segments_equal_brute_force_forward_and_backward(spec: Spec, layout: str) -> None:
    rows = _rows(spec, layout)
    length = max(r.num_tokens for r in rows)
    q, k, v = _qkv(len(rows), length, requires_grad=True)
    want = _brute_force(rows, layout, q, k, v)
    want_grads = torch.autograd.grad(sum(w.square().sum() for w in want), (q, k, v))
    for backend in ("dense", "segments"):
        attention = build_attention(backend, rows, layout, length, BLOCK, torch.device("cpu"))
        got = _real(rows, attention(q, k, v))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(sum(g.square().sum() for g in got), (q, k, v))
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@given(spec=rows_of_pairs)
def test_segment_calls_tile_each_row_in_order(spec: Spec) -> None:
    for layout in ("shared", "unshared"):
        for row in _rows(spec, layout):
            calls = segment_calls(row, layout)
            assert calls[0, 0] == 0 and calls[-1, 1] == row.num_tokens
            assert (calls[1:, 0] == calls[:-1, 1]).all()


def test_dense_mask_padding_queries_see_only_themselves() -> None:
    rows = _rows([[(2, 1, 1)], [(3, 3, 3)]], "shared")
    mask = dense_mask(rows, "shared", 9)[0, 0]
    assert np.array_equal(mask[4:, 4:], np.eye(5, dtype=bool)) and not mask[4:, :4].any()


@pytest.mark.parametrize("layout", ["shared", "unshared"])
@given(spec=rows_of_pairs)
def test_flex_mask_mod_equals_the_definition(spec: Spec, layout: str) -> None:
    rows = _rows(spec, layout)
    length = -(-max(r.num_tokens for r in rows) // BLOCK) * BLOCK
    block_mask = flex_block_mask(rows, layout, length, BLOCK, torch.device("cpu"))
    grid = create_mask(block_mask.mask_mod, len(rows), 1, length, length, device="cpu")
    want = torch.from_numpy(dense_mask(rows, layout, length))
    for b, row in enumerate(rows):
        n = row.num_tokens
        assert grid[b, 0, :n, :n].equal(want[b, 0, :n, :n])
        assert not grid[b, 0, n:].any() and not grid[b, 0, :, n:].any()


@pytest.mark.parametrize("layout", ["shared", "unshared"])
def test_flex_forward_equals_dense_on_cpu(layout: str) -> None:
    """FlexAttention's eager forward runs on CPU (no backward there): rows of several pairs
    spanning several 16-token blocks, so full, partial and empty blocks all occur."""
    rows = _rows([[(9, 7, 5), (3, 8, 2), (6, 1, 9)], [(4, 4, 4)], [(2, 9, 9), (9, 9, 1)]], layout)
    length = -(-max(r.num_tokens for r in rows) // BLOCK) * BLOCK
    q, k, v = _qkv(len(rows), length)
    cpu = torch.device("cpu")
    dense = build_attention("dense", rows, layout, length, BLOCK, cpu)(q, k, v)
    with warnings.catch_warnings():  # eager flex warns that it is unfused; we know
        warnings.simplefilter("ignore", UserWarning)
        flex = build_attention("flex", rows, layout, length, BLOCK, cpu)(q, k, v)
    for g, w in zip(_real(rows, flex), _real(rows, dense), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_flex_refuses_to_train_on_cpu() -> None:
    rows = _rows([[(3, 2, 2)]], "shared")
    q, k, v = _qkv(1, BLOCK, requires_grad=True)
    attention = build_attention("flex", rows, "shared", BLOCK, BLOCK, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="flex backend trains on CUDA only"):
        attention(q, k, v)


def test_flex_needs_block_lists_for_its_block_size() -> None:
    rows = _rows([[(9, 9, 9)]], "shared")  # lists for 16-token blocks: 2 query blocks
    with pytest.raises(ValueError, match="needs 4 at block size 8"):
        flex_block_mask(rows, "shared", 32, 8, torch.device("cpu"))


def test_unknown_backend_is_named() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'sparse'"):
        build_attention(
            "sparse", _rows([[(1, 1, 1)]], "shared"), "shared", 3, BLOCK, torch.device("cpu")
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
@pytest.mark.parametrize("layout", ["shared", "unshared"])
def test_flex_forward_and_backward_equal_dense_on_cuda(layout: str) -> None:
    spec = [[(40, 30, 50), (100, 20, 7)], [(9, 200, 31)], [(64, 64, 64), (1, 1, 1)]]
    rows, cuda = _rows(spec, layout), torch.device("cuda")
    length = -(-max(r.num_tokens for r in rows) // BLOCK) * BLOCK
    q, k, v = (t.detach().cuda().requires_grad_() for t in _qkv(len(rows), length))
    results = []
    for backend in ("dense", "flex"):
        out = build_attention(backend, rows, layout, length, BLOCK, cuda)(q, k, v)
        real = _real(rows, out)
        grads = torch.autograd.grad(sum(r.square().sum() for r in real), (q, k, v))
        results.append((real, grads))
    (dense_out, dense_grads), (flex_out, flex_grads) = results
    for g, w in zip(flex_out + list(flex_grads), dense_out + list(dense_grads), strict=True):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)
