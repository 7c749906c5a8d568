"""Curate canonical pairs: named, configurable rules, applied as a funnel.

Each rule is a Polars expression that is True for the pairs it keeps; its name is the drop
reason in the report. Rules run in the order of `RULES`, each on what the ones before it
kept, so a pair is counted once, under the first rule that drops it, and

    rows_in = rows_out + eval_pairs + sum(dropped by reason)

Where a rule's column is null for a pair (no margin, no language, ...) the rule does not
apply to it. Margin and score thresholds are on the source's own scale (the pairs' metadata
`score_scale` names it), so they are off by default. The AIR study of preference data found
moderate margins and high absolute chosen scores work best: set `min_margin`, `max_margin`
and `min_chosen_score` per source to follow it (`--preset air` does, `pipeline.presets`).

Three rules look at the pairs that reach them rather than one pair at a time:
`near_duplicate` groups prompts whose character n-grams are nearly the same (MinHash + LSH,
`pipeline.near_dup`) and keeps the best pairs of each group; `over_prompt_cap` ranks the
pairs of one prompt (both by margin, as its standing within the pair's source, so that
sources on other scales compare fairly); `over_chosen_longer_share` drops a seeded random part of each source's
chosen-longer pairs. They run late, so what they keep has passed every other rule.

The eval split runs last, on the pairs every rule kept, and holds out whole prompts: the
unit is the pair's near-duplicate group when the rule found one, else its prompt (roles
and normalized text), so no prompt and no near-duplicate group is on both sides.
`eval_share` holds out the units whose seeded content hash (blake2b, as a fraction of
2^64) is below the share, so adding data never moves a prompt across sides; `eval_pairs`
takes whole units in hash order until it has that many pairs; `eval_splits` holds out the
pairs of a source's own eval split (UltraFeedback binarized `test_prefs`) and drops the
training pairs that share a unit with one as `shares_eval_prompt`. The held-out pairs go
to `eval_pairs.parquet` beside `pairs.parquet` (written empty without a split).

The report (`data_contracts.curation_report`) also gives, for sources with per-attribute
scores (HelpSteer's five, UltraFeedback's four aspects), how often each attribute agrees
with the chosen/rejected order, conflicts with it, or ties, over the curated pairs; the
length bias of each source (in characters) before and after the rules; and a summary of
the near-duplicate groups with a few examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts import curation_report, preference_pair
from pipeline import near_dup
from pipeline.flags import SettingError, check_settings, flag_name, setting
from pipeline.io import (
    DROPPED_FILE,
    PAIRS_FILE,
    REPORT_FILE,
    atomic_directory,
    pairs_path,
    write_json,
    write_parquet,
)

EVAL_PAIRS_FILE = "eval_pairs.parquet"  # beside pairs.parquet: the held-out pairs


@dataclass(frozen=True)
class CurateConfig:
    """What curation keeps. Each field's `help` says what it does (the CLI flags and the
    Dagster config are built from these fields); None turns a threshold off."""

    drop_empty: bool = setting(True, "drop pairs whose chosen or rejected is empty or blank")
    drop_identical: bool = setting(
        True, "drop pairs whose chosen and rejected are equal after text normalization"
    )
    drop_ties: bool = setting(True, "drop pairs with margin 0: no preference to learn")
    dedup: bool = setting(
        True, "keep the first of pairs equal in normalized prompt, chosen and rejected"
    )
    near_dup_threshold: float | None = setting(
        None,
        "group prompts whose character n-grams have at least this estimated Jaccard "
        "similarity (MinHash + LSH; 0.8 is common) and keep --near-dup-max-pairs pairs of "
        "each group. Off by default: unlike exact duplicates, near-duplicates can differ in "
        "the words that matter ('3x + 5 = 20' / '3x + 7 = 20'), so check the report's "
        "example groups before trusting a threshold",
        gt=0,
        le=1,
    )
    near_dup_ngram: int = setting(
        5, "character n-gram (shingle) size of --near-dup-threshold", ge=1
    )
    near_dup_max_pairs: int = setting(
        1,
        "pairs kept per group of near-duplicate prompts (across sources), largest margin "
        "first, then input order; a prompt without near-duplicates keeps its pairs "
        "(--max-pairs-per-prompt caps those)",
        ge=1,
    )
    languages: tuple[str, ...] | None = setting(
        None, "keep only these languages (pairs without one are kept)"
    )
    exclude_languages: tuple[str, ...] | None = setting(None, "drop these languages")
    domains: tuple[str, ...] | None = setting(
        None, "keep only these domains (pairs without one are kept)"
    )
    exclude_domains: tuple[str, ...] | None = setting(None, "drop these domains")
    max_prompt_chars: int | None = setting(
        16_000, "drop prompts longer than this, all messages (~4k tokens)", ge=1
    )
    min_response_chars: int | None = setting(
        None, "drop pairs whose shorter response has fewer characters", ge=0
    )
    max_response_chars: int | None = setting(
        16_000, "drop pairs whose longer response has more characters", ge=1
    )
    max_length_ratio: float | None = setting(
        None,
        "drop pairs whose chosen has more than this many times the characters of rejected "
        "(a cap on length bias; 1 keeps only pairs where chosen is not longer)",
        ge=1,
    )
    min_margin: float | None = setting(None, "drop pairs with a smaller margin (source scale)")
    max_margin: float | None = setting(None, "drop pairs with a larger margin (source scale)")
    min_chosen_score: float | None = setting(
        None, "drop pairs whose chosen scores lower (source scale)"
    )
    contamination_ngram: int = setting(
        13,
        "word n-gram size of the contamination check against eval prompts (shorter eval "
        "prompts must equal the whole prompt)",
        ge=1,
    )
    max_pairs_per_prompt: int | None = setting(
        None,
        "keep at most this many pairs per prompt, largest margins (within their source) first",
        ge=1,
    )
    max_chosen_longer_share: float | None = setting(
        None,
        "per source, drop pairs whose chosen is longer (characters) at random, seeded, "
        "until at most this share of pairs has chosen longer (0.5: length no longer "
        "predicts the preference; a source whose chosen is always longer keeps none); "
        "runs last, on the pairs every other rule kept",
        ge=0,
        le=1,
    )
    eval_share: float | None = setting(
        None,
        "hold out this share of the prompts for evaluation: a prompt (or near-duplicate "
        "group) goes to eval_pairs.parquet when its seeded content hash falls below the "
        "share, so adding data never moves a prompt across sides; runs last, on the pairs "
        "every rule kept",
        gt=0,
        lt=1,
    )
    eval_pairs: int | None = setting(
        None,
        "hold out whole prompts (or near-duplicate groups) in seeded content-hash order "
        "until at least this many pairs are held out for evaluation (a prompt's pairs are "
        "never split, so a few more may be); runs last, on the pairs every rule kept",
        ge=1,
    )
    eval_splits: tuple[str, ...] | None = setting(
        None,
        "the pairs of these source splits are the eval set (e.g. UltraFeedback binarized "
        "test_prefs, HelpSteer2 validation); training pairs that share a prompt (or "
        "near-duplicate group) with one are dropped as shares_eval_prompt",
    )
    seed: int = setting(
        0,
        "seed of the near-duplicate MinHash, the --max-chosen-longer-share draw and the "
        "hash of --eval-share / --eval-pairs",
        ge=0,
    )

    def __post_init__(self) -> None:
        check_settings(self)
        given = [flag_name(f) for f in self._eval_fields()]
        if len(given) > 1:
            raise SettingError(f"{' and '.join(given)} are exclusive: give one eval split")

    def _eval_fields(self) -> list[dataclasses.Field]:
        return [
            f
            for f in dataclasses.fields(self)
            if f.name in EVAL_FIELDS and getattr(self, f.name) is not None
        ]

    @property
    def eval_field(self) -> dataclasses.Field | None:
        """The eval split's one setting that is set (`EVAL_FIELDS`); None without a split."""
        return next(iter(self._eval_fields()), None)


