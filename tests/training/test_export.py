"""Exported folders: the base model's tokenizer files with what training changed (eos =
the end of turn, the trained chat template, generation_config.json), read back by
transformers (test-only) as a serving stack would.

The base folder is laid out like a hub base model (`tests.training.base_folders`): eos,
pad and unk `<|endoftext|>` (1280), bos `<|im_start|>` (1281), an 8192 context and a
generation_config.json; the shards were packed from the chatml fixture, whose responses end
with `<|im_end|>` (1282), into rows of 1024 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from tests.training.base_folders import (
    BASE_MAX_LEN,
    ENDOFTEXT,
    IM_END,
    IM_START,
    PACK_MAX_LEN,
    VOCAB,
    base_folder,
    chatml_shards,
    gpt2_folder,
    tiny_model,
)
from training.checkpoint import load_pretrained, save_pretrained
from training.export_files import ExportTokenizer

TEXT = "<|im_start|>user\nsay the word<|im_end|>\n"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chatml_shards(tmp_path_factory.mktemp("chatml"))


def _trained_template(shards: Path) -> str:
    return json.loads((shards / "tokenizer_config.json").read_text())["chat_template"]


def _export(model, shards: Path, base: Path | None, folder: Path) -> Path:
    return save_pretrained(model, folder, tokenizer=ExportTokenizer(shards, base))


def test_export_keeps_the_base_tokenizer_with_the_end_of_turn_as_eos(
    shards: Path, tmp_path: Path
) -> None:
    base = base_folder(tmp_path / "base")
    final = _export(load_pretrained(base), shards, base, tmp_path / "final")

    ours = transformers.AutoTokenizer.from_pretrained(final)
    theirs = transformers.AutoTokenizer.from_pretrained(base)
    assert theirs.eos_token == "<|endoftext|>" and ours.eos_token == "<|im_end|>"
    assert (
        (ours.bos_token, ours.pad_token, ours.unk_token)
        == (
            theirs.bos_token,
            theirs.pad_token,
            theirs.unk_token,
        )
        == ("<|im_start|>", "<|endoftext|>", "<|endoftext|>")
    )
    assert ours.chat_template == theirs.chat_template == _trained_template(shards)
    assert ours.model_max_length == theirs.model_max_length == BASE_MAX_LEN != PACK_MAX_LEN
    assert ours(TEXT)["input_ids"] == theirs(TEXT)["input_ids"]
    special = json.loads((final / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|im_end|>" and special["pad_token"] == "<|endoftext|>"

    generation = transformers.GenerationConfig.from_pretrained(final)
    assert generation.eos_token_id == [ENDOFTEXT, IM_END]  # the base's and the end of turn
    assert (generation.bos_token_id, generation.pad_token_id) == (IM_START, ENDOFTEXT)
    assert generation.do_sample and generation.temperature == 0.3  # the base's, kept

    model = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert model.config.vocab_size == VOCAB


def test_a_base_generation_config_without_token_ids_gets_config_json_s(
    shards: Path, tmp_path: Path
) -> None:
    """The base's generation settings are kept; ids it leaves out come from config.json,
    so its eos is not lost when the end of turn is added."""
    base = base_folder(tmp_path / "base")
    (base / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    final = _export(load_pretrained(base), shards, base, tmp_path / "final")
    generation = transformers.GenerationConfig.from_pretrained(final)
    assert generation.eos_token_id == [ENDOFTEXT, IM_END] and generation.bos_token_id == IM_START
    assert generation.temperature == 0.3


@pytest.mark.parametrize("where", ["config", "named", None, "other"])
def test_the_exported_template_is_the_trained_one(
    shards: Path, tmp_path: Path, where: str | None
) -> None:
    """A base whose template (or whose default named template) is the trained one keeps it
    where it is; one without a template, or with another (the pack named a --template),
    gets the trained one as chat_template.jinja, the only copy."""
    base = base_folder(tmp_path / "base", template=where)
    final = _export(load_pretrained(base), shards, base, tmp_path / "final")
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    assert tokenizer.get_chat_template() == _trained_template(shards)
    kept = where in ("config", "named")
    assert (final / "chat_template.jinja").is_file() != kept
    assert ("chat_template" in json.loads((final / "tokenizer_config.json").read_text())) == kept


@pytest.mark.parametrize("base", ["none", "no tokenizer files", "another tokenizer"])
def test_without_the_base_tokenizer_the_shards_tokenizer_gets_the_model_context(
    shards: Path, tmp_path: Path, base: str
) -> None:
    """A model from --config, a folder without tokenizer files, or one whose tokenizer is
    not the shards' (an allowed mismatch: the model learned the shards' ids) exports the
    shards' tokenizer with the model's context and a generation_config.json."""
    ids = {"bos_token_id": IM_START, "eos_token_id": ENDOFTEXT}
    model = tiny_model({} if base == "none" else ids)
    folder = {
        "none": None,
        "no tokenizer files": tmp_path / "model",
        "another tokenizer": tmp_path / "gpt2",
    }[base]
    if base == "no tokenizer files":
        folder.mkdir()
    elif base == "another tokenizer":
        gpt2_folder(folder)
    final = _export(model, shards, folder, tmp_path / "final")

    assert (final / "tokenizer.json").read_bytes() == (shards / "tokenizer.json").read_bytes()
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.model_max_length == model.config.max_position_embeddings != PACK_MAX_LEN
    assert tokenizer.chat_template == _trained_template(shards)
    generation = transformers.GenerationConfig.from_pretrained(final)
    # config.json's ids when it has them, else the tokenizer's; the end of turn either way.
    assert generation.eos_token_id == (IM_END if base == "none" else [ENDOFTEXT, IM_END])
    assert generation.bos_token_id == IM_START


def test_the_card_is_written_and_a_failed_export_leaves_no_folder(
    shards: Path, tmp_path: Path
) -> None:
    final = save_pretrained(
        tiny_model(), tmp_path / "final", tokenizer=ExportTokenizer(shards), readme="# card\n"
    )
    assert (final / "README.md").read_text() == "# card\n"
    with pytest.raises(FileNotFoundError):  # before any weights: no folder, no leftovers
        save_pretrained(tiny_model(), tmp_path / "bad", tokenizer=ExportTokenizer(tmp_path / "x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
