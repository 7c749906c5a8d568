"""Tokenizers: load one, train one, and tokenize rendered pairs in batches.

A tokenizer comes from a `tokenizer.json` file or a Hugging Face model folder (its
`tokenizer.json`, plus bos/eos and the `chat_template` from `tokenizer_config.json` or
`chat_template.jinja`). Text is encoded with `add_special_tokens=False`, as
`apply_chat_template` does: the template, not the tokenizer's post-processor, places bos.

When no tokenizer is configured (the bundled sample job has no model hub) we train a
small byte-level BPE on the rendered pairs with `tokenizers`; its training is
deterministic for the same texts and settings, and the shards keep its `tokenizer.json`.

Boundary agreement: the prompt and each response are tokenized separately, so
`prompt_ids + response_ids` may differ from tokenizing the joined text when a token would
straddle the boundary (e.g. a generation prompt ending in a space). `boundary_agreement`
measures how often that happens for a template/tokenizer pair.

Markers: a template's turn markers and end of turn must each be one token of the
tokenizer (`check_markers`); GPT-2's tokenizer, say, splits chatml's `<|im_end|>` into 7
ordinary tokens, and a model trained on those never emits the eos a generation loop stops
on. `EndingReport` counts the responses whose tokens end with the end of turn.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from core.errors import TokenizerError
from data_contracts import tokenized_pair
from pipeline import ragged
from pipeline.ahead import ahead
from pipeline.templates import ChatTemplate, PairTexts, TurnMarkers, turn_markers

ENCODE_CHUNK = 1024  # texts per encode_batch_fast call (`encode`; does not change the ids)

# Names under which tokenizers commonly store bos/eos, tried in order for a bare
# tokenizer.json (it has no config saying which special token is which).
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>")
_EOS_NAMES = ("<|eot_id|>", "<|im_end|>", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>")
# The pre-tokenizer split of Llama 3 / cl100k: unlike GPT-2's, it keeps a run of newlines
# in one piece, so a prompt ending in "\n\n" tokenizes the same alone as joined with the
# response (GPT-2's split gives "\n\n" alone but "\n" + "\n" before a word).
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class MarkerError(ValueError):
    """A template's markers are not single tokens of the tokenizer; names them and the fix."""


