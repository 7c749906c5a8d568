"""Attention backends: one masking rule (docs/design.md, `data_contracts.packed_row`), four
ways to run it, selected by name. All are exact: they compute the same softmax over the same
visible keys, and differ only in how much of the row's T x T square they touch and in how
many kernels a layer launches.

Every pair of a `shared` row is two attention problems: the `prompt | chosen` document
attends to itself causally, and the rejected queries attend to the keys `prompt ++
rejected` with lower-right (bottom-right) causal alignment: rejected token i sees the
whole prompt and rejected tokens 0..i. In the two-document layouts every document is one
causal problem. `Segments` lists these problems for a whole micro-batch.

- `dense`: SDPA with the boolean mask of `packed_row.attention_mask`, padded to the batch.
  The reference; O(T^2) memory per row.
- `segments` (the CPU path): the problems grouped into length buckets (powers of two), one
  SDPA call per bucket: documents causally with right padding, rejected queries either as
  a causal document over `prompt ++ rejected` (short prompts) or with a small (queries x
  keys) mask (long prompts). The calls per layer are bounded by the number of buckets (at
  most 2 log2(max_len) + 2), whatever the number of pairs.
- `varlen` (CUDA): FlashAttention varlen (`torch.nn.attention.varlen.varlen_attn`), two
  calls per layer for the whole micro-batch: every `prompt | chosen` document causally,
  then every rejected query block over its gathered `prompt ++ rejected` keys, where
  `cu_seq_q` differs from `cu_seq_k` and FlashAttention aligns the causal mask bottom-right
  (the idea of li-plus/flash-preference). Needs bf16 (autocast) and a CUDA device.
- `flex`: FlexAttention with a `BlockMask` made from the shard's precomputed per-query-block
  lists (`kv_block_full`, `kv_block_partial`) and a `mask_mod` for the partial blocks,
  compiled once for the shard's padded row length. Training needs CUDA: FlexAttention has
  no backward on CPU (its forward runs there, which the tests use to check it).

`segments` and `varlen` run on a *flat* batch: the rows of a micro-batch concatenated into
one sequence without padding (the model's linear layers see no padding at all); `dense`
and `flex` run on rows padded to a common length. The `padded` layout (one causal document
per sequence, right padding) is what trainers without packing run: every backend name
gives plain causal SDPA there, which is FlashAttention on CUDA.

A backend object is built once per batch from the metadata (index tensors, masks and
sequence offsets made on the host, moved to the device once), and called by every layer as
`attention(q, k, v, window, scale)` with q (B, T, nh, hd), k and v (B, T, nkv, hd); it returns
(B, T, nh, hd). Grouped-query attention throughout (`enable_gqa`); `scale` is the score
scale (None: 1/sqrt(hd); Gemma 3 sets its own).

Sliding windows (`window`, per layer: Gemma 3 mixes windowed and full layers) follow the
definition in `data_contracts.packed_row` (keys at positions > p - window). Every backend
gets them from the same fact: each attention problem's keys, in order, are at positions
0, 1, ... (`prompt ++ rejected`, or a document), so a query's window is a band of key slots:
- `dense` and `padded`: the mask and'ed with the position-id band;
- `segments`: the same calls, a causal call longer than the window takes a banded mask;
- `varlen`: FlashAttention's own `window_size=(window - 1, 0)`, bottom-right aligned;
- `flex`: the band in the mask_mod, and the block lists narrowed to the band (blocks
  outside it dropped, full blocks it cuts made partial).
Each backend builds a window's masks the first time a layer asks and keeps them for the
batch's other layers (and the backward's recomputation).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.attention.varlen import varlen_attn

from data_contracts.packed_row import (
    Layout,
    PackedRow,
    attention_mask,
    position_ids,
    token_roles,
)
from training.train_config import BACKENDS, Backend


def _sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs: object) -> Tensor:
    """SDPA on (B, T, h, hd) tensors (it wants (B, h, T, hd))."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True, **kwargs
    )
    return out.transpose(1, 2)


