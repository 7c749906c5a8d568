"""K-fold splits of pair ids, and pairs unpacked from packed rows and packed again."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from data_contracts.packed_row import LAYOUTS, pair_tokens
from pipeline.pack import PackConfig, apply_length_policy, build_shards, template_ids
from pipeline.shards import assign_folds, open_shards, pack_pairs, table_rows, unpack_pairs
from pipeline.tokenized import TOKENIZED, TokenizeConfig, build_tokenized
from tests.pipeline.factories import tokenized_table

pair_id_sets = st.sets(st.text(min_size=1, max_size=12), min_size=1, max_size=60)


@given(ids=pair_id_sets, k=st.integers(2, 7), seed=st.integers(0, 2**32), shuffle=st.randoms())
def test_folds_partition_the_ids_evenly_whatever_their_order(ids, k, seed, shuffle) -> None:
    """The held-out sets of the k folds are disjoint and together hold every id; sizes
    differ by at most one (no empty fold once there are k ids); the fold of an id does not
    depend on the order the ids come in."""
    ordered = sorted(ids)
    folds = assign_folds(ordered, k, seed)
    held_out = [{pid for pid, f in zip(ordered, folds, strict=True) if f == i} for i in range(k)]
    assert set().union(*held_out) == ids
    assert sum(len(h) for h in held_out) == len(ids)  # no id in two folds
    sizes = [len(h) for h in held_out]
    assert max(sizes) - min(sizes) <= 1
    if len(ids) >= k:
        assert min(sizes) >= 1
    reordered = list(ordered)
    shuffle.shuffle(reordered)
    again = dict(zip(reordered, assign_folds(reordered, k, seed), strict=True))
    assert again == dict(zip(ordered, folds.tolist(), strict=True))


def test_another_seed_gives_another_split() -> None:
    ids = [f"pair{i}" for i in range(200)]
    assert not np.array_equal(assign_folds(ids, 5, seed=0), assign_folds(ids, 5, seed=1))
    assert np.array_equal(assign_folds(ids, 5, seed=1), assign_folds(ids, 5, seed=1))


def test_duplicate_ids_and_one_fold_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        assign_folds(["a", "b", "a"], 2)
    with pytest.raises(ValueError, match="at least 2"):
        assign_folds(["a", "b"], 1)


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by("pair_id")


@given(
    lengths=st.lists(
        st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(1, 20)),
        min_size=1,
        max_size=40,
    ),
    layout=st.sampled_from(LAYOUTS),
    window=st.integers(1, 50),
)
def test_pairs_packed_then_unpacked_are_the_same_pairs(lengths, layout, window) -> None:
    pairs = tokenized_table(lengths, seed=len(lengths))
    longest = max(int(pair_tokens(p, c, r, layout)) for p, c, r in lengths)
    rows = pack_pairs(pairs, layout, max_len=longest + 7, block_size=8, window=window)
    assert all(row.num_tokens <= longest + 7 for row in table_rows(rows))
    assert _sorted(unpack_pairs(rows, layout)).equals(_sorted(pairs))


@pytest.mark.parametrize("layout", ["shared", "unshared"])
def test_unpacking_shards_gives_the_pairs_as_packed(
    pairs_path, tiny_tokenizer_path, tmp_path, layout
) -> None:
    """Read back from shards written by the pack stage, with a max_len that truncates some
    pairs: exactly the tokenized pairs after the length policy."""
    store = tmp_path / "store"
    tokenized = build_tokenized(pairs_path, tiny_tokenizer_path, TokenizeConfig(), store)
    config = PackConfig(layout=layout, max_len=96, min_response_len=8, mask_block_size=16)
    shards = open_shards(build_shards(tokenized.directory, config, store).directory)
    ids = template_ids(tokenized.directory, tokenized.report)
    policy = apply_length_policy(pq.read_table(tokenized.directory / TOKENIZED), config, ids)
    assert policy.truncated > 0  # the case where the packed pairs differ from the tokenized
    unpacked = unpack_pairs(shards.table, layout)
    assert _sorted(unpacked).equals(_sorted(policy.kept.cast(unpacked.schema)))
    # Packed again in another order, by the same packer: the same pairs.
    shuffled = unpacked.take(random.Random(0).sample(range(unpacked.num_rows), unpacked.num_rows))
    again = pack_pairs(shuffled, layout, config.max_len, config.mask_block_size, window=8)
    assert _sorted(unpack_pairs(again, layout)).equals(_sorted(unpacked))
