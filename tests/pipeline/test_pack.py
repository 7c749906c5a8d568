"""Length policy and packing: properties checked against brute-force definitions.

The central property: in a packed row, what each response token's query may see (by the
packed_row definitions of positions and mask, fed with our metadata) is exactly the
separate sequence `prompt + response[:j+1]`, token for token and position for position.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from data_contracts import tokenized_pair
from data_contracts.packed_row import (
    PackedRow,
    attention_mask,
    pair_tokens,
    position_ids,
    targets,
)
from pipeline import ragged
from pipeline.mask_blocks import row_block_summary
from pipeline.pack import (
    PackConfig,
    TemplateIds,
    apply_length_policy,
    prompt_cuts,
    truncated_lengths,
)
from pipeline.packer import BestFitPacker, RowPacker
from tests.pipeline.factories import tokenized_table

LAYOUTS = ("shared", "unshared", "padded")


def _rows(batches: list[pa.RecordBatch]) -> list[PackedRow]:
    table = pa.Table.from_batches(batches) if batches else None
    if table is None:
        return []
    rows = []
    for r in table.to_pylist():
        rows.append(
            PackedRow(
                input_ids=np.array(r["input_ids"], np.int32),
                pair_start=np.array(r["pair_start"], np.int32),
                prompt_len=np.array(r["prompt_len"], np.int32),
                chosen_len=np.array(r["chosen_len"], np.int32),
                rejected_len=np.array(r["rejected_len"], np.int32),
                pair_ids=tuple(r["pair_ids"]),
                kv_block_full=tuple(np.array(x, np.int32) for x in r["kv_block_full"]),
                kv_block_partial=tuple(np.array(x, np.int32) for x in r["kv_block_partial"]),
            )
        )
    return rows


def _pack(table: pa.Table, layout: str, max_len: int, window: int, block: int):
    packer = RowPacker(layout, max_len, block)
    batches = []
    for start in range(0, table.num_rows, window):
        batches += list(packer.add(table.slice(start, window)))
    batches += list(packer.finish())
    return _rows(batches)


def _brute_force_blocks(row: PackedRow, layout: str, block: int):
    """Per query block: key blocks wholly / partly visible, from the dense mask."""
    mask = attention_mask(row, layout)
    t = len(mask)
    n = -(-t // block)
    padded = np.zeros((n * block, n * block), dtype=bool)
    padded[:t, :t] = mask
    squares = padded.reshape(n, block, n, block).transpose(0, 2, 1, 3).reshape(n, n, -1)
    full, seen = squares.all(-1), squares.any(-1)
    return [np.flatnonzero(f) for f in full], [
        np.flatnonzero(s & ~f) for s, f in zip(seen, full, strict=True)
    ]


lengths = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12))


@given(
    pairs=st.lists(lengths, min_size=1, max_size=25),
    layout=st.sampled_from(LAYOUTS),
    max_len=st.integers(48, 90),  # the largest pair, 2 x 12 + 12 + 12, always fits
    window=st.integers(1, 12),
    block=st.integers(1, 16),
)
def test_packed_rows_reproduce_each_pair_as_two_separate_sequences(
    pairs, layout, max_len, window, block
) -> None:
    table = tokenized_table(pairs)
    rows = _pack(table, layout, max_len, window, block)
    source = {r["pair_id"]: r for r in table.to_pylist()}

    # Every pair appears exactly once; no row exceeds max_len; padded = one pair per row.
    seen = [pid for row in rows for pid in row.pair_ids]
    assert sorted(seen) == sorted(source)
    assert all(row.num_tokens <= max_len for row in rows)
    if layout == "padded":
        assert all(row.num_pairs == 1 for row in rows)

    for row in rows:
        pos = position_ids(row, layout)  # also checks boundaries tile input_ids exactly
        mask = attention_mask(row, layout)
        for i, pid in enumerate(row.pair_ids):
            pair = source[pid]
            s, p = int(row.pair_start[i]), int(row.prompt_len[i])
            c, r = int(row.chosen_len[i]), int(row.rejected_len[i])
            assert (p, c, r) == tuple(
                len(pair[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")
            )
            assert row.input_ids[s : s + p].tolist() == pair["prompt_ids"]
            first_response = s + p
            second_response = s + p + c + (0 if layout == "shared" else p)
            for start, response in (
                (first_response, "chosen_ids"),
                (second_response, "rejected_ids"),
            ):
                sequence = pair["prompt_ids"] + pair[response]
                for j in range(len(pair[response])):
                    q = start + j
                    visible = np.flatnonzero(mask[q])
                    assert row.input_ids[visible].tolist() == sequence[: p + j + 1]
                    assert pos[visible].tolist() == list(range(p + j + 1))
        # Each response token is predicted from exactly the context before it.
        t = targets(row, layout)
        for label, logit in zip(t.label_pos.tolist(), t.logit_pos.tolist(), strict=True):
            context = np.flatnonzero(mask[logit])
            assert pos[label] == pos[logit] + 1 == len(context)
        # The stored block summary is the dense mask's.
        full, partial = _brute_force_blocks(row, layout, block)
        assert [x.tolist() for x in row.kv_block_full] == [x.tolist() for x in full]
        assert [x.tolist() for x in row.kv_block_partial] == [x.tolist() for x in partial]


@given(pairs=st.lists(lengths, min_size=1, max_size=40), layout=st.sampled_from(LAYOUTS))
def test_packing_is_deterministic(pairs, layout) -> None:
    table = tokenized_table(pairs)
    runs = [_pack(table, layout, 60, 7, 8) for _ in range(2)]
    assert [r.input_ids.tolist() for r in runs[0]] == [r.input_ids.tolist() for r in runs[1]]
    assert [r.pair_ids for r in runs[0]] == [r.pair_ids for r in runs[1]]


def _reference_bfd(sizes: list[int], capacity: int) -> list[int]:
    """Textbook best-fit decreasing: sorted loads of the bins."""
    loads: list[int] = []
    for size in sorted(sizes, reverse=True):
        fitting = [i for i, load in enumerate(loads) if load + size <= capacity]
        if fitting:
            best = max(fitting, key=lambda i: loads[i])
            loads[best] += size
        else:
            loads.append(size)
    return sorted(loads)


@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=60))
def test_one_window_is_textbook_best_fit_decreasing(sizes) -> None:
    packer = BestFitPacker(50)
    packer.add(np.array(sizes))
    bins, carried = packer.close(final=True)
    assert len(carried) == 0
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert sorted(sum(sizes[i] for i in b) for b in bins) == _reference_bfd(sizes, 50)


def test_carrying_rows_keeps_the_fill_of_one_big_window() -> None:
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(np.log(400), 0.6, size=6000).astype(np.int64), 3, 4096)

    def rows_needed(window: int, max_carry: int) -> int:
        packer = BestFitPacker(4096, max_carry=max_carry)
        count, carried = 0, 0
        for start in range(0, len(sizes), window):
            packer.add(sizes[start : start + window], first_item=carried)
            bins, kept = packer.close(final=False)
            count, carried = count + len(bins), len(kept)
        return count + len(packer.close(final=True)[0])

    one_window = rows_needed(len(sizes), 512)
    assert rows_needed(500, 512) <= one_window + 1
    # Without carrying, each window leaves its own tail of part-filled rows.
    assert rows_needed(500, 0) > rows_needed(500, 512)
    assert sizes.sum() / (one_window * 4096) > 0.99


@given(
    p=st.integers(1, 300),
    c=st.integers(1, 300),
    r=st.integers(1, 300),
    copies=st.sampled_from([1, 2]),
    max_len=st.integers(3, 400),
    minimum=st.integers(1, 80),
)
def test_truncation_rule(p, c, r, copies, max_len, minimum) -> None:
    p2, c2, r2 = (
        int(x[0])
        for x in truncated_lengths(
            np.array([p]), np.array([c]), np.array([r]), copies, max_len, minimum
        )
    )
    if copies * p + c + r <= max_len:
        assert (p2, c2, r2) == (p, c, r)
        return
    if p2 == 0:  # dropped: not even one prompt token fits next to minimal responses
        assert copies + min(c, minimum) + min(r, minimum) > max_len
        return
    assert copies * p2 + c2 + r2 <= max_len
    assert 1 <= p2 <= p and min(c, minimum) <= c2 <= c and min(r, minimum) <= r2 <= r
    if p2 < p:  # the prompt is cut only once responses are down to their minimum
        assert (c2, r2) == (min(c, minimum), min(r, minimum))
    else:  # responses use the room left by the whole prompt; the longer one is cut first
        assert copies * p + c2 + r2 >= max_len - 1
        if c2 < c and r2 < r:
            assert abs(c2 - r2) <= 1 or min(c2, r2) == minimum


def test_policy_keeps_prompt_end_and_response_starts() -> None:
    table = tokenized_table([(30, 30, 30), (5, 5, 5), (90, 2, 2)])
    config = PackConfig(max_len=40, min_response_len=4)
    result = apply_length_policy(table, config)
    assert (result.truncated, result.too_long) == (2, 0)
    before, after = table.to_pylist(), result.kept.to_pylist()
    for old, new in zip(before, after, strict=True):
        assert (
            new["prompt_ids"]
            == old["prompt_ids"][len(old["prompt_ids"]) - len(new["prompt_ids"]) :]
        )
        assert new["chosen_ids"] == old["chosen_ids"][: len(new["chosen_ids"])]
        assert new["rejected_ids"] == old["rejected_ids"][: len(new["rejected_ids"])]
        assert sum(len(new[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")) <= 40
    assert after[1] == before[1]
    dropped = apply_length_policy(table, PackConfig(max_len=40, too_long="drop"))
    assert (dropped.truncated, dropped.too_long) == (0, 2)
    assert dropped.kept.column("pair_id").to_pylist() == ["p1"]


def test_truncation_budget_counts_the_prompt_twice_without_sharing() -> None:
    table = tokenized_table([(20, 10, 10)])
    shared = apply_length_policy(table, PackConfig(max_len=40, layout="shared"))
    unshared = apply_length_policy(table, PackConfig(max_len=40, layout="unshared"))
    assert shared.truncated == 0
    kept = unshared.kept.to_pylist()[0]
    lens = [len(kept[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    assert unshared.truncated == 1 and pair_tokens(*lens, "unshared") <= 40


def test_row_block_summary_matches_the_packed_columns() -> None:
    rows = _pack(tokenized_table([(9, 4, 7), (3, 3, 3), (20, 1, 5)]), "shared", 64, 10, 8)
    for row in rows:
        full, partial = row_block_summary(row, "shared", 8)
        assert [x.tolist() for x in full] == [x.tolist() for x in row.kv_block_full]
        assert [x.tolist() for x in partial] == [x.tolist() for x in row.kv_block_partial]


def test_a_pair_over_max_len_is_refused_by_the_packer() -> None:
    packer = RowPacker("unshared", 40, 8)
    with pytest.raises(ValueError, match="pair p1 has 41 tokens"):
        list(packer.add(tokenized_table([(5, 5, 5), (11, 7, 12)])))


def test_ragged_gather_matches_slicing() -> None:
    values = np.arange(100)
    starts, lens = np.array([5, 0, 90, 40]), np.array([3, 0, 10, 1])
    expected = np.concatenate([values[s : s + n] for s, n in zip(starts, lens, strict=True)])
    assert ragged.gather(values, starts, lens).tolist() == expected.tolist()


# A Llama-3-shaped prompt in made-up ids: 9 = bos, 1 = a turn's start marker, 2 = "system",
# 3 = "user", 4 = "assistant", 7 = end of turn; 5 6 close the generation prompt.
PROMPT = [
    9,
    1, 2, 50, 51, 7,  # system turn: the head ends at position 6
    1, 3, 60, 61, 62, 7,  # user, starts at 6
    1, 4, 65, 66, 7,  # assistant, starts at 12
    1, 3, 70, 71, 72, 73, 7,  # user, starts at 17
    1, 5, 6,  # generation prompt, starts at 24
]  # fmt: skip
IDS = TemplateIds(turn_start=1, system=(1, 2), generation_starts_turn=True, end_of_turn=7)


def _pairs(rows: list[tuple[list[int], list[int], list[int]]]) -> pa.Table:
    """tokenized_pair rows with these exact ids; pair ids p0, p1, ..."""
    columns = [pa.array([f"p{i}" for i in range(len(rows))])]
    for k in range(3):
        columns.append(pa.array([row[k] for row in rows], pa.list_(pa.int32())))
    return pa.Table.from_arrays(columns, schema=tokenized_pair.SCHEMA)


@pytest.mark.parametrize(
    ("budget", "head", "tail"),
    [
        (27, 0, 0),  # fits: uncut
        (16, 6, 17),  # head + the last user turn and the generation prompt, exactly
        (20, 6, 17),  # the cut moves forward to the next turn start (4 tokens freed)
        (25, 6, 12),  # two whole turns fit
        (15, 6, 18),  # the last message alone does not fit: its first token goes
        (6, 0, 21),  # the head leaves no room: the end only
    ],
)
def test_a_cut_prompt_keeps_its_head_and_its_end_from_a_turn_start(budget, head, tail) -> None:
    values = np.array(PROMPT, np.int32)
    offsets = np.array([0, len(PROMPT)])
    heads, tails = prompt_cuts(values, offsets, np.array([budget]), IDS)
    assert (int(heads[0]), int(tails[0])) == (head, tail)
    kept = PROMPT[:head] + PROMPT[tail:] if budget < len(PROMPT) else PROMPT
    assert len(kept) <= budget and kept[-3:] == [1, 5, 6]
    # Without known turns the prompt keeps its end only (the `plain` template).
    heads, tails = prompt_cuts(values, offsets, np.array([budget]), TemplateIds())
    assert (int(heads[0]), int(tails[0])) == ((0, len(PROMPT) - budget) if budget < 27 else (0, 0))


def test_prompt_cuts_are_per_prompt_in_a_batch() -> None:
    """Turn starts are owned by their prompt: a batch gives each prompt's own cut."""
    short = [9, 1, 3, 80, 7, 1, 5, 6]  # no system turn: the head is the bos alone
    values = np.array(short + PROMPT + short, np.int32)
    offsets = np.array([0, 8, 8 + 27, 8 + 27 + 8])
    heads, tails = prompt_cuts(values, offsets, np.array([8, 16, 5]), IDS)
    # The last short prompt: head 1 (bos) + end from position 4 (no whole turn fits).
    assert heads.tolist() == [0, 6, 1] and tails.tolist() == [0, 17, 4]


