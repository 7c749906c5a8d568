"""Steps on threads (`pipeline.ahead`) and the bytes of tokenize and pack with them.

`ahead` runs an iterator's work on a thread of its own, in order; tokenize and pack chain
three such steps. These tests pin what makes that safe: items come in order, an error
comes at its place and nothing is computed after it, a bounded number is held, closing
stops the thread; and the tokenized directory and the shards are the bytes the serial
path (every step in the caller's thread) writes, whatever the read batch, the read-ahead
depth and the number of tokenizer threads.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pytest

from pipeline import pack, packer, tokenize, tokenized
from pipeline.ahead import ahead
from pipeline.pack import PackConfig, build_shards
from pipeline.templates import TemplateError
from pipeline.tokenize import load_tokenizer
from pipeline.tokenized import TokenizeConfig, build_tokenized
from tests.pipeline.factories import fixture_pairs, pair_table, random_pairs, write_pairs

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
CONFIG = TokenizeConfig(boundary_check_pairs=20, bpe_vocab_size=600)
# Small windows, row batches and shards, so packing crosses every boundary many times.
PACK = PackConfig(max_len=256, min_response_len=8, pack_window=24, shard_bytes=4096)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _serial(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Every step in the caller's thread, as before steps ran on threads (for `ahead`)."""
    return iter(items)


def _build(pairs: Path, tokenizer: Path | None, store: Path) -> dict[str, bytes]:
    """Tokenize and pack (what `prefpack pack` runs); every file of the store."""
    result = build_tokenized(pairs, tokenizer, CONFIG, store)
    build_shards(result.directory, PACK, store)
    return _files(store)


@pytest.fixture
def many_pairs(tmp_path: Path) -> Path:
    """The fixture pairs and 150 random ones: many read batches, windows and shards."""
    table = pa.concat_tables([fixture_pairs(), random_pairs(150, seed=11, max_words=80)])
    return write_pairs(tmp_path / "pairs.parquet", table)


# ------------------------------------------------------------------------------ ahead


def test_items_come_in_order_computed_on_another_thread() -> None:
    threads = set()

    def items() -> Iterator[int]:
        for i in range(50):
            threads.add(threading.get_ident())
            yield i

    assert list(ahead(items(), depth=3)) == list(range(50))
    assert threads and threading.get_ident() not in threads


def test_an_error_comes_at_its_place_and_nothing_is_computed_after_it() -> None:
    computed = []

    def items() -> Iterator[int]:
        for i in range(10):
            if i == 4:
                raise ValueError("item 4")
            computed.append(i)
            yield i

    got = []
    with pytest.raises(ValueError, match="item 4"):
        for item in ahead(items(), depth=3):
            got.append(item)
    assert got == computed == [0, 1, 2, 3]


def test_at_most_depth_items_are_held_ahead_of_the_caller() -> None:
    produced = []

    def items() -> Iterator[int]:
        for i in range(20):
            produced.append(i)
            yield i

    iterator = ahead(items(), depth=3)
    assert next(iterator) == 0
    time.sleep(0.2)  # time for the thread to run ahead as far as it may
    # the item taken, plus `depth` computed or in progress
    assert len(produced) <= 1 + 3
    assert list(iterator) == list(range(1, 20))


