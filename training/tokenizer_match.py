"""Is the shards' tokenizer the model's own? Compared by content, without torch.

A model trained on ids from another tokenizer learns nothing it can use, and a vocabulary
size check passes whenever the shards' vocabulary happens to be the smaller one (GPT-2's
1,280 tokens inside SmolLM2's 49,152). So when the model folder carries a `tokenizer.json`,
the shards' must be the same tokenizer.

"The same" means what gives the ids, not the file's bytes: a copy may be written again by
`tokenizers` (other key order, the merges as pairs instead of "a b" strings) and the
tokenize stage rewrites `tokenizer_config.json`'s eos to the end of turn. Both files are
parsed and written back by `tokenizers` (one canonical form), and compared on
`added_tokens`, `normalizer`, `pre_tokenizer` and `model` (vocabulary, merges, unk and
byte fallback). Left out: `truncation` and `padding` (turned off before any pair is
encoded), `post_processor` (pairs are encoded with `add_special_tokens=False`, so it adds
nothing), `decoder` (ids to text only) and `tokenizer_config.json`.

Torch-free: the Dagster layer calls `tokenizer_mismatch` before it launches training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from core.errors import TokenizerError

TOKENIZER = "tokenizer.json"
# The parts of a tokenizer.json that change the ids of a text encoded without special tokens.
ID_FIELDS = ("added_tokens", "normalizer", "pre_tokenizer", "model")


@dataclass(frozen=True)
class TokenizerContent:
    """What names a tokenizer in a mismatch message, and what compares it.

    Attributes:
        path: its tokenizer.json.
        vocab_size: tokens, added tokens included.
        parts: canonical JSON text of each of `ID_FIELDS`.
    """

    path: Path
    vocab_size: int
    parts: dict[str, str]

    @property
    def sha256(self) -> str:
        """sha256 of the parts that give the ids (not of the file's bytes)."""
        digest = hashlib.sha256()
        for name in ID_FIELDS:
            digest.update(f"{name}={self.parts[name]}\n".encode())
        return digest.hexdigest()

    def describe(self) -> str:
        return f"{self.path}, {self.vocab_size:,} tokens, content sha256 {self.sha256[:12]}"


def tokenizer_content(path: str | Path) -> TokenizerContent:
    """The id-giving content of a tokenizer.json (or of a folder's tokenizer.json).

    Raises:
        TokenizerError: the file is missing or not a `tokenizers` tokenizer.json.
    """
    path = Path(path)
    file = path / TOKENIZER if path.is_dir() else path
    try:
        tokenizer = Tokenizer.from_str(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise TokenizerError(f"{file}: cannot read: {err}") from err
    except Exception as err:  # the Rust side raises plain Exception for any parse error
        raise TokenizerError(f"{file}: not a tokenizers tokenizer.json: {err}") from err
    document = json.loads(tokenizer.to_str())
    document["added_tokens"] = sorted(document["added_tokens"], key=lambda t: t["id"])
    parts = {
        name: json.dumps(document[name], sort_keys=True, ensure_ascii=False) for name in ID_FIELDS
    }
    return TokenizerContent(file, tokenizer.get_vocab_size(with_added_tokens=True), parts)


def tokenizer_mismatch(shards: str | Path, model: str | Path) -> str | None:
    """Why the shards' tokenizer is not the model folder's, or None when it is.

    Args:
        shards: a shard directory (or tokenized directory, or a tokenizer.json).
        model: the model folder training starts from.

    Returns:
        None when the folder has no tokenizer.json (nothing to compare: the caller falls
        back to the vocabulary size check) or holds the same tokenizer; else one line
        naming both tokenizers (path, vocabulary size, content hash), what differs and the
        fixes.

    Raises:
        TokenizerError: either tokenizer.json is unreadable (names the file).
    """
    model = Path(model)
    if not (model / TOKENIZER).is_file():
        return None
    ours, theirs = tokenizer_content(shards), tokenizer_content(model)
    differ = [name for name in ID_FIELDS if ours.parts[name] != theirs.parts[name]]
    if not differ:
        return None
    return (
        f"the shards' tokenizer ({ours.describe()}) is not the model's ({theirs.describe()}): "
        f"they differ in {', '.join(differ)}; pack with --tokenizer {model}, or pass "
        "--allow-tokenizer-mismatch"
    )