# The eval split's settings, each with the mode it selects (at most one is set).
EVAL_FIELDS = {"eval_share": "share", "eval_pairs": "pairs", "eval_splits": "splits"}


@dataclass(frozen=True)
class Curated:
    """The output of `curate`.

    Attributes:
        pairs: the kept training pairs, in input order, with the input's schema and metadata.
        eval_pairs: the kept pairs held out for evaluation (none without an eval split), in
            input order, with the same schema and metadata; no prompt or near-duplicate
            group is in both tables.
        dropped: every other input pair, in input order, with its `position` in the input
            and `reason`, the rule that dropped it (findable, not only counted).
        report: the funnel (rows_in, dropped by rule, rows_out, eval_pairs), the config,
            the eval split, per-source counts and attribute agreement.
    """

    pairs: pa.Table
    eval_pairs: pa.Table
    dropped: pa.Table
    report: dict[str, Any]


# ---------------------------------------------------------------------------------------
# Helper columns, computed once


def _normalized(text: pl.Expr) -> pl.Expr:
    """Text as compared by the rules: lower case, whitespace runs as one space, stripped."""
    # Only runs and non-space whitespace are rewritten: most spaces need no replacement.
    return text.str.to_lowercase().str.replace_all(r"\s{2,}|[^\S ]", " ").str.strip_chars()


