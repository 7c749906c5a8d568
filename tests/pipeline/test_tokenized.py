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
from pipeline.pack import PackConfig, build_shards
from pipeline.shards import TOKENIZER, TOKENIZER_CONFIG, ShardError
from pipeline.templates import builtin_template, render_pairs
from pipeline.tokenize import MarkerError, load_tokenizer, tokenize_pairs
from pipeline.tokenized import (
    DATA_FILES,
    REPORT,
    TOKENIZED,
    TokenizeConfig,
    build_tokenized,
    read_tokenized,
    tokenized_key,
)
from tests.conftest import FIXTURES
from tests.pipeline.factories import pair_table, random_pairs, write_pairs

SMALL = TokenizeConfig(boundary_check_pairs=8)
BARE = "{% for m in messages %}{{ m.content }}{% endfor %}"  # no end of turn
GPT2 = FIXTURES / "gpt2_small_tokenizer.json"  # GPT-2's BPE: no chat markers
CHATML_FOLDER = FIXTURES / "chatml_tokenizer"  # SmolLM2-style folder with chat_template


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


CHANGED = {
    "template": "llama3",
    "bpe_vocab_size": 500,
    "boundary_check_pairs": 3,
    "allow_multi_token_markers": True,
}


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


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        (("files", 0, "sha256"), "0" * 64, "does not match its checksum"),
        (("config", "boundary_check_pairs"), 3, "does not match its checksum"),
        (("tokenizer", "bos_token"), "<|im_end|>", "does not match its checksum"),
        (("stats", "lengths", "pair", "max"), 1, "does not match its checksum"),
        (("key",), "0" * 20, "is not the directory's name"),
    ],
)
def test_an_edited_report_is_named_and_rebuilt(
    field: tuple, value: object, says: str, pairs_path: Path, tiny_tokenizer_path: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Edits that keep the report's own accounting and format: caught by the key and the
    checksum, blamed on report.json (not on the intact file a sha256 lists), rebuilt."""
    from data_contracts import manifest as sealed

    result = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    original = _files(result.directory)
    edited = json.loads(json.dumps(result.report))
    node = edited
    for step in field[:-1]:
        node = node[step]
    node[field[-1]] = value
    path = result.directory / REPORT
    path.write_text(sealed.text(edited))
    for verify in (True, False):
        with pytest.raises(ShardError) as raised:
            read_tokenized(result.directory, verify=verify)
        assert str(raised.value).startswith(f"{path}: ") and says in str(raised.value)
    again = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    assert not again.reused and _files(again.directory) == original


def test_a_report_is_sealed_by_its_checksum(
    pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path
) -> None:
    from data_contracts import manifest as sealed

    result = build_tokenized(pairs_path, tiny_tokenizer_path, SMALL, tmp_path / "store")
    text = (result.directory / REPORT).read_text()
    assert text == sealed.text(result.report)
    assert result.report["checksum"] == sealed.checksum(result.report)
    (result.directory / REPORT).write_text(text.replace("\n", "\r\n"))
    with pytest.raises(ShardError, match="not the text that was written"):
        read_tokenized(result.directory, verify=False)


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
    ("flag", "field", "value"),
    [
        ("--bpe-vocab-size", "bpe_vocab_size", 299),
        ("--boundary-check-pairs", "boundary_check_pairs", -1),
    ],
)
def test_out_of_range_settings_are_named(flag: str, field: str, value: object) -> None:
    """The config refuses them as it is built, before any data is read."""
    with pytest.raises(ValueError, match=f"{flag} must be >= .*, got {value}"):
        dataclasses.replace(SMALL, **{field: value})


# ----------------------------------------------------------- markers and end of turn


def _exported_eos(directory: Path) -> str | None:
    return json.loads((directory / TOKENIZER_CONFIG).read_text()).get("eos_token")


def _ending_by_hand(directory: Path, suffix: list[int]) -> tuple[int, int]:
    """(responses whose ids end with `suffix`, responses), from the written rows."""
    rows = pq.read_table(directory / TOKENIZED).to_pylist()
    responses = [row[k] for row in rows for k in ("chosen_ids", "rejected_ids")]
    return sum(r[-len(suffix) :] == suffix for r in responses), len(responses)


def test_gpt2_with_chatml_stops_before_any_pair_is_read(
    pairs_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unread(*args: object) -> None:
        raise AssertionError("pairs were read")

    monkeypatch.setattr(tokenized, "_pair_batches", unread)
    monkeypatch.setattr(tokenized, "sha256_file", unread)
    with pytest.raises(MarkerError) as caught:
        build_tokenized(pairs_path, GPT2, SMALL, tmp_path / "s")
    message = str(caught.value)
    assert "template 'chatml'" in message and "'<|im_end|>' -> 7 tokens" in message
    assert "--template plain" in message and "--allow-multi-token-markers" in message
    assert not (tmp_path / "s" / "tokenized").exists()


def test_allowed_multi_token_markers_are_tokenized_and_their_ending_rate_reported(
    tmp_path: Path,
) -> None:
    """GPT-2 merges a trailing space with the "<" of "<|im_end|>", so the two responses
    ending in spaces do not end with the marker's 8 tokens (7 + "\\n"): 4 of 6 do."""
    table = pair_table(
        [
            ([{"role": "user", "content": "hi"}], "Sure.", "No "),
            ([{"role": "user", "content": "why"}], "Because", "ok  "),
            ([{"role": "user", "content": "yo"}], "fine\n", "x"),
        ]
    )
    path = write_pairs(tmp_path / "p.parquet", table)
    config = dataclasses.replace(SMALL, allow_multi_token_markers=True)
    result = build_tokenized(path, GPT2, config, tmp_path / "s")
    ending = result.report["stats"]["responses_ending_with_eos"]
    gpt2 = load_tokenizer(GPT2).tokenizer
    suffix = gpt2.encode("<|im_end|>\n", add_special_tokens=False).ids
    assert _ending_by_hand(result.directory, suffix) == (ending["count"], ending["of"]) == (4, 6)
    assert ending["token"] == "<|im_end|>" and len(ending["token_ids"]) == 7
    assert ending["rate"] == 4 / 6
    assert result.report["config"]["allow_multi_token_markers"] is True
    # <|im_end|> is no token of GPT-2: naming it as eos would make transformers add an
    # untrained one, so the tokenizer's own eos stays.
    assert _exported_eos(result.directory) == "<|endoftext|>"


def _base_model_folder(tmp_path: Path) -> Path:
    """A Qwen-base-like folder: chatml markers are special tokens, but eos is
    <|endoftext|> and there is no chat_template (so chatml is used)."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((CHATML_FOLDER / "tokenizer.json").read_bytes())
    config = {"eos_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("case", "template", "end_of_turn", "suffix"),
    [
        ("base-folder", None, "<|im_end|>", "<|im_end|>\n"),
        ("smollm-folder", None, "<|im_end|>", "<|im_end|>\n"),  # the folder's own template
        ("trained", None, "<|im_end|>", "<|im_end|>\n"),
        ("trained", "llama3", "<|eot_id|>", "<|eot_id|>"),
        ("gpt2", "plain", "<|endoftext|>", "<|endoftext|>"),
    ],
)
def test_every_response_ends_with_the_end_of_turn_and_it_is_the_exported_eos(
    case: str,
    template: str | None,
    end_of_turn: str,
    suffix: str,
    pairs_path: Path,
    tmp_path: Path,
) -> None:
    tokenizer = {
        "base-folder": _base_model_folder(tmp_path),
        "smollm-folder": CHATML_FOLDER,
        "trained": None,
        "gpt2": GPT2,
    }[case]
    config = dataclasses.replace(SMALL, template=template, bpe_vocab_size=400)
    store = tmp_path / "s"
    result = build_tokenized(pairs_path, tokenizer, config, store)
    if case == "smollm-folder":
        assert result.report["template"]["name"] == "tokenizer"
    ending = result.report["stats"]["responses_ending_with_eos"]
    loaded = load_tokenizer(result.directory / TOKENIZER)
    suffix_ids = loaded.tokenizer.encode(suffix, add_special_tokens=False).ids
    assert ending["token_ids"] == [loaded.tokenizer.token_to_id(end_of_turn)]
    assert (ending["token"], ending["suffix"], ending["rate"]) == (end_of_turn, suffix, 1.0)
    assert _ending_by_hand(result.directory, suffix_ids) == (ending["count"], ending["of"])
    assert ending["of"] == 2 * result.report["stats"]["pairs_out"] > 0
    # Generation stops where the responses end: in the tokenized and in the shard folder.
    shards = build_shards(result.directory, PackConfig(max_len=512, pack_window=16), store)
    assert _exported_eos(result.directory) == end_of_turn
    assert _exported_eos(shards.directory) == end_of_turn
