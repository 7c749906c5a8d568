"""Random preference pairs and packed rows built by hand, for the training tests.

Rows are built directly from token lists (the packer lives in `pipeline/`), following the
layouts of `data_contracts.packed_row`; the block lists come from the brute-force mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from data_contracts.packed_row import Layout, PackedRow, attention_mask

Pair = tuple[np.ndarray, np.ndarray, np.ndarray]  # prompt, chosen, rejected token ids

# Token ids 0..3 play the chat-template roles of a multi-turn prompt.
BOS, USER, ASSISTANT, END_OF_TURN = 0, 1, 2, 3


def multi_turn_prompt(rng: np.random.Generator, vocab: int, turns: int) -> np.ndarray:
    """`<bos> (<user> text <eot> <assistant> text <eot>)* <user> text <eot> <assistant>`."""
    parts = [[BOS]]
    for turn in range(2 * turns - 1):
        role = USER if turn % 2 == 0 else ASSISTANT
        parts.append([role, *rng.integers(4, vocab, rng.integers(1, 6)), END_OF_TURN])
    parts.append([ASSISTANT])
    return np.concatenate(parts).astype(np.int32)


def random_pairs(rng: np.random.Generator, n: int, vocab: int) -> list[Pair]:
    """`n` pairs with multi-turn prompts and responses of 1..8 tokens ending in <eot>."""
    pairs = []
    for _ in range(n):
        prompt = multi_turn_prompt(rng, vocab, turns=int(rng.integers(1, 4)))
        chosen, rejected = (
            np.append(rng.integers(4, vocab, rng.integers(0, 8)), END_OF_TURN).astype(np.int32)
            for _ in range(2)
        )
        pairs.append((prompt, chosen, rejected))
    return pairs


def block_lists(
    row: PackedRow, layout: Layout, block_size: int
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """(full, partial) key blocks per query block, from the definition mask."""
    n = row.num_tokens
    nb = -(-n // block_size)
    mask = np.zeros((nb * block_size, nb * block_size), dtype=bool)
    mask[:n, :n] = attention_mask(row, layout)
    blocks = mask.reshape(nb, block_size, nb, block_size).transpose(0, 2, 1, 3)
    full, seen = blocks.all(axis=(2, 3)), blocks.any(axis=(2, 3))
    return (
        tuple(np.flatnonzero(f).astype(np.int32) for f in full),
        tuple(np.flatnonzero(p).astype(np.int32) for p in seen & ~full),
    )


def pack(
    pairs: Sequence[Pair],
    layout: Layout,
    pairs_per_row: int,
    block_size: int | None = None,
    first_id: int = 0,
) -> list[PackedRow]:
    """Rows of `pairs_per_row` consecutive pairs in `layout` (padded: one pair per row);
    pair k is named `pair-{first_id + k}`."""
    per_row = 1 if layout == "padded" else pairs_per_row
    rows = []
    for first in range(0, len(pairs), per_row):
        group = pairs[first : first + per_row]
        if layout == "shared":
            pieces = [np.concatenate([p, c, r]) for p, c, r in group]
        else:
            pieces = [np.concatenate([p, c, p, r]) for p, c, r in group]
        sizes = np.array([len(x) for x in pieces])
        row = PackedRow(
            input_ids=np.concatenate(pieces).astype(np.int32),
            pair_start=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32),
            prompt_len=np.array([len(p) for p, _, _ in group], np.int32),
            chosen_len=np.array([len(c) for _, c, _ in group], np.int32),
            rejected_len=np.array([len(r) for _, _, r in group], np.int32),
            pair_ids=tuple(f"pair-{first_id + first + i}" for i in range(len(group))),
        )
        if block_size is not None:
            full, partial = block_lists(row, layout, block_size)
            row = PackedRow(**{**row.__dict__, "kv_block_full": full, "kv_block_partial": partial})
        rows.append(row)
    return rows


def separate_logps(model: torch.nn.Module, pairs: Sequence[Pair]) -> tuple[torch.Tensor, ...]:
    """The oracle: (chosen, rejected) summed log-probs from the two separate sequences
    `prompt+chosen` and `prompt+rejected`, each run alone with plain causal attention."""
    from training.attention import CausalAttention

    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    for prompt, chosen, rejected in pairs:
        for name, response in (("chosen", chosen), ("rejected", rejected)):
            ids = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))[None]
            ids = ids.to(device)
            pos = torch.arange(ids.shape[1], device=device)[None]
            logp = model(ids, pos, CausalAttention())[0].float().log_softmax(-1)
            p = len(prompt)
            labels = ids[0, p:]
            out[name].append(logp[p - 1 : -1].gather(-1, labels[:, None]).sum())
    return torch.stack(out["chosen"]), torch.stack(out["rejected"])


def varied_rows(
    seed: int,
    layout: Layout,
    vocab: int = 512,
    pairs_per_row: Sequence[int] = (1, 4, 2, 3) * 3,
    block_size: int | None = None,
) -> list[PackedRow]:
    """Rows holding 1 to 4 pairs each (30 pairs by default), for training tests: rows differ
    in how many pairs they hold, which is what the loss normalisation must get right."""
    pairs = random_pairs(np.random.default_rng(seed), sum(pairs_per_row), vocab)
    rows, first = [], 0
    for size in pairs_per_row:
        rows.extend(pack(pairs[first : first + size], layout, size, block_size, first))
        first += size
    return rows