MESSAGE_SEPARATOR = "\u241e"  # a visible symbol, so message boundaries survive normalization


def _helpers() -> list[pl.Expr]:
    contents = pl.col("prompt").list.eval(pl.element().struct.field("content"))
    roles = pl.col("prompt").list.eval(pl.element().struct.field("role")).list.join(",")
    return [
        _normalized(contents.list.join(MESSAGE_SEPARATOR)).alias("__prompt_text"),
        _normalized(pl.col("chosen")).alias("__chosen_key"),
        _normalized(pl.col("rejected")).alias("__rejected_key"),
        contents.list.eval(pl.element().str.len_chars()).list.sum().alias("__prompt_chars"),
        roles.alias("__prompt_roles"),
        pl.col("chosen").str.len_chars().alias("__chosen_chars"),
        pl.col("rejected").str.len_chars().alias("__rejected_chars"),
    ]


def _prompt_id() -> pl.Expr:
    """One id per distinct prompt (roles and normalized text); hashed for fast windows."""
    return pl.struct("__prompt_roles", "__prompt_text").hash(seed=0).alias("__prompt_id")


# ---------------------------------------------------------------------------------------
# Rules: name -> (config -> keep expression, or None when the rule is off)


def _in(column: str, values: Sequence[str] | None, keep_listed: bool) -> pl.Expr | None:
    if values is None:
        return None
    listed = pl.col(column).str.to_lowercase().is_in([v.lower() for v in values])
    return pl.col(column).is_null() | (listed if keep_listed else ~listed)


def _at_least(expr: pl.Expr, bound: float | None) -> pl.Expr | None:
    return None if bound is None else expr >= bound


def _at_most(expr: pl.Expr, bound: float | None) -> pl.Expr | None:
    return None if bound is None else expr <= bound


def _best_first(group: str, cap: int) -> pl.Expr:
    """True for the `cap` best pairs of each `group`: largest margin first (no margin
    last), then input order (the pair exact dedup would keep).

    A group can hold pairs of several sources, each with margins on its own scale
    (HelpSteer3's 0-3 beside UltraFeedback's 1-10), so margins are compared as their
    share of the source's pairs (that reached the rule) with a margin no larger: the
    same order within one source, scale-free across sources."""
    margin = pl.col("margin")
    standing = margin.rank("max").over("source") / margin.count().over("source")
    rank = pl.int_range(pl.len()).over(
        group, order_by=[standing.fill_null(-np.inf).neg(), pl.col("__position")]
    )
    return rank < cap


def _prompt_cap(c: CurateConfig) -> pl.Expr | None:
    if c.max_pairs_per_prompt is None:
        return None
    return _best_first("__prompt_id", c.max_pairs_per_prompt)


def _near_duplicate_cap(c: CurateConfig) -> pl.Expr | None:
    if c.near_dup_threshold is None:
        return None
    # A prompt without a near-duplicate has no group and keeps its pairs.
    return pl.col("__near_dup_group").is_null() | _best_first(
        "__near_dup_group", c.near_dup_max_pairs
    )


def _length_ratio(c: CurateConfig) -> pl.Expr | None:
    if c.max_length_ratio is None:
        return None
    return pl.col("__chosen_chars") <= c.max_length_ratio * pl.col("__rejected_chars")


def _chosen_longer_share(c: CurateConfig) -> pl.Expr | None:
    """Of each source's L chosen-longer and O other pairs, keep the L' = floor(share * O /
    (1 - share)) chosen-longer ones of smallest `__random` draw, so L' / (L' + O) <= share."""
    share = c.max_chosen_longer_share
    if share is None:
        return None
    longer = pl.col("__chosen_chars") > pl.col("__rejected_chars")
    others = (~longer).sum().over("source")
    allowed = pl.lit(np.inf) if share == 1 else (others * share / (1 - share) + 1e-9).floor()
    rank = pl.int_range(pl.len()).over(["source", longer], order_by="__random")
    return ~longer | (rank < allowed)


def _shorter_response() -> pl.Expr:
    return pl.min_horizontal("__chosen_chars", "__rejected_chars")


def _longer_response() -> pl.Expr:
    return pl.max_horizontal("__chosen_chars", "__rejected_chars")


