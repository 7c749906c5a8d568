"""A shard manifest's names and keys are checked before any file it lists is opened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import shards
from pipeline.pack import PackConfig, build_shards
from pipeline.shards import ShardError, check_files
from pipeline.tokenized import TokenizeConfig, build_tokenized


@pytest.fixture
def shard_dir(pairs_path: Path, tiny_tokenizer_path: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    tokens = build_tokenized(pairs_path, tiny_tokenizer_path, TokenizeConfig(), store)
    return build_shards(tokens.directory, PackConfig(max_len=256), store).directory


@pytest.mark.parametrize(
    ("where", "bad"),
    [(("shards", 0, "file"), "../../etc/passwd"), (("shards", 0, "file"), "/etc/passwd"),
     (("tokenizer", "path"), "../tokenizer.json"), (("key",), "../../x"),
     (("tokenized", "key"), "/tmp")],
)  # fmt: skip
def test_a_hostile_manifest_is_refused_before_any_listed_file_is_opened(
    shard_dir: Path, monkeypatch: pytest.MonkeyPatch, where: tuple, bad: str
) -> None:
    path = shard_dir / shards.MANIFEST
    manifest = json.loads(path.read_text())
    *parents, last = where
    node = manifest
    for step in parents:
        node = node[step]
    node[last] = bad
    path.write_text(json.dumps(manifest))

    def opened(*args: object) -> None:
        raise AssertionError(f"opened {args} before checking the names")

    monkeypatch.setattr(shards, "sha256_file", opened)
    monkeypatch.setattr(shards.pa, "memory_map", opened)
    for verify in (True, False):
        with pytest.raises(ValueError, match=r"not a plain file name|not a hex key") as raised:
            shards.open_shards(shard_dir, verify=verify)
        assert str(raised.value).startswith(f"{path}: ") and repr(bad) in str(raised.value)


def test_check_files_refuses_a_listed_name_outside_the_directory(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("x")
    with pytest.raises(ShardError, match=r"'\.\./secret' is not a plain file name"):
        check_files(tmp_path / "d", [("../secret", 1, "0" * 64)])
