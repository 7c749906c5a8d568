"""`varlen_attn` on CPU, for tests: FlashAttention's varlen kernel is CUDA-only.

Each sequence alone through SDPA with FlashAttention's documented (2.1 and later) masking:
query i of nq sits at key slot i + nk - nq (causal aligned bottom-right when it has fewer
queries than keys), and sees the keys at slots [slot - left, slot] for `window_size=(left,
0)` (left -1: no limit). The GPU tests check the real kernel against `dense` on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor


def emulated_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Tensor,
    max_q: int,
    max_k: int,
    *,
    window_size: tuple[int, int],
    enable_gqa: bool,
    scale: float | None = None,
) -> Tensor:
    """`varlen_attn` on CPU: each sequence alone, causal aligned bottom-right, windowed."""
    left, right = window_size
    assert right == 0 and left >= -1 and enable_gqa
    outs = []
    for i in range(len(cu_seq_q) - 1):
        qs = q[cu_seq_q[i] : cu_seq_q[i + 1]].transpose(0, 1)[None]
        ks = k[cu_seq_k[i] : cu_seq_k[i + 1]].transpose(0, 1)[None]
        vs = v[cu_seq_k[i] : cu_seq_k[i + 1]].transpose(0, 1)[None]
        nq, nk = qs.shape[2], ks.shape[2]
        assert nq <= max_q and nk <= max_k
        slot = torch.arange(nq)[:, None] + nk - nq  # each query's place among the keys
        back = slot - torch.arange(nk)[None, :]  # (nq, nk): how far each key is behind
        mask = (back >= 0) & ((back <= left) if left >= 0 else True)
        out = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)
