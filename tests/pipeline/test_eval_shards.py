"""Eval shards: the curated eval pairs tokenized and packed exactly as the training pairs
were (the same tokenizer, never one trained on the eval pairs, template and settings),
keyed and reused like any shards, through the library and `prefpack pack --eval`."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import prefpack
from pipeline.curate import EVAL_PAIRS_FILE, CurateConfig, curate, write_curated
from pipeline.eval_shards import EvalShards, build_eval_shards, eval_pairs_path
from pipeline.io import PAIRS_FILE
from pipeline.pack import PackConfig, ShardResult, build_shards
from pipeline.shards import TOKENIZER, ShardError, open_shards
from pipeline.tokenize import load_tokenizer
from pipeline.tokenized import TokenizeConfig, build_tokenized, read_tokenized, tokenize_like
from tests.conftest import FIXTURES, assert_one_error_line
from tests.pipeline.factories import random_pairs

TOKENIZE = TokenizeConfig(bpe_vocab_size=300, boundary_check_pairs=8)
PACK = PackConfig(max_len=512, mask_block_size=64)


def _curated(directory: Path, **split: object) -> Path:
    result = curate(random_pairs(80, seed=3), CurateConfig(**split))
    return write_curated(result, directory)


@dataclass(frozen=True)
class Built:
    store: Path
    curated: Path
    train: ShardResult
    evals: EvalShards


def _build(root: Path, tokenizer: Path | None) -> Built:
    curated = _curated(root / "curated", eval_share=0.25)
    store = root / "store"
    tokenized = build_tokenized(curated, tokenizer, TOKENIZE, store)
    train = build_shards(tokenized.directory, PACK, store)
    return Built(store, curated, train, build_eval_shards(curated, train.directory, store))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Training and eval shards of one curate output, the tokenizer a BPE trained here."""
    return _build(tmp_path_factory.mktemp("eval"), tokenizer=None)


def _pair_ids(directory: Path) -> list[str]:
    return pc.list_flatten(open_shards(directory).table["pair_ids"]).to_pylist()


def _stamps(store: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.rglob("*")}


def test_eval_shards_have_the_training_shards_tokenizer_template_and_settings(built) -> None:
    train, evals = built.train.manifest, built.evals.shards.manifest
    assert evals["tokenizer"] == train["tokenizer"] and evals["tokenizer"]["trained"] is True
    assert evals["template"] == train["template"]
    assert evals["config"] == train["config"]
    assert evals["tokenized"]["config"] == train["tokenized"]["config"]
    assert evals["key"] != train["key"] and evals["input"]["name"] == EVAL_PAIRS_FILE
    shards = built.evals.shards.directory
    assert shards.parent == built.store / "shards"
    for name in (TOKENIZER, "tokenizer_config.json"):
        assert (shards / name).read_bytes() == (built.train.directory / name).read_bytes()


def test_eval_shards_hold_exactly_the_eval_pairs_none_of_them_trained_on(built) -> None:
    held = pq.read_table(built.curated / EVAL_PAIRS_FILE)["pair_id"].to_pylist()
    evals, train = _pair_ids(built.evals.shards.directory), _pair_ids(built.train.directory)
    assert held and sorted(evals) == sorted(held)
    assert not set(evals) & set(train)
    assert sorted(train) == sorted(pq.read_table(built.curated / PAIRS_FILE)["pair_id"].to_pylist())


def test_the_eval_pairs_never_train_a_tokenizer_of_their_own(built) -> None:
    """Tokenized on their own, the eval pairs would get another BPE; `tokenize_like` gives
    them the training pairs' one."""
    train_tokenized = built.store / built.train.manifest["tokenized"]["directory"]
    own = build_tokenized(built.curated / EVAL_PAIRS_FILE, None, TOKENIZE, built.store)
    trained = (train_tokenized / TOKENIZER).read_bytes()
    assert (own.directory / TOKENIZER).read_bytes() != trained
    assert (built.evals.tokenized.directory / TOKENIZER).read_bytes() == trained


def test_a_second_call_reuses_both_stages_and_rewrites_nothing(built) -> None:
    stamps = _stamps(built.store)
    again = build_eval_shards(built.curated, built.train.directory, built.store)
    assert again.tokenized.reused and again.shards.reused
    assert again.shards.key == built.evals.shards.key
    assert again.tokenized.key == built.evals.tokenized.key
    assert _stamps(built.store) == stamps