def test_closing_stops_the_thread_and_closes_the_source() -> None:
    state = {"closed": False, "produced": 0}

    def items() -> Iterator[int]:
        try:
            for i in range(1000):
                state["produced"] += 1
                yield i
        finally:
            state["closed"] = True

    with closing(ahead(items(), depth=2)) as iterator:
        assert next(iterator) == 0
    produced = state["produced"]
    assert state["closed"] and produced <= 1 + 2
    assert not any(t.name.startswith("ahead") for t in threading.enumerate() if t.is_alive())


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_encoding_in_chunks_gives_the_ids_of_one_call(
    chunk: int, tiny_tokenizer_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`encode` sends chunks of ENCODE_CHUNK texts, one ahead of their conversion: the same
    ids and offsets as one encode_batch call, for empty texts and no texts too."""
    tok = load_tokenizer(tiny_tokenizer_path).tokenizer
    texts = [" ".join(["hello", "world"] * i) for i in range(11)]
    monkeypatch.setattr(tokenize, "ENCODE_CHUNK", chunk)
    ids, offsets = tokenize.encode(tok, texts)
    expected = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert ids.dtype == np.int32 and offsets.dtype == np.int64
    assert [ids[a:b].tolist() for a, b in itertools.pairwise(offsets)] == expected
    ids, offsets = tokenize.encode(tok, [])
    assert len(ids) == 0 and offsets.tolist() == [0]


# ------------------------------------------------------------------- bytes of the stages


@pytest.mark.parametrize(
    ("read_batch", "depth", "given"),
    [(1024, 2, True), (7, 1, True), (16, 2, True), (5, 5, True), (7, 2, False)],
)
def test_threaded_steps_write_the_bytes_of_the_serial_path(
    read_batch: int,
    depth: int,
    given: bool,
    many_pairs: Path,
    tiny_tokenizer_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read in batches of `read_batch`: serial (every step in this thread), then threaded
    `depth` ahead, twice: every file of the store is the same bytes, with the tokenizer
    given or trained here (on texts rendered on a thread)."""
    tokenizer = tiny_tokenizer_path if given else None
    monkeypatch.setattr(tokenized, "READ_BATCH", read_batch)
    monkeypatch.setattr(tokenized, "ROW_GROUP", 16)  # several row groups (part of the bytes)
    monkeypatch.setattr(packer, "BATCH_TOKENS", 512)  # a few rows per record batch
    for module in (tokenize, tokenized, pack):
        monkeypatch.setattr(module, "ahead", _serial)
    serial = _build(many_pairs, tokenizer, tmp_path / "serial")

    monkeypatch.setattr(tokenize, "ENCODE_CHUNK", 5)  # several chunks per encode
    for module in (tokenize, tokenized, pack):
        monkeypatch.setattr(module, "ahead", functools.partial(ahead, depth=depth))
    threaded = _build(many_pairs, tokenizer, tmp_path / "threaded")
    again = _build(many_pairs, tokenizer, tmp_path / "again")

    assert sum(name.endswith(".arrow") for name in serial) > 1  # shard boundaries crossed
    assert threaded == serial and again == serial


def test_a_template_error_in_a_later_batch_is_the_serial_error(
    tiny_tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The template raises for one pair of the third read batch: the same error, naming
    that pair, and no directory left, with the steps on threads as without."""
    rows = [([{"role": "user", "content": f"question {i}"}], "yes", "no") for i in range(40)]
    rows[37] = ([{"role": "user", "content": "FORBIDDEN"}], "yes", "no")
    table = pair_table(rows)
    path = write_pairs(tmp_path / "p.parquet", table)
    template = tmp_path / "strict.jinja"
    template.write_text(
        "{% for m in messages %}{% if m.content == 'FORBIDDEN' %}"
        "{{ raise_exception('refused') }}{% endif %}{{ m.content }}{% endfor %}"
    )
    config = dataclasses.replace(CONFIG, template=str(template))
    monkeypatch.setattr(tokenized, "READ_BATCH", 16)
    errors = []
    for name, step in (("serial", _serial), ("threaded", ahead)):
        monkeypatch.setattr(tokenized, "ahead", step)
        with pytest.raises(TemplateError) as caught:
            build_tokenized(path, tiny_tokenizer_path, config, tmp_path / name)
        errors.append(str(caught.value))
        assert list((tmp_path / name / "tokenized").iterdir()) == []
    assert errors[0] == errors[1]
    assert table.column("pair_id")[37].as_py() in errors[0] and "refused" in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "env",
    [{"TOKENIZERS_PARALLELISM": "false"}, {"RAYON_NUM_THREADS": "1"}, {"RAYON_NUM_THREADS": "5"}],
    ids=["library-serial", "one-rayon-thread", "five-rayon-threads"],
)
def test_the_bytes_do_not_depend_on_the_tokenizers_threads(
    env: dict[str, str], many_pairs: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    """A fresh process with the tokenizer's own pool off, or of another size, writes the
    bytes this one does."""
    here = _build(many_pairs, tiny_tokenizer_path, tmp_path / "here")
    script = (
        "import sys; from tests.pipeline.test_ahead import _build; from pathlib import Path; "
        "_build(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))"
    )
    child_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    there = tmp_path / "there"
    command = [sys.executable, "-c", script, str(many_pairs), str(tiny_tokenizer_path), str(there)]
    subprocess.run(command, check=True, cwd=REPO, env=child_env)
    assert _files(there) == here
