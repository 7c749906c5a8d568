"""The tokenizer files and `generation_config.json` of an exported Hugging Face folder.

The shards hold the tokenizer the rows were made with, but only a minimal config: its eos
is the end of turn the responses end with (`pipeline.tokenized`) and its
`model_max_length` is the packing max_len. A base model's folder holds much more that a
serving stack reads: pad and unk tokens, the real context length, `generation_config.json`
with the ids generation stops on. So an export keeps the base folder's tokenizer files
when its tokenizer.json is the shards' (`training.tokenizer_match`), and changes only
what training changed:

- eos (`tokenizer_config.json`, `special_tokens_map.json`) becomes the end of turn the
  responses end with, so generation stops where training put the end;
- the chat template becomes the one the pairs were rendered with, when it differs from
  the base's (it is the base's unless the pack named another `--template`), written as
  `chat_template.jinja`, the file transformers reads first;
- `generation_config.json` gets the end-of-turn id among its `eos_token_id`.

Without a base tokenizer (a model initialised from `--config`, a folder without
tokenizer.json) or with another one (a mismatch the user allowed: the model learned the
shards' ids), the shards' tokenizer is exported, with the model's
`max_position_embeddings` as `model_max_length`, and a `generation_config.json` made from
config.json's token ids (the tokenizer's, where config.json has none) plus the end of turn.

Torch-free: `training.checkpoint.write_pretrained` writes these bytes inside its atomic
directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from training.tokenizer_match import TOKENIZER, tokenizer_mismatch

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"
LEGACY_CHAT_TEMPLATE = "chat_template.json"
GENERATION_CONFIG = "generation_config.json"
# The tokenizer files of a model folder (copied as they are by `copy_tokenizer_files`).
TOKENIZER_FILES = (
    TOKENIZER,
    TOKENIZER_CONFIG,
    SPECIAL_TOKENS_MAP,
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    CHAT_TEMPLATE,
    LEGACY_CHAT_TEMPLATE,
    GENERATION_CONFIG,
)
# transformers reads a model_max_length above this as "no limit" (its LARGE_INTEGER).
_NO_LIMIT = int(1e20)


@dataclass(frozen=True)
class ExportTokenizer:
    """Where an exported folder's tokenizer comes from.

    Attributes:
        shards: the shard directory the model was trained on: its tokenizer.json made the
            ids, and its tokenizer_config.json names the end of turn (eos) and template.
        base: the model folder training started from; its tokenizer files are kept when
            its tokenizer.json is the shards'. None for a model initialised from a config.
    """

    shards: Path
    base: Path | None = None


def export_files(spec: ExportTokenizer, config: Mapping[str, Any]) -> dict[str, bytes]:
    """The tokenizer files and generation_config.json of an exported folder.

    Args:
        spec: the shards and the base folder.
        config: the exported config.json (its `max_position_embeddings` and token ids).

    Returns:
        File name -> bytes, to write beside config.json and the weights.

    Raises:
        FileNotFoundError: the shards lack tokenizer.json or tokenizer_config.json.
        TokenizerError: a tokenizer.json is unreadable (names the file).
    """
    shards = _read_json(spec.shards / TOKENIZER_CONFIG)
    end_of_turn = _text(shards.get("eos_token"))
    base = _base_tokenizer(spec)
    if base is None:
        files = {TOKENIZER: (spec.shards / TOKENIZER).read_bytes()}
    else:
        files = {n: (base / n).read_bytes() for n in TOKENIZER_FILES if (base / n).is_file()}
    base_generation = files.pop(GENERATION_CONFIG, None)
    if TOKENIZER_CONFIG in files:
        tok_config = json.loads(files[TOKENIZER_CONFIG])
    else:  # the shards' minimal config, less the packing max_len (not the model's)
        tok_config = {k: v for k, v in shards.items() if k != "model_max_length"}

    if not _is_length(tok_config.get("model_max_length")):
        tok_config["model_max_length"] = config["max_position_embeddings"]
    if end_of_turn is not None:
        tok_config["eos_token"] = _with_text(tok_config.get("eos_token"), end_of_turn)
        if SPECIAL_TOKENS_MAP in files:
            special = json.loads(files[SPECIAL_TOKENS_MAP])
            special["eos_token"] = _with_text(special.get("eos_token"), end_of_turn)
            files[SPECIAL_TOKENS_MAP] = _json_bytes(special)
    template = shards.get("chat_template")
    if isinstance(template, str) and template != _chat_template(files, tok_config):
        # One template, the trained one: transformers reads chat_template.jinja first, and
        # no other copy is left to disagree with it.
        files[CHAT_TEMPLATE] = template.encode("utf-8")
        tok_config.pop("chat_template", None)
        files.pop(LEGACY_CHAT_TEMPLATE, None)
    files[TOKENIZER_CONFIG] = _json_bytes(tok_config)

    tokenizer = Tokenizer.from_str(files[TOKENIZER].decode("utf-8"))
    ids = _token_ids(config, tok_config, tokenizer)
    # The base's generation settings, with the ids it leaves out from config.json.
    generation = {**ids, **json.loads(base_generation)} if base_generation is not None else ids
    end_id = tokenizer.token_to_id(end_of_turn) if end_of_turn is not None else None
    eos = _ids(generation.get("eos_token_id")) + ([end_id] if end_id is not None else [])
    eos = list(dict.fromkeys(eos))
    if eos:
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    files[GENERATION_CONFIG] = _json_bytes(generation)
    return files


def _base_tokenizer(spec: ExportTokenizer) -> Path | None:
    """The base folder when its tokenizer files are the ones to export: it has a
    tokenizer.json and that is the shards' tokenizer."""
    base = spec.base
    if base is None or not (base / TOKENIZER).is_file():
        return None
    return base if tokenizer_mismatch(spec.shards, base) is None else None


def _token_ids(
    config: Mapping[str, Any], tok_config: Mapping[str, Any], tokenizer: Tokenizer
) -> dict[str, Any]:
    """bos/eos/pad ids from config.json, else from the tokenizer config's tokens."""
    ids: dict[str, Any] = {}
    for name in ("bos", "eos", "pad"):
        value = config.get(f"{name}_token_id")
        if value is None and (token := _text(tok_config.get(f"{name}_token"))) is not None:
            value = tokenizer.token_to_id(token)
        if value is not None:
            ids[f"{name}_token_id"] = value
    return ids


def _chat_template(files: Mapping[str, bytes], tok_config: Mapping[str, Any]) -> str | None:
    """The default template transformers would load: chat_template.jinja first, else the
    tokenizer config's (a string, or the "default" of a list of named templates)."""
    if CHAT_TEMPLATE in files:
        return files[CHAT_TEMPLATE].decode("utf-8")
    value = tok_config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _json_bytes(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _text(token: object) -> str | None:
    """A special token as configs store it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _with_text(token: object, text: str) -> object:
    """`token` holding `text`, in the form it was stored in (a dict keeps its flags)."""
    return {**token, "content": text} if isinstance(token, dict) else text


def _is_length(value: object) -> bool:
    return isinstance(value, int) and 0 < value < _NO_LIMIT


def _ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    return list(value) if isinstance(value, list) else []
