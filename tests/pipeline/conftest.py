"""Pipeline fixtures: a tiny tokenizer trained in-process (hermetic: no model hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.templates import builtin_template
from pipeline.tokenize import train_tokenizer
from tests.pipeline.factories import fixture_pairs, random_text


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-token byte-level BPE trained on random text and the fixtures (chatml tokens)."""
    rng = np.random.default_rng(1)
    texts = [random_text(rng, 50) for _ in range(200)]
    table = fixture_pairs()
    texts += table.column("chosen").to_pylist() + table.column("rejected").to_pylist()
    loaded = train_tokenizer(texts, 400, builtin_template("chatml"))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_bytes(loaded.json_bytes)
    return path
