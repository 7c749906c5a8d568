"""`prefpack tokenize`, `prefpack pack` and `prefpack inspect` through the real dispatcher."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import prefpack
from tests.conftest import assert_one_error_line
from tests.pipeline.factories import fixture_pairs, write_pairs


def _stamps(store: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(store)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.rglob("*")
    }


def test_pack_twice_then_inspect(
    tiny_tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = write_pairs(tmp_path / "pairs.parquet", fixture_pairs())
    store = tmp_path / "store"
    argv = [
        "pack",
        "--pairs", str(pairs),
        "--tokenizer", str(tiny_tokenizer_path),
        "--max-len", "512",
        "--out", str(store),
        "--layout", "unshared",
        "--block-size", "64",
    ]  # fmt: skip
    assert prefpack.main(argv) == 0
    first = capsys.readouterr()
    directory = Path(first.out.strip())
    assert directory.parent == store / "shards" and directory.is_dir()
    assert "tokenize: 8 pairs in, 8 tokenized" in first.err and "packed 8 pairs" in first.err

    stamps = _stamps(store)
    assert prefpack.main(argv) == 0
    second = capsys.readouterr()
    assert second.out == first.out
    assert "tokenize: reused" in second.err and "pack: reused" in second.err
    assert "nothing rewritten" in second.err and _stamps(store) == stamps

    assert prefpack.main(["inspect", str(directory), "--row", "0"]) == 0
    shown = capsys.readouterr().out
    assert "layout unshared" in shown and "fill ratio" in shown
    # The row decodes back to text, each segment between its markers.
    assert shown.count("[PROMPT]") == shown.count("[PROMPT again]") == shown.count("[CHOSEN]")
    assert "[REJECTED]" in shown and "<|im_start|>assistant\n[/PROMPT]" in shown
    contents = [m["content"] for p in fixture_pairs().column("prompt").to_pylist() for m in p]
    assert any(c in shown for c in contents)


def test_a_new_max_len_repacks_the_tokenized_pairs_of_prefpack_tokenize(
    tiny_tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = write_pairs(tmp_path / "pairs.parquet", fixture_pairs())
    inputs = ["--pairs", str(pairs), "--tokenizer", str(tiny_tokenizer_path)]
    inputs += ["--out", str(tmp_path / "store")]
    assert prefpack.main(["tokenize", *inputs]) == 0
    tokenized = Path(capsys.readouterr().out.strip())
    assert tokenized.parent == tmp_path / "store" / "tokenized"
    assert (tokenized / "report.json").is_file()

    for max_len in ("512", "256"):
        assert prefpack.main(["pack", *inputs, "--max-len", max_len]) == 0
        run = capsys.readouterr()
        assert "tokenize: reused" in run.err and "pack: packed" in run.err
        assert "nothing rewritten" not in run.err
    assert len(list((tmp_path / "store" / "shards").iterdir())) == 2
    assert list((tmp_path / "store" / "tokenized").iterdir()) == [tokenized]


# -----------------------------------------------------------------------------
# Mistakes: one line, exit status 2, nothing written


def _pack_argv(tiny_tokenizer_path: Path, tmp_path: Path, *extra: str) -> list[str]:
    pairs = write_pairs(tmp_path / "pairs.parquet", fixture_pairs())
    return [
        "pack",
        "--pairs", str(pairs),
        "--tokenizer", str(tiny_tokenizer_path),
        "--out", str(tmp_path / "store"),
        *extra,
    ]  # fmt: skip


def test_max_len_out_of_range_stops_before_tokenizing(
    tiny_tokenizer_path: Path, tmp_path: Path, cli
) -> None:
    status, err = cli(_pack_argv(tiny_tokenizer_path, tmp_path, "--max-len", "0"))
    assert_one_error_line(status, err, "pack", "--max-len must be >= 3, got 0")
    assert not (tmp_path / "store").exists()


def test_nothing_packed_is_an_error_with_the_lengths(
    tiny_tokenizer_path: Path, tmp_path: Path, cli
) -> None:
    argv = _pack_argv(tiny_tokenizer_path, tmp_path, "--max-len", "8", "--too-long", "drop")
    status, err = cli(argv)
    assert_one_error_line(status, err, "pack", "no pair packed", "against --max-len 8")
    assert re.search(r"is \d+ tokens at the median and \d+ at most", err)
    shards = tmp_path / "store" / "shards"
    assert not shards.exists() or not any(p.name[0] != "." for p in shards.iterdir())


def test_truncating_many_pairs_warns_with_the_count(
    tiny_tokenizer_path: Path, tmp_path: Path, cli
) -> None:
    status, err = cli(
        _pack_argv(tiny_tokenizer_path, tmp_path, "--max-len", "64", "--min-response-len", "4")
    )
    assert status == 0, err
    truncated = re.search(r"truncated (\d+)\)", err)
    assert truncated and int(truncated.group(1)) > 0, err
    assert f"{truncated.group(1)} of " in err and "were truncated to fit --max-len 64" in err


@pytest.mark.parametrize("target", ["file", "folder", "missing"])
def test_inspect_on_something_else_is_one_line(tmp_path: Path, cli, target: str) -> None:
    path = tmp_path / target
    if target == "file":
        path.write_text("not shards\n")
    elif target == "folder":
        path.mkdir()
    status, err = cli(["inspect", str(path)])
    assert_one_error_line(status, err, "inspect", str(path))


def test_curate_on_a_missing_path_is_one_line(tmp_path: Path, cli) -> None:
    missing = tmp_path / "nothing_here"
    status, err = cli(["curate", "--pairs", str(missing), "--out", str(tmp_path / "out")])
    assert_one_error_line(status, err, "curate", str(missing))
    assert not (tmp_path / "out").exists()


def test_curate_on_a_corrupt_parquet_is_one_line(tmp_path: Path, cli) -> None:
    bad = tmp_path / "pairs.parquet"
    bad.write_bytes(b"PAR1 not really")
    status, err = cli(["curate", "--pairs", str(bad), "--out", str(tmp_path / "out")])
    assert_one_error_line(status, err, "curate", str(bad), "not a readable Parquet file")
