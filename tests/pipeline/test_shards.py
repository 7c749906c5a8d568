"""build_shards and the shard directory: reuse, cache keys, verification, atomicity,
byte-identical output, other readers, and the exported tokenizer."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from data_contracts import packed_row, preference_pair
from data_contracts.contract import ContractError
from pipeline import pack
from pipeline.pack import PackConfig, build_shards
from pipeline.shards import MANIFEST, ShardError, ShardWriter, open_shards
from pipeline.tokenize import train_tokenizer
from tests.pipeline.factories import (
    fixture_pairs,
    pair_table,
    random_pairs,
    tokenized_table,
    write_pairs,
)

SMALL = PackConfig(max_len=256, mask_block_size=16, pack_window=16, boundary_check_pairs=8)


@pytest.fixture
def pairs_path(tmp_path: Path) -> Path:
    table = pa.concat_tables([fixture_pairs(), random_pairs(60, seed=7)])
    return write_pairs(tmp_path / "pairs.parquet", table)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_reader_returns_the_packed_pairs_as_zero_copy_views(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    result = build_shards(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    assert not result.reused and result.directory == tmp_path / "store" / "shards" / result.key
    reader = open_shards(result.directory)
    stats = reader.manifest["stats"]
    assert (reader.layout, reader.max_len, reader.block_size, reader.key) == (
        "shared",
        256,
        16,
        result.key,
    )
    assert len(reader) == stats["rows"] == len(list(reader))
    pair_ids = [pid for row in reader for pid in row.pair_ids]
    source_ids = pa.parquet.read_table(pairs_path).column("pair_id").to_pylist()
    assert sorted(pair_ids) == sorted(source_ids) and stats["pairs"] == len(source_ids)
    assert stats["tokens"] == int(reader.row_tokens.sum())
    assert stats["fill_ratio"] == pytest.approx(stats["tokens"] / (len(reader) * 256))

    row = reader[-1]
    buffer = reader.table.column("input_ids").chunks[-1].values.to_numpy()
    assert np.shares_memory(row.input_ids, buffer) and not row.input_ids.flags.owndata
    assert row.input_ids.dtype == np.int32 and len(row.kv_block_full) == -(-row.num_tokens // 16)
    with pytest.raises(IndexError):
        reader[len(reader)]


def test_shards_open_with_datasets_and_polars(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    result = build_shards(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    reader = open_shards(result.directory)
    expected = [row.input_ids.tolist() for row in reader]
    shard_files = [result.directory / s["file"] for s in reader.manifest["shards"]]
    from_datasets = [
        ids for f in shard_files for ids in datasets.Dataset.from_file(str(f))["input_ids"]
    ]
    from_polars = [ids for f in shard_files for ids in pl.read_ipc_stream(f)["input_ids"].to_list()]
    assert from_datasets == expected == from_polars


def test_second_call_reuses_and_rewrites_nothing(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    first = build_shards(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first.directory.iterdir()}
    second = build_shards(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    assert second.reused and second.key == first.key and second.directory == first.directory
    assert stamps == {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in second.directory.iterdir()
    }
    assert second.manifest == first.manifest


CHANGED = {
    "layout": "unshared",
    "max_len": 200,
    "too_long": "drop",
    "min_response_len": 8,
    "template": "llama3",
    "mask_block_size": 32,
    "pack_window": 17,
    "shard_bytes": 4096,
    "bpe_vocab_size": 500,
    "boundary_check_pairs": 3,
}


def test_every_config_field_is_in_the_key() -> None:
    assert set(CHANGED) == {f.name for f in dataclasses.fields(PackConfig)}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_key_changes_with_each_config_field(field: str, tiny_tokenizer_path: Path) -> None:
    from pipeline.templates import resolve_template
    from pipeline.tokenize import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_path)
    changed = dataclasses.replace(SMALL, **{field: CHANGED[field]})
    keys = {
        pack.cache_key("abc", tok, resolve_template(c.template, None), c) for c in (SMALL, changed)
    }
    assert len(keys) == 2


def test_key_changes_with_tokenizer_template_and_data(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    base = build_shards(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "s").key
    other_tok = tmp_path / "other.json"
    other_tok.write_bytes(
        train_tokenizer(
            ["other words entirely"] * 20, 300, pack.resolve_template("chatml", None)
        ).json_bytes
    )
    template = tmp_path / "mine.jinja"
    template.write_text(pack.resolve_template("chatml", None).source + "{{ '' }}")
    other_pairs = write_pairs(tmp_path / "other.parquet", random_pairs(10, seed=99))
    keys = {
        base,
        build_shards(pairs_path, other_tok, SMALL, tmp_path / "s").key,
        build_shards(
            pairs_path,
            tiny_tokenizer_path,
            dataclasses.replace(SMALL, template=str(template)),
            tmp_path / "s",
        ).key,
        build_shards(other_pairs, tiny_tokenizer_path, SMALL, tmp_path / "s").key,
        build_shards(pairs_path, None, SMALL, tmp_path / "s").key,
    }
    assert len(keys) == 5


@pytest.mark.parametrize("victim", ["shard", "tokenizer"])
def test_a_flipped_byte_is_detected_and_rebuilt(
    victim: str, pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    result = build_shards(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    name = result.manifest["shards"][0]["file"] if victim == "shard" else "tokenizer.json"
    path = result.directory / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=name):
        open_shards(result.directory)
    open_shards(result.directory, verify=False)  # same size, so only the hash can tell
    again = build_shards(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    assert not again.reused and again.key == result.key
    assert len(open_shards(again.directory)) == result.manifest["stats"]["rows"]


def test_missing_or_broken_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=MANIFEST):
        open_shards(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"contract": "manifest"}))
    with pytest.raises(ShardError, match="lacks"):
        open_shards(tmp_path)


def test_an_exception_mid_write_leaves_no_directory(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = ShardWriter.write

    def failing_write(self: ShardWriter, batch: pa.RecordBatch) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        original(self, batch)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    monkeypatch.setattr(pack, "BATCH_TOKENS", 512)  # many small batches
    config = dataclasses.replace(SMALL, shard_bytes=1)  # and a file per batch
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_shards(pairs_path, tiny_tokenizer_path, config, tmp_path / "store")
    assert calls["n"] == 2
    assert list((tmp_path / "store" / "shards").iterdir()) == []


@pytest.mark.parametrize("tokenizer", ["tiny", None])
@pytest.mark.parametrize("layout", ["shared", "unshared", "padded"])
def test_same_input_gives_byte_identical_directories(
    layout: str,
    tokenizer: str | None,
    pairs_path: Path,
    tiny_tokenizer_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tok = tiny_tokenizer_path if tokenizer else None
    monkeypatch.setattr(pack, "BATCH_TOKENS", 2048)  # several batches and shards
    config = dataclasses.replace(SMALL, layout=layout, bpe_vocab_size=400, shard_bytes=8192)
    a = build_shards(pairs_path, tok, config, tmp_path / "a")
    b = build_shards(pairs_path, tok, config, tmp_path / "b")
    assert a.key == b.key and not b.reused
    assert len(a.manifest["shards"]) > 1
    assert _files(a.directory) == _files(b.directory)


def test_shards_are_bounded_and_read_back_in_order(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pack, "BATCH_TOKENS", 1024)  # 4 rows of 256 per record batch
    config = dataclasses.replace(SMALL, shard_bytes=8192)
    many = build_shards(pairs_path, tiny_tokenizer_path, config, tmp_path / "many")
    one = build_shards(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "one")
    shards = many.manifest["shards"]
    assert len(shards) > 2
    # A shard closes after the batch that passes shard_bytes: bounded by it + one batch.
    batch_bytes = 4 * 256 * 4 * 3
    assert all(s["bytes"] <= 8192 + batch_bytes for s in shards)
    rows = [r.input_ids.tolist() for r in open_shards(many.directory)]
    assert rows == [r.input_ids.tolist() for r in open_shards(one.directory)]


def test_row_accounting_counts_every_drop(tiny_tokenizer_path: Path, tmp_path: Path) -> None:
    """Responses that render to nothing and pairs too long to fit are counted by reason."""
    long = "word " * 400
    table = pair_table(
        [
            ([{"role": "user", "content": "hi"}], "fine", "also fine"),
            ([{"role": "user", "content": "hi"}], "", "empty chosen"),
            ([{"role": "user", "content": long}], "x", "y"),
        ]
    )
    path = write_pairs(tmp_path / "p.parquet", table)
    template = tmp_path / "bare.jinja"  # no end of turn: an empty response has no tokens
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    config = dataclasses.replace(SMALL, template=str(template), too_long="drop", max_len=64)
    stats = build_shards(path, tiny_tokenizer_path, config, tmp_path / "s").manifest["stats"]
    assert stats["pairs_in"] == 3 and stats["pairs"] == 1
    assert stats["dropped"] == {"empty_chosen_ids": 1, "too_long": 1}


def test_bad_input_names_the_file_and_rows(tiny_tokenizer_path: Path, tmp_path: Path) -> None:
    table = random_pairs(5)
    prompts = table.column("prompt").to_pylist()
    prompts[3] = [{"role": "assistant", "content": "no user turn"}]
    broken = table.set_column(
        table.schema.get_field_index("prompt"),
        "prompt",
        pa.array(prompts, preference_pair.SCHEMA.field("prompt").type),
    )
    path = write_pairs(tmp_path / "broken.parquet", broken)
    with pytest.raises(ContractError, match=r"broken.parquet \(rows 0..4\).*no_user_turn"):
        build_shards(path, tiny_tokenizer_path, SMALL, tmp_path / "s")
    path = write_pairs(tmp_path / "narrow.parquet", table.drop_columns(["chosen"]))
    with pytest.raises(ContractError, match=r"narrow.parquet.*chosen"):
        build_shards(path, tiny_tokenizer_path, SMALL, tmp_path / "s")


def test_manifest_stats_compare_layouts(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    config = dataclasses.replace(SMALL, max_len=4096)  # nothing truncated
    reader = open_shards(
        build_shards(pairs_path, tiny_tokenizer_path, config, tmp_path / "s").directory
    )
    stats = reader.manifest["stats"]
    p, c, r = (
        np.concatenate([getattr(row, k) for row in reader]).astype(np.int64)
        for k in ("prompt_len", "chosen_len", "rejected_len")
    )
    by_layout = stats["tokens_by_layout"]
    assert by_layout["shared"] == stats["tokens"] == int((p + c + r).sum())
    assert by_layout["unshared"] == int((2 * p + c + r).sum())
    assert by_layout["padded"] == int((2 * np.maximum(p + c, p + r)).sum())
    assert stats["tokens_saved_by_prefix_sharing"] == int(p.sum())
    assert sum(stats["pair_length_histogram"]["counts"]) == stats["pairs"]
    assert stats["boundary_agreement"]["checked"] == 2 * SMALL.boundary_check_pairs
    assert reader.manifest["contracts"]["packed_row"] == packed_row.VERSION


def test_exported_tokenizer_reproduces_the_prompt_ids(pairs_path: Path, tmp_path: Path) -> None:
    """With no tokenizer given, the trained one is stored; transformers loads it from the
    shard directory and its apply_chat_template gives the packed prompt tokens."""
    config = dataclasses.replace(SMALL, bpe_vocab_size=400)
    reader = open_shards(build_shards(pairs_path, None, config, tmp_path / "s").directory)
    assert reader.tokenizer_path == reader.directory / "tokenizer.json"
    assert reader.manifest["tokenizer"]["trained"]
    hf = PreTrainedTokenizerFast.from_pretrained(str(reader.directory))
    prompts = {r["pair_id"]: r["prompt"] for r in pa.parquet.read_table(pairs_path).to_pylist()}
    for row in list(reader)[:5]:
        for i, pid in enumerate(row.pair_ids):
            s, p = int(row.pair_start[i]), int(row.prompt_len[i])
            ids = hf.apply_chat_template(
                prompts[pid], tokenize=True, add_generation_prompt=True, return_dict=False
            )
            assert row.input_ids[s : s + p].tolist() == list(ids)


@settings(max_examples=15)
@given(
    lengths=st.lists(st.tuples(*[st.integers(1, 30)] * 3), min_size=1, max_size=30),
    layout=st.sampled_from(["shared", "unshared", "padded"]),
    seed=st.integers(0, 2**16),
)
def test_writing_the_same_pairs_twice_gives_identical_bytes(lengths, layout, seed) -> None:
    table = tokenized_table(lengths, seed=seed)
    digests = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("a", "b"):
            directory = Path(tmp) / name
            directory.mkdir()
            writer = ShardWriter(directory, shard_bytes=2048)
            packer = pack.RowPacker(layout, 120, 8)  # the largest pair: 2 x 30 + 30 + 30
            for start in range(0, table.num_rows, 7):
                for batch in packer.add(table.slice(start, 7)):
                    writer.write(batch)
            for batch in packer.finish():
                writer.write(batch)
            digests.append([(s["file"], s["sha256"]) for s in writer.close()])
    assert digests[0] == digests[1]
