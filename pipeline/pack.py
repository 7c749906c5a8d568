"""The pack stage: tokenized pairs -> packed rows with mask metadata -> shards.

`build_shards` is the entry the CLI and Dagster call (the `packed_shards` asset). It
streams the `tokenized_pair` rows of a tokenized directory (`pipeline.tokenized`) in
batches: apply the length policy, bin-pack whole pairs into rows of at most `max_len`
tokens, derive the block-sparse mask summary, and write shards atomically into
`<store>/shards/<cache key>`. The key (`data_contracts.manifest.shard_key`) hashes the
tokenized directory's key (which covers data, tokenizer and template), every `PackConfig`
setting and the code and contract versions; the manifest records each of them, so a
reader recomputes the key from the manifest (`pipeline.shards.read_manifest`). If that
directory exists and proves itself (key, checksum, every file's sha256), nothing is
redone; otherwise it is rebuilt. A new max_len or layout repacks without tokenizing again.

Length policy (`too_long`), for a pair whose tokens under the layout (P+C+R shared,
2P+C+R otherwise) exceed `max_len`:
- "drop": the pair is dropped and counted as `too_long`.
- "truncate": responses keep their start; the prompt keeps its head and its end and loses
  its middle. First the responses are cut, the longer one first, until the pair fits with
  its whole prompt, but never below `min_response_len` tokens (or their own length, if
  shorter); only then is the prompt cut, to the budget left:
  - its *head* stays whole: every token before the first non-system turn (bos and the
    system turns, `<|begin_of_text|><|start_header_id|>system...<|eot_id|>` for Llama 3),
    when that leaves room for at least one more token;
  - its *end* fills the rest of the budget, and starts at a whole turn when one fits: the
    cut is moved forward to the next turn start (never the generation prompt's own), so
    whole earlier turns go. When the last message alone is longer than what is left, the
    middle tokens go and the end starts inside that message. The end always closes with
    the generation prompt.
  Turns and the head are found in the token ids by the marker each turn opens with
  (`pipeline.templates.turn_openings`, e.g. `<|start_header_id|>`, `<|im_start|>`); a
  template without one (`plain`) has no known head or turns, and its prompt keeps its
  end. Room a whole-turn cut frees goes back to the responses. A pair whose prompt would
  keep no token is dropped as `too_long`. A pair is never split across rows.
  `stats.one_response_cut` counts the pairs where exactly one response lost its end of
  turn (its last kept token is not the end of turn): for those the cut, not the
  annotator, tells the responses apart.

Packing is best-fit decreasing over windows of `pack_window` pairs (`pipeline.packer`), so
memory stays bounded on millions of pairs. Same input, same rows, byte for byte. Reading (with the
length policy), packing and writing (with hashing) run on three threads, each over the
batches in order (`pipeline.ahead`), so they overlap without changing a byte.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from core.atomic import atomic_directory, keyed_directory
from core.progress import progress
from core.settings import check_settings, setting
from data_contracts import manifest as manifest_contract
from data_contracts import packed_row, tokenized_pair
from data_contracts.manifest import DROP_TOO_LONG
from data_contracts.packed_row import Layout, pair_tokens
from pipeline import ragged
from pipeline.ahead import ahead
from pipeline.io import rechunk
from pipeline.lengths import LengthCounts, power_of_two_edges
from pipeline.packer import RowPacker
from pipeline.shards import (
    TOKENIZER,
    TOKENIZER_CONFIG,
    TOKENIZER_FILES,
    ShardError,
    ShardWriter,
    file_entries,
    open_shards,
    write_manifest,
)
from pipeline.templates import ChatTemplate, turn_openings
from pipeline.tokenize import token_ids
from pipeline.tokenized import read_tokenized, tokenized_batches

# Bump when this module's code would write different bytes for the same inputs.
PACKER_VERSION = "4"  # 4: the pair-length histogram on power-of-two edges
TRUNCATION_WARNING = 0.05  # share of packed pairs truncated above which pack warns
MIN_MAX_LEN = 3  # one token each of prompt, chosen and rejected


@dataclass(frozen=True)
class PackConfig:
    """Every setting of the pack stage; all of them are part of the shard cache key."""

    layout: Layout = setting(
        "shared",
        "shared P|C|R (the prompt once), unshared P|C|P|R packed, padded one pair per row "
        "(the baseline of trainers without packing)",
    )
    max_len: int = setting(
        2048, "tokens per row at most (rows are never padded on disk)", ge=MIN_MAX_LEN
    )
    too_long: Literal["truncate", "drop"] = setting(
        "truncate", "what to do with pairs longer than --max-len (rule: module docstring)"
    )
    min_response_len: int = setting(
        64, "truncation never cuts a response below this many tokens", ge=1
    )
    mask_block_size: int = setting(
        packed_row.DEFAULT_BLOCK_SIZE,
        "block size of the block-sparse mask summary (FlexAttention's default is 128)",
        ge=1,
        flag="--block-size",
    )
    pack_window: int = setting(
        65_536, "pairs bin-packed together; bounds memory (a window's tokens live in RAM)", ge=1
    )
    shard_bytes: int = setting(
        256 * 2**20, "a shard file closes once it passes this size (plus one batch)", ge=1
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class ShardResult:
    """What `build_shards` made (or found).

    Attributes:
        directory: the shard directory, `<store>/shards/<key>`.
        key: the cache key (use it as the data version).
        reused: True when a verified directory with this key already existed.
        manifest: the parsed manifest.json.
    """

    directory: Path
    key: str
    reused: bool
    manifest: dict


# ---------------------------------------------------------------------- length policy


@dataclass(frozen=True)
class TemplateIds:
    """The token ids the length policy reads a prompt's structure and ends by.

    Attributes:
        turn_start: the id every turn opens with (`<|start_header_id|>`), or None when
            turns cannot be found (then no head is known and the prompt keeps its end).
        system: the ids a system turn opens with (`<|start_header_id|>`, `system`);
            empty when system turns cannot be told apart.
        generation_starts_turn: the generation prompt opens with `turn_start` too.
        end_of_turn: the id a response's turn ends with, or None when it is not one token.
    """

    turn_start: int | None = None
    system: tuple[int, ...] = ()
    generation_starts_turn: bool = False
    end_of_turn: int | None = None


def template_ids(tokenized: Path, report: dict) -> TemplateIds:
    """The `TemplateIds` of a tokenized directory's template and tokenizer (probed once)."""
    tokenizer = Tokenizer.from_file(str(tokenized / TOKENIZER))
    config = json.loads((tokenized / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    template = ChatTemplate(name=report["template"]["name"], source=config["chat_template"])
    ending = report["stats"]["responses_ending_with_eos"]["token_ids"]
    end_of_turn = ending[0] if len(ending) == 1 else None
    info = report["tokenizer"]
    openings = turn_openings(template, info["bos_token"], info["eos_token"])
    start = token_ids(tokenizer, openings.start) if openings else []
    if len(start) != 1:
        return TemplateIds(end_of_turn=end_of_turn)
    system = token_ids(tokenizer, openings.system) if openings.system else []
    return TemplateIds(
        turn_start=start[0],
        system=tuple(system) if len(system) > 1 and system[0] == start[0] else (),
        generation_starts_turn=openings.generation_starts_turn,
        end_of_turn=end_of_turn,
    )


def _fit_responses(
    room: np.ndarray, c: np.ndarray, r: np.ndarray, minimum: int
) -> tuple[np.ndarray, np.ndarray]:
    """Response lengths within `room`: the shorter keeps all it can, the longer gets the
    rest, neither below `minimum` (or its own length); within `room` whenever both minima
    fit in it."""
    low_c, low_r = np.minimum(c, minimum), np.minimum(r, minimum)
    c_cut = np.clip(np.maximum(room - r, -(-room // 2)), low_c, c)
    r_cut = np.clip(room - c_cut, low_r, r)
    return np.clip(room - r_cut, low_c, c), r_cut


def truncated_lengths(
    prompt_len: np.ndarray,
    chosen_len: np.ndarray,
    rejected_len: np.ndarray,
    prompt_copies: int,
    max_len: int,
    min_response_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lengths after the truncation rule (module docstring); a kept prompt of 0 = drop.

    Args:
        prompt_len, chosen_len, rejected_len: int64 lengths P, C, R.
        prompt_copies: 1 for the shared layout (P+C+R), 2 otherwise (2P+C+R).
        max_len: the row budget.
        min_response_len: responses are never cut below this (or their own length).

    Returns:
        (P', C', R'): the prompt's budget P' <= P (which tokens it keeps is
        `apply_length_policy`'s), C' <= C and R' <= R keeping the responses' starts;
        pairs that fit are unchanged.
    """
    p, c, r = (np.asarray(a, dtype=np.int64) for a in (prompt_len, chosen_len, rejected_len))
    c_cut, r_cut = _fit_responses(max_len - prompt_copies * p, c, r, min_response_len)
    p_cut = np.clip((max_len - c_cut - r_cut) // prompt_copies, 0, p)
    return p_cut, c_cut, r_cut


def _opens_with(values: np.ndarray, ends: np.ndarray, pos: np.ndarray, ids: tuple) -> np.ndarray:
    """bool per position: `values[pos:pos+len(ids)] == ids`, inside its list (ends)."""
    if not ids:
        return np.zeros(len(pos), dtype=bool)
    index = pos[:, None] + np.arange(len(ids))
    inside = index[:, -1] < ends
    return inside & (values[np.minimum(index, len(values) - 1)] == np.array(ids)).all(axis=1)


def prompt_cuts(
    values: np.ndarray, offsets: np.ndarray, budget: np.ndarray, ids: TemplateIds
) -> tuple[np.ndarray, np.ndarray]:
    """Where each prompt is cut to its budget: it keeps `[0, head)` and `[tail, P)`.

    Args:
        values, offsets: the prompts' ids as a ragged array.
        budget: int64 tokens each prompt may keep (P for an uncut one, >= 1).
        ids: the template's turn ids.

    Returns:
        (head, tail) int64 per prompt, head + P - tail <= budget; (0, 0) when uncut.
    """
    p = np.diff(offsets)
    cut = budget < p
    head = np.zeros_like(p)
    rel = owner = np.zeros(0, dtype=np.int64)  # turn starts: position in prompt, prompt
    if ids.turn_start is not None:
        pos = np.flatnonzero(values == ids.turn_start)
        owner = np.searchsorted(offsets, pos, side="right") - 1
        rel = pos - offsets[owner]
        message = ~_opens_with(values, offsets[owner + 1], pos, ids.system)
        first = p.copy()  # the first non-system turn start ends the head
        np.minimum.at(first, owner[message], rel[message])
        head = np.where(first < p, first, 0)
        if ids.generation_starts_turn:  # a prompt's last turn start opens the generation
            last = np.full_like(p, -1)
            np.maximum.at(last, owner, rel)
            keep = rel < last[owner]
            rel, owner = rel[keep], owner[keep]
    head = np.where(cut & (head < budget), head, 0)
    nominal = np.where(cut, p - budget + head, 0)  # where the end starts, cutting tokens
    # The end starts at the first turn start at or after that, when there is one.
    later = cut[owner] & (rel >= nominal[owner])
    tail = p.copy()
    np.minimum.at(tail, owner[later], rel[later])
    return head, np.where(tail < p, tail, nominal)


@dataclass(frozen=True)
class PolicyResult:
    """Pairs after the length policy: the kept ones (maybe cut) and the counts."""

    kept: pa.Table
    truncated: int
    too_long: int
    one_response_cut: int


def _lost_end(values: np.ndarray, offsets: np.ndarray, new_len: np.ndarray, end: int | None):
    """bool per response: cut, and its last kept token is not the end of turn."""
    cut = new_len < np.diff(offsets)
    if end is None:
        return cut
    last = values[np.maximum(offsets[:-1] + new_len - 1, 0)]
    return cut & (last != end)


def apply_length_policy(
    tokenized: pa.Table, config: PackConfig, ids: TemplateIds = TemplateIds()
) -> PolicyResult:
    """Drop or truncate pairs longer than `config.max_len` under `config.layout`.

    Args:
        tokenized: `tokenized_pair` rows (every list non-empty).
        config: the pack settings.
        ids: the template's turn and end-of-turn ids (`template_ids`); the default knows
            none, so a cut prompt keeps its end only.

    Returns:
        The kept rows, in order, with cut lists; how many were cut, dropped, and cut so
        that exactly one response lost its end of turn.
    """
    names = ("prompt_ids", "chosen_ids", "rejected_ids")
    parts = [ragged.list_parts(tokenized.column(n)) for n in names]
    p, c, r = (np.diff(offsets) for _, offsets in parts)
    copies = 1 if config.layout == "shared" else 2
    fits = pair_tokens(p, c, r, config.layout) <= config.max_len
    if config.too_long == "drop":
        return PolicyResult(tokenized.filter(pa.array(fits)), 0, int((~fits).sum()), 0)
    budget = truncated_lengths(p, c, r, copies, config.max_len, config.min_response_len)[0]
    keep = budget > 0
    cut = keep & ~fits
    if not cut.any():
        return PolicyResult(tokenized.filter(pa.array(keep)), 0, int((~keep).sum()), 0)
    (pv, po), (cv, co), (rv, ro) = parts
    head, tail = prompt_cuts(pv, po, np.maximum(budget, 1), ids)
    p2 = head + p - tail
    c2, r2 = _fit_responses(config.max_len - copies * p2, c, r, config.min_response_len)
    lost = _lost_end(cv, co, c2, ids.end_of_turn) != _lost_end(rv, ro, r2, ids.end_of_turn)
    k = np.flatnonzero(keep)
    # The prompt keeps [0, head) and [tail, P); each response keeps its start.
    starts = np.stack([po[k], po[k] + tail[k]], axis=1).reshape(-1)
    lengths = np.stack([head[k], p[k] - tail[k]], axis=1).reshape(-1)
    lists = [(pv, starts, lengths, p2[k]), (cv, co[k], c2[k], c2[k]), (rv, ro[k], r2[k], r2[k])]
    columns = [tokenized.column("pair_id").take(pa.array(k))]
    for values, start, length, new_len in lists:
        new_values = pa.array(ragged.gather(values, start, length))
        columns.append(ragged.list_array(new_values, ragged.offsets_of(new_len)))
    kept = pa.Table.from_arrays(columns, schema=tokenized_pair.SCHEMA)
    return PolicyResult(kept, int(cut.sum()), int((~keep).sum()), int((lost & keep).sum()))


# ------------------------------------------------------------------------ the build


def cache_key(tokenized_key: str, config: PackConfig) -> str:
    """Hash of everything that changes the bytes: the tokenized pairs, config, code.

    The tokenized key already covers the input data, tokenizer and template; a reader
    recomputes this from the manifest (`data_contracts.manifest.shard_key`).
    """
    return manifest_contract.shard_key(
        tokenized_key, asdict(config), _contract_versions(), PACKER_VERSION
    )


def _contract_versions() -> dict[str, str]:
    return {
        "tokenized_pair": tokenized_pair.VERSION,
        "packed_row": packed_row.VERSION,
        "manifest": manifest_contract.VERSION,
    }


class _Stats:
    """Counts over the written rows, for the manifest."""

    def __init__(self, layout: Layout, max_len: int) -> None:
        self.layout = layout
        self.max_len = max_len
        self.rows = self.tokenized_pairs = self.truncated = self.too_long = 0
        self.one_response_cut = 0
        self.lengths = {name: LengthCounts() for name in ("prompt", "chosen", "rejected", "pair")}
        self.by_layout = dict.fromkeys(("shared", "unshared", "padded"), 0)

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        p, c, r = (
            ragged.list_parts(batch.column(f"{name}_len"))[0].astype(np.int64)
            for name in ("prompt", "chosen", "rejected")
        )
        for name, x in zip(self.lengths, (p, c, r, pair_tokens(p, c, r, self.layout)), strict=True):
            self.lengths[name].add(x)
        self.by_layout["shared"] += int((p + c + r).sum())
        self.by_layout["unshared"] += int((2 * p + c + r).sum())
        self.by_layout["padded"] += int((2 * np.maximum(p + c, p + r)).sum())

    def to_dict(self, tokenized: dict) -> dict:
        """The manifest's stats; `tokenized` is the tokenized directory's report."""
        pairs = self.lengths["pair"].items
        tokens = self.lengths["pair"].total
        by_layout = {**self.by_layout, "padded_to_max_len": 2 * pairs * self.max_len}
        saved = by_layout["unshared"] - by_layout["shared"]
        dropped = Counter(tokenized["stats"]["dropped"])
        if self.too_long:
            dropped[DROP_TOO_LONG] += self.too_long
        edges = power_of_two_edges(self.lengths["pair"].longest)  # no empty tail bins
        return {
            "rows": self.rows,
            "pairs_in": tokenized["stats"]["pairs_in"],
            "tokenized_pairs": self.tokenized_pairs,
            "pairs": pairs,
            "tokens": tokens,
            "fill_ratio": tokens / (self.rows * self.max_len) if self.rows else 0.0,
            "truncated": self.truncated,
            "one_response_cut": self.one_response_cut,
            "dropped": dict(sorted(dropped.items())),
            "tokens_by_layout": by_layout,
            "tokens_saved_by_prefix_sharing": saved,
            "prefix_sharing_saving": saved / by_layout["unshared"] if pairs else 0.0,
            "lengths": {name: x.quantiles() for name, x in self.lengths.items()},
            "pair_length_histogram": {
                "edges": edges.tolist(),
                "counts": self.lengths["pair"].histogram(edges),
            },
            "boundary_agreement": tokenized["stats"]["boundary_agreement"],
        }


def _copy_tokenizer(tokenized: Path, directory: Path, max_len: int) -> None:
    """The tokenized directory's tokenizer files, with max_len as model_max_length."""
    shutil.copyfile(tokenized / TOKENIZER, directory / TOKENIZER)
    config = json.loads((tokenized / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    config["model_max_length"] = max_len
    text = json.dumps(config, indent=2) + "\n"
    (directory / TOKENIZER_CONFIG).write_text(text, encoding="utf-8")


def _write_shards(
    tokenized: Path, report: dict, config: PackConfig, key: str, store: Path, directory: Path
) -> dict:
    """Pack every tokenized pair and write every shard plus the manifest into `directory`."""
    writer = ShardWriter(directory, config.shard_bytes)
    packer = RowPacker(config.layout, config.max_len, config.mask_block_size)
    stats = _Stats(config.layout, config.max_len)
    ids = template_ids(tokenized, report)

    def kept_pairs() -> Iterator[pa.Table]:
        with progress(total=report["stats"]["pairs_out"], unit="pair", desc="pack") as bar:
            for table in tokenized_batches(tokenized):
                policy = apply_length_policy(table, config, ids)
                stats.tokenized_pairs += table.num_rows
                stats.truncated += policy.truncated
                stats.too_long += policy.too_long
                stats.one_response_cut += policy.one_response_cut
                bar.update(table.num_rows)
                yield policy.kept

    def packed() -> Iterator[pa.RecordBatch]:
        for window in rechunk(ahead(kept_pairs()), config.pack_window):  # exactly that many
            yield from packer.add(window)
        yield from packer.finish()

    # Three steps on three threads (`pipeline.ahead`), each over the batches in order:
    # read + length policy, bin-pack + lay out rows, and here write + hash + count.
    with closing(ahead(packed())) as batches:
        for batch in batches:
            writer.write(batch)
            stats.add(batch)
    shards = writer.close()

    _copy_tokenizer(tokenized, directory, config.max_len)
    manifest = {
        "contract": "manifest",
        "version": manifest_contract.VERSION,
        "contracts": {**report["contracts"], **_contract_versions()},
        "key": key,
        "packer": PACKER_VERSION,
        "layout": config.layout,
        "max_len": config.max_len,
        "mask_block_size": config.mask_block_size,
        "config": asdict(config),
        "input": report["input"],
        "tokenized": {
            "key": report["key"],
            "directory": Path(os.path.relpath(tokenized.resolve(), store.resolve())).as_posix(),
            "config": report["config"],
        },
        "tokenizer": report["tokenizer"],
        "template": report["template"],
        "shards": shards,
        "files": file_entries(directory, TOKENIZER_FILES),
        "stats": stats.to_dict(report),
    }
    return write_manifest(directory, manifest)


def build_shards(tokenized: str | Path, config: PackConfig, store: str | Path) -> ShardResult:
    """Pack a tokenized directory into verified shards, or reuse them.

    An existing directory with the key is reused only when it proves itself
    (`open_shards` with every sha256); one that does not (an edited manifest, shard or
    tokenizer file) is logged, naming the file, and replaced by a fresh build.

    Args:
        tokenized: a directory written by `pipeline.tokenized.build_tokenized`.
        config: the pack settings.
        store: the store root; shards go to `<store>/shards/<key>`.

    Returns:
        Where the shards are, their key, whether they were reused, and the manifest.

    Raises:
        ShardError: the tokenized directory is incomplete or corrupt (names the file).
        ValueError: a setting is out of range.
    """
    tokenized, store = Path(tokenized), Path(store)
    # The report alone gives the key; the data files are verified only when packing.
    report = read_tokenized(tokenized, verify=False)
    key = cache_key(report["key"], config)

    def stage(out: Path) -> AbstractContextManager[Path]:
        read_tokenized(tokenized, verify=True)  # never pack (nor stage) corrupt pairs
        return atomic_directory(out, keep_identical=True)

    def build(tmp: Path) -> dict:
        manifest = _write_shards(tokenized, report, config, key, store, tmp)
        _refuse_empty(manifest["stats"], report, config)
        return manifest

    directory = store / "shards" / key
    manifest, reused = keyed_directory(
        directory,
        lambda d: open_shards(d, verify=True).manifest,
        build,
        invalid=ShardError,
        stage=stage,
    )
    return ShardResult(directory, key, reused, manifest)


def _refuse_empty(stats: dict, tokenized: dict, config: PackConfig) -> None:
    """Raises: ValueError when no pair was packed, with the lengths that explain why."""
    if stats["pairs"]:
        return
    lengths = tokenized["stats"]["lengths"]["pair"]
    raise ValueError(
        f"no pair packed: {stats['tokenized_pairs']} tokenized pairs, dropped "
        f"{stats['dropped']}; prompt+chosen+rejected is {lengths['p50']} tokens at the "
        f"median and {lengths['max']} at most, against --max-len {config.max_len} "
        f"(--too-long {config.too_long}, --min-response-len {config.min_response_len})"
    )


def truncation_warning(stats: dict, config: PackConfig) -> str | None:
    """A warning when more than `TRUNCATION_WARNING` of the packed pairs were cut to fit
    (the CLI prints it, the asset logs it); None otherwise."""
    if stats["truncated"] <= TRUNCATION_WARNING * stats["pairs"]:
        return None
    share = stats["truncated"] / stats["pairs"]
    return (
        f"{stats['truncated']} of {stats['pairs']} pairs ({share:.0%}) were truncated to fit "
        f"--max-len {config.max_len}; raise --max-len or use --too-long drop"
    )
