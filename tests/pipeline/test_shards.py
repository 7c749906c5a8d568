"""build_shards and the shard directory: reuse (per stage), cache keys, verification,
atomicity, byte-identical output, row accounting across both stages, other readers, and
the exported tokenizer."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import tempfile
from pathlib import Path

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from core import atomic
from data_contracts import manifest as manifest_contract
from data_contracts import packed_row
from pipeline import pack, packer, tokenized
from pipeline.pack import PackConfig, ShardResult, build_shards
from pipeline.shards import (
    MANIFEST,
    TOKENIZER,
    TOKENIZER_CONFIG,
    ShardError,
    ShardWriter,
    open_shards,
)
from pipeline.templates import resolve_template
from pipeline.tokenize import train_tokenizer
from pipeline.tokenized import TOKENIZED, TokenizeConfig, build_tokenized
from tests.conftest import assert_one_error_line
from tests.pipeline.factories import pair_table, random_pairs, tokenized_table, write_pairs

SMALL = PackConfig(max_len=256, mask_block_size=16, pack_window=16)
TOK = TokenizeConfig(boundary_check_pairs=8)


def _build(
    pairs: Path,
    tokenizer: Path | None,
    store: Path,
    config: PackConfig = SMALL,
    tok: TokenizeConfig = TOK,
) -> ShardResult:
    """Both stages, as `prefpack pack` runs them."""
    return build_shards(build_tokenized(pairs, tokenizer, tok, store).directory, config, store)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _stamps(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_reader_returns_the_packed_pairs_as_zero_copy_views(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    result = _build(pairs_path, tiny_tokenizer_path, tmp_path / "store")
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


def test_packed_rows_hold_the_tokenized_pairs(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    """Each packed pair is its tokenized row, token for token (nothing cut at 4096)."""
    store = tmp_path / "store"
    tokens = build_tokenized(pairs_path, tiny_tokenizer_path, TOK, store)
    result = build_shards(tokens.directory, dataclasses.replace(SMALL, max_len=4096), store)
    rows = {
        r["pair_id"]: r for r in pa.parquet.read_table(tokens.directory / TOKENIZED).to_pylist()
    }
    for row in open_shards(result.directory):
        for i, pid in enumerate(row.pair_ids):
            s, p = int(row.pair_start[i]), int(row.prompt_len[i])
            c, r = int(row.chosen_len[i]), int(row.rejected_len[i])
            expected = rows.pop(pid)
            assert row.input_ids[s : s + p + c + r].tolist() == (
                expected["prompt_ids"] + expected["chosen_ids"] + expected["rejected_ids"]
            )
    assert rows == {}
    # The manifest names the tokenized pairs it was packed from; the tokenizer is copied.
    manifest = result.manifest
    assert manifest["tokenized"] == {
        "key": tokens.key,
        "directory": f"tokenized/{tokens.key}",
        "config": dataclasses.asdict(TOK),
    }
    for name in ("input", "tokenizer", "template"):
        assert manifest[name] == tokens.report[name]
    assert manifest["stats"]["boundary_agreement"] == tokens.report["stats"]["boundary_agreement"]
    assert (result.directory / TOKENIZER).read_bytes() == tiny_tokenizer_path.read_bytes()
    tok_config = json.loads((result.directory / TOKENIZER_CONFIG).read_text())
    assert tok_config == {
        **json.loads((tokens.directory / TOKENIZER_CONFIG).read_text()),
        "model_max_length": 4096,
    }


def test_shards_open_with_datasets_and_polars(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    result = _build(pairs_path, tiny_tokenizer_path, tmp_path / "store")
    reader = open_shards(result.directory)
    expected = [row.input_ids.tolist() for row in reader]
    shard_files = [result.directory / s["file"] for s in reader.manifest["shards"]]
    from_datasets = [
        ids for f in shard_files for ids in datasets.Dataset.from_file(str(f))["input_ids"]
    ]
    from_polars = [ids for f in shard_files for ids in pl.read_ipc_stream(f)["input_ids"].to_list()]
    assert from_datasets == expected == from_polars


def test_second_call_reuses_both_stages_and_rewrites_nothing(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    first = _build(pairs_path, tiny_tokenizer_path, store)
    tokens_dir = store / "tokenized" / first.manifest["tokenized"]["key"]
    stamps = {d: _stamps(d) for d in (first.directory, tokens_dir)}
    again = build_tokenized(pairs_path, tiny_tokenizer_path, TOK, store)
    second = build_shards(again.directory, SMALL, store)
    assert again.reused and again.directory == tokens_dir
    assert second.reused and second.key == first.key and second.directory == first.directory
    assert {d: _stamps(d) for d in stamps} == stamps
    assert second.manifest == first.manifest


def test_a_reuse_removes_a_killed_runs_temp_directory_of_the_key(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    """A run of the same key killed inside its write left `.KEY.tmp-<host>-<pid>-...`
    beside each directory; the next run reuses both directories and removes both."""
    store = tmp_path / "store"
    first = _build(pairs_path, tiny_tokenizer_path, store)
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftovers = []
    for directory in (first.directory, store / "tokenized" / first.manifest["tokenized"]["key"]):
        leftover = directory.parent / f".{directory.name}.tmp-{atomic._HOST}-{dead.pid}-0123abcd"
        leftover.mkdir()
        (leftover / "half.arrow").write_bytes(b"x" * 100)
        leftovers.append(leftover)
    again = build_tokenized(pairs_path, tiny_tokenizer_path, TOK, store)
    second = build_shards(again.directory, SMALL, store)
    assert again.reused and second.reused
    assert [leftover.exists() for leftover in leftovers] == [False, False]


def test_a_new_pack_config_repacks_without_tokenizing_again(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    first = _build(pairs_path, tiny_tokenizer_path, store)
    tokens_dir = store / "tokenized" / first.manifest["tokenized"]["key"]
    stamps = _stamps(tokens_dir)

    def no_tokenizing(*args: object) -> None:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenized, "tokenize_pairs", no_tokenizing)
    changed = dataclasses.replace(SMALL, max_len=200, layout="unshared")
    second = _build(pairs_path, tiny_tokenizer_path, store, config=changed)
    assert not second.reused and second.key != first.key
    assert second.manifest["tokenized"] == first.manifest["tokenized"]
    assert _stamps(tokens_dir) == stamps
    assert sorted(p.name for p in (store / "shards").iterdir()) == sorted([first.key, second.key])


CHANGED = {
    "layout": "unshared",
    "max_len": 200,
    "too_long": "drop",
    "min_response_len": 8,
    "mask_block_size": 32,
    "pack_window": 17,
    "shard_bytes": 4096,
}


def test_every_config_field_is_in_the_key() -> None:
    assert set(CHANGED) == {f.name for f in dataclasses.fields(PackConfig)}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_key_changes_with_each_config_field(field: str) -> None:
    changed = dataclasses.replace(SMALL, **{field: CHANGED[field]})
    assert pack.cache_key("abc", SMALL) != pack.cache_key("abc", changed)


def test_key_changes_with_tokenizer_template_data_and_tokenize_config(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    """Everything the tokenize stage depends on changes its key, and so the shard key."""
    other_tok = tmp_path / "other.json"
    other_tok.write_bytes(
        train_tokenizer(
            ["other words entirely"] * 20, 300, resolve_template("chatml", None)
        ).json_bytes
    )
    template = tmp_path / "mine.jinja"
    template.write_text(resolve_template("chatml", None).source + "{{ '' }}")
    other_pairs = write_pairs(tmp_path / "other.parquet", random_pairs(10, seed=99))
    variants = [
        (pairs_path, tiny_tokenizer_path, TOK),
        (pairs_path, other_tok, TOK),
        (pairs_path, tiny_tokenizer_path, dataclasses.replace(TOK, template=str(template))),
        (pairs_path, tiny_tokenizer_path, dataclasses.replace(TOK, boundary_check_pairs=3)),
        (other_pairs, tiny_tokenizer_path, TOK),
        (pairs_path, None, dataclasses.replace(TOK, bpe_vocab_size=400)),
    ]
    store = tmp_path / "s"
    results = [_build(p, t, store, tok=c) for p, t, c in variants]
    assert len({r.manifest["tokenized"]["key"] for r in results}) == len(variants)
    assert len({r.key for r in results}) == len(variants)


@pytest.mark.parametrize("victim", ["shard", TOKENIZER, TOKENIZER_CONFIG])
def test_a_flipped_byte_is_detected_and_rebuilt(
    victim: str, pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    result = _build(pairs_path, tiny_tokenizer_path, tmp_path / "store")
    original = _files(result.directory)
    name = result.manifest["shards"][0]["file"] if victim == "shard" else victim
    path = result.directory / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"^{path}: sha256"):
        open_shards(result.directory)
    if victim == "shard":  # same size, so only the hash can tell; --no-verify skips it
        open_shards(result.directory, verify=False)
    else:  # the tokenizer files are small: hashed even without verify
        with pytest.raises(ShardError, match=f"^{path}: sha256"):
            open_shards(result.directory, verify=False)
    again = _build(pairs_path, tiny_tokenizer_path, tmp_path / "store")
    assert not again.reused and again.key == result.key
    assert _files(again.directory) == original


def _edit(manifest: dict, path: tuple, value: object) -> dict:
    edited = json.loads(json.dumps(manifest))
    node = edited
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return edited


# (field path, new value, what the error says). Edits are written in the manifest's own
# format, so only the content differs; a field the reader can name is named.
EDITS = [
    (("key",), "0" * 20, "key '00000000000000000000' is not the directory's name"),
    (("layout",), "unshared", "layout is 'unshared', config.layout is 'shared'"),
    (("max_len",), 300, "max_len is 300, config.max_len is 256"),
    (("mask_block_size",), 32, "mask_block_size is 32, config.mask_block_size is 16"),
    (("config", "max_len"), 300, "max_len is 256, config.max_len is 300"),
    (("config", "min_response_len"), 8, "is not the key of its config"),
    (("config", "pack_window"), 17, "is not the key of its config"),
    (("tokenized", "key"), "0" * 20, "is not the key of its config, tokenized.key"),
    (("packer",), "0", "is not the key of its config, tokenized.key, packer"),
    (("contracts", "packed_row"), "0", "is not the key of its config, tokenized.key, packer"),
    (("shards", 0, "sha256"), "0" * 64, "does not match its checksum"),
    (("files", 1, "sha256"), "0" * 64, "does not match its checksum"),
    (("stats", "truncated"), lambda n: n + 1, "does not match its checksum"),
    (("stats", "fill_ratio"), 1.0, "does not match its checksum"),
    (("tokenizer", "bos_token"), "<|im_start|>", "does not match its checksum"),
    (("checksum",), "0" * 64, "does not match its checksum"),
]


@pytest.fixture
def built(pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path) -> ShardResult:
    return _build(pairs_path, tiny_tokenizer_path, tmp_path / "store")


@pytest.mark.parametrize(("field", "value", "says"), EDITS, ids=lambda x: str(x))
def test_an_edited_manifest_field_is_named_refused_and_rebuilt(
    field: tuple, value: object, says: str, built: ShardResult, pairs_path: Path,
    tiny_tokenizer_path: Path, tmp_path: Path, cli,
) -> None:  # fmt: skip
    original = _files(built.directory)
    path = built.directory / MANIFEST
    path.write_text(manifest_contract.text(_edit(built.manifest, field, value)))
    for verify in (True, False):  # the manifest's checks never depend on --no-verify
        with pytest.raises(ShardError) as raised:
            open_shards(built.directory, verify=verify)
        assert str(raised.value).startswith(f"{path}: ") and says in str(raised.value)
        assert built.manifest["shards"][0]["file"] not in str(raised.value)
    for flags in ([], ["--no-verify"]):
        status, err = cli(["inspect", str(built.directory), *flags])
        assert_one_error_line(status, err, "inspect", str(path), says)
    again = _build(pairs_path, tiny_tokenizer_path, tmp_path / "store")
    assert not again.reused and again.directory == built.directory
    assert _files(again.directory) == original and again.manifest == built.manifest


def test_a_manifest_with_only_its_bytes_changed_is_refused(built: ShardResult) -> None:
    """Same content, other bytes (a reformatting editor): still not what was written."""
    path = built.directory / MANIFEST
    path.write_text(json.dumps(built.manifest, indent=4) + "\n")
    with pytest.raises(ShardError, match=f"^{path}: not the text that was written"):
        open_shards(built.directory, verify=False)


def test_an_edited_tokenizer_config_never_reaches_training(
    built: ShardResult, pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path, cli
) -> None:
    """An edited bos_token is caught (and named) even with --no-verify, then rebuilt."""
    path = built.directory / TOKENIZER_CONFIG
    original = path.read_bytes()
    config = json.loads(original)
    config["bos_token"] = "<|im_end|>"
    path.write_text(json.dumps(config, indent=2) + "\n")
    with pytest.raises(ShardError, match=f"^{path}: "):
        open_shards(built.directory, verify=False)
    status, err = cli(["inspect", str(built.directory), "--no-verify"])
    assert_one_error_line(status, err, "inspect", str(path))
    again = _build(pairs_path, tiny_tokenizer_path, tmp_path / "store")
    assert not again.reused and path.read_bytes() == original
    open_shards(again.directory)


def test_a_copy_under_another_name_is_not_its_key(built: ShardResult, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "store" / "shards" / ("f" * 20)
    shutil.copytree(built.directory, copy)
    with pytest.raises(ShardError, match=f"^{copy / MANIFEST}: key '{built.key}' is not the"):
        open_shards(copy)


def test_a_reader_recomputes_the_key_the_packer_computed(built: ShardResult) -> None:
    manifest = built.manifest
    config = PackConfig(**manifest["config"])
    assert pack.cache_key(manifest["tokenized"]["key"], config) == manifest["key"] == built.key
    assert manifest["checksum"] == manifest_contract.checksum(manifest)
    assert [f["file"] for f in manifest["files"]] == [TOKENIZER, TOKENIZER_CONFIG]


def test_corrupt_tokenized_pairs_are_never_packed(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    tokens = build_tokenized(pairs_path, tiny_tokenizer_path, TOK, store)
    path = tokens.directory / TOKENIZED
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=TOKENIZED):
        build_shards(tokens.directory, SMALL, store)
    assert not (store / "shards").exists()


def test_missing_or_broken_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=MANIFEST):
        open_shards(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"contract": "manifest"}))
    with pytest.raises(ShardError, match="lacks"):
        open_shards(tmp_path)


def test_an_exception_mid_write_leaves_no_directory(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    tokens = build_tokenized(pairs_path, tiny_tokenizer_path, TOK, store)
    calls = {"n": 0}
    original = ShardWriter.write

    def failing_write(self: ShardWriter, batch: pa.RecordBatch) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        original(self, batch)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    monkeypatch.setattr(packer, "BATCH_TOKENS", 512)  # many small batches
    config = dataclasses.replace(SMALL, shard_bytes=1)  # and a file per batch
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_shards(tokens.directory, config, store)
    assert calls["n"] == 2
    assert list((store / "shards").iterdir()) == []


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
    monkeypatch.setattr(packer, "BATCH_TOKENS", 2048)  # several batches and shards
    config = dataclasses.replace(SMALL, layout=layout, shard_bytes=8192)
    tok_config = dataclasses.replace(TOK, bpe_vocab_size=400)
    a = _build(pairs_path, tok, tmp_path / "a", config, tok_config)
    b = _build(pairs_path, tok, tmp_path / "b", config, tok_config)
    assert a.key == b.key and not b.reused
    assert len(a.manifest["shards"]) > 1
    assert _files(a.directory) == _files(b.directory)


def test_shards_are_bounded_and_read_back_in_order(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packer, "BATCH_TOKENS", 1024)  # 4 rows of 256 per record batch
    config = dataclasses.replace(SMALL, shard_bytes=8192)
    many = _build(pairs_path, tiny_tokenizer_path, tmp_path / "many", config)
    one = _build(pairs_path, tiny_tokenizer_path, tmp_path / "one")
    shards = many.manifest["shards"]
    assert len(shards) > 2
    # A shard closes after the batch that passes shard_bytes: bounded by it + one batch.
    batch_bytes = 4 * 256 * 4 * 3
    assert all(s["bytes"] <= 8192 + batch_bytes for s in shards)
    rows = [r.input_ids.tolist() for r in open_shards(many.directory)]
    assert rows == [r.input_ids.tolist() for r in open_shards(one.directory)]


def test_row_accounting_chains_through_both_stages(
    tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    """Responses that render to nothing (tokenize) and pairs too long to fit (pack) are
    counted by reason, each in its stage, and together in the manifest."""
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
    store = tmp_path / "s"
    tokens = build_tokenized(
        path, tiny_tokenizer_path, dataclasses.replace(TOK, template=str(template)), store
    )
    report = tokens.report["stats"]
    assert (report["pairs_in"], report["pairs_out"]) == (3, 2)
    assert report["dropped"] == {"empty_chosen_ids": 1}
    config = dataclasses.replace(SMALL, too_long="drop", max_len=64)
    stats = build_shards(tokens.directory, config, store).manifest["stats"]
    assert (stats["pairs_in"], stats["tokenized_pairs"], stats["pairs"]) == (3, 2, 1)
    assert stats["dropped"] == {"empty_chosen_ids": 1, "too_long": 1}


def test_manifest_stats_compare_layouts(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    config = dataclasses.replace(SMALL, max_len=4096)  # nothing truncated
    reader = open_shards(_build(pairs_path, tiny_tokenizer_path, tmp_path / "s", config).directory)
    stats = reader.manifest["stats"]
    p, c, r = (
        np.concatenate([getattr(row, k) for row in reader]).astype(np.int64)
        for k in ("prompt_len", "chosen_len", "rejected_len")
    )
    by_layout = stats["tokens_by_layout"]
    assert by_layout["shared"] == stats["tokens"] == int((p + c + r).sum())
    assert by_layout["unshared"] == int((2 * p + c + r).sum())
    assert by_layout["padded"] == int((2 * np.maximum(p + c, p + r)).sum())
    assert by_layout["padded_to_max_len"] == 2 * len(p) * 4096
    assert stats["tokens_saved_by_prefix_sharing"] == int(p.sum())
    edges = np.array(stats["pair_length_histogram"]["edges"])
    assert stats["pair_length_histogram"]["counts"] == np.histogram(p + c + r, edges)[0].tolist()
    for name, x in (("prompt", p), ("chosen", c), ("rejected", r), ("pair", p + c + r)):
        q = np.percentile(x, [50, 90, 99], method="lower").tolist()
        assert stats["lengths"][name] == dict(
            zip(("p50", "p90", "p99", "max"), [*q, x.max()], strict=True)
        )
    assert stats["boundary_agreement"]["checked"] == 2 * TOK.boundary_check_pairs
    assert reader.manifest["contracts"]["packed_row"] == packed_row.VERSION


def test_exported_tokenizer_reproduces_the_prompt_ids(pairs_path: Path, tmp_path: Path) -> None:
    """With no tokenizer given, the trained one is stored; transformers loads it from the
    shard directory and its apply_chat_template gives the packed prompt tokens."""
    tok = dataclasses.replace(TOK, bpe_vocab_size=400)
    reader = open_shards(_build(pairs_path, None, tmp_path / "s", tok=tok).directory)
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
            row_packer = packer.RowPacker(layout, 120, 8)  # the largest pair: 2 x 30 + 30 + 30
            for start in range(0, table.num_rows, 7):
                for batch in row_packer.add(table.slice(start, 7)):
                    writer.write(batch)
            for batch in row_packer.finish():
                writer.write(batch)
            digests.append([(s["file"], s["sha256"]) for s in writer.close()])
    assert digests[0] == digests[1]


@settings(max_examples=10)
@given(
    responses=st.lists(
        st.tuples(st.sampled_from(["", "ok", "a few more words here"]), st.integers(0, 60)),
        min_size=1,
        max_size=12,
    ),
    max_len=st.integers(8, 120),
    too_long=st.sampled_from(["truncate", "drop"]),
    layout=st.sampled_from(["shared", "unshared", "padded"]),
)
def test_every_pair_is_packed_once_or_counted_as_dropped(
    responses, max_len, too_long, layout, tiny_tokenizer_path: Path
) -> None:
    """pairs in = tokenized + dropped by rule; tokenized = packed + too_long; no pair twice."""
    rows = [
        ([{"role": "user", "content": "word " * words + str(i)}], text, f"reply {i}")
        for i, (text, words) in enumerate(responses)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_pairs(Path(tmp) / "p.parquet", pair_table(rows))
        template = Path(tmp) / "bare.jinja"
        template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
        tok_config = dataclasses.replace(TOK, template=str(template))
        tokens = build_tokenized(path, tiny_tokenizer_path, tok_config, Path(tmp) / "s")
        config = dataclasses.replace(SMALL, max_len=max_len, too_long=too_long, layout=layout)
        try:
            result = build_shards(tokens.directory, config, Path(tmp) / "s")
        except ValueError as err:  # nothing fits: an error, and no shard directory
            assert str(err).startswith("no pair packed")
            shards = Path(tmp) / "s" / "shards"
            assert not shards.exists() or not [p for p in shards.iterdir() if p.name[0] != "."]
            return
        kept = pa.parquet.read_table(tokens.directory / TOKENIZED).column("pair_id").to_pylist()
        packed = [pid for row in open_shards(result.directory) for pid in row.pair_ids]
    report, stats = tokens.report["stats"], result.manifest["stats"]
    empty = sum(text == "" for text, _ in responses)
    assert report["pairs_in"] == len(rows) == report["pairs_out"] + empty
    assert report["dropped"] == ({"empty_chosen_ids": empty} if empty else {})
    assert len(kept) == report["pairs_out"] == stats["tokenized_pairs"]
    too_long_count = stats["dropped"].get("too_long", 0)
    assert len(packed) == len(set(packed)) == stats["pairs"]
    assert set(packed) <= set(kept) and len(kept) - len(packed) == too_long_count
    assert stats["pairs_in"] == stats["pairs"] + sum(stats["dropped"].values())


def test_read_batch_size_does_not_change_the_bytes(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows hold exactly pack_window pairs, however the tokenized pairs are read."""
    a = _build(pairs_path, tiny_tokenizer_path, tmp_path / "a")
    monkeypatch.setattr(tokenized, "READ_BATCH", 7)
    b = _build(pairs_path, tiny_tokenizer_path, tmp_path / "b")
    assert _files(a.directory) == _files(b.directory)


