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

`max_pairs` (`--max-pairs N`) keeps a seeded sample of at most N of the pairs that pass the
per-pair rules, dedup and the contamination checks: those whose content hash (blake2b of
the seed and the pair id, itself a hash of source, prompt and responses) is smallest, so the
sample does not depend on the input's order; the others are dropped as `over_max_pairs`.
It runs before the rules that compare pairs with each other, the costly ones.

Three rules look at the pairs that reach them rather than one pair at a time:
`near_duplicate` groups prompts whose character n-grams are nearly the same (MinHash + LSH,
`pipeline.near_dup`) and keeps the best pairs of each group; `over_prompt_cap` ranks the
pairs of one prompt (both by margin, as its standing within the pair's source, so that
sources on other scales compare fairly); `over_chosen_longer_share` drops a seeded random
part of each source's chosen-longer pairs. They run late, so what they keep has passed
every other rule.

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

Memory: the pairs are read `BATCH_ROWS` at a time (`Pairs`), never whole, and curation
holds across batches only what a rule needs (`_Curation`). The first pass runs the per-pair
rules and exact dedup, which remembers an 8-byte key per pair it kept (`_SeenKeys`). Of
every pair it keeps source and lengths (12 bytes, for the length bias) and its fate (one
byte: kept, held out, or the rule that dropped it); of a pair that passes, when a rule that
compares pairs is on, a slim row: position and source (8 bytes) and what those rules need,
margin and prompt id (16), the sample key (8), the share rule's draw (9). Those rules run
on the slim rows; the group and prompt caps sort only the pairs they may drop (those of a
near-duplicate group, of a prompt with more pairs than the cap), not every slim row.
Near-duplicates and the eval split read the prompts once more, and each distinct prompt's
MinHash signature and band keys go to disk (`pipeline.near_dup.Index`). The last pass
writes each pair where its fate says, in input order. The output bytes do not depend on
the batch size (`pipeline.io.ParquetRowGroups`). After each batch, the memory Arrow's pool
freed goes back to the system (`_release_arrow_memory`). Measured at ten million pairs in
`benchmarks/normalize_curate.py` (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.atomic import atomic_directory
from core.progress import progress
from core.settings import SettingError, check_settings, flag_name, setting
from data_contracts import curation_report, preference_pair
from data_contracts.contract import ROW_INDEX
from pipeline import near_dup
from pipeline.ingest import parquet_batches
from pipeline.io import (
    DROPPED_FILE,
    PAIRS_FILE,
    REPORT_FILE,
    ParquetRowGroups,
    pairs_path,
    write_json,
    write_row_groups,
)

EVAL_PAIRS_FILE = "eval_pairs.parquet"  # beside pairs.parquet: the held-out pairs
BATCH_ROWS = 32_768  # pairs read at once: bounds memory, never changes the output


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
    max_pairs: int | None = setting(
        None,
        "keep a seeded sample of at most this many of the pairs that pass the per-pair "
        "rules, dedup and the contamination checks: those of smallest content hash (the "
        "pair id, salted by --seed), so the sample does not depend on the input's order; "
        "the others are dropped as over_max_pairs. It runs before the rules that compare "
        "pairs with each other (near-duplicates, per-prompt cap, chosen-longer share, eval "
        "split), the costly ones: try their settings on a subset",
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
        "seed of the near-duplicate MinHash, the --max-pairs sample, the "
        "--max-chosen-longer-share draw and the hash of --eval-share / --eval-pairs",
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


def _contents() -> pl.Expr:
    return pl.col("prompt").list.eval(pl.element().struct.field("content"))


def _prompt_keys() -> list[pl.Expr]:
    """`__prompt_text` (normalized, messages joined) and `__prompt_roles`: a prompt's
    identity for the rules."""
    roles = pl.col("prompt").list.eval(pl.element().struct.field("role")).list.join(",")
    return [
        _normalized(_contents().list.join(MESSAGE_SEPARATOR)).alias("__prompt_text"),
        roles.alias("__prompt_roles"),
    ]


def _helpers() -> list[pl.Expr]:
    return [
        *_prompt_keys(),
        _normalized(pl.col("chosen")).alias("__chosen_key"),
        _normalized(pl.col("rejected")).alias("__rejected_key"),
        _contents().list.eval(pl.element().str.len_chars()).list.sum().alias("__prompt_chars"),
        pl.col("chosen").str.len_chars().alias("__chosen_chars"),
        pl.col("rejected").str.len_chars().alias("__rejected_chars"),
    ]


def _chosen_longer() -> pl.Expr:
    return (pl.col("__chosen_chars") > pl.col("__rejected_chars")).alias("__chosen_longer")


def _prompt_id() -> pl.Expr:
    """One id per distinct prompt (roles and normalized text); hashed for fast windows."""
    return pl.struct("__prompt_roles", "__prompt_text").hash(seed=0).alias("__prompt_id")


def _seeded_hashes(texts: Iterable[str], seed: int) -> pl.Series:
    """blake2b of each text salted by `seed`, as u64: one call per text, stable across
    machines and library versions (a dataframe hash is not)."""
    salted = hashlib.blake2b(f"{seed}\0".encode(), digest_size=8)

    def digest(text: str) -> int:
        h = salted.copy()
        h.update(text.encode())
        return int.from_bytes(h.digest(), "big")

    return pl.Series(list(map(digest, texts)), dtype=pl.UInt64)


class _SeenKeys:
    """The u64 keys of the pairs exact dedup kept so far, in sorted runs merged two by two
    as they grow (a binary counter): 8 bytes a key, a lookup is a few binary searches.

    A key is a 64-bit hash of prompt id and normalized responses: two different pairs
    share one with probability about n^2 / 2^65 among n pairs (3e-6 at ten million), the
    risk the 64-bit prompt id already takes.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        """Per key: True when no earlier batch nor an earlier key here had it; adds them."""
        distinct, first = np.unique(keys, return_index=True)
        new = np.ones(len(distinct), bool)
        for run in self._runs:
            at = np.minimum(np.searchsorted(run, distinct), len(run) - 1)
            new &= run[at] != distinct
        fresh = np.zeros(len(keys), bool)
        fresh[first[new]] = True
        if new.any():
            self._runs.append(distinct[new])
        while len(self._runs) > 1 and len(self._runs[-1]) >= len(self._runs[-2]):
            merged = np.concatenate([self._runs.pop(), self._runs.pop()])
            merged.sort(kind="stable")  # two sorted runs: one merge, in place
            self._runs.append(merged)
        return fresh


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
    return _rank_within(group, _standing(), pl.col("__position")) < cap


def _standing() -> pl.Expr:
    """`_best_first`'s sort key: minus a pair's margin standing within its source (no margin:
    last)."""
    margin = pl.col("margin")
    standing = margin.rank("max").over("source") / margin.count().over("source")
    return standing.fill_null(-np.inf).neg()


def _near_duplicate_keep(frame: pl.DataFrame, cap: int) -> pl.Series:
    """What `_near_duplicate_cap` keeps of `frame`, ranking only the pairs whose prompt is in
    a group (a few in a hundred): the standings come from every pair, the sort from those."""
    grouped = frame.select(
        "__near_dup_group", "__position", _standing().alias("__standing")
    ).filter(pl.col("__near_dup_group").is_not_null())
    best = grouped.select(
        _rank_within("__near_dup_group", pl.col("__standing"), pl.col("__position")) < cap
    ).to_series()
    keep = frame["__near_dup_group"].is_null().to_numpy().copy()
    keep[~keep] = best.to_numpy()
    return pl.Series("keep", keep)


def _prompt_cap_keep(frame: pl.DataFrame, cap: int) -> pl.Series:
    """What `_prompt_cap` keeps of `frame`, ranking only the pairs of prompts with more than
    `cap` pairs: those are found by one numpy sort of the prompt ids (memory the system gets
    back at once), the standings come from every pair, the sort by standing from those."""
    prompt = frame["__prompt_id"].to_numpy()
    order = np.argsort(prompt, kind="stable")
    ordered = prompt[order]
    opens = np.ones(len(ordered), bool)  # the first pair of each prompt, in prompt order
    opens[1:] = ordered[1:] != ordered[:-1]
    del ordered
    starts = np.flatnonzero(opens)
    sizes = np.diff(np.append(starts, len(prompt)))
    crowded = np.zeros(len(prompt), bool)
    crowded[order[np.repeat(sizes > cap, sizes)]] = True
    del order, opens
    ranked = frame.select("__prompt_id", "__position", _standing().alias("__standing")).filter(
        pl.Series(crowded)
    )
    best = ranked.select(
        _rank_within("__prompt_id", pl.col("__standing"), pl.col("__position")) < cap
    ).to_series()
    keep = ~crowded
    keep[crowded] = best.to_numpy()
    return pl.Series("keep", keep)


def _rank_within(group: str, *keys: pl.Expr) -> pl.Expr:
    """Each row's rank (0, 1, ...) within its `group` in the order of `keys` (which must not
    tie): `pl.int_range(pl.len()).over(group, order_by=keys)`, computed by one sort of all
    rows, not a window per group; over millions of prompts, half the memory and a fifth of
    the time."""
    order = pl.arg_sort_by(pl.col(group), *keys)
    ordered = pl.col(group).gather(order)
    index = pl.int_range(pl.len())
    opens = (index == 0) | ordered.ne_missing(ordered.shift(1))  # a group's first row
    return (index - pl.when(opens).then(index).forward_fill()).sort_by(order)


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
    longer = pl.col("__chosen_longer")
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
    # `__first_seen`: no pair of the same prompt and normalized responses came before it
    # (`_SeenKeys`, across batches).
    "duplicate": lambda c: pl.col("__first_seen") if c.dedup else None,
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
    # From here on, rules compare the pairs that reach them: they run on the slim rows of
    # the first pass (`_Curation.decide`). Ordinal rank: equal keys go by input order.
    "over_max_pairs": lambda c: (
        None if c.max_pairs is None else pl.col("__sample_key").rank("ordinal") <= c.max_pairs
    ),
    "near_duplicate": _near_duplicate_cap,
    "over_prompt_cap": _prompt_cap,
    "over_chosen_longer_share": _chosen_longer_share,
    # After `mark_eval` (the source's own eval split): a training pair of an eval prompt.
    "shares_eval_prompt": lambda c: None if c.eval_splits is None else ~pl.col("__shares_eval"),
}
_RULE_NAMES = list(RULES)
PER_PAIR_RULES = _RULE_NAMES[: _RULE_NAMES.index("over_max_pairs")]  # the first pass runs these


def _slim_columns(c: CurateConfig) -> list[str]:
    """What the first pass keeps of a pair that passes its rules: what the rules after it
    and the eval split need (none of them on: nothing)."""
    compares = [c.max_pairs, c.near_dup_threshold, c.max_pairs_per_prompt]
    compares += [c.max_chosen_longer_share, c.eval_field]
    if all(setting is None for setting in compares):
        return []
    columns = ["__position", "source"]
    if c.max_pairs is not None:
        columns.append("__sample_key")
    if c.near_dup_threshold is not None or c.max_pairs_per_prompt is not None:
        columns.append("margin")
    if c.near_dup_threshold is not None or c.max_pairs_per_prompt is not None or c.eval_field:
        columns.append("__prompt_id")
    if c.max_chosen_longer_share is not None:
        columns += ["__random", "__chosen_longer"]
    if c.eval_splits is not None:
        columns.append("split")
    return columns


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


class Contamination:
    """Eval prompts, normalized and cut into hashed word n-grams once, to check prompts
    against batch by batch.

    Args:
        eval_prompts: raw eval prompt texts; normalized as the rules normalize prompts.
        n: n-gram size in words.
    """

    def __init__(self, eval_prompts: Sequence[str], n: int) -> None:
        evals = pl.DataFrame({"t": pl.Series(eval_prompts, dtype=pl.String)}).select(
            _normalized(pl.col("t")).alias("t")
        )
        eval_rows, eval_words = _word_hashes(evals, "t")
        self.n = n
        self.grams = np.unique(_ngram_hashes(eval_rows, eval_words, n)[1])
        # Eval prompts shorter than n words: a prompt must equal one of them whole.
        lengths = np.bincount(eval_rows, minlength=len(evals))
        short = evals.filter(pl.Series(lengths < n))["t"].str.extract_all(r"\w+").list.join(" ")
        self.short = short.filter(short != "").to_list()

    def hits(self, prompt_text: pl.Series) -> np.ndarray:
        """bool per prompt (normalized, see `_normalized`): shares a word n-gram with an
        eval prompt, or equals a shorter one."""
        pairs = prompt_text.alias("t").to_frame()
        pair_rows, pair_words = _word_hashes(pairs, "t")
        hit = np.zeros(len(pairs), bool)
        owners, grams = _ngram_hashes(pair_rows, pair_words, self.n)
        hit[owners[np.isin(grams, self.grams)]] = True
        whole = pairs["t"].str.extract_all(r"\w+").list.join(" ")
        hit |= whole.is_in(self.short).to_numpy()
        return hit


def contaminated(prompt_text: pl.Series, eval_prompts: Sequence[str], n: int) -> np.ndarray:
    """bool per prompt: shares a word n-gram with an eval prompt, or equals a shorter one
    (`Contamination`, for one set of prompts).

    Args:
        prompt_text: normalized prompt texts (see `_normalized`).
        eval_prompts: raw eval prompt texts; normalized here the same way.
        n: n-gram size in words.
    """
    return Contamination(eval_prompts, n).hits(prompt_text)


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
    frame: pl.DataFrame,
    prompts: pl.DataFrame,
    found: near_dup.NearDuplicates,
    config: CurateConfig,
) -> tuple[pl.DataFrame, dict[str, Any], list[list[int]]]:
    """`frame` with `__near_dup_group` (the first position of the group's prompts; null for a
    prompt with no near-duplicate), the report's summary of the groups without its
    `examples`, and the positions of the examples' prompts (their first pairs).

    Distinct prompts (roles and normalized text) are compared once each, so the pairs of one
    prompt always share its group.

    Args:
        frame: the pairs that reach the rule (`__prompt_id`, `__position`).
        prompts: the distinct prompts of `frame` by first pair (`__prompt_id`, `__position`),
            the texts `found` grouped, in that order.
        found: their groups (`pipeline.near_dup.Index.find`).
        config: the rule's settings, for the summary.
    """
    first = prompts["__position"].to_numpy()[np.maximum(found.group, 0)]
    prompts = prompts.with_columns(
        pl.when(pl.Series(found.group >= 0)).then(pl.Series(first)).alias("__near_dup_group")
    )
    frame = frame.join(  # the prompts in a group only: a pair of another prompt gets null
        prompts.select("__prompt_id", "__near_dup_group").drop_nulls("__near_dup_group"),
        on="__prompt_id",
        how="left",
        maintain_order="left",
    )
    sizes = (
        prompts.drop_nulls("__near_dup_group")
        .group_by("__near_dup_group")
        .agg(pl.len().alias("size"), pl.col("__position").head(EXAMPLE_PROMPTS))
        .sort("size", "__near_dup_group", descending=[True, False])
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
    }
    return frame, summary, sizes.head(EXAMPLE_GROUPS)["__position"].to_list()


# ---------------------------------------------------------------------------------------
# The eval split: whole prompts, or near-duplicate groups, on one side


def _unit_hashes(frame: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    """`frame` with `__unit`, the pair's split unit, and `__unit_hash`, its seeded hash.

    The unit is the pair's near-duplicate group when it has one, else its prompt; both are
    named by a position of their first pair, so the two kinds never collide. A prompt's
    hash (`prompts`: `__prompt_id` -> `__hash`) is blake2b of its roles and normalized
    text, salted by the seed (`_seeded_hashes`). A group takes the smallest hash of its
    prompts, so its side does not depend on which prompt came first.
    """
    group = pl.col("__near_dup_group") if "__near_dup_group" in frame.columns else None
    first = pl.col("__position").min().over("__prompt_id")
    unit = first if group is None else pl.coalesce(group, first)
    return (
        _with_prompt_hash(frame, prompts)
        .with_columns(unit.alias("__unit"))
        .with_columns(pl.col("__hash").min().over("__unit").alias("__unit_hash"))
    )


def _with_prompt_hash(frame: pl.DataFrame, prompts: pl.DataFrame) -> pl.DataFrame:
    """`frame` with `__hash`, its prompt's in `prompts` (which holds every prompt of `frame`:
    they are read from the pairs the rules kept), found by binary search in the sorted
    prompt ids: numpy memory, given back at once, where a join's hash table of millions of
    prompts stays."""
    ids, wanted = prompts["__prompt_id"].to_numpy(), frame["__prompt_id"].to_numpy()
    order = np.argsort(ids)
    at = order[np.minimum(np.searchsorted(ids, wanted, sorter=order), max(len(ids) - 1, 0))]
    if not np.array_equal(ids[at], wanted):
        raise RuntimeError("curate: a pair's prompt is missing from the prompt hashes")
    return frame.with_columns(pl.Series("__hash", prompts["__hash"].to_numpy()[at]))


def _first_units(frame: pl.DataFrame, pairs: int) -> pl.Expr:
    """True for the pairs of the units taken in hash order until at least `pairs` pairs."""
    units = (
        frame.group_by("__unit")
        .agg(pl.len().alias("n"), pl.col("__unit_hash").first())
        .sort("__unit_hash", "__unit")
        .filter(pl.col("n").cum_sum() - pl.col("n") < pairs)
    )
    return pl.col("__unit").is_in(units["__unit"].implode())


def mark_eval(frame: pl.DataFrame, config: CurateConfig, prompts: pl.DataFrame) -> pl.DataFrame:
    """`frame` with `__eval` (the pair is held out for evaluation) and, for a source's
    eval split, `__shares_eval` (a training pair whose unit holds an eval pair);
    `prompts` holds each prompt's seeded `__hash` (`_Curation.prompt_hashes`).

    Raises:
        ValueError: `eval_splits` names no split of the pairs that reach the split.
    """
    frame = _unit_hashes(frame, prompts)
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
        )
        .with_columns((pl.col("chosen_longer") / pl.col("pairs")).round(4).alias("share"))
        .sort("source")
    )
    out = {}
    for row in stats.iter_rows(named=True):
        # One source's ratios, one quantile at a time: each copies them once (as quantiles
        # in the aggregation did, all at once: 65 bytes a pair at ten million pairs).
        ratios = frame.filter(pl.col("source") == row["source"]).select(ratio).to_series()
        quantiles = {
            name: ratios.quantile(q, interpolation="linear")
            for name, q in curation_report.RATIO_QUANTILES.items()
        }
        out[row["source"]] = {
            "pairs": row["pairs"],
            "chosen_longer": row["chosen_longer"],
            "rejected_longer": row["rejected_longer"],
            "equal": row["equal"],
            "chosen_longer_share": row["share"],
            "ratio_quantiles": {
                name: pl.Series([value], dtype=pl.Float64).round(4).item()
                for name, value in quantiles.items()
            },
        }
    return out


# ---------------------------------------------------------------------------------------
# Attribute agreement


def attribute_counts(pairs: pl.DataFrame) -> pl.DataFrame:
    """Per source and attribute: pairs where chosen's attribute is higher (agree), lower
    (conflict) or equal (tie) than rejected's; counts of batches add up."""
    entry = pl.List(pl.Struct({"key": pl.String, "value": pl.Float64}))
    sides = {}
    for side in ("chosen", "rejected"):
        sides[side] = (
            pairs.select(
                pl.col("source").cast(pl.String),
                pl.int_range(pl.len()).alias("row"),
                pl.col(f"{side}_attributes").cast(entry).alias("a"),
            )
            .explode("a")
            .drop_nulls("a")
            .unnest("a")
        )
    both = sides["chosen"].join(sides["rejected"], on=["source", "row", "key"], suffix="_r")
    return both.group_by("source", "key").agg(
        pl.len().cast(pl.Int64).alias("pairs"),
        (pl.col("value") > pl.col("value_r")).sum().cast(pl.Int64).alias("agree"),
        (pl.col("value") < pl.col("value_r")).sum().cast(pl.Int64).alias("conflict"),
        (pl.col("value") == pl.col("value_r")).sum().cast(pl.Int64).alias("tie"),
    )