@dataclass(frozen=True)
class CausalAttention:
    """Plain causal attention over right-padded single documents (the `padded` layout).

    Padding sits after every real token, so causal masking alone keeps it invisible. Each
    document starts at position 0, so a token's column is its position id and a window is
    the band of columns (col - window, col].
    """

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, window: int | None = None, scale: float | None = None
    ) -> Tensor:
        T = q.shape[1]
        if window is None or window >= T:
            return _sdpa(q, k, v, is_causal=True, scale=scale)
        col = torch.arange(T, device=q.device)
        back = col[:, None] - col[None, :]  # (T, T): how far the key is behind the query
        return _sdpa(q, k, v, attn_mask=(back >= 0) & (back < window), scale=scale)


@dataclass(frozen=True)
class DenseAttention:
    """SDPA with an explicit boolean mask.

    Attributes:
        mask: bool (B, 1, T, T), True where the query may attend the key.
        positions: (B, T) position ids (0 on padding), for sliding windows.
    """

    mask: Tensor
    positions: Tensor
    _windowed: dict[int, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def mask_for(self, window: int | None) -> Tensor:
        """The mask, and'ed with the window's position band (built once per window)."""
        if window is None:
            return self.mask
        if window not in self._windowed:
            pos = self.positions[:, None]  # (B, 1, T)
            band = pos[..., :, None] - pos[..., None, :] < window  # (B, 1, T, T)
            self._windowed[window] = self.mask & band
        return self._windowed[window]

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, window: int | None = None, scale: float | None = None
    ) -> Tensor:
        return _sdpa(q, k, v, attn_mask=self.mask_for(window), scale=scale)


# -----------------------------------------------------------------------------
# The attention problems of a flat batch