@pytest.mark.parametrize(
    ("field", "value"),
    [("layout", "sideways"), ("too_long", "wrap"), ("max_len", 2), ("min_response_len", 0)],
)
def test_out_of_range_settings_are_named(field: str, value: object) -> None:
    """Refused when the config is made, before any input is read; the flag is named."""
    with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
        dataclasses.replace(SMALL, **{field: value})


LLAMA3_HEAD = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
LLAMA3_GENERATION = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_a_cut_llama3_prompt_keeps_bos_system_and_generation_prompt(tmp_path: Path) -> None:
    """Long multi-turn prompts with a system message, packed at a max_len that forces the
    prompt to be cut: each keeps bos + the system turn, then whole later turns, and ends
    with the generation prompt; one_response_cut is recounted from the rows."""
    words = "the cat sat on a mat and then it ran off to see the sea " * 3
    rows = []
    for i in range(12):
        prompt = [{"role": "system", "content": "Be brief."}]
        for turn in range(3 + i % 3):
            prompt += [
                {"role": "user", "content": f"question {i} {turn} {words}"},
                {"role": "assistant", "content": f"answer {turn} {words[: 20 * (i + 1)]}"},
            ]
        prompt.append({"role": "user", "content": f"last question {i}"})
        rows.append((prompt, f"yes {words[: 9 * i]}", f"no {words[: 5 * (12 - i)]}"))
    pairs = write_pairs(tmp_path / "p.parquet", pair_table(rows))
    tok = dataclasses.replace(TOK, template="llama3", bpe_vocab_size=400)
    store = tmp_path / "s"
    tokens = build_tokenized(pairs, None, tok, store)
    config = PackConfig(max_len=160, min_response_len=8, mask_block_size=16, pack_window=16)
    result = build_shards(tokens.directory, config, store)
    reader = open_shards(result.directory)
    decoder = Tokenizer.from_file(str(reader.tokenizer_path))
    source = {
        r["pair_id"]: r for r in pa.parquet.read_table(tokens.directory / TOKENIZED).to_pylist()
    }
    eot = decoder.token_to_id("<|eot_id|>")
    cut_prompts = one_sided = 0
    for row in reader:
        for i, pid in enumerate(row.pair_ids):
            s, p = int(row.pair_start[i]), int(row.prompt_len[i])
            c, r = int(row.chosen_len[i]), int(row.rejected_len[i])
            ids = row.input_ids[s : s + p].tolist()
            full = source[pid]["prompt_ids"]
            text = decoder.decode(ids, skip_special_tokens=False)
            assert text.startswith(LLAMA3_HEAD) and text.endswith(LLAMA3_GENERATION), text
            if p < len(full):
                cut_prompts += 1
                head = len(decoder.encode(LLAMA3_HEAD, add_special_tokens=False).ids)
                assert ids[:head] == full[:head] and ids[head:] == full[len(full) - p + head :]
                # The end starts at a whole turn, the last question's or earlier.
                assert text[len(LLAMA3_HEAD) :].startswith("<|start_header_id|>")
            chosen = row.input_ids[s + p : s + p + c].tolist()
            rejected = row.input_ids[s + p + c : s + p + c + r].tolist()
            lost = [
                len(kept) < len(source[pid][name]) and kept[-1] != eot
                for kept, name in ((chosen, "chosen_ids"), (rejected, "rejected_ids"))
            ]
            one_sided += lost[0] != lost[1]
    stats = result.manifest["stats"]
    assert cut_prompts >= 6 and stats["truncated"] >= cut_prompts
    assert stats["one_response_cut"] == one_sided > 0
