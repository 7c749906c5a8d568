"""`packed_row`: one training sequence holding whole preference pairs, plus its mask metadata.

This module is the executable form of the token layout in docs/design.md. The functions
below are the *definition* that every backend (dense, segments, flex) and the pack-time
block summary are tested against; they favour clarity, but are vectorised so the trainer
can use them at collate time.

Layouts (named in the shard manifest):
- `shared`: a pair starting at s is `prompt | chosen | rejected` (P + C + R tokens).
  Positions: prompt 0..P-1, chosen P..P+C-1, rejected P..P+R-1. A prompt token sees
  earlier prompt tokens; a chosen token sees the prompt and earlier chosen tokens; a
  rejected token sees the prompt and earlier rejected tokens, never a chosen token.
- `unshared`: a pair is two documents `prompt | chosen` and `prompt | rejected`
  (2P + C + R tokens), each causal with positions from 0, kept together in one row.
- `padded`: as `unshared`, one pair per row; the trainer splits the row into its two
  documents and pads each batch to its longest sequence, as trainers without packing do.
Nothing ever sees another pair in the same row.

Sliding windows (Mistral, Phi-3, Gemma 3's local layers) are defined on **position ids**: a
query at position p additionally sees only keys at positions > p - window (itself and the
window - 1 positions before it) among those the layout lets it see; transformers' rule
(`kv_idx > q_idx - sliding_window`, FlashAttention's `window_size=(window - 1, 0)`) for every
family it implements. Since a rejected token's keys are `prompt ++ rejected` at positions
0..P+R-1, as in the separate sequence `prompt+rejected`, the window cuts exactly what it cuts
there.

Log-prob targets (shared): chosen token j is predicted by the logits at s+P-1+j; rejected
token 0 by the logits of the last prompt token (s+P-1), rejected token j>0 by s+P+C+j-1.
In the two-document layouts each response token is predicted by the token before it in
its own document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from data_contracts.contract import Contract, described

VERSION = "1"

Layout = Literal["shared", "unshared", "padded"]
LAYOUTS: tuple[Layout, ...] = ("shared", "unshared", "padded")
DEFAULT_BLOCK_SIZE = 128

_i32 = pa.list_(pa.int32())
SCHEMA = pa.schema(
    [
        described("input_ids", _i32, "token ids of the whole row, no padding stored"),
        described("pair_start", _i32, "per pair: offset of its first token in the row"),
        described("prompt_len", _i32, "per pair: P, prompt tokens (>= 1)"),
        described("chosen_len", _i32, "per pair: C, chosen tokens incl. end of turn (>= 1)"),
        described("rejected_len", _i32, "per pair: R, rejected tokens incl. end of turn (>= 1)"),
        described("pair_ids", pa.list_(pa.string()), "per pair: preference_pair.pair_id"),
        described(
            "kv_block_full",
            pa.list_(_i32),
            "per query block: key blocks whose whole square is visible (FlexAttention full "
            "blocks), over the row padded to a multiple of the manifest's mask_block_size",
        ),
        described(
            "kv_block_partial",
            pa.list_(_i32),
            "per query block: key blocks that are partly visible (need the mask_mod)",
        ),
    ],
    metadata={"contract": "packed_row", "version": VERSION},
)

CONTRACT = Contract(name="packed_row", version=VERSION, schema=SCHEMA)


@dataclass(frozen=True)
class PackedRow:
    """One packed row as numpy arrays (views into the shard where the reader can).

    Attributes:
        input_ids: int32 [T].
        pair_start, prompt_len, chosen_len, rejected_len: int32 [N], one entry per pair.
        pair_ids: N pair ids.
        kv_block_full, kv_block_partial: per query block, int32 arrays of key block
            indices (see SCHEMA); empty tuples when not loaded.
    """

    input_ids: np.ndarray
    pair_start: np.ndarray
    prompt_len: np.ndarray
    chosen_len: np.ndarray
    rejected_len: np.ndarray
    pair_ids: tuple[str, ...]
    kv_block_full: tuple[np.ndarray, ...] = ()
    kv_block_partial: tuple[np.ndarray, ...] = ()

    @property
    def num_pairs(self) -> int:
        return len(self.pair_start)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def pair_tokens(
    prompt_len: np.ndarray | int,
    chosen_len: np.ndarray | int,
    rejected_len: np.ndarray | int,
    layout: Layout,
) -> np.ndarray | int:
    """Tokens a pair occupies in a row under `layout` (P+C+R shared, 2P+C+R otherwise)."""
    if layout == "shared":
        return prompt_len + chosen_len + rejected_len
    return 2 * prompt_len + chosen_len + rejected_len


def _segments(row: PackedRow, layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous segments of the row: (length, first position id, segment kind).

    Kinds: 0 prompt, 1 chosen, 2 rejected (shared); 3 prompt+chosen doc, 4 prompt+rejected
    doc (two-document layouts). Segments are in row order and tile the row exactly.
    """
    p, c, r = (a.astype(np.int64) for a in (row.prompt_len, row.chosen_len, row.rejected_len))
    n = len(p)
    if layout == "shared":
        lengths = np.stack([p, c, r], axis=1).reshape(-1)
        first_pos = np.stack([np.zeros(n, np.int64), p, p], axis=1).reshape(-1)
        kinds = np.tile(np.array([0, 1, 2]), n)
    else:
        lengths = np.stack([p + c, p + r], axis=1).reshape(-1)
        first_pos = np.zeros(2 * n, np.int64)
        kinds = np.tile(np.array([3, 4]), n)
    expected_start = np.concatenate([[0], np.cumsum(pair_tokens(p, c, r, layout))[:-1]])
    if not np.array_equal(expected_start, row.pair_start.astype(np.int64)):
        raise ValueError("pair_start is not the running sum of pair lengths for " + layout)
    if int(lengths.sum()) != row.num_tokens:
        raise ValueError(
            f"pairs cover {int(lengths.sum())} tokens but the row holds {row.num_tokens}"
        )
    return lengths, first_pos, kinds