def test_a_model_folder_whose_eos_is_not_the_end_of_turn(tmp_path: Path) -> None:
    """The stored tokenizer_config.json names chatml's <|im_end|> as eos where the folder
    said <|endoftext|>: loading the tokenized directory as a model folder gives another
    tokenizer fingerprint, `tokenize_like` the recorded one."""
    folder = tmp_path / "qwen_like"
    shutil.copytree(FIXTURES / "chatml_tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "eos_token": "<|endoftext|>"})
    )
    built = _build(tmp_path, tokenizer=folder)
    tokenized = built.store / built.train.manifest["tokenized"]["directory"]
    recorded = read_tokenized(tokenized)["tokenizer"]
    assert recorded["eos_token"] == "<|endoftext|>"
    assert load_tokenizer(tokenized).fingerprint != recorded["fingerprint"]  # the trap
    assert built.evals.shards.manifest["tokenizer"] == built.train.manifest["tokenizer"]
    assert built.evals.tokenized.report["tokenizer"] == recorded


def test_an_edited_tokenizer_is_refused(built, tmp_path: Path) -> None:
    """The same tokenizer in other bytes is not the one recorded: nothing is tokenized."""
    tokenized = tmp_path / "tokenized" / built.train.manifest["tokenized"]["key"]
    shutil.copytree(built.store / built.train.manifest["tokenized"]["directory"], tokenized)
    text = json.loads((tokenized / TOKENIZER).read_text())
    (tokenized / TOKENIZER).write_text(json.dumps(text, indent=1))
    with pytest.raises(ShardError, match=r"not the tokenizer report\.json records"):
        tokenize_like(built.curated / EVAL_PAIRS_FILE, tokenized, tmp_path)


def test_eval_pairs_of_another_curate_output_are_refused(built, tmp_path: Path) -> None:
    other = write_curated(
        curate(random_pairs(30, seed=9), CurateConfig(eval_pairs=3)), tmp_path / "o"
    )
    with pytest.raises(ValueError, match=r"pairs.parquet is not the input of the shards"):
        build_eval_shards(other, built.train.directory, built.store)


def test_no_eval_pairs_is_an_error_naming_the_file(tmp_path: Path) -> None:
    curated = _curated(tmp_path / "curated")
    with pytest.raises(ValueError, match=r"eval_pairs.parquet holds no eval pairs; curate with"):
        eval_pairs_path(curated)
    (curated / EVAL_PAIRS_FILE).unlink()
    with pytest.raises(ValueError, match=r"eval_pairs.parquet: no such file"):
        eval_pairs_path(curated / PAIRS_FILE)
    with pytest.raises(FileNotFoundError, match=r"missing: no such curate output"):
        eval_pairs_path(tmp_path / "missing")


# -----------------------------------------------------------------------------
# prefpack pack --eval


def _argv(curated: Path, store: Path) -> list[str]:
    return [
        "pack", "--pairs", str(curated), "--out", str(store), "--eval",
        "--bpe-vocab-size", "300", "--max-len", "512", "--block-size", "64",
    ]  # fmt: skip


def test_pack_eval_prints_the_eval_shards_and_reuses_them(tmp_path: Path, capsys) -> None:
    curated = _curated(tmp_path / "curated", eval_pairs=10)
    store = tmp_path / "store"
    assert prefpack.main(_argv(curated, store)) == 0
    first = capsys.readouterr()
    assert len(first.out.splitlines()) == 1  # SHARDS=$(prefpack pack ... --eval)
    evals = Path(first.out.strip())
    assert evals.parent == store / "shards"
    assert "pack: packed" in first.err and "pack --eval: packed" in first.err
    manifest = open_shards(evals).manifest
    held = pq.read_metadata(curated / EVAL_PAIRS_FILE).num_rows
    assert manifest["stats"]["pairs_in"] == held >= 10
    train = [p for p in (store / "shards").iterdir() if p != evals]
    assert len(train) == 1  # the training shards, packed first
    assert open_shards(train[0]).manifest["tokenizer"] == manifest["tokenizer"]

    stamps = _stamps(store)
    assert prefpack.main(_argv(curated, store)) == 0
    second = capsys.readouterr()
    assert second.out == first.out
    assert "pack --eval: reused" in second.err and _stamps(store) == stamps


def test_pack_eval_without_eval_pairs_is_one_line_before_tokenizing(tmp_path: Path, cli) -> None:
    curated = _curated(tmp_path / "curated")
    status, err = cli(_argv(curated, tmp_path / "store"))
    assert_one_error_line(status, err, "pack", "eval_pairs.parquet holds no eval pairs")
    assert not (tmp_path / "store").exists()
