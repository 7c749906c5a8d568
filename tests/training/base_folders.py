"""Builders for export and tokenizer-match tests: shards packed with the chatml fixture
tokenizer, and base model folders laid out like a real hub model's."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from pipeline.pack import PackConfig, build_shards
from pipeline.tokenized import TokenizeConfig, build_tokenized
from tests.pipeline.factories import FIXTURES, fixture_pairs, write_pairs
from training.checkpoint import save_pretrained
from training.configs import tiny
from training.model import CausalLM

CHATML = FIXTURES / "chatml_tokenizer"
VOCAB = 1283  # the chatml fixture's tokens, added ones included
ENDOFTEXT, IM_START, IM_END = 1280, 1281, 1282
PACK_MAX_LEN = 1024
BASE_MAX_LEN = 8192


def chatml_shards(root: Path) -> Path:
    """The fixture pairs tokenized with the chatml fixture folder (its template) and packed
    into rows of `PACK_MAX_LEN`, as `prefpack pack --tokenizer` would."""
    pairs = write_pairs(root / "pairs.parquet", fixture_pairs())
    tokenized = build_tokenized(pairs, CHATML, TokenizeConfig(), root / "store")
    return build_shards(
        tokenized.directory, PackConfig(max_len=PACK_MAX_LEN), root / "store"
    ).directory


def tiny_model(hf_config: dict | None = None) -> CausalLM:
    """`tiny` with the chatml fixture's vocabulary, carrying `hf_config` (config.json keys
    such as token ids)."""
    model = CausalLM(dataclasses.replace(tiny(), vocab_size=VOCAB))
    model.hf_config = dict(hf_config or {})
    return model


def base_folder(folder: Path, template: str | None = "jinja") -> Path:
    """A base model's folder: config.json with token ids, weights, the chatml tokenizer
    written again by `tokenizers` (pretty: other bytes, same ids), a
    tokenizer_config.json with its own bos/eos/pad/unk and an 8192 context,
    special_tokens_map.json and generation_config.json, as a base checkpoint has them.

    Args:
        template: where the fixture's template is: "jinja" (chat_template.jinja),
            "config" (tokenizer_config.json), "named" (there, as the "default" of a list
            of named templates); or "other" (a different template) or None (none).
    """
    ids = {"bos_token_id": IM_START, "eos_token_id": ENDOFTEXT, "pad_token_id": ENDOFTEXT}
    save_pretrained(tiny_model(ids), folder)
    tokenizer = Tokenizer.from_file(str(CHATML / "tokenizer.json"))
    (folder / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    config = json.loads((CHATML / "tokenizer_config.json").read_text(encoding="utf-8"))
    chat_template = config.pop("chat_template")
    special = {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"}
    special |= {"pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config |= {**special, "model_max_length": BASE_MAX_LEN}
    if template == "jinja":
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    elif template == "config":
        config["chat_template"] = chat_template
    elif template == "named":
        tools = {"name": "tool_use", "template": "{{ tools }}"}
        config["chat_template"] = [{"name": "default", "template": chat_template}, tools]
    elif template == "other":
        config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    generation = {**ids, "do_sample": True, "temperature": 0.3}
    (folder / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return folder


def gpt2_folder(folder: Path) -> Path:
    """A model folder whose tokenizer is the gpt2_small fixture (no chat markers)."""
    folder.mkdir(parents=True)
    shutil.copyfile(FIXTURES / "gpt2_small_tokenizer.json", folder / "tokenizer.json")
    return folder
