"""Training fixtures: tiny shards made by the real packer from a small pair table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.pack import PackConfig, build_shards
from tests.pipeline.factories import random_pairs, write_pairs

TINY_SHARD_PAIRS = 48


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
    config = PackConfig(max_len=256, mask_block_size=32, bpe_vocab_size=320, min_response_len=8)
    return build_shards(pairs, None, config, root / "store").directory