def test_policy_cuts_turns_gives_freed_room_to_the_responses_and_counts_one_sided_cuts() -> None:
    """max_len 26, min_response_len 4, shared. Each pair is 27 + C + R > 26.

    Responses first go down to 4 + 4, leaving the prompt 26 - 8 = 18 tokens: head 6, and
    the end from the first turn start at or after 27 - 12 = 15, i.e. 17: 6 + 10 = 16
    tokens. The 2 freed tokens go back to the responses, room 26 - 16 = 10:
    - p0, C=10, R=4: R keeps all 4, C gets 6: only the chosen lost its end -> counted;
    - p1, C=10, R=10: 5 and 5, both lost their ends -> not counted;
    - p2, C=6, R=4 with C ending 7 8 (end of turn, then a newline, as chatml does):
      C keeps 6 (all), R 4: nothing cut in the responses -> not counted.
    """
    chosen = [20 + i for i in range(9)] + [7]
    rows = [
        (PROMPT, chosen, [30, 31, 32, 7]),
        (PROMPT, chosen, [40 + i for i in range(9)] + [7]),
        (PROMPT, [21, 22, 23, 24, 7, 8], [30, 31, 32, 7]),
    ]
    config = PackConfig(max_len=26, min_response_len=4)
    result = apply_length_policy(_pairs(rows), config, IDS)
    kept = result.kept.to_pylist()
    assert (result.truncated, result.too_long, result.one_response_cut) == (3, 0, 1)
    cut_prompt = PROMPT[:6] + PROMPT[17:]
    assert [k["prompt_ids"] for k in kept] == [cut_prompt] * 3
    assert [(len(k["chosen_ids"]), len(k["rejected_ids"])) for k in kept] == [
        (6, 4),
        (5, 5),
        (6, 4),
    ]
    for k, (_, c, r) in zip(kept, rows, strict=True):
        assert k["chosen_ids"] == c[: len(k["chosen_ids"])]
        assert k["rejected_ids"] == r[: len(k["rejected_ids"])]


