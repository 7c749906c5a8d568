"""Builders for pipeline tests: preference_pair tables made through the contract, and
random tokenized pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import preference_pair, tokenized_pair
from pipeline import ragged

FIXTURES = Path(__file__).parents[1] / "fixtures"
_TEXT = (
    "the a of to and in is it you that he was for on are with as I his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come "
    "did number sound no most people my over know water than call first who may down side"
)
WORDS = _TEXT.split()


def pair_table(rows: list[tuple[list[dict], str, str]], source: str = "test") -> pa.Table:
    """A validated preference_pair table from (prompt messages, chosen, rejected)."""
    records = [
        {
            "pair_id": preference_pair.make_pair_id(source, prompt, chosen, rejected),
            "source": source,
            "split": "train",
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
        }
        for prompt, chosen, rejected in rows
    ]
    table = pa.Table.from_pylist(records, schema=preference_pair.SCHEMA)
    return preference_pair.CONTRACT.validate(table)


def fixture_pairs() -> pa.Table:
    """The hand-written pairs in tests/fixtures/preference_pairs.jsonl."""
    lines = (FIXTURES / "preference_pairs.jsonl").read_text(encoding="utf-8").splitlines()
    table = pa.Table.from_pylist([json.loads(x) for x in lines], schema=preference_pair.SCHEMA)
    return preference_pair.CONTRACT.validate(table)


def random_text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=max(words, 1)).tolist())


def random_pairs(n: int, seed: int = 0, max_words: int = 40) -> pa.Table:
    """n pairs of random words; some prompts are multi-turn with a system message."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": random_text(rng, int(rng.integers(1, max_words)))}]
        if i % 3 == 0:
            prompt = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": random_text(rng, 3)},
                {"role": "assistant", "content": random_text(rng, 4)},
                *prompt,
            ]
        chosen = random_text(rng, int(rng.integers(1, max_words)))
        rejected = random_text(rng, int(rng.integers(1, max_words)))
        rows.append((prompt, chosen, rejected))
    return pair_table(rows)


def write_pairs(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def tokenized_table(lengths: list[tuple[int, int, int]], seed: int = 0) -> pa.Table:
    """tokenized_pair rows with the given (P, C, R) and random ids; pair ids p0, p1, ..."""
    rng = np.random.default_rng(seed)
    columns = []
    for k in range(3):
        lens = np.array([x[k] for x in lengths], dtype=np.int64)
        values = rng.integers(0, 1000, size=int(lens.sum()), dtype=np.int32)
        columns.append(ragged.list_array(pa.array(values), ragged.offsets_of(lens)))
    ids = pa.array([f"p{i}" for i in range(len(lengths))])
    return pa.Table.from_arrays([ids, *columns], schema=tokenized_pair.SCHEMA)