@dataclass(frozen=True)
class Segments:
    """Every attention problem of a flat batch (rows concatenated), host-side int64 arrays.

    Problem i: the queries [q_lo, q_lo + q_len) attend the keys [k1_lo, k1_lo + k1_len) ++
    [k2_lo, k2_lo + k2_len) with lower-right causal alignment. A document has k2_len 0 and
    its keys are its queries; a rejected response has k1 = its prompt, k2 = itself. The
    query ranges tile the batch's tokens.
    """

    q_lo: np.ndarray
    q_len: np.ndarray
    k1_lo: np.ndarray
    k1_len: np.ndarray
    k2_lo: np.ndarray
    k2_len: np.ndarray

    @property
    def k_len(self) -> np.ndarray:
        return self.k1_len + self.k2_len

    @property
    def is_document(self) -> np.ndarray:
        return self.k2_len == 0

    def take(self, index: np.ndarray) -> Segments:
        return Segments(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def flat_segments(rows: Sequence[PackedRow], layout: Layout) -> Segments:
    """The attention problems of `rows` (`shared` or `unshared`) concatenated in order.

    Shared pair at s: the document [s, s+P+C), then the rejected queries [s+P+C, s+P+C+R)
    over the prompt [s, s+P) ++ themselves. Unshared pair: the documents [s, s+P+C) and
    [s+P+C, s+2P+C+R).
    """
    offsets = np.cumsum([0] + [r.num_tokens for r in rows[:-1]])
    s, p, c, r = (
        np.concatenate([getattr(row, name).astype(np.int64) for row in rows])
        for name in ("pair_start", "prompt_len", "chosen_len", "rejected_len")
    )
    s = s + np.repeat(offsets, [row.num_pairs for row in rows])
    zero = np.zeros_like(s)
    if layout == "shared":
        second = (s + p + c, r, s, p, s + p + c, r)
    else:
        second = (s + p + c, p + r, s + p + c, p + r, zero, zero)
    first = (s, p + c, s, p + c, zero, zero)
    # Interleave (first, second) per pair so the query ranges stay in token order.
    return Segments(
        *(np.stack([a, b], axis=1).reshape(-1) for a, b in zip(first, second, strict=True))
    )


def _ranges(lo: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Concatenated aranges [lo_i, lo_i + length_i)."""
    starts = np.repeat(lo - np.cumsum(length) + length, length)
    return starts + np.arange(int(length.sum()))


def _key_index(segments: Segments) -> np.ndarray:
    """Flat token index of every key, problem by problem (k1 then k2)."""
    lo = np.stack([segments.k1_lo, segments.k2_lo], axis=1).reshape(-1)
    length = np.stack([segments.k1_len, segments.k2_len], axis=1).reshape(-1)
    return _ranges(lo, length)


def _padded(values: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """(n, width) array of the ragged `values`, each row right-padded with index 0."""
    out = np.zeros((len(lengths), width), dtype=np.int64)
    out[np.arange(width) < lengths[:, None]] = values
    return out


# -----------------------------------------------------------------------------
# segments: a bounded number of SDPA calls on CPU


def length_buckets(lengths: np.ndarray) -> np.ndarray:
    """Bucket of each length: ceil(log2(length)), so a bucket's lengths differ by < 2x."""
    return np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64)


def group_mask(
    causal: bool,
    q_len: np.ndarray,
    k_len: np.ndarray,
    lq: int,
    lk: int,
    window: int | None = None,
) -> np.ndarray | None:
    """bool (n, 1, lq, lk) for one call of n problems, or None where plain causal is exact.

    Key slot b of a problem is its key's position id (`prompt ++ rejected` and documents
    both start at position 0), so a query's position is its own slot in a causal call
    (its queries are its keys) and k_len - q_len + a in a masked one (bottom-right).

    Args:
        causal: the call's query slots are its keys.
        q_len, k_len: (n,) real queries and keys per problem.
        lq, lk: the call's padded query and key lengths.
        window: a sliding window, or None.
    """
    if window is not None and lk <= window:
        window = None  # no key is a window or more behind any query
    if causal and window is None:
        return None  # right padding under a causal mask is invisible to real queries
    a, b = np.arange(lq)[None, :, None], np.arange(lk)[None, None, :]
    ql, kl = q_len[:, None, None], k_len[:, None, None]
    at = a if causal else kl - ql + a  # the query's position
    mask = (b <= at) & (b < kl)
    if window is not None:
        # Padding query slots (at >= kl) keep every real key: no softmax row is empty.
        mask &= (at - b < window) | (at >= kl)
    return mask[:, None]


@dataclass(frozen=True)
class SegmentGroup:
    """One SDPA call: n problems padded to Lq query slots and Lk keys.

    Attributes:
        shape: (n, Lq, Lk).
        causal: the problems' queries are their keys (documents; rejected problems whose
            prompt is shorter than the response).
        q_len, k_len: (n,) host arrays, each problem's real queries and keys.
        mask: bool (n, 1, Lq, Lk) without a window, or None for a causal call.
    """

    shape: tuple[int, int, int]
    causal: bool
    q_len: np.ndarray
    k_len: np.ndarray
    mask: Tensor | None


@dataclass(frozen=True)
class SegmentAttention:
    """The problems grouped into length buckets, one SDPA call per group.

    Attributes:
        groups: the calls.
        q_index, k_index: flat token index of every query / key slot of every group, group
            after group (padding: 0), so one layer gathers q, k and v once each.
        out_index: (T,) for each token of the flat batch, its output's slot in the
            concatenated padded outputs of all groups.
    """

    groups: tuple[SegmentGroup, ...]
    q_index: Tensor
    k_index: Tensor
    out_index: Tensor
    _windowed: dict[int, tuple[Tensor | None, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def masks(self, window: int | None) -> tuple[Tensor | None, ...]:
        """Each call's mask under `window` (built once per window, on the masks' device)."""
        if window is None:
            return tuple(g.mask for g in self.groups)
        if window not in self._windowed:
            device = self.out_index.device
            self._windowed[window] = tuple(
                None if m is None else torch.from_numpy(m).to(device)
                for m in (
                    group_mask(g.causal, g.q_len, g.k_len, g.shape[1], g.shape[2], window)
                    for g in self.groups
                )
            )
        return self._windowed[window]

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, window: int | None = None, scale: float | None = None
    ) -> Tensor:
        qf, kf, vf = q[0], k[0], v[0]  # (T, h, hd): a flat batch is one sequence
        qs = qf[self.q_index].split([n * lq for n, lq, _ in (g.shape for g in self.groups)])
        k_sizes = [n * lk for n, _, lk in (g.shape for g in self.groups)]
        ks, vs = kf[self.k_index].split(k_sizes), vf[self.k_index].split(k_sizes)
        outs = []
        for g, mask, qg, kg, vg in zip(self.groups, self.masks(window), qs, ks, vs, strict=True):
            n, lq, lk = g.shape
            qg, kg, vg = (
                qg.view(n, lq, *qf.shape[1:]),
                kg.view(n, lk, *kf.shape[1:]),
                vg.view(n, lk, *vf.shape[1:]),
            )
            if mask is None:
                out = _sdpa(qg, kg, vg, is_causal=True, scale=scale)
            else:
                out = _sdpa(qg, kg, vg, attn_mask=mask, scale=scale)
            outs.append(out.reshape(n * lq, *out.shape[2:]))
        return torch.cat(outs)[self.out_index][None]  # (1, T, nh, hd)


def segment_attention(segments: Segments, device: torch.device) -> SegmentAttention:
    """Group the problems by kind and key-length bucket and build each call's indices.

    Two kinds of call. Causal: documents, and rejected problems whose prompt is shorter
    than the response, run as a causal document over `prompt ++ rejected` whose prompt
    query slots are computed and dropped: (P+R)^2/2 scores, which beats the masked call's
    R(P+R) when P < R, and needs no mask (the kernel skips the blocks above the diagonal).
    Masked: the other rejected problems, queries over `prompt ++ rejected` keys with a
    small lower-right causal mask. A sliding window keeps these calls and gives them banded
    masks (`group_mask`) the first time a layer asks (`SegmentAttention.masks`).
    """
    causal = segments.is_document | (segments.k1_len < segments.k2_len)
    kinds = np.where(causal, 0, 1)
    buckets = length_buckets(segments.k_len)
    num_tokens = int(segments.q_len.sum())
    out_index = np.empty(num_tokens, dtype=np.int64)
    groups, q_parts, k_parts, slot = [], [], [], 0
    for kind, bucket in sorted(set(zip(kinds.tolist(), buckets.tolist(), strict=True))):
        part = segments.take(np.flatnonzero((kinds == kind) & (buckets == bucket)))
        keys = _padded(_key_index(part), part.k_len, int(part.k_len.max()))
        n, lk = keys.shape
        # A causal call's query slots are its keys; the problem's own queries are the last
        # q_len of them (all of them for a document).
        first = part.k_len - part.q_len if kind == 0 else np.zeros_like(part.q_len)
        lq = lk if kind == 0 else int(part.q_len.max())
        queries = keys if kind == 0 else _padded(_ranges(part.q_lo, part.q_len), part.q_len, lq)
        slots = _ranges(first, part.q_len) + np.repeat(np.arange(n) * lq, part.q_len)
        out_index[_ranges(part.q_lo, part.q_len)] = slot + slots
        slot += n * lq
        # Masked calls: lower-right causal on the real lengths; padded keys invisible;
        # padded query slots see every real key, so no softmax row is empty.
        mask = group_mask(kind == 0, part.q_len, part.k_len, lq, lk)
        groups.append(
            SegmentGroup(
                shape=(n, lq, lk),
                causal=kind == 0,
                q_len=part.q_len,
                k_len=part.k_len,
                mask=None if mask is None else torch.from_numpy(mask).to(device),
            )
        )
        q_parts.append(queries.reshape(-1))
        k_parts.append(keys.reshape(-1))
    return SegmentAttention(
        groups=tuple(groups),
        q_index=torch.from_numpy(np.concatenate(q_parts)).to(device),
        k_index=torch.from_numpy(np.concatenate(k_parts)).to(device),
        out_index=torch.from_numpy(out_index).to(device),
    )


# -----------------------------------------------------------------------------
# varlen: FlashAttention varlen, two calls per layer (CUDA)

VarlenKernel = Callable[..., Tensor]  # the signature of torch's varlen_attn


def gqa_causal_varlen(kernel: VarlenKernel) -> VarlenKernel:
    """`kernel` called as torch 2.13's `varlen_attn` (`window_size=(left, 0)`,
    `enable_gqa=True`, `scale`), whatever its torch: the first releases (2.10) take
    `is_causal` and no `enable_gqa`, so an existing CUDA environment's torch gets repeated
    kv heads and `is_causal=True` (FlashAttention's causal is bottom-right aligned in both);
    a sliding window or a scale it cannot take is refused, naming it."""
    params = inspect.signature(kernel).parameters
    if {"window_size", "enable_gqa", "scale"} <= params.keys():
        return kernel

    def adapted(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *lengths: object,
        window_size: tuple[int, int],
        enable_gqa: bool,
        scale: float | None = None,
    ) -> Tensor:
        assert enable_gqa and window_size[1] == 0, (enable_gqa, window_size)
        if "enable_gqa" not in params and k.shape[1] != q.shape[1]:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        kw: dict[str, object] = {}
        if "window_size" in params:
            kw["window_size"] = window_size
        elif window_size == (-1, 0):
            kw["is_causal"] = True
        else:
            raise RuntimeError(
                "this torch's varlen_attn takes no window_size, which sliding-window layers "
                "need: use torch >= 2.13 for the varlen backend, or backend flex or dense"
            )
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        if scale is not None:
            if "scale" not in params:
                raise RuntimeError("this torch's varlen_attn takes no attention scale")
            kw["scale"] = scale
        return kernel(q, k, v, *lengths, **kw)

    return adapted


TORCH_VARLEN = gqa_causal_varlen(varlen_attn)


@dataclass(frozen=True)
class VarlenCall:
    """One varlen_attn call over gathered tokens.

    Attributes:
        q_index, k_index: flat token index of the call's queries and keys, sequence by
            sequence (None: the keys are the queries).
        cu_seq_q, cu_seq_k: int32 (n + 1,) cumulative sequence lengths.
        max_q, max_k: longest query and key sequence (host ints: no device sync).
    """

    q_index: Tensor
    k_index: Tensor | None
    cu_seq_q: Tensor
    cu_seq_k: Tensor
    max_q: int
    max_k: int


@dataclass(frozen=True)
class VarlenAttention:
    """Documents, then rejected queries over their prompt ++ rejected keys.

    Attributes:
        calls: one call (documents only) or two (documents, rejected).
        out_index: (T,) each token's row in the concatenated outputs of the calls.
        kernel: `varlen_attn` (tests put a CPU emulation of it here).
    """

    calls: tuple[VarlenCall, ...]
    out_index: Tensor
    kernel: VarlenKernel = TORCH_VARLEN

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, window: int | None = None, scale: float | None = None
    ) -> Tensor:
        qf, kf, vf = q[0], k[0], v[0]  # (T, h, hd)
        # FlashAttention's window is (left, right) inclusive, bottom-right aligned: a query
        # sees keys at most `left` slots back, and slots are positions (see module docs).
        window_size = (-1, 0) if window is None else (window - 1, 0)
        outs = []
        for c in self.calls:
            k_index = c.q_index if c.k_index is None else c.k_index
            outs.append(
                self.kernel(
                    qf[c.q_index],
                    kf[k_index],
                    vf[k_index],
                    c.cu_seq_q,
                    c.cu_seq_k,
                    c.max_q,
                    c.max_k,
                    window_size=window_size,  # causal; bottom-right when lengths differ
                    enable_gqa=True,
                    scale=scale,
                )
            )
        return torch.cat(outs)[self.out_index][None]  # (1, T, nh, hd)


def _varlen_call(part: Segments, device: torch.device, documents: bool) -> VarlenCall:
    def cumulative(lengths: np.ndarray) -> Tensor:
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return torch.from_numpy(cu).to(device)

    q_index = torch.from_numpy(_ranges(part.q_lo, part.q_len)).to(device)
    cu_q = cumulative(part.q_len)
    return VarlenCall(
        q_index=q_index,
        k_index=None if documents else torch.from_numpy(_key_index(part)).to(device),
        cu_seq_q=cu_q,
        cu_seq_k=cu_q if documents else cumulative(part.k_len),
        max_q=int(part.q_len.max()),
        max_k=int(part.k_len.max()),
    )


def varlen_attention(segments: Segments, device: torch.device) -> VarlenAttention:
    """The two calls of a flat batch (one when every problem is a document)."""
    docs = np.flatnonzero(segments.is_document)
    rejected = np.flatnonzero(~segments.is_document)
    parts = [(segments.take(docs), True)]
    if len(rejected):
        parts.append((segments.take(rejected), False))
    order = np.concatenate([_ranges(p.q_lo, p.q_len) for p, _ in parts])
    out_index = np.empty_like(order)
    out_index[order] = np.arange(len(order))
    return VarlenAttention(
        calls=tuple(_varlen_call(p, device, documents) for p, documents in parts),
        out_index=torch.from_numpy(out_index).to(device),
    )


# -----------------------------------------------------------------------------
# flex: FlexAttention over a block-sparse mask (CUDA)


@cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    """FlexAttention compiled once per process (the fused kernel; eager materialises T x T).
    Static shapes: batches are padded to the shards' max_len, so one shape serves a run."""
    return torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True)
