"""Eval shards: a curate output's held-out pairs, packed exactly as its training pairs were.

`build_eval_shards` takes every setting from the training shards' manifest, so the two
cannot drift apart: the eval pairs (`eval_pairs.parquet` of the curate output, see
`pipeline.curate`) are tokenized like the tokenized directory the training shards were
packed from (`pipeline.tokenized.tokenize_like`: its tokenizer, which is the BPE trained
on the training pairs when none was given, its chat template and its `TokenizeConfig`)
and packed by `pipeline.pack.build_shards` with the training shards' `PackConfig`. So the
eval shards are an ordinary, verified shard directory under `<store>/shards/<key>`, keyed
like any (the tokenized key covers the eval pairs, the tokenizer and the template; the
pack settings are the same), reused when that directory proves itself, and their
manifest's `tokenizer`, `template` and `config` equal the training shards'.

The curate output must be the one the training shards were made from (its pairs.parquet
is their input, by sha256): only then does the curate split's guarantee hold, that no
prompt, and no near-duplicate group, is on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.curate import EVAL_PAIRS_FILE
from pipeline.io import pairs_path
from pipeline.pack import PackConfig, ShardResult, build_shards
from pipeline.shards import read_manifest, sha256_file
from pipeline.tokenized import TokenizedResult, tokenize_like

HOW = "curate with --eval-share, --eval-pairs or --eval-splits to hold some out"


@dataclass(frozen=True)
class EvalShards:
    """What `build_eval_shards` made (or found).

    Attributes:
        tokenized: the eval pairs' tokenized directory (reused when its key exists).
        shards: the eval shards (`build_shards`'s result).
    """

    tokenized: TokenizedResult
    shards: ShardResult


def eval_pairs_path(curated: str | Path) -> Path:
    """The eval pairs of a curate output: `eval_pairs.parquet` in that directory (or beside
    that pairs file).

    Raises:
        FileNotFoundError: `curated` is not there.
        ValueError: the file is not there, or holds no pair (no eval split configured).
    """
    curated = Path(curated)
    if not curated.exists():
        raise FileNotFoundError(f"{curated}: no such curate output")
    file = (curated if curated.is_dir() else curated.parent) / EVAL_PAIRS_FILE
    if not file.is_file():
        raise ValueError(f"{file}: no such file; --eval packs the eval pairs of a curate output")
    if pq.read_metadata(file).num_rows == 0:
        raise ValueError(f"{file} holds no eval pairs; {HOW}")
    return file


def build_eval_shards(curated: str | Path, shards: str | Path, store: str | Path) -> EvalShards:
    """Tokenize and pack a curate output's eval pairs with the training shards' settings.

    Args:
        curated: the curate output directory the training shards were made from.
        shards: the training shard directory (its manifest names the tokenized directory,
            under `store`, and the pack settings).
        store: the store root of both.

    Returns:
        The eval pairs' tokenized directory and shards.

    Raises:
        ValueError: no eval pairs, or a curate output the shards were not made from.
        ShardError: the shards or their tokenized directory do not prove themselves.
    """
    store = Path(store)
    eval_file = eval_pairs_path(curated)
    manifest = read_manifest(shards)
    train_file = pairs_path(eval_file.parent)
    if sha256_file(train_file) != manifest["input"]["sha256"]:
        raise ValueError(
            f"{train_file} is not the input of the shards {shards}: pack the eval pairs of "
            "the curate output the training shards were made from"
        )
    tokenized = tokenize_like(eval_file, store / manifest["tokenized"]["directory"], store)
    packed = build_shards(tokenized.directory, PackConfig(**manifest["config"]), store)
    return EvalShards(tokenized, packed)