@dataclass(frozen=True)
class LoadedTokenizer:
    """A tokenizer with the facts templates and the manifest need.

    Attributes:
        tokenizer: the `tokenizers.Tokenizer`, with truncation and padding turned off.
        name: the file or folder name (or "trained-bpe-<vocab>"), for reports.
        json_bytes: the exact `tokenizer.json`, copied beside the shards.
        bos_token, eos_token: their text, or None when the tokenizer has none.
        chat_template: the model folder's template, when it has one.
        trained: True when `train_tokenizer` made it.
    """

    tokenizer: Tokenizer
    name: str
    json_bytes: bytes
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None = None
    trained: bool = False

    @property
    def fingerprint(self) -> str:
        """sha256 of everything that changes the ids: tokenizer.json and bos/eos."""
        digest = hashlib.sha256(self.json_bytes)
        digest.update(json.dumps([self.bos_token, self.eos_token]).encode())
        return digest.hexdigest()


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or {content: ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _config_template(value: object) -> str | None:
    """`chat_template` is a string, or a list of {name, template} (pick "default")."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


def _from_json(json_bytes: bytes, source: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_str(json_bytes.decode("utf-8"))
    except Exception as err:  # the Rust side raises plain Exception for any parse error
        raise TokenizerError(f"{source}: not a tokenizers tokenizer.json: {err}") from err
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


# What `load_tokenizer` reads from a model folder (the weights are not among them).
FILES_READ = (
    "tokenizer.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files `load_tokenizer(path)` reads that exist: the file itself, or those of
    `FILES_READ` in the folder."""
    path = Path(path)
    if not path.is_dir():
        return [path] if path.is_file() else []
    return [path / name for name in FILES_READ if (path / name).is_file()]


def load_tokenizer(path: str | Path) -> LoadedTokenizer:
    """Load a `tokenizer.json` file or a Hugging Face model folder.

    Args:
        path: a tokenizer.json, or a folder holding tokenizer.json and optionally
            tokenizer_config.json / special_tokens_map.json / chat_template.jinja.

    Returns:
        The tokenizer with bos/eos from the folder's config, or for a bare file, guessed
        from its special added tokens by their usual names.

    Raises:
        TokenizerError: the path or its tokenizer.json is missing or unreadable.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{file}: no tokenizer.json there")
    json_bytes = file.read_bytes()
    tokenizer = _from_json(json_bytes, file)
    if not path.is_dir():
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        bos = next((t for t in _BOS_NAMES if t in special), None)
        eos = next((t for t in _EOS_NAMES if t in special), None)
        return LoadedTokenizer(tokenizer, file.name, json_bytes, bos, eos)
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
        if (path / name).is_file():
            try:
                config.update(json.loads((path / name).read_text(encoding="utf-8")))
            except json.JSONDecodeError as err:
                raise TokenizerError(f"{path / name}: invalid JSON: {err}") from err
    template = _config_template(config.get("chat_template"))
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return LoadedTokenizer(
        tokenizer=tokenizer,
        name=path.name,
        json_bytes=json_bytes,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
        chat_template=template,
    )


def stored_tokenizer(file: str | Path, entry: dict) -> LoadedTokenizer:
    """A tokenizer.json stored beside a stage's output, as it was loaded when the output
    was made: with the name, bos/eos and origin that output's report records in its
    `tokenizer` entry (`pipeline.tokenized`), rather than the bos/eos a model-folder load
    would read from the stored tokenizer_config.json (whose eos is the end of turn).

    Raises:
        TokenizerError: the file is missing or not a tokenizers tokenizer.json.
    """
    file = Path(file)
    if not file.is_file():
        raise TokenizerError(f"{file}: no tokenizer.json there")
    json_bytes = file.read_bytes()
    return LoadedTokenizer(
        tokenizer=_from_json(json_bytes, file),
        name=entry["name"],
        json_bytes=json_bytes,
        bos_token=entry["bos_token"],
        eos_token=entry["eos_token"],
        trained=entry["trained"],
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, template: ChatTemplate
) -> LoadedTokenizer:
    """Train a byte-level BPE (Llama 3 style split) on `texts`, deterministically.

    Args:
        texts: the rendered prompts and responses it will encode.
        vocab_size: target vocabulary, incl. the 256 byte symbols and special tokens.
        template: its markers and bos/eos, and the known markers a custom template
            renders, become atomic special tokens.

    Returns:
        The trained tokenizer; `json_bytes` is its `tokenizer.json`.
    """
    bos_eos = [t for t in (template.bos_token, template.eos_token) if t]
    rendered = turn_markers(template, template.bos_token, template.eos_token).markers
    specials = list(dict.fromkeys([*template.special_tokens, *bos_eos, *rendered]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    json_bytes = tokenizer.to_str().encode("utf-8")
    return LoadedTokenizer(
        tokenizer=tokenizer,
        name=f"trained-bpe-{vocab_size}",
        json_bytes=json_bytes,
        bos_token=template.bos_token,
        eos_token=template.eos_token,
        trained=True,
    )


def encode(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch with the library's parallel batch encoder.

    The texts go to `encode_batch_fast` in chunks of `ENCODE_CHUNK`, one chunk ahead
    (`pipeline.ahead`): while this thread turns a chunk's encodings into ids (Python,
    holding the GIL), the next chunk is being encoded on the library's Rayon pool, so the
    cores do not wait for the conversion. Ids do not depend on the chunks.

    Returns:
        (int32 flat ids, int64 offsets [len(texts) + 1]).
    """
    chunks = (
        tokenizer.encode_batch_fast(texts[i : i + ENCODE_CHUNK], add_special_tokens=False)
        for i in range(0, len(texts), ENCODE_CHUNK)
    )
    lengths, ids = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int32)]
    for encodings in ahead(chunks, depth=1):
        lengths.append(np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings)))
        flat = itertools.chain.from_iterable(e.ids for e in encodings)
        ids.append(np.fromiter(flat, dtype=np.int32, count=int(lengths[-1].sum())))
    return np.concatenate(ids), ragged.offsets_of(np.concatenate(lengths))