class FlexBlockAttention:
    """FlexAttention over a block-sparse mask.

    Attributes:
        block_mask: the batch's BlockMask (B, 1, T, T) with the layout's mask_mod.
        windowed: builds the BlockMask under a sliding window (`flex_block_mask(...,
            window)` on the batch's rows).
    """

    block_mask: BlockMask
    windowed: Callable[[int], BlockMask]
    _windowed: dict[int, BlockMask] = field(default_factory=dict, repr=False, compare=False)

    def mask_for(self, window: int | None) -> BlockMask:
        """The block mask under `window` (built once per window)."""
        if window is None:
            return self.block_mask
        if window not in self._windowed:
            self._windowed[window] = self.windowed(window)
        return self._windowed[window]

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, window: int | None = None, scale: float | None = None
    ) -> Tensor:
        if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
            raise RuntimeError(
                "the flex backend trains on CUDA only (FlexAttention has no backward on CPU); "
                "use backend 'segments' or 'dense' on this device"
            )
        fn = _compiled_flex_attention() if q.is_cuda else flex_attention
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        block_mask = self.mask_for(window)
        return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True).transpose(1, 2)


AttentionBackend = (
    CausalAttention | DenseAttention | SegmentAttention | VarlenAttention | FlexBlockAttention
)


# -----------------------------------------------------------------------------
# Building a backend from a batch's metadata


