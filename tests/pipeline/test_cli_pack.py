"""`prefpack pack` and `prefpack inspect` through the real dispatcher."""

from __future__ import annotations

from pathlib import Path

import pytest

import prefpack
from tests.pipeline.factories import fixture_pairs, write_pairs


def test_pack_twice_then_inspect(
    tiny_tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = write_pairs(tmp_path / "pairs.parquet", fixture_pairs())
    argv = [
        "pack",
        "--pairs", str(pairs),
        "--tokenizer", str(tiny_tokenizer_path),
        "--max-len", "512",
        "--out", str(tmp_path / "store"),
        "--layout", "unshared",
        "--block-size", "64",
    ]  # fmt: skip
    assert prefpack.main(argv) == 0
    first = capsys.readouterr()
    directory = Path(first.out.strip())
    assert directory.parent == tmp_path / "store" / "shards" and directory.is_dir()
    assert "packed 8 pairs" in first.err

    assert prefpack.main(argv) == 0
    second = capsys.readouterr()
    assert second.out == first.out and "reused" in second.err

    assert prefpack.main(["inspect", str(directory), "--row", "0"]) == 0
    shown = capsys.readouterr().out
    assert "layout unshared" in shown and "fill ratio" in shown
    # The row decodes back to text, each segment between its markers.
    assert shown.count("[PROMPT]") == shown.count("[PROMPT again]") == shown.count("[CHOSEN]")
    assert "[REJECTED]" in shown and "<|im_start|>assistant\n[/PROMPT]" in shown
    contents = [m["content"] for p in fixture_pairs().column("prompt").to_pylist() for m in p]
    assert any(c in shown for c in contents)