def token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of `text` alone, encoded as every pair is (no special tokens added)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def check_markers(loaded: LoadedTokenizer, template: ChatTemplate, markers: TurnMarkers) -> None:
    """Refuse a template whose markers the tokenizer has no single token for.

    Trained so, a model ends its turns with several ordinary tokens (GPT-2 splits
    `<|im_end|>` into 7) that no generation loop stops on, and nothing else would say so.

    Raises:
        MarkerError: one line naming each split marker, the template, the tokenizer and the
            fixes (another template, another tokenizer, or the explicit opt-in).
    """
    split = {m: n for m in markers.markers if (n := len(token_ids(loaded.tokenizer, m))) != 1}
    if not split:
        return
    listed = ", ".join(f"{m!r} -> {n} tokens" for m, n in split.items())
    eos = f", which ends a turn with its eos {loaded.eos_token!r}" if loaded.eos_token else ""
    raise MarkerError(
        f"template {template.name!r} uses markers that tokenizer {loaded.name!r} has no single "
        f"token for ({listed}), so the model would end its turns with ordinary tokens that no "
        f"generation loop stops on; use a template made for this tokenizer (e.g. --template "
        f"plain{eos}), a tokenizer that has these markers as special tokens, or "
        "--allow-multi-token-markers (allow_multi_token_markers=True) to train them as they are"
    )


def tokenize_pairs(texts: PairTexts, pair_ids: list[str], tokenizer: Tokenizer) -> pa.Table:
    """Tokenize rendered pairs: the prompt once, each response on its own.

    Returns:
        A `tokenized_pair` table, one row per pair, in input order.
    """
    n = len(pair_ids)
    ids, offsets = encode(tokenizer, [*texts.prompt, *texts.chosen, *texts.rejected])
    columns = [
        ragged.list_array(ids[offsets[k * n] : offsets[(k + 1) * n]], part - part[0])
        for k, part in enumerate((offsets[: n + 1], offsets[n : 2 * n + 1], offsets[2 * n :]))
    ]
    return pa.Table.from_arrays(
        [pa.array(pair_ids, pa.string()), *columns], schema=tokenized_pair.SCHEMA
    )


@dataclass
class BoundaryReport:
    """How often separate tokenization equals tokenizing the joined text.

    Attributes:
        template, tokenizer: the names of the pair measured.
        checked: responses checked (two per pair).
        agreed: responses whose `prompt_ids + response_ids` equals the joined encoding.
        examples: up to five pair ids where they differ.
    """

    template: str
    tokenizer: str
    checked: int = 0
    agreed: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.agreed / self.checked if self.checked else 1.0

    def to_dict(self) -> dict:
        return {
            "template": self.template,
            "tokenizer": self.tokenizer,
            "checked": self.checked,
            "agreed": self.agreed,
            "rate": self.rate,
            "examples": self.examples,
        }


@dataclass
class EndingReport:
    """How many responses end with the template's end of turn, as tokens.

    Attributes:
        token: the end-of-turn marker, None when the template ends turns with none.
        token_ids: its ids (one, unless multi-token markers were allowed).
        suffix: a response's text from that marker on (`<|im_end|>\\n` for chatml).
        suffix_ids: its ids; a response counts when its ids end with them (never, when
            `token` is None).
        count: responses (chosen and rejected) that end so.
        of: responses checked.
    """

    token: str | None
    token_ids: list[int]
    suffix: str
    suffix_ids: np.ndarray
    count: int = 0
    of: int = 0

    @classmethod
    def for_markers(cls, tokenizer: Tokenizer, markers: TurnMarkers) -> EndingReport:
        end = markers.end_of_turn
        suffix_ids = np.array(token_ids(tokenizer, markers.suffix), dtype=np.int32)
        return cls(end, token_ids(tokenizer, end) if end else [], markers.suffix, suffix_ids)

    @property
    def rate(self) -> float:
        return self.count / self.of if self.of else 0.0

    def add(self, responses: pa.Array | pa.ChunkedArray) -> None:
        """Count a batch of `chosen_ids` or `rejected_ids` lists."""
        self.of += len(responses)
        if self.token is not None:
            self.count += int(_ends_with(responses, self.suffix_ids).sum())

    def to_dict(self) -> dict:
        return {
            "token": self.token,
            "token_ids": self.token_ids,
            "suffix": self.suffix,
            "count": self.count,
            "of": self.of,
            "rate": self.rate,
        }