def dense_mask(
    rows: Sequence[PackedRow], layout: Layout, length: int, window: int | None = None
) -> np.ndarray:
    """bool (B, 1, length, length): each row's definition mask (under `window`), zero-padded.

    Padding queries attend to themselves only, so no softmax row is empty (an empty row
    gives NaN, and NaN times a zero gradient is still NaN in the weight gradients).
    """
    mask = np.zeros((len(rows), 1, length, length), dtype=bool)
    for b, row in enumerate(rows):
        n = row.num_tokens
        mask[b, 0, :n, :n] = attention_mask(row, layout, window)
        mask[b, 0, np.arange(n, length), np.arange(n, length)] = True
    return mask


def padded_positions(rows: Sequence[PackedRow], layout: Layout, length: int) -> np.ndarray:
    """int64 (B, length): each row's position ids, zero-padded."""
    positions = np.zeros((len(rows), length), dtype=np.int64)
    for b, row in enumerate(rows):
        positions[b, : row.num_tokens] = position_ids(row, layout)
    return positions


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


def window_block_lists(
    full: Sequence[np.ndarray],
    partial: Sequence[np.ndarray],
    positions: np.ndarray,
    block_size: int,
    window: int,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """A row's (full, partial) key blocks per query block under a sliding window, from its
    lists without one.

    From each block's lowest and highest position id (positions restart per pair, so
    blocks are not ordered by position): a block pair is dropped when every query is a
    window or more past every key (lowest query - highest key >= window), stays full only
    when it was full and every query is within the window of every key (highest query -
    lowest key < window), and is partial (the mask_mod decides per token) otherwise. Exact
    (a superset of the visible blocks, full only where all is visible) but not tight: a
    query block holding the end of chosen and the start of rejected spans both branches'
    positions, and keeps the key blocks either of them could reach.

    Args:
        full, partial: the row's lists without a window (`packed_row.SCHEMA`).
        positions: (T,) the row's position ids.
        block_size: the lists' block size.
        window: the sliding window.
    """
    nb = -(-len(positions) // block_size)
    pad = nb * block_size - len(positions)
    lo = np.pad(positions, (0, pad), constant_values=np.iinfo(np.int64).max)
    hi = np.pad(positions, (0, pad), constant_values=-1)
    lo, hi = lo.reshape(nb, block_size).min(1), hi.reshape(nb, block_size).max(1)  # (nb,)
    new_full, new_partial = [], []
    for qb, (f, p) in enumerate(zip(full, partial, strict=True)):
        blocks = np.concatenate([f, p]).astype(np.int64)
        was_full = np.arange(len(blocks)) < len(f)
        near = lo[qb] - hi[blocks] < window  # some query within the window of some key
        whole = was_full & (hi[qb] - lo[blocks] < window)
        new_full.append(np.sort(blocks[near & whole]).astype(np.int32))
        new_partial.append(np.sort(blocks[near & ~whole]).astype(np.int32))
    return tuple(new_full), tuple(new_partial)


def flex_block_mask(
    rows: Sequence[PackedRow],
    layout: Layout,
    length: int,
    block_size: int,
    device: torch.device,
    window: int | None = None,
) -> BlockMask:
    """The batch's BlockMask from the rows' precomputed block lists.

    Args:
        rows: rows carrying `kv_block_full` / `kv_block_partial` for `block_size`.
        layout: `shared` or `unshared`.
        length: batch length, a multiple of `block_size`.
        block_size: the shards' mask block size.
        device: where the mask lives.
        window: a sliding window: the mask_mod adds the position band and the block
            lists are narrowed to it (`window_block_lists`). None: no window.

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
    full = [r.kv_block_full for r in rows]
    partial = [r.kv_block_partial for r in rows]
    positions = padded_positions(rows, layout, length)
    pos_t = torch.from_numpy(positions).to(device)
    if window is not None:
        lists = [
            window_block_lists(f, p, positions[b, : r.num_tokens], block_size, window)
            for b, (r, f, p) in enumerate(zip(rows, full, partial, strict=True))
        ]
        full, partial = [f for f, _ in lists], [p for _, p in lists]

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        # The definition's rule on per-token roles: same pair, causal, and the key is
        # prompt (kind 0) or in the query's own segment / document. Padding has pair -1.
        same_pair = (pair_t[b, q] == pair_t[b, k]) & (pair_t[b, q] >= 0)
        branch = (kind_t[b, k] == 0) | (kind_t[b, k] == kind_t[b, q])
        visible = same_pair & branch & (k <= q)
        if window is None:
            return visible
        return visible & (pos_t[b, q] - pos_t[b, k] < window)  # the sliding window's band

    q_blocks = length // block_size
    partial_n, partial_idx = _block_lists(partial, q_blocks)
    full_n, full_idx = _block_lists(full, q_blocks)
    return BlockMask.from_kv_blocks(
        partial_n.to(device),
        partial_idx.to(device),
        full_n.to(device),
        full_idx.to(device),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


FLAT_BACKENDS = ("segments", "varlen")  # run on one concatenated sequence per micro-batch


def build_attention(
    backend: Backend,
    rows: Sequence[PackedRow],
    layout: Layout,
    length: int,
    block_size: int,
    device: torch.device,
) -> AttentionBackend:
    """The backend object for one batch of `shared` or `unshared` rows.

    Args:
        backend: a resolved backend name (not `auto`).
        rows, layout: the batch's rows and their layout.
        length: the padded row length (`dense`, `flex`); flat backends ignore it.
        block_size: the shards' mask block size (`flex`).
        device: where the index tensors and masks go.

    Raises:
        ValueError: unknown backend name.
    """
    if backend == "dense":
        return DenseAttention(
            mask=torch.from_numpy(dense_mask(rows, layout, length)).to(device),
            positions=torch.from_numpy(padded_positions(rows, layout, length)).to(device),
        )
    if backend == "segments":
        return segment_attention(flat_segments(rows, layout), device)
    if backend == "varlen":
        return varlen_attention(flat_segments(rows, layout), device)
    if backend == "flex":

        def windowed(window: int | None) -> BlockMask:
            return flex_block_mask(rows, layout, length, block_size, device, window)

        return FlexBlockAttention(windowed(None), windowed=windowed)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