def position_ids(row: PackedRow, layout: Layout) -> np.ndarray:
    """int64 [T] position ids per the layout rules (prompt from 0, responses after it)."""
    lengths, first_pos, _ = _segments(row, layout)
    token_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.arange(row.num_tokens, dtype=np.int64) - np.repeat(token_start - first_pos, lengths)


def token_roles(row: PackedRow, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Per token: (pair index, segment kind) as defined in `_segments`."""
    lengths, _, kinds = _segments(row, layout)
    per_pair = 3 if layout == "shared" else 2
    pair_of_segment = np.arange(len(lengths)) // per_pair
    return np.repeat(pair_of_segment, lengths), np.repeat(kinds, lengths)


def attention_mask(row: PackedRow, layout: Layout, window: int | None = None) -> np.ndarray:
    """bool [T, T], True where query q may attend key k: the brute-force definition.

    Args:
        row, layout: the row and its layout.
        window: a sliding window (see the module docstring): keys whose position id is
            `window` or more below the query's are invisible too. None: no window.
    """
    pair, kind = token_roles(row, layout)
    q = np.arange(row.num_tokens)[:, None]
    k = np.arange(row.num_tokens)[None, :]
    same_pair = pair[:, None] == pair[None, :]
    causal = k <= q
    if layout == "shared":
        # A key is visible if it is prompt, or in the query's own segment.
        visible = same_pair & causal & ((kind[None, :] == 0) | (kind[None, :] == kind[:, None]))
    else:
        visible = same_pair & causal & (kind[:, None] == kind[None, :])
    if window is not None:
        if window < 1:
            raise ValueError(f"sliding window must be >= 1, got {window}")
        pos = position_ids(row, layout)
        visible &= pos[:, None] - pos[None, :] < window
    return visible


@dataclass(frozen=True)
class Targets:
    """Where each response token's log-prob comes from, for one row.

    Attributes:
        label_pos: int64 [M], row position of the predicted token.
        logit_pos: int64 [M], row position whose logits predict it.
        pair: int64 [M], index of the pair within the row.
        chosen: bool [M], True for chosen tokens, False for rejected.
    """

    label_pos: np.ndarray
    logit_pos: np.ndarray
    pair: np.ndarray
    chosen: np.ndarray


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated aranges: (owner index, offset j within its range)."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    offset = np.arange(int(lengths.sum())) - np.repeat(
        np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths
    )
    return owner, offset


def targets(row: PackedRow, layout: Layout) -> Targets:
    """The log-prob gather positions of every chosen and rejected token (the rules of
    docs/design.md)."""
    s, p, c, r = (
        a.astype(np.int64)
        for a in (row.pair_start, row.prompt_len, row.chosen_len, row.rejected_len)
    )
    c_pair, j = _ranges(s, c)
    c_label = s[c_pair] + p[c_pair] + j
    c_logit = c_label - 1
    r_pair, j = _ranges(s, r)
    if layout == "shared":
        r_label = s[r_pair] + p[r_pair] + c[r_pair] + j
        # Rejected token 0 is predicted by the last prompt token, not the last chosen one.
        r_logit = np.where(j == 0, s[r_pair] + p[r_pair] - 1, r_label - 1)
    else:
        r_label = s[r_pair] + p[r_pair] + c[r_pair] + p[r_pair] + j
        r_logit = r_label - 1
    return Targets(
        label_pos=np.concatenate([c_label, r_label]),
        logit_pos=np.concatenate([c_logit, r_logit]),
        pair=np.concatenate([c_pair, r_pair]),
        chosen=np.concatenate([np.ones(len(c_pair), bool), np.zeros(len(r_pair), bool)]),
    )