def _ends_with(lists: pa.Array | pa.ChunkedArray, suffix: np.ndarray) -> np.ndarray:
    """bool per list: its last len(suffix) values equal `suffix`."""
    values, offsets = ragged.list_parts(lists)
    long_enough = np.diff(offsets) >= len(suffix)
    # (rows, len(suffix)) positions of each long-enough list's tail.
    tails = offsets[1:][long_enough, None] - len(suffix) + np.arange(len(suffix))
    ends = np.zeros(len(offsets) - 1, dtype=bool)
    ends[long_enough] = (values[tails] == suffix).all(axis=1)
    return ends


def boundary_agreement(
    texts: PairTexts, tokenized: pa.Table, tokenizer: Tokenizer, report: BoundaryReport
) -> None:
    """Add these pairs to `report`: encode prompt+response joined and compare.

    Args:
        texts: the rendered pairs.
        tokenized: their `tokenized_pair` rows (same order).
        tokenizer: the tokenizer that produced `tokenized`.
        report: updated in place.
    """
    prompt, prompt_offsets = ragged.list_parts(tokenized.column("prompt_ids"))
    pair_ids = tokenized.column("pair_id").to_pylist()
    for column, responses in (("chosen_ids", texts.chosen), ("rejected_ids", texts.rejected)):
        joined, joined_offsets = encode(
            tokenizer, [p + r for p, r in zip(texts.prompt, responses, strict=True)]
        )
        response, response_offsets = ragged.list_parts(tokenized.column(column))
        separate, separate_offsets = _concat_rows(
            prompt, prompt_offsets, response, response_offsets
        )
        agree = _rows_equal(joined, joined_offsets, separate, separate_offsets)
        report.checked += len(agree)
        report.agreed += int(agree.sum())
        room = 5 - len(report.examples)
        report.examples += [pair_ids[i] for i in np.flatnonzero(~agree)[:room]]


def _concat_rows(
    a: np.ndarray, a_offsets: np.ndarray, b: np.ndarray, b_offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise concatenation of two ragged arrays with the same number of rows."""
    a_len, b_len = np.diff(a_offsets), np.diff(b_offsets)
    starts = np.stack([a_offsets[:-1], len(a) + b_offsets[:-1]], axis=1).reshape(-1)
    lengths = np.stack([a_len, b_len], axis=1).reshape(-1)
    return ragged.gather(np.concatenate([a, b]), starts, lengths), ragged.offsets_of(a_len + b_len)


def _rows_equal(
    a: np.ndarray, a_offsets: np.ndarray, b: np.ndarray, b_offsets: np.ndarray
) -> np.ndarray:
    """bool per row: the two ragged arrays hold the same sequence in that row."""
    a_len, b_len = np.diff(a_offsets), np.diff(b_offsets)
    same_len = a_len == b_len
    # Compare element-wise only rows of equal length; count mismatches per row.
    rows = np.flatnonzero(same_len)
    owner, within = ragged.ranges(a_len[rows])
    differs = a[a_offsets[rows][owner] + within] != b[b_offsets[rows][owner] + within]
    mismatches = np.bincount(owner, weights=differs, minlength=len(rows))
    equal = np.zeros(len(a_len), dtype=bool)
    equal[rows] = mismatches == 0
    return equal