def attribute_agreement(counts: pl.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """`attribute_counts` (of one table, or of its batches) as the report shows them:
    source -> attribute -> pairs, agree, conflict, tie and the agree rate."""
    totals = (
        counts.group_by("source", "key")
        .agg(pl.col("pairs", "agree", "conflict", "tie").sum())
        .with_columns((pl.col("agree") / pl.col("pairs")).round(4).alias("agree_rate"))
        .sort("source", "key")
    )
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in totals.iter_rows(named=True):
        source, key = row.pop("source"), row.pop("key")
        out.setdefault(source, {})[key] = row
    return out


# ---------------------------------------------------------------------------------------
# Reading pairs, batch by batch


class Pairs:
    """Canonical pairs to curate: one table in memory (`Pairs.of`) or pairs files
    (`Pairs.open`), read batch by batch, in input order, never whole. Each file's columns
    are checked on opening, before any row is read.

    Attributes:
        schema: the schema the kept pairs are written with: the table's own, or
            `preference_pair.SCHEMA` with the files' score scales merged.
        rows: pairs in all.
    """

    def __init__(self, parts: list[tuple[str, pa.Table | Path]], schema: pa.Schema) -> None:
        self.parts, self.schema, self.rows = parts, schema, 0
        for label, part in parts:
            if isinstance(part, pa.Table):
                empty, rows = part.slice(0, 0), part.num_rows
            else:
                empty, rows = pq.read_schema(part).empty_table(), pq.read_metadata(part).num_rows
            preference_pair.CONTRACT.conform(empty, source=label)  # missing or mistyped columns
            self.rows += rows

    @classmethod
    def of(cls, table: pa.Table) -> Pairs:
        """`table`'s pairs; what is kept of it keeps its schema and metadata."""
        return cls([("pairs to curate", table)], table.schema)

    @classmethod
    def open(cls, paths: Sequence[str | Path]) -> Pairs:
        """Pairs files (or normalize or curate output dirs), one after another.

        Raises:
            FileNotFoundError: naming a path that holds no pairs file.
            ValueError: naming a file that is not Parquet.
            data_contracts.ContractError: naming a file that is not canonical pairs.
        """
        parts: list[tuple[str, pa.Table | Path]] = []
        scales: dict[str, str] = {}
        for path in paths:
            file = pairs_path(path)
            try:
                schema = pq.read_schema(file)
            except pa.ArrowException as err:
                raise ValueError(f"{file}: not a readable Parquet file ({err})") from err
            scales.update(json.loads((schema.metadata or {}).get(b"score_scale", b"{}")))
            parts.append((str(file), file))
        metadata = {**preference_pair.SCHEMA.metadata, b"score_scale": json.dumps(scales)}
        return cls(parts, preference_pair.SCHEMA.with_metadata(metadata))

    def batches(self, columns: list[str] | None, size: int) -> Iterator[tuple[int, pa.Table]]:
        """(position of its first pair, batch) for batches of at most `size` pairs: the
        `columns` cast to the contract's types, or (None) whole pairs as they are written:
        a table's own rows, a file's cast to `schema`. Without pairs, one empty batch."""
        offset, batches = 0, 0
        for label, part in self.parts:
            if isinstance(part, pa.Table):
                tables: Iterable[pa.Table] = (
                    part.slice(start, size) for start in range(0, part.num_rows, size)
                )
            else:
                tables = parquet_batches(part, size, columns)
            for table in tables:
                yield offset, self._cast(table, label, columns, isinstance(part, pa.Table))
                offset, batches = offset + table.num_rows, batches + 1
        if not batches:  # so that every pass sees the columns and their types
            label, part = self.parts[0]
            if isinstance(part, pa.Table):
                yield 0, self._cast(part.slice(0, 0), label, columns, True)
            else:
                yield 0, self._cast(self.schema.empty_table(), label, columns, False)

    def _cast(self, table: pa.Table, label: str, columns: list[str] | None, own: bool) -> pa.Table:
        """`table`'s `columns` cast to the contract; whole rows as written when `columns` is
        None: a table's `own` rows, a file's cast to `schema`."""
        if columns is None and own:
            return table
        cast = preference_pair.CONTRACT.conform(table, label, columns)
        return cast.replace_schema_metadata(self.schema.metadata)

    def sources(self) -> list[str]:
        """The sources of the pairs, sorted (reads the `source` column alone)."""
        found: set[str] = set()
        for _, batch in self.batches(["source"], BATCH_ROWS):
            found.update(pc.unique(batch["source"]).to_pylist())
        return sorted(found)


# ---------------------------------------------------------------------------------------
# The funnel


KEPT, HELD = 0, 1  # a pair's fate: kept, held out for eval, else dropped by _RULE_NAMES[k - 2]
_DROPPED_BY = {name: 2 + k for k, name in enumerate(_RULE_NAMES)}
_REASONS = np.array([None, None, *_RULE_NAMES], object)
# What the per-pair rules and the contract's row rules read.
_RULE_COLUMNS = [
    "pair_id",
    "source",
    "split",
    "prompt",
    "chosen",
    "rejected",
    "score_chosen",
    "score_rejected",
    "margin",
    "domain",
    "language",
]


def _release_arrow_memory() -> None:
    """Give the memory Arrow's pool freed back to the system, once a batch is done: its
    allocator keeps freed blocks for reuse, and over a pass of ten million pairs the blocks of
    earlier batches pile up (hundreds of MB) more than the next batch reuses them."""
    pa.default_memory_pool().release_unused()


class _Curation:
    """One curation of `pairs`: `decide` gives every pair its fate, `outputs` hands the
    pairs out by fate, `report` sums it up (see the module docstring, Memory).

    Args:
        scratch: where the near-duplicate index may write its files (a temporary
            directory inside, removed once the groups are found); None: the system's.
    """

    def __init__(
        self,
        pairs: Pairs,
        config: CurateConfig,
        eval_prompts: Sequence[str] | None,
        benchmark_prompts: Sequence[str] | None,
        batch_rows: int,
        scratch: Path | None,
    ) -> None:
        self.pairs, self.config, self.batch_rows, self.scratch = pairs, config, batch_rows, scratch
        self.eval_prompts, self.benchmark_prompts = eval_prompts, benchmark_prompts
        self.fate = np.full(pairs.rows, KEPT, np.uint8)
        rules = {name: rule(config) for name, rule in RULES.items()}
        if eval_prompts is None:
            rules["contaminated"] = None
        if benchmark_prompts is None:
            rules["benchmark_prompt"] = None
        self.rules = {name: keep for name, keep in rules.items() if keep is not None}
        self.dropped = dict.fromkeys(self.rules, 0)
        self.prompts: pl.DataFrame | None = None  # distinct prompts read again, maybe hashed
        self.near_duplicates: dict[str, Any] | None = None
        self.examples: list[list[int]] = []  # positions of the near-duplicate examples
        self.texts: dict[int, str] = {}  # their texts, read by `outputs`
        self.eval_split: dict[str, Any] | None = None
        self.bias: dict[str, Any] = {}
        self.sources: dict[str, Counter[str]] = {k: Counter() for k in ("in", "out", "eval")}
        self.attributes: list[pl.DataFrame] = []

    def _apply(self, name: str, frame: pl.DataFrame) -> pl.DataFrame:
        """Rule `name` on `frame`: its dropped pairs get their fate; the kept ones return."""
        if name == "near_duplicate":  # the same keep, sorting only the grouped pairs
            keep = _near_duplicate_keep(frame, self.config.near_dup_max_pairs)
        elif name == "over_prompt_cap":  # likewise, sorting only the crowded prompts' pairs
            assert self.config.max_pairs_per_prompt is not None
            keep = _prompt_cap_keep(frame, self.config.max_pairs_per_prompt)
        else:
            keep = frame.select(self.rules[name].fill_null(True)).to_series()
        gone = frame.filter(~keep)["__position"].to_numpy()
        self.fate[gone] = _DROPPED_BY[name]
        self.dropped[name] += len(gone)
        return frame.filter(keep)

    def decide(self) -> None:
        """The fate of every pair: the per-pair rules batch by batch, then the rules that
        compare pairs and the eval split on the slim rows.

        Raises:
            data_contracts.ContractError: pairs that break the `preference_pair` contract.
            ValueError: the eval split finds none of `eval_splits`, or leaves no pair.
        """
        config = self.config
        slim, lengths = self._first_pass()
        for name in self.rules:
            if name in PER_PAIR_RULES:
                continue
            if name == "near_duplicate":
                slim = self._mark_near_duplicates(slim)
            if name == "shares_eval_prompt":  # the source's own eval split
                slim = mark_eval(slim, config, self._prompt_hashes(slim))
            slim = self._apply(name, slim)
        if config.eval_field is not None and "__eval" not in slim.columns:
            slim = mark_eval(slim, config, self._prompt_hashes(slim))  # by hash
        self.eval_split = eval_summary(slim, config)
        if self.eval_split is not None:
            self.fate[slim.filter(pl.col("__eval"))["__position"].to_numpy()] = HELD
        self.bias["out"] = length_bias(lengths.filter(pl.Series(self.fate == KEPT)))

    def _first_pass(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The per-pair rules and exact dedup, batch by batch: (the slim rows of the pairs
        they keep, every pair's source and lengths: 12 bytes, for the length bias)."""
        config = self.config
        # A pair's position: 4 bytes while they fit.
        position = pl.UInt32 if self.pairs.rows < 2**32 else pl.Int64
        rng = np.random.default_rng(config.seed)  # one draw per pair read, by position
        seen = _SeenKeys()
        contamination = None
        if self.eval_prompts is not None:
            contamination = Contamination(self.eval_prompts, config.contamination_ngram)
        columns = _slim_columns(config)
        broken, lengths, slim = [], [], []
        bar = progress(total=self.pairs.rows, desc="curate: rules", unit="pair")
        for offset, batch in self.pairs.batches(_RULE_COLUMNS, self.batch_rows):
            labels = preference_pair.CONTRACT.label(batch)
            broken.append(
                labels.filter(pl.col("rule").is_not_null()).with_columns(
                    pl.col(ROW_INDEX).cast(pl.Int64) + offset
                )
            )
            frame = pl.from_arrow(batch)
            assert isinstance(frame, pl.DataFrame)
            frame = frame.with_columns(
                pl.int_range(offset, offset + batch.num_rows, dtype=position).alias("__position"),
                pl.Series("__random", rng.random(batch.num_rows)),
                pl.col("source", "split").cast(pl.Categorical),
            ).filter(labels["rule"].is_null())
            frame = frame.with_columns(*_helpers()).with_columns(_prompt_id(), _chosen_longer())
            if contamination is not None:
                hit = contamination.hits(frame["__prompt_text"])
                frame = frame.with_columns(pl.Series("__contaminated", hit))
            if self.benchmark_prompts is not None:
                frame = frame.with_columns(asks_listed(self.benchmark_prompts).alias("__benchmark"))
            lengths.append(frame.select("source", "__chosen_chars", "__rejected_chars"))
            for name in self.rules:
                if name not in PER_PAIR_RULES:
                    break
                if name == "duplicate":
                    key = pl.struct("__prompt_id", "__chosen_key", "__rejected_key").hash(seed=0)
                    fresh = seen.first_seen(frame.select(key).to_series().to_numpy())
                    frame = frame.with_columns(pl.Series("__first_seen", fresh))
                frame = self._apply(name, frame)
            if config.max_pairs is not None:
                keys = _seeded_hashes(frame["pair_id"], config.seed)
                frame = frame.with_columns(keys.alias("__sample_key"))
            slim.append(frame.select(columns))
            _release_arrow_memory()
            bar.update(batch.num_rows)
        bar.close()
        schema = {ROW_INDEX: pl.Int64, "rule": pl.String}
        preference_pair.CONTRACT.check_labels(
            pl.concat([pl.DataFrame(schema=schema), *broken]), source="pairs to curate"
        )
        self.bias["in"] = length_bias(pl.concat(lengths))
        return pl.concat(slim), pl.concat(lengths)

    def _read_prompts(self, frame: pl.DataFrame, index: near_dup.Index | None) -> pl.DataFrame:
        """The distinct prompts of `frame` (`__prompt_id`, `__position` of the first pair),
        read once more: their texts go to `index`, in order; with an eval split, their
        seeded hashes come back as `__hash`."""
        prompts = frame.select("__prompt_id", "__position").unique(
            "__prompt_id", keep="first", maintain_order=True
        )
        wanted = prompts["__position"].to_numpy()
        hashes = []
        for offset, batch in self.pairs.batches(["prompt"], self.batch_rows):
            low, high = np.searchsorted(wanted, [offset, offset + batch.num_rows])
            if low == high:
                continue
            read = pl.from_arrow(batch.take(pa.array(wanted[low:high] - offset)))
            assert isinstance(read, pl.DataFrame)
            keys = read.select(*_prompt_keys())
            if index is not None:
                index.add(keys["__prompt_text"])
            if self.config.eval_field is not None:
                texts = map("{}\0{}".format, keys["__prompt_roles"], keys["__prompt_text"])
                hashes.append(_seeded_hashes(texts, self.config.seed))
        if self.config.eval_field is not None:
            hashed = pl.concat([pl.Series("__hash", [], pl.UInt64), *hashes])
            prompts = prompts.with_columns(hashed.alias("__hash"))
        return prompts

    def _mark_near_duplicates(self, frame: pl.DataFrame) -> pl.DataFrame:
        """`mark_near_duplicates` of `frame`'s distinct prompts, read once more into an
        on-disk index (in `scratch`), gone once the groups are found."""
        config = self.config
        assert config.near_dup_threshold is not None
        with tempfile.TemporaryDirectory(prefix="near-dup-", dir=self.scratch) as directory:
            index = near_dup.Index(
                Path(directory), config.near_dup_threshold, config.near_dup_ngram, config.seed
            )
            self.prompts = self._read_prompts(frame, index)
            found = index.find()
        frame, self.near_duplicates, self.examples = mark_near_duplicates(
            frame, self.prompts, found, config
        )
        return frame

    def _prompt_hashes(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Each prompt's seeded hash, read with the near-duplicates' prompts or now."""
        if self.prompts is None:
            self.prompts = self._read_prompts(frame, None)
        return self.prompts

    def outputs(self) -> Iterator[tuple[pa.Table, pa.Table, pa.Table]]:
        """(kept, held out, dropped) pairs of each batch, in input order; the dropped with
        their `position` and `reason`. Counts what the report needs of them."""
        examples = np.array(sorted(p for group in self.examples for p in group), np.int64)
        bar = progress(total=self.pairs.rows, desc="curate: write", unit="pair")
        for offset, batch in self.pairs.batches(None, self.batch_rows):
            fate = self.fate[offset : offset + batch.num_rows]
            kept, held = batch.filter(pa.array(fate == KEPT)), batch.filter(pa.array(fate == HELD))
            gone = np.flatnonzero(fate > HELD)
            dropped = (
                batch.take(pa.array(gone, pa.int64()))
                .append_column("position", pa.array(gone + offset, pa.int64()))
                .append_column("reason", pa.array(_REASONS[fate[gone]].tolist(), pa.string()))
            )
            for side, table in (("in", batch), ("out", kept), ("eval", held)):
                self.sources[side].update(dict(_counts(table["source"])))
            rated = _frame(kept, ["source", "chosen_attributes", "rejected_attributes"])
            self.attributes.append(attribute_counts(rated))
            low, high = np.searchsorted(examples, [offset, offset + batch.num_rows])
            if low < high:
                texts = _frame(batch.take(pa.array(examples[low:high] - offset)), ["prompt"])
                shown = texts.select(_prompt_keys()[0].str.slice(0, EXAMPLE_CHARS))
                self.texts.update(zip(examples[low:high].tolist(), shown.to_series(), strict=True))
            bar.update(batch.num_rows)
            yield kept, held, dropped
            _release_arrow_memory()
        bar.close()

    def report(self) -> dict[str, Any]:
        """The funnel and its summaries, once `outputs` has run (`curation_report`)."""
        if self.near_duplicates is not None:
            examples = [[self.texts[p] for p in group] for group in self.examples]
            self.near_duplicates["examples"] = examples
        report = {
            "contract": "curation_report",
            "version": curation_report.VERSION,
            "rows_in": self.pairs.rows,
            "dropped": self.dropped,
            "rows_out": int(np.count_nonzero(self.fate == KEPT)),
            "eval_pairs": int(np.count_nonzero(self.fate == HELD)),
            "dropped_file": DROPPED_FILE,
            "eval_file": EVAL_PAIRS_FILE,
            "config": dataclasses.asdict(self.config),
            "eval_split": self.eval_split,
            "eval_prompts": None if self.eval_prompts is None else len(self.eval_prompts),
            "benchmark_prompts": (
                None if self.benchmark_prompts is None else len(self.benchmark_prompts)
            ),
            "score_scale": json.loads(
                (self.pairs.schema.metadata or {}).get(b"score_scale", b"{}")
            ),
            "sources": {
                s: {
                    "rows_in": n,
                    "rows_out": self.sources["out"][s],
                    "eval_pairs": self.sources["eval"][s],
                }
                for s, n in sorted(self.sources["in"].items())
            },
            "attribute_agreement": attribute_agreement(pl.concat(self.attributes)),
            "length_bias": {"unit": "characters", **self.bias},
            "near_duplicates": self.near_duplicates,
        }
        curation_report.validate(report, source="curation report")
        return report


# ---------------------------------------------------------------------------------------


def curate(
    pairs: pa.Table,
    config: CurateConfig,
    eval_prompts: Sequence[str] | None = None,
    benchmark_prompts: Sequence[str] | None = None,
    *,
    batch_rows: int = BATCH_ROWS,
) -> Curated:
    """Apply the rules of `config` to `pairs`, counting every drop by rule, then hold out
    its eval split (if any) from what they kept; in memory (`curate_to` writes the same
    files batch by batch).

    Args:
        pairs: canonical pairs (`preference_pair.SCHEMA`), e.g. `Normalized.pairs`.
        config: which rules run and their thresholds.
        eval_prompts: prompts of evaluation sets; pairs whose prompt overlaps one are dropped
            as `contaminated` (off when None).
        benchmark_prompts: a benchmark's questions (e.g. TruthfulQA's); pairs with a user
            turn equal to one are dropped as `benchmark_prompt` (off when None).
        batch_rows: pairs handled at once (memory only: the result is the same).

    Returns:
        The kept training pairs and eval pairs (input order, schema and metadata
        unchanged), the dropped pairs and the report.

    Raises:
        data_contracts.ContractError: `pairs` does not satisfy the `preference_pair` contract.
        ValueError: the eval split finds none of `eval_splits`, or leaves no pair to train on.
    """
    run = _Curation(Pairs.of(pairs), config, eval_prompts, benchmark_prompts, batch_rows, None)
    run.decide()
    parts = list(run.outputs())
    kept, held, dropped = (
        pa.concat_tables([p[k] for p in parts]).combine_chunks() for k in range(3)
    )
    return Curated(kept, held, dropped, run.report())


def curate_to(
    out_dir: str | Path,
    pairs: Pairs,
    config: CurateConfig,
    eval_prompts: Sequence[str] | None = None,
    benchmark_prompts: Sequence[str] | None = None,
    *,
    preset: str | None = None,
    batch_rows: int = BATCH_ROWS,
) -> dict[str, Any]:
    """`curate` for pairs of any size: `pairs` (e.g. `Pairs.open(paths)`) are read batch by
    batch and `out_dir` gets, atomically, what `write_curated` writes of the curated
    result, its report naming `preset` (as `pipeline.presets.with_preset` does).

    Returns:
        The report (`report.json`).

    Raises:
        As `curate`; `out_dir` is then left as it was.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        run = _Curation(pairs, config, eval_prompts, benchmark_prompts, batch_rows, tmp)
        run.decide()
        with (
            ParquetRowGroups(tmp / PAIRS_FILE, pairs.schema) as kept,
            ParquetRowGroups(tmp / EVAL_PAIRS_FILE, pairs.schema) as held,
            ParquetRowGroups(tmp / DROPPED_FILE, _dropped_schema(pairs.schema)) as dropped,
        ):
            for parts in run.outputs():
                for out, part in zip((kept, held, dropped), parts, strict=True):
                    out.write(part)
        report = {**run.report(), "preset": preset}
        write_json(report, tmp / REPORT_FILE)
    return report


def _dropped_schema(schema: pa.Schema) -> pa.Schema:
    """A dropped pair: the pair, its position in the input and the rule that dropped it."""
    return schema.append(pa.field("position", pa.int64())).append(pa.field("reason", pa.string()))


def read_pairs(paths: Sequence[str | Path]) -> pa.Table:
    """Read and concatenate pairs files (or normalize output dirs), merging `score_scale`,
    in memory (`Pairs.open` reads them batch by batch).

    Raises:
        FileNotFoundError: naming a path that holds no pairs file.
        data_contracts.ContractError: naming a file that is not canonical pairs.
    """
    pairs = Pairs.open(paths)
    tables = [table for _, table in pairs.batches(None, max(pairs.rows, 1))]
    return pa.concat_tables(tables).replace_schema_metadata(pairs.schema.metadata)


def _frame(table: pa.Table, columns: list[str]) -> pl.DataFrame:
    frame = pl.from_arrow(table.select(columns))
    assert isinstance(frame, pl.DataFrame)
    return frame


def _counts(column: pa.ChunkedArray) -> Iterator[tuple[str, int]]:
    """(value, count) of each value of `column`."""
    return pl.Series(column).value_counts().iter_rows()


def write_curated(result: Curated, out_dir: str | Path) -> Path:
    """Write the curated `pairs.parquet` (the training pairs), `eval_pairs.parquet` (the
    pairs held out for evaluation; always written, empty without an eval split),
    `dropped.parquet` (each other pair and the rule that dropped it) and `report.json`
    atomically.

    Returns:
        `out_dir`, complete; the same result always gives the same bytes, those
        `curate_to` writes.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_row_groups(result.pairs, tmp / PAIRS_FILE)
        write_row_groups(result.eval_pairs, tmp / EVAL_PAIRS_FILE)
        write_row_groups(result.dropped, tmp / DROPPED_FILE)
        write_json(result.report, tmp / REPORT_FILE)
    return out_dir
