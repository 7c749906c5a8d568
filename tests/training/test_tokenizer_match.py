"""`tokenizer_mismatch`: the shards' tokenizer against the model folder's, by content.

Same content in other bytes (written again by `tokenizers`, truncation and padding on, the
tokenizer_config.json eos rewritten to the end of turn) is the same tokenizer; a change
that gives other ids (another vocabulary, one merge less, one added token more) is not,
and the line names both tokenizers, what differs and the fixes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer

from core.errors import TokenizerError
from tests.training.base_folders import CHATML, base_folder, chatml_shards, gpt2_folder
from training.tokenizer_match import tokenizer_content, tokenizer_mismatch


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chatml_shards(tmp_path_factory.mktemp("chatml"))


def _rewritten(folder: Path, change) -> Path:
    """A model folder holding the chatml tokenizer after `change(tokenizer)`."""
    tokenizer = Tokenizer.from_file(str(CHATML / "tokenizer.json"))
    change(tokenizer)
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    return folder


def test_the_model_folder_the_shards_were_packed_from_matches(shards: Path) -> None:
    assert tokenizer_mismatch(shards, CHATML) is None


def test_same_content_in_other_bytes_matches(shards: Path, tmp_path: Path) -> None:
    """A base folder whose tokenizer.json is written again (pretty) and whose
    tokenizer_config.json names another eos, pad and unk is the same tokenizer."""
    base = base_folder(tmp_path / "base")
    assert (base / "tokenizer.json").read_bytes() != (shards / "tokenizer.json").read_bytes()
    assert (
        json.loads((base / "tokenizer_config.json").read_text())["eos_token"]
        != json.loads((shards / "tokenizer_config.json").read_text())["eos_token"]
    )
    assert tokenizer_mismatch(shards, base) is None


def test_truncation_and_padding_settings_do_not_count(shards: Path, tmp_path: Path) -> None:
    def settings(tokenizer: Tokenizer) -> None:
        tokenizer.enable_truncation(16)
        tokenizer.enable_padding(length=32)

    assert tokenizer_mismatch(shards, _rewritten(tmp_path / "model", settings)) is None


@pytest.mark.parametrize(
    ("change", "part"),
    [
        (lambda t: t.add_special_tokens([AddedToken("<|tool|>", special=True)]), "added_tokens"),
        (lambda t: setattr(t.model, "byte_fallback", True), "model"),
    ],
    ids=["one more special token", "byte fallback"],
)
def test_a_change_that_gives_other_ids_is_named(
    shards: Path, tmp_path: Path, change, part: str
) -> None:
    line = tokenizer_mismatch(shards, _rewritten(tmp_path / "model", change))
    assert line is not None and f"differ in {part}" in line


def test_another_tokenizer_is_one_line_naming_both(shards: Path, tmp_path: Path) -> None:
    """gpt2_small is the chatml fixture's BPE without the chat markers: 1,281 tokens."""
    model = gpt2_folder(tmp_path / "gpt2")
    line = tokenizer_mismatch(shards, model)
    assert line is not None and "\n" not in line
    ours, theirs = tokenizer_content(shards), tokenizer_content(model)
    assert ours.sha256 != theirs.sha256
    assert (
        f"the shards' tokenizer ({shards / 'tokenizer.json'}, 1,283 tokens, content sha256 " in line
    )
    assert f"is not the model's ({model / 'tokenizer.json'}, 1,281 tokens, content sha256 " in line
    assert ours.sha256[:12] in line and theirs.sha256[:12] in line
    assert f"pack with --tokenizer {model}" in line and "--allow-tokenizer-mismatch" in line


def test_a_bpe_the_pipeline_trained_is_not_the_models(tiny_shards: Path) -> None:
    line = tokenizer_mismatch(tiny_shards, CHATML)
    assert line is not None
    assert re.search(r"shards' tokenizer \(.*, 320 tokens, content sha256 [0-9a-f]{12}\)", line)
    assert re.search(r"model's \(.*chatml_tokenizer/tokenizer.json, 1,283 tokens, ", line)


def test_a_model_folder_without_a_tokenizer_is_not_compared(shards: Path, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert tokenizer_mismatch(shards, tmp_path / "model") is None


def test_an_unreadable_tokenizer_names_its_file(shards: Path, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "model" / "tokenizer.json"))):
        tokenizer_mismatch(shards, tmp_path / "model")


def test_the_export_helpers_do_not_import_torch() -> None:
    """The Dagster layer calls these without torch."""
    code = (
        "import sys, training.tokenizer_match, training.export_files, training.model_card; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
