"""K-fold splits of packed pairs, and the pairs of some folds packed again into rows.

Difficulty scoring (`training/difficulty.py`, after Selective DPO) trains one model per fold
on the other folds' pairs and scores the fold's own pairs with it, so every pair is scored
by a model that never saw it. Here, torch-free:

- `assign_folds`: fold of each pair id. The ids are ordered by a seeded hash of the id
  alone and dealt round-robin, so the folds are disjoint, cover every pair, differ in size
  by at most one (none is empty when there are at least k pairs), and do not depend on the
  order the pairs come in. They do depend on the set of ids: a new pair moves others, as
  any balanced split must (the shard key changes then too, so nothing stale is reused).
- `unpack_pairs`: the `tokenized_pair` rows inside packed rows, exactly as packed (after the
  length policy), read back from the token layout of `data_contracts.packed_row`.
- `pack_pairs`: pairs packed again by the pack stage's own packer (`pipeline.pack.RowPacker`,
  same layout, max_len and block size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from data_contracts import packed_row, tokenized_pair
from data_contracts.packed_row import Layout
from pipeline import ragged
from pipeline.io import rechunk
from pipeline.pack import RowPacker


def assign_folds(pair_ids: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """The fold (0..k-1) of each pair id, in the order given.

    Args:
        pair_ids: unique pair ids.
        k: number of folds (>= 2).
        seed: salts the hash: another seed, another split.

    Returns:
        int64 fold per id.

    Raises:
        ValueError: k < 2, or a pair id given twice (it would sit in two folds).
    """
    if k < 2:
        raise ValueError(f"folds must be at least 2, got {k}")
    ids = list(pair_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("pair ids must be unique to split them into folds")
    salt = seed.to_bytes(8, "little", signed=False)
    # One hash per id: Python at the id boundary (about a microsecond each); the digest is
    # stable across machines and versions, unlike a dataframe library's row hash.
    digests = [
        hashlib.blake2b(pid.encode("utf-8"), digest_size=8, salt=salt).digest() for pid in ids
    ]
    order = sorted(range(len(ids)), key=lambda i: (digests[i], ids[i]))
    folds = np.empty(len(ids), dtype=np.int64)
    folds[order] = np.arange(len(ids)) % k
    return folds


def unpack_pairs(rows: pa.Table, layout: Layout) -> pa.Table:
    """The pairs of `packed_row` rows as `tokenized_pair` rows, in row order.

    Shared rows hold `prompt | chosen | rejected`; unshared and padded rows hold
    `prompt | chosen | prompt | rejected` (the second prompt copy is skipped).
    """
    tokens, row_offsets = ragged.list_parts(rows.column("input_ids"))
    starts, pair_offsets = ragged.list_parts(rows.column("pair_start"))
    p, c, r = (
        ragged.list_parts(rows.column(name))[0].astype(np.int64)
        for name in ("prompt_len", "chosen_len", "rejected_len")
    )
    owner_row = np.repeat(np.arange(len(pair_offsets) - 1), np.diff(pair_offsets))
    start = row_offsets[owner_row] + starts.astype(np.int64)
    rejected_start = start + p + c if layout == "shared" else start + 2 * p + c
    columns = [
        ragged.list_array(pa.array(ragged.gather(tokens, s, n)), ragged.offsets_of(n))
        for s, n in ((start, p), (start + p, c), (rejected_start, r))
    ]
    ids = rows.column("pair_ids").combine_chunks().flatten()
    return pa.Table.from_arrays([ids, *columns], schema=tokenized_pair.SCHEMA)


def pack_pairs(
    pairs: pa.Table, layout: Layout, max_len: int, block_size: int, window: int
) -> pa.Table:
    """`tokenized_pair` rows (each within max_len) packed into `packed_row` rows as the pack
    stage packs them, `window` pairs at a time (`PackConfig.pack_window`); the trainer takes
    them as `pipeline.shards.table_rows`."""
    packer = RowPacker(layout, max_len, block_size)
    batches = [b for part in rechunk([pairs], window) for b in packer.add(part)]
    batches += packer.finish()
    return pa.Table.from_batches(batches, schema=packed_row.SCHEMA)
