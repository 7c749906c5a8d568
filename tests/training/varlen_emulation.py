"""`varlen_attn` on CPU, for tests: FlashAttention's varlen kernel is CUDA-only.

Each sequence alone through SDPA, causal aligned bottom-right when it has fewer queries than
keys, which is what FlashAttention (2.1 and later) documents for `causal=True`. The GPU
tests check the real kernel against `dense` on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right


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
) -> Tensor:
    """`varlen_attn` on CPU: each sequence alone, causal aligned bottom-right."""
    assert window_size == (-1, 0) and enable_gqa
    outs = []
    for i in range(len(cu_seq_q) - 1):
        qs = q[cu_seq_q[i] : cu_seq_q[i + 1]].transpose(0, 1)[None]
        ks = k[cu_seq_k[i] : cu_seq_k[i + 1]].transpose(0, 1)[None]
        vs = v[cu_seq_k[i] : cu_seq_k[i + 1]].transpose(0, 1)[None]
        assert qs.shape[2] <= max_q and ks.shape[2] <= max_k
        bias = causal_lower_right(qs.shape[2], ks.shape[2])
        out = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=bias, enable_gqa=True
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)
