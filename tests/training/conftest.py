"""Training fixtures: tiny shards made by the real packer from a small pair table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.curate import EVAL_PAIRS_FILE
from pipeline.eval_shards import build_eval_shards
from pipeline.pack import PackConfig, build_shards
from pipeline.shards import open_shards
from pipeline.tokenized import TokenizeConfig, build_tokenized
from tests.pipeline.factories import random_pairs, write_pairs
from training.checkpoint import save_pretrained
from training.configs import tiny
from training.model import CausalLM

TINY_SHARD_PAIRS = 48
TINY_EVAL_PAIRS = 12


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """One intra-op thread: on models this small, keeping 2 threads in step costs more than
    it saves (about 10x per op on a busy 2-core machine)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 random-word pairs (some multi-turn with a system turn) packed `shared` into rows
    of at most 256 tokens, with a 320-token BPE trained on them (no tokenizer download)."""
    root = tmp_path_factory.mktemp("shards")
    pairs = write_pairs(root / "pairs.parquet", random_pairs(TINY_SHARD_PAIRS, seed=3))
    store = root / "store"
    tokenized = build_tokenized(pairs, None, TokenizeConfig(bpe_vocab_size=320), store)
    config = PackConfig(max_len=256, mask_block_size=32, min_response_len=8)
    return build_shards(tokenized.directory, config, store).directory


@pytest.fixture(scope="session")
def tiny_eval_shards(tiny_shards: Path) -> Path:
    """12 other random-word pairs held out beside `tiny_shards`' pairs (as a curate output's
    eval_pairs.parquet) and packed with their tokenizer and settings."""
    root = tiny_shards.parents[2]  # root/store/shards/<key>: root holds pairs.parquet
    write_pairs(root / EVAL_PAIRS_FILE, random_pairs(TINY_EVAL_PAIRS, seed=4))
    return build_eval_shards(root, tiny_shards, root / "store").shards.directory


def tiny_checkpoint(shards: Path, folder: Path, seed: int = 0) -> Path:
    """The model `--config tiny --init-seed SEED` starts from on `shards`, saved as a
    Hugging Face folder (what `--model` reads)."""
    vocab = int(open_shards(shards).manifest["tokenizer"]["vocab_size"])
    torch.manual_seed(seed)
    return save_pretrained(CausalLM(dataclasses.replace(tiny(), vocab_size=vocab)), folder)


def with_model(argv: list[str], folder: Path) -> list[str]:
    """`argv` with `--config tiny` replaced by `--model FOLDER`."""
    at = argv.index("--config")
    return [*argv[:at], "--model", str(folder), *argv[at + 2 :]]