RULES: dict[str, Callable[[CurateConfig], pl.Expr | None]] = {
    "empty_response": lambda c: (
        (pl.col("__chosen_key") != "") & (pl.col("__rejected_key") != "") if c.drop_empty else None
    ),
    "identical_responses": lambda c: (
        pl.col("__chosen_key") != pl.col("__rejected_key") if c.drop_identical else None
    ),
    "tie": lambda c: pl.col("margin") != 0 if c.drop_ties else None,
    "duplicate": lambda c: (
        pl.struct("__prompt_id", "__chosen_key", "__rejected_key").is_first_distinct()
        if c.dedup
        else None
    ),
    "language_not_included": lambda c: _in("language", c.languages, keep_listed=True),
    "language_excluded": lambda c: _in("language", c.exclude_languages, keep_listed=False),
    "domain_not_included": lambda c: _in("domain", c.domains, keep_listed=True),
    "domain_excluded": lambda c: _in("domain", c.exclude_domains, keep_listed=False),
    "prompt_too_long": lambda c: _at_most(pl.col("__prompt_chars"), c.max_prompt_chars),
    "response_too_short": lambda c: _at_least(_shorter_response(), c.min_response_chars),
    "response_too_long": lambda c: _at_most(_longer_response(), c.max_response_chars),
    "length_ratio_above_max": _length_ratio,
    "margin_below_min": lambda c: _at_least(pl.col("margin"), c.min_margin),
    "margin_above_max": lambda c: _at_most(pl.col("margin"), c.max_margin),
    "score_below_min": lambda c: _at_least(pl.col("score_chosen"), c.min_chosen_score),
    "benchmark_prompt": lambda c: ~pl.col("__benchmark"),
    "contaminated": lambda c: ~pl.col("__contaminated"),
    "near_duplicate": _near_duplicate_cap,
    "over_prompt_cap": _prompt_cap,
    "over_chosen_longer_share": _chosen_longer_share,
    # After `mark_eval` (the source's own eval split): a training pair of an eval prompt.
    "shares_eval_prompt": lambda c: None if c.eval_splits is None else ~pl.col("__shares_eval"),
}


# ---------------------------------------------------------------------------------------
# Contamination: word n-gram overlap with eval prompts