def test_a_response_cut_after_its_end_of_turn_keeps_it() -> None:
    """C = x x x 7 8 cut by one keeps its end of turn 7: not a one-sided loss; without a
    known end of turn every cut response counts as having lost it."""
    rows = [([9, 1, 5], [21, 22, 23, 7, 8], [30, 7, 8])]
    config = PackConfig(max_len=10, min_response_len=1)
    with_end = apply_length_policy(_pairs(rows), config, IDS)
    assert with_end.kept.to_pylist()[0]["chosen_ids"] == [21, 22, 23, 7]
    assert (with_end.truncated, with_end.one_response_cut) == (1, 0)
    assert apply_length_policy(_pairs(rows), config).one_response_cut == 1


@st.composite
def _turn_prompts(draw: st.DrawFn) -> list[int]:
    """bos, maybe a system turn, 1-5 user/assistant turns, the generation prompt (ids as
    in PROMPT; message words are 50..99)."""
    prompt = [9]
    if draw(st.booleans()):
        prompt += [1, 2, *draw(st.lists(st.integers(50, 99), max_size=6)), 7]
    for turn in range(draw(st.integers(1, 5))):
        role = 3 if turn % 2 == 0 else 4
        prompt += [1, role, *draw(st.lists(st.integers(50, 99), max_size=12)), 7]
    return [*prompt, 1, 5, 6]


@given(prompts=st.lists(_turn_prompts(), min_size=1, max_size=6), data=st.data())
def test_prompt_cuts_keep_the_head_and_an_end_within_the_budget(prompts, data) -> None:
    values = np.array([t for p in prompts for t in p], np.int32)
    offsets = ragged.offsets_of(np.array([len(p) for p in prompts]))
    budget = np.array([data.draw(st.integers(1, len(p))) for p in prompts])
    heads, tails = prompt_cuts(values, offsets, budget, IDS)
    for prompt, b, h, t in zip(
        prompts, budget.tolist(), heads.tolist(), tails.tolist(), strict=True
    ):
        if b == len(prompt):
            assert (h, t) == (0, 0)
            continue
        kept = prompt[:h] + prompt[t:]
        assert 0 <= h < b and h < t and len(kept) <= b
        head = prompt.index(3) - 1  # the first non-system turn starts the end of the head
        assert h in (head, 0) and (h == head) == (head < b)
        # The end is whole turns when it starts at a turn start; else exactly fills.
        assert prompt[t] == 1 or len(kept) == b
        if prompt[t] == 1:  # and then no earlier turn start would have fit
            nominal = len(prompt) - b + h
            assert all(prompt[j] != 1 for j in range(nominal, t))
