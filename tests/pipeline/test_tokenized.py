"""build_tokenized and the tokenized directory: content, reuse, cache keys, verification,
atomicity, byte-identical output, row accounting and the report's statistics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import preference_pair, tokenized_pair
from data_contracts.contract import ContractError
from pipeline import ragged, tokenized
from pipeline.shards import TOKENIZER, TOKENIZER_CONFIG, ShardError
from pipeline.templates import builtin_template, render_pairs
from pipeline.tokenize import load_tokenizer, tokenize_pairs
from pipeline.tokenized import (
    DATA_FILES,
    REPORT,
    TOKENIZED,
    TokenizeConfig,
    build_tokenized,
    read_tokenized,
    tokenized_key,
)
from tests.pipeline.factories import pair_table, random_pairs, write_pairs

SMALL = TokenizeConfig(boundary_check_pairs=8)
BARE = "{% for m in messages %}{{ m.content }}{% endfor %}"  # no end of turn


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _stamps(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_streamed_rows_equal_tokenizing_the_whole_file_at_once(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenized, "READ_BATCH", 7)  # many read batches
    monkeypatch.setattr(tokenized, "ROW_GROUP", 10)  # and row groups
    result = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    assert not result.reused and result.directory == tmp_path / "store" / "tokenized" / result.key
    file = pq.ParquetFile(result.directory / TOKENIZED)
    sizes = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
    assert sizes == [10] * 6 + [8]

    pairs = pq.read_table(pairs_path)
    loaded = load_tokenizer(tiny_tokenizer_path)
    ids = pairs.column("pair_id").to_pylist()
    texts = render_pairs(
        pairs.column("prompt").to_pylist(),
        pairs.column("chosen").to_pylist(),
        pairs.column("rejected").to_pylist(),
        ids,
        builtin_template("chatml"),
        loaded.bos_token,
        loaded.eos_token,
    )
    at_once = tokenize_pairs(texts, ids, loaded.tokenizer)
    assert file.read().to_pylist() == at_once.to_pylist()
    assert file.schema_arrow.equals(tokenized_pair.SCHEMA, check_metadata=False)
    assert (result.directory / TOKENIZER).read_bytes() == tiny_tokenizer_path.read_bytes()
    config = json.loads((result.directory / TOKENIZER_CONFIG).read_text())
    assert config["chat_template"] == builtin_template("chatml").source
    assert read_tokenized(result.directory) == result.report


def test_report_statistics_match_numpy_on_the_written_rows(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    report = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "s").report
    stats = report["stats"]
    table = pq.read_table(tmp_path / "s" / "tokenized" / report["key"] / TOKENIZED)
    p, c, r = (
        ragged.lengths_of(table.column(n)) for n in ("prompt_ids", "chosen_ids", "rejected_ids")
    )
    parts = {"prompt": p, "chosen": c, "rejected": r, "pair": p + c + r}
    edges = np.array(stats["length_histograms"]["edges"])
    # Shared edges: 0, then powers of two from 16 to the first one that holds the longest.
    assert edges[0] == 0 and edges[1] == 16 and np.all(edges[2:] == 2 * edges[1:-1])
    assert edges[-2] < parts["pair"].max() <= edges[-1]
    for name, x in parts.items():
        q = np.percentile(x, [50, 90, 99], method="lower")
        assert stats["lengths"][name] == {
            "p50": q[0],
            "p90": q[1],
            "p99": q[2],
            "max": x.max(),
        }
        assert stats["length_histograms"][name] == np.histogram(x, bins=edges)[0].tolist()
        assert stats["tokens"][name] == int(x.sum())
    assert stats["pairs_in"] == stats["pairs_out"] == table.num_rows == report["input"]["rows"]
    assert stats["boundary_agreement"]["checked"] == 2 * SMALL.boundary_check_pairs


def test_second_call_reuses_and_rewrites_nothing(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    first = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    stamps = _stamps(first.directory)
    second = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    assert second.reused and (second.key, second.directory) == (first.key, first.directory)
    assert _stamps(second.directory) == stamps
    assert second.report == first.report


def test_a_normalize_or_curate_directory_is_read_as_its_pairs_file(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "curated"
    folder.mkdir()
    (folder / "pairs.parquet").write_bytes(pairs_path.read_bytes())
    by_file = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "s")
    by_folder = build_tokenized(folder, tiny_tokenizer_path, SMALL, tmp_path / "s")
    assert by_folder.key == by_file.key and by_folder.reused


CHANGED = {"template": "llama3", "bpe_vocab_size": 500, "boundary_check_pairs": 3}


def test_every_config_field_is_in_the_key() -> None:
    assert set(CHANGED) == {f.name for f in dataclasses.fields(TokenizeConfig)}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_key_changes_with_each_config_field(field: str, tiny_tokenizer_path: Path) -> None:
    from pipeline.templates import resolve_template

    tok = load_tokenizer(tiny_tokenizer_path)
    changed = dataclasses.replace(SMALL, **{field: CHANGED[field]})
    keys = {
        tokenized_key("abc", tok, resolve_template(c.template, None), c) for c in (SMALL, changed)
    }
    assert len(keys) == 2


@pytest.mark.parametrize("victim", DATA_FILES)
def test_a_flipped_byte_is_detected_and_rebuilt_identically(
    victim: str, pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    result = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    original = _files(result.directory)
    path = result.directory / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=victim):
        read_tokenized(result.directory)
    read_tokenized(result.directory, verify=False)  # same size, so only the hash can tell
    again = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    assert not again.reused and again.key == result.key
    assert _files(again.directory) == original


def test_a_missing_broken_or_inconsistent_report_is_named(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(ShardError, match=REPORT):
        read_tokenized(tmp_path)
    directory = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "s").directory
    report = json.loads((directory / REPORT).read_text())

    def rewritten(**changes: object) -> None:
        (directory / REPORT).write_text(json.dumps({**report, **changes}))

    rewritten(stats={**report["stats"], "pairs_out": report["stats"]["pairs_out"] - 1})
    with pytest.raises(ShardError, match="pairs_add_up"):
        read_tokenized(directory)
    rewritten(files=report["files"][1:])
    with pytest.raises(ShardError, match=f"does not list.*{TOKENIZED}"):
        read_tokenized(directory)
    rewritten(contract="manifest")
    with pytest.raises(ShardError, match="not 'tokenized_report'"):
        read_tokenized(directory)


def test_an_exception_mid_write_leaves_no_directory(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = tokenized.tokenize_pairs

    def failing(*args: object) -> pa.Table:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return original(*args)

    monkeypatch.setattr(tokenized, "tokenize_pairs", failing)
    monkeypatch.setattr(tokenized, "READ_BATCH", 16)
    monkeypatch.setattr(tokenized, "ROW_GROUP", 16)  # a row group is written before the fire
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    assert calls["n"] == 3
    assert list((tmp_path / "store" / "tokenized").iterdir()) == []


@pytest.mark.parametrize("tokenizer", ["tiny", None])
def test_same_input_gives_byte_identical_directories(
    tokenizer: str | None,
    pairs_path: Path,
    tiny_tokenizer_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tok = tiny_tokenizer_path if tokenizer else None
    config = dataclasses.replace(SMALL, bpe_vocab_size=400)
    monkeypatch.setattr(tokenized, "ROW_GROUP", 16)
    a = build_tokenized(pairs_path, tok, config, tmp_path / "a")
    monkeypatch.setattr(tokenized, "READ_BATCH", 7)  # how the input is read does not matter
    b = build_tokenized(pairs_path, tok, config, tmp_path / "b")
    assert a.key == b.key and not b.reused
    assert _files(a.directory) == _files(b.directory)
    assert set(_files(a.directory)) == {*DATA_FILES, REPORT}


def test_row_accounting_counts_every_drop_by_rule(
    tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    """Responses that render to no tokens are dropped and counted by tokenized_pair rule."""
    table = pair_table(
        [
            ([{"role": "user", "content": "hi"}], "fine", "also fine"),
            ([{"role": "user", "content": "hi"}], "", "empty chosen"),
            ([{"role": "user", "content": "yo"}], "empty rejected", ""),
            ([{"role": "user", "content": "hey"}], "", ""),
        ]
    )
    path = write_pairs(tmp_path / "p.parquet", table)
    template = tmp_path / "bare.jinja"  # no end of turn: an empty response has no tokens
    template.write_text(BARE)
    config = dataclasses.replace(SMALL, template=str(template))
    result = build_tokenized(path, tiny_tokenizer_path, config, tmp_path / "s")
    stats = result.report["stats"]
    assert (stats["pairs_in"], stats["pairs_out"]) == (4, 1)
    # A pair breaking two rules is counted once, under the first.
    assert stats["dropped"] == {"empty_chosen_ids": 2, "empty_rejected_ids": 1}
    kept = pq.read_table(result.directory / TOKENIZED).column("pair_id").to_pylist()
    assert kept == table.column("pair_id").to_pylist()[:1]


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
        build_tokenized(path, tiny_tokenizer_path, SMALL, tmp_path / "s")
    path = write_pairs(tmp_path / "narrow.parquet", table.drop_columns(["chosen"]))
    with pytest.raises(ContractError, match=r"narrow.parquet.*chosen"):
        build_tokenized(path, tiny_tokenizer_path, SMALL, tmp_path / "s")
    with pytest.raises(FileNotFoundError, match=r"absent\.parquet"):
        build_tokenized(tmp_path / "absent.parquet", tiny_tokenizer_path, SMALL, tmp_path / "s")
    assert list((tmp_path / "s" / "tokenized").iterdir()) == []  # no half-written output


@pytest.mark.parametrize(
    ("field", "value"), [("bpe_vocab_size", 299), ("boundary_check_pairs", -1)]
)
def test_out_of_range_settings_are_named(field: str, value: object, tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, **{field: value})
    with pytest.raises(ValueError, match=field):
        build_tokenized(tmp_path / "unused.parquet", None, config, tmp_path / "s")