def _word_hashes(frame: pl.DataFrame, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(owner row, hash) of every word of `text`, in order."""
    words = (
        frame.select(pl.int_range(pl.len()).alias("row"), pl.col(text).str.extract_all(r"\w+"))
        .explode(text)
        .drop_nulls(text)
    )
    return words["row"].to_numpy(), words[text].hash(seed=0).to_numpy()


def _ngram_hashes(rows: np.ndarray, hashes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(owner row, hash) of every n-gram of consecutive words of one row (u64 polynomial)."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, np.int64), np.empty(0, np.uint64)
    acc = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            acc = acc * np.uint64(1_000_003) + hashes[k : k + count]
    same_row = rows[:count] == rows[n - 1 : n - 1 + count]
    return rows[:count][same_row], acc[same_row]


def contaminated(prompt_text: pl.Series, eval_prompts: Sequence[str], n: int) -> np.ndarray:
    """bool per prompt: shares a word n-gram with an eval prompt, or equals a shorter one.

    Args:
        prompt_text: normalized prompt texts (see `_normalized`).
        eval_prompts: raw eval prompt texts; normalized here the same way.
        n: n-gram size in words.
    """
    evals = pl.DataFrame({"t": pl.Series(eval_prompts, dtype=pl.String)}).select(
        _normalized(pl.col("t")).alias("t")
    )
    pairs = prompt_text.alias("t").to_frame()
    eval_rows, eval_words = _word_hashes(evals, "t")
    pair_rows, pair_words = _word_hashes(pairs, "t")
    hit = np.zeros(len(pairs), bool)
    _, eval_grams = _ngram_hashes(eval_rows, eval_words, n)
    owners, grams = _ngram_hashes(pair_rows, pair_words, n)
    hit[owners[np.isin(grams, eval_grams)]] = True
    # Eval prompts shorter than n words: the pair's whole prompt must equal one of them.
    lengths = np.bincount(eval_rows, minlength=len(evals))
    short = evals.filter(pl.Series(lengths < n))["t"].str.extract_all(r"\w+").list.join(" ")
    whole = pairs["t"].str.extract_all(r"\w+").list.join(" ")
    hit |= whole.is_in(short.filter(short != "").to_list()).to_numpy()
    return hit


def asks_listed(listed: Sequence[str]) -> pl.Expr:
    """True for a prompt with a user turn equal to a listed prompt (a benchmark's questions),
    compared as the rules compare text (case and whitespace aside)."""
    keys = pl.DataFrame({"t": pl.Series(listed, dtype=pl.String)}).select(_normalized(pl.col("t")))
    turn = pl.element().struct.field("content")
    user = pl.element().struct.field("role") == "user"
    return (
        pl.col("prompt").list.eval(user & _normalized(turn).is_in(keys["t"].implode())).list.any()
    )


def load_eval_prompts(path: str | Path) -> list[str]:
    """Eval or benchmark prompts from a `.txt` file (one per line) or a JSON lines / Parquet
    file with a `prompt` (or, as TruthfulQA names it, `question`) string column.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: naming the file when it has neither column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such eval prompts file")
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.strip()]
    frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_ndjson(path)
    column = next((c for c in ("prompt", "question") if c in frame.columns), None)
    if column is None:
        raise ValueError(
            f"{path}: prompts need a 'prompt' or 'question' column; found {frame.columns}"
        )
    return frame[column].cast(pl.String).drop_nulls().to_list()


# ---------------------------------------------------------------------------------------
# Near-duplicate prompts: found among the pairs that reach the rule, not all pairs read


EXAMPLE_GROUPS, EXAMPLE_PROMPTS, EXAMPLE_CHARS = 5, 3, 160  # the report's example groups


def mark_near_duplicates(
    frame: pl.DataFrame, config: CurateConfig
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """`frame` with `__near_dup_group` (the first position of the group's prompts; null for a
    prompt with no near-duplicate) and the report's summary of the groups.

    Distinct prompts (roles and normalized text) are compared once each, so the pairs of one
    prompt always share its group.
    """
    prompts = frame.select("__prompt_id", "__prompt_text", "__position").unique(
        "__prompt_id", keep="first", maintain_order=True
    )
    found = near_dup.near_duplicates(
        prompts["__prompt_text"], config.near_dup_threshold, config.near_dup_ngram, config.seed
    )
    first = prompts["__position"].to_numpy()[np.maximum(found.group, 0)]
    prompts = prompts.with_columns(
        pl.Series("__near_dup_group", np.where(found.group >= 0, first, -1)).replace(-1, None)
    )
    frame = frame.join(
        prompts.select("__prompt_id", "__near_dup_group"),
        on="__prompt_id",
        how="left",
        maintain_order="left",
    )
    sizes = (
        prompts.drop_nulls("__near_dup_group")
        .group_by("__near_dup_group")
        .agg(pl.len().alias("size"), pl.col("__prompt_text").head(EXAMPLE_PROMPTS))
        .sort("size", "__near_dup_group", descending=[True, False])
    )
    examples = sizes.head(EXAMPLE_GROUPS)["__prompt_text"].list.eval(
        pl.element().str.slice(0, EXAMPLE_CHARS)
    )
    summary = {
        "threshold": config.near_dup_threshold,
        "ngram": config.near_dup_ngram,
        "permutations": near_dup.PERMUTATIONS,
        "bands": found.bands,
        "rows": found.rows,
        "seed": config.seed,
        "prompts": prompts.height,
        "candidate_pairs": found.candidate_pairs,
        "similar_pairs": found.similar_pairs,
        "groups": sizes.height,
        "prompts_in_groups": int(sizes["size"].sum()),
        "largest_group": int(sizes["size"].max() or 0),
        "examples": examples.to_list(),
    }
    return frame, summary


# ---------------------------------------------------------------------------------------
# The eval split: whole prompts, or near-duplicate groups, on one side


def _unit_hashes(frame: pl.DataFrame, seed: int) -> pl.DataFrame:
    """`frame` with `__unit`, the pair's split unit, and `__unit_hash`, its seeded hash.

    The unit is the pair's near-duplicate group when it has one, else its prompt; both are
    named by a position of their first pair, so the two kinds never collide. A prompt's
    hash is blake2b of its roles and normalized text, salted by `seed`: one call per
    distinct prompt, stable across machines and library versions (a dataframe row hash is
    not). A group takes the smallest hash of its prompts, so its side does not depend on
    which prompt came first.
    """
    prompts = frame.unique("__prompt_id", keep="first", maintain_order=True)
    salted = hashlib.blake2b(f"{seed}\0".encode(), digest_size=8)

    def digest(roles: str, text: str) -> int:
        h = salted.copy()
        h.update(f"{roles}\0{text}".encode())
        return int.from_bytes(h.digest(), "big")

    hashes = map(digest, prompts["__prompt_roles"], prompts["__prompt_text"])
    prompts = prompts.select("__prompt_id", pl.Series("__hash", list(hashes), pl.UInt64))
    group = pl.col("__near_dup_group") if "__near_dup_group" in frame.columns else None
    first = pl.col("__position").min().over("__prompt_id")
    unit = first if group is None else pl.coalesce(group, first)
    return (
        frame.join(prompts, on="__prompt_id", how="left", maintain_order="left")
        .with_columns(unit.alias("__unit"))
        .with_columns(pl.col("__hash").min().over("__unit").alias("__unit_hash"))
    )


def _first_units(frame: pl.DataFrame, pairs: int) -> pl.Expr:
    """True for the pairs of the units taken in hash order until at least `pairs` pairs."""
    units = (
        frame.group_by("__unit")
        .agg(pl.len().alias("n"), pl.col("__unit_hash").first())
        .sort("__unit_hash", "__unit")
        .filter(pl.col("n").cum_sum() - pl.col("n") < pairs)
    )
    return pl.col("__unit").is_in(units["__unit"].implode())


def mark_eval(frame: pl.DataFrame, config: CurateConfig) -> pl.DataFrame:
    """`frame` with `__eval` (the pair is held out for evaluation) and, for a source's
    eval split, `__shares_eval` (a training pair whose unit holds an eval pair).

    Raises:
        ValueError: `eval_splits` names no split of the pairs that reach the split.
    """
    frame = _unit_hashes(frame, config.seed)
    if config.eval_share is not None:
        # The hash as a fraction of 2^64 below the share: a prompt's side never changes
        # when other pairs are added.
        below = pl.lit(int(config.eval_share * 2**64), pl.UInt64)
        return frame.with_columns((pl.col("__unit_hash") < below).alias("__eval"))
    if config.eval_pairs is not None:
        return frame.with_columns(_first_units(frame, config.eval_pairs).alias("__eval"))
    assert config.eval_splits is not None
    listed = pl.col("split").is_in(list(config.eval_splits))
    if frame.height and not frame.select(listed.any()).item():
        found = ", ".join(sorted(frame["split"].unique().to_list()))
        raise ValueError(
            f"--eval-splits {' '.join(config.eval_splits)}: none of the {frame.height} pairs "
            f"the rules kept is in these splits (theirs: {found})"
        )
    return frame.with_columns(
        listed.alias("__eval"), (~listed & listed.any().over("__unit")).alias("__shares_eval")
    )


def eval_summary(frame: pl.DataFrame, config: CurateConfig) -> dict[str, Any] | None:
    """The report's `eval_split`: how it was chosen and the prompts and units held out.

    Raises:
        ValueError: the split holds every pair the rules kept, leaving none to train on.
    """
    field = config.eval_field
    if field is None:
        return None
    held = frame.filter(pl.col("__eval"))
    if held.height and held.height == frame.height:
        raise ValueError(
            f"the eval split ({flag_name(field)}) holds all {frame.height} pairs the rules "
            "kept: none is left to train on"
        )
    setting = getattr(config, field.name)
    return {
        "mode": EVAL_FIELDS[field.name],
        "setting": list(setting) if isinstance(setting, tuple) else setting,
        "seed": config.seed,
        "prompts": held["__prompt_id"].n_unique(),
        "units": held["__unit"].n_unique(),
    }


# ---------------------------------------------------------------------------------------
# Length bias


def length_bias(frame: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Per source: pairs whose chosen is longer than rejected, shorter, or as long, in
    characters (tokens are not known at curation), and quantiles of chosen / rejected
    characters (pairs with an empty rejected left out). DPO learns length from a set where
    chosen is mostly the longer one."""
    chosen, rejected = pl.col("__chosen_chars"), pl.col("__rejected_chars")
    ratio = pl.when(rejected > 0).then(chosen / rejected)
    stats = (
        frame.group_by("source")
        .agg(
            pl.len().alias("pairs"),
            (chosen > rejected).sum().alias("chosen_longer"),
            (chosen < rejected).sum().alias("rejected_longer"),
            (chosen == rejected).sum().alias("equal"),
            *(
                ratio.quantile(q, interpolation="linear").round(4).alias(name)
                for name, q in curation_report.RATIO_QUANTILES.items()
            ),
        )
        .with_columns((pl.col("chosen_longer") / pl.col("pairs")).round(4).alias("share"))
        .sort("source")
    )
    out = {}
    for row in stats.iter_rows(named=True):
        out[row["source"]] = {
            "pairs": row["pairs"],
            "chosen_longer": row["chosen_longer"],
            "rejected_longer": row["rejected_longer"],
            "equal": row["equal"],
            "chosen_longer_share": row["share"],
            "ratio_quantiles": {name: row[name] for name in curation_report.RATIO_QUANTILES},
        }
    return out


# ---------------------------------------------------------------------------------------
# Attribute agreement


def attribute_agreement(pairs: pl.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Per source and attribute: pairs where chosen's attribute is higher (agree), lower
    (conflict) or equal (tie) than rejected's, and the agree rate."""
    entry = pl.List(pl.Struct({"key": pl.String, "value": pl.Float64}))
    sides = {}
    for side in ("chosen", "rejected"):
        sides[side] = (
            pairs.select(
                "source",
                pl.int_range(pl.len()).alias("row"),
                pl.col(f"{side}_attributes").cast(entry).alias("a"),
            )
            .explode("a")
            .drop_nulls("a")
            .unnest("a")
        )
    both = sides["chosen"].join(sides["rejected"], on=["source", "row", "key"], suffix="_r")
    counts = (
        both.group_by("source", "key")
        .agg(
            pl.len().alias("pairs"),
            (pl.col("value") > pl.col("value_r")).sum().alias("agree"),
            (pl.col("value") < pl.col("value_r")).sum().alias("conflict"),
            (pl.col("value") == pl.col("value_r")).sum().alias("tie"),
        )
        .with_columns((pl.col("agree") / pl.col("pairs")).round(4).alias("agree_rate"))
        .sort("source", "key")
    )
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in counts.iter_rows(named=True):
        source, key = row.pop("source"), row.pop("key")
        out.setdefault(source, {})[key] = row
    return out


# ---------------------------------------------------------------------------------------


def curate(
    pairs: pa.Table,
    config: CurateConfig,
    eval_prompts: Sequence[str] | None = None,
    benchmark_prompts: Sequence[str] | None = None,
) -> Curated:
    """Apply the rules of `config` to `pairs`, counting every drop by rule, then hold out
    its eval split (if any) from what they kept.

    Args:
        pairs: canonical pairs (`preference_pair.SCHEMA`), e.g. `Normalized.pairs`.
        config: which rules run and their thresholds.
        eval_prompts: prompts of evaluation sets; pairs whose prompt overlaps one are dropped
            as `contaminated` (off when None).
        benchmark_prompts: a benchmark's questions (e.g. TruthfulQA's); pairs with a user
            turn equal to one are dropped as `benchmark_prompt` (off when None).

    Returns:
        The kept training pairs and eval pairs (input order, schema and metadata
        unchanged), the dropped pairs and the report.

    Raises:
        data_contracts.ContractError: `pairs` does not satisfy the `preference_pair` contract.
        ValueError: the eval split finds none of `eval_splits`, or leaves no pair to train on.
    """
    preference_pair.CONTRACT.validate(pairs, source="pairs to curate")
    columns = ["source", "split", "prompt", "chosen", "rejected", "margin", "score_chosen"]
    frame = _frame(pairs, [*columns, "domain", "language"])
    frame = frame.with_columns(*_helpers(), pl.int_range(pl.len()).alias("__position"))
    frame = frame.with_columns(_prompt_id())
    rules = dict(RULES)
    if eval_prompts is None:
        del rules["contaminated"]
    else:
        hit = contaminated(frame["__prompt_text"], eval_prompts, config.contamination_ngram)
        frame = frame.with_columns(pl.Series("__contaminated", hit))
    frame = frame.with_columns(
        # One uniform draw per input pair, by position: the order of a seeded resampling.
        pl.Series("__random", np.random.default_rng(config.seed).random(frame.height))
    )
    bias_in = length_bias(frame)
    if benchmark_prompts is None:
        del rules["benchmark_prompt"]
    else:
        frame = frame.with_columns(asks_listed(benchmark_prompts).alias("__benchmark"))
    dropped: dict[str, int] = {}
    near_duplicates = None
    reason = np.full(pairs.num_rows, None, object)
    for name, rule in rules.items():
        keep = rule(config)
        if keep is None:
            continue
        if name == "near_duplicate":
            frame, near_duplicates = mark_near_duplicates(frame, config)
        if name == "shares_eval_prompt":  # the source's own eval split
            frame = mark_eval(frame, config)
        frame = frame.with_columns(keep.fill_null(True).alias("__keep"))
        reason[frame.filter(~pl.col("__keep"))["__position"].to_numpy()] = name
        frame = frame.filter(pl.col("__keep"))
        dropped[name] = int(np.count_nonzero(reason == name))
    if config.eval_field is not None and "__eval" not in frame.columns:
        frame = mark_eval(frame, config)  # the split by hash, on what every rule kept
    eval_split = eval_summary(frame, config)
    is_eval = np.zeros(pairs.num_rows, bool)
    if eval_split is not None:
        is_eval[frame.filter(pl.col("__eval"))["__position"].to_numpy()] = True
        frame = frame.filter(~pl.col("__eval"))
    is_kept = (reason == None) & ~is_eval  # noqa: E711 (elementwise on an object array)
    kept, held = pairs.filter(pa.array(is_kept)), pairs.filter(pa.array(is_eval))
    report = {
        "contract": "curation_report",
        "version": curation_report.VERSION,
        "rows_in": pairs.num_rows,
        "dropped": dropped,
        "rows_out": kept.num_rows,
        "eval_pairs": held.num_rows,
        "dropped_file": DROPPED_FILE,
        "eval_file": EVAL_PAIRS_FILE,
        "config": dataclasses.asdict(config),
        "eval_split": eval_split,
        "eval_prompts": None if eval_prompts is None else len(eval_prompts),
        "benchmark_prompts": None if benchmark_prompts is None else len(benchmark_prompts),
        "score_scale": json.loads((pairs.schema.metadata or {}).get(b"score_scale", b"{}")),
        "sources": _per_source(pairs, kept, held),
        "attribute_agreement": attribute_agreement(
            _frame(kept, ["source", "chosen_attributes", "rejected_attributes"])
        ),
        "length_bias": {"unit": "characters", "in": bias_in, "out": length_bias(frame)},
        "near_duplicates": near_duplicates,
    }
    curation_report.validate(report, source="curation report")
    return Curated(kept, held, _dropped_rows(pairs, reason, reason != None), report)  # noqa: E711


def _dropped_rows(pairs: pa.Table, reason: np.ndarray, is_dropped: np.ndarray) -> pa.Table:
    positions = np.flatnonzero(is_dropped)
    table = pairs.take(pa.array(positions, pa.int64()))
    table = table.append_column("position", pa.array(positions, pa.int64()))
    return table.append_column("reason", pa.array(reason[positions].tolist(), pa.string()))


def read_pairs(paths: Sequence[str | Path]) -> pa.Table:
    """Read and concatenate pairs files (or normalize output dirs), merging `score_scale`.

    Raises:
        FileNotFoundError: naming a path that holds no pairs file.
        data_contracts.ContractError: naming a file that is not canonical pairs.
    """
    tables, scales = [], {}
    for path in paths:
        file = pairs_path(path)
        try:
            table = pq.read_table(file)
        except pa.ArrowException as err:
            raise ValueError(f"{file}: not a readable Parquet file ({err})") from err
        scales.update(json.loads((table.schema.metadata or {}).get(b"score_scale", b"{}")))
        tables.append(preference_pair.CONTRACT.conform(table, source=str(file)))
    metadata = {**preference_pair.SCHEMA.metadata, b"score_scale": json.dumps(scales)}
    return pa.concat_tables(tables).replace_schema_metadata(metadata)


def _frame(table: pa.Table, columns: list[str]) -> pl.DataFrame:
    frame = pl.from_arrow(table.select(columns))
    assert isinstance(frame, pl.DataFrame)
    return frame


def _per_source(before: pa.Table, after: pa.Table, held: pa.Table) -> dict[str, dict[str, int]]:
    def count(table: pa.Table) -> dict[str, int]:
        counts = pl.Series(table["source"]).value_counts()
        return dict(counts.iter_rows())

    rows_in, rows_out, evals = count(before), count(after), count(held)
    return {
        s: {"rows_in": n, "rows_out": rows_out.get(s, 0), "eval_pairs": evals.get(s, 0)}
        for s, n in sorted(rows_in.items())
    }


def write_curated(result: Curated, out_dir: str | Path) -> Path:
    """Write the curated `pairs.parquet` (the training pairs), `eval_pairs.parquet` (the
    pairs held out for evaluation; always written, empty without an eval split),
    `dropped.parquet` (each other pair and the rule that dropped it) and `report.json`
    atomically.

    Returns:
        `out_dir`, complete; the same result always gives the same bytes.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_parquet(result.pairs, tmp / PAIRS_FILE)
        write_parquet(result.eval_pairs, tmp / EVAL_PAIRS_FILE)
        write_parquet(result.dropped, tmp / DROPPED_FILE)
        write_json(result.report, tmp / REPORT_FILE)
    return out_dir
