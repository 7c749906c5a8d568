"""Benchmark DPO training: throughput of `padded` vs `unshared` vs `shared` packed rows,
attention kernels per layer, and the memory of the log-prob step.

Run: `python -m benchmarks.train` (about 12 minutes on 2 busy cores). Prints tables and
writes `benchmarks/results/train.json`.

Kernels per layer: the attention calls one layer makes for one micro-batch, per backend,
counted as they run (the profiler's `aten::scaled_dot_product_attention` events for the SDPA
backends; the kernel's invocations for varlen, whose FlashAttention kernel is CUDA-only and
is replaced by a counting stand-in), on UltraFeedback-like and HelpSteer-like micro-batches
of 8 rows of 4096 tokens and on rows of 4 to 256 pairs. `flex` is one `flex_attention` call
by construction. The per-pair segments backend this replaced made 2 calls per pair.

Log-prob step memory: the output projection + log-softmax + gather, forward and backward,
at vocabulary 128,256 and 16,384 response tokens (hidden 2048), chunked (`--logits-chunk`
default) vs all at once. Peak live tensor bytes are tracked by `torch`'s `MemTracker` on
fake tensors (the same ops, no real memory: the unchunked case needs about 30 GB); the
tracker is checked against the real peak RSS of fresh processes at 2,048 tokens.

What is compared, fairly:
- Same pairs: per dataset, pair lengths are drawn with `benchmarks.pack.draw_lengths`
  (UltraFeedback-like and HelpSteer-like, the published medians), cut with the packer's
  own truncation rule to the *unshared* budget (2P+C+R <= max_len) so that every layout
  holds exactly the same tokens, given random token ids, and packed in each layout by the
  real packer (`pipeline.packer.RowPacker`).
- Same model and seeds: the `small` named config (4 layers, width 256, vocabulary 8192),
  one seeded init, copied for every run; the trainer is `training.train.train` itself
  (segments backend, reference model in memory), so each step's time covers collate,
  policy forward/backward, reference forward and the optimizer step.
- Same batch in pairs: a step holds about `PAIRS_PER_STEP` pairs in every layout (padded
  rows hold one pair; packed rows are batched `PAIRS_PER_STEP / mean pairs per row`).
- Noise: the pairs are split into rounds; every round trains its own pairs in all three
  layouts (the order rotated each round), so load from other processes hits all of them
  alike. One untimed call per layout warms up first, and the first step of every call is
  left out (optimizer state allocation). A step's time is this process's CPU time by
  default (one torch thread): other engineers' processes on the 2 shared cores stretch
  wall time by tens of percent from one minute to the next, CPU time much less; wall-clock
  rates are reported beside. Reported: per layout the median over rounds of pairs/s and
  tokens/s (real tokens, no padding), the positions the model ran per pair (padding
  included) in the timed sample and over 20k pairs, and the median over rounds of the
  per-round ratios.

The ideal token ratio of prefix sharing is unshared tokens / shared tokens of the same
pairs (2P+C+R over P+C+R); the target is shared/unshared pairs/s >= 0.9x that ratio. The
ratio is taken per round from the tokens per pair of each layout's timed steps (the first,
untimed step holds other pairs in each layout), so the comparison equals the ratio of the
two layouts' tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from benchmarks.pack import draw_lengths, synthetic_tokenized
from data_contracts import tokenized_pair
from data_contracts.packed_row import LAYOUTS, Layout, PackedRow
from pipeline import ragged
from pipeline.pack import truncated_lengths
from pipeline.packer import RowPacker
from training.batch import PackedRows
from training.configs import small
from training.model import CausalLM
from training.train import TrainConfig, global_step_rows, train, train_step

RESULTS = Path(__file__).parent / "results" / "train.json"
# label -> (benchmarks.pack.PUBLISHED name, row budget about 2.5x the median pair, pairs).
# More UltraFeedback-like pairs: they are cheaper and its ideal token ratio (~1.2) is the
# harder one to tell from noise.
DATASETS = {
    "UltraFeedback-like": ("UltraFeedback", 1024, 144),
    "HelpSteer-like": ("Tulu-HelpSteer", 2048, 96),
}
PAIRS_PER_STEP = 8
BLOCK_SIZE = 128  # mask block size of the rows (FlexAttention's default)
MIN_RESPONSE_LEN = 64  # the packer's default


# ---------------------------------------------------------------------------- data


def tokenized_pairs(p: np.ndarray, c: np.ndarray, r: np.ndarray, vocab: int, seed: int) -> pa.Table:
    """`tokenized_pair` rows of these lengths with random token ids (compute does not
    depend on the ids)."""
    rng = np.random.default_rng(seed)
    columns = [
        ragged.list_array(
            pa.array(rng.integers(4, vocab, int(x.sum()), dtype=np.int32)), ragged.offsets_of(x)
        )
        for x in (p, c, r)
    ]
    ids = pa.array([f"{seed:08x}{i:024x}" for i in range(len(p))])
    return pa.Table.from_arrays([ids, *columns], schema=tokenized_pair.SCHEMA)


def pack_rows(
    pairs: pa.Table, layout: Layout, max_len: int, block_size: int | None = None
) -> list[PackedRow]:
    """The real packer's rows as `PackedRow`s (setup, not timed), with the block lists of
    `block_size` when given (the flex backend reads them; segments does not)."""
    packer = RowPacker(layout, max_len, block_size=block_size or BLOCK_SIZE)
    batches = [*packer.add(pairs), *packer.finish()]
    names = list(PackedRow.__dataclass_fields__)[: 8 if block_size else 6]
    rows = []
    for batch in batches:
        for row in batch.select(names).to_pylist():
            blocks = {
                k: tuple(np.asarray(b, np.int32) for b in row.pop(k))
                for k in ("kv_block_full", "kv_block_partial")
                if k in row
            }
            pair_ids = tuple(row.pop("pair_ids"))
            arrays = {k: np.asarray(v, np.int32) for k, v in row.items()}
            rows.append(PackedRow(**arrays, pair_ids=pair_ids, **blocks))
    return rows


def cut_lengths(name: str, n: int, max_len: int, seed: int) -> tuple[np.ndarray, ...]:
    """(P, C, R, cut) of `n` drawn pairs cut by the packer's rule to fit the unshared
    budget 2P+C+R <= max_len (so every layout holds the same tokens); `cut` flags the
    pairs that were cut. Pairs that cannot fit are left out."""
    drawn = draw_lengths(name, n, seed)
    p, c, r = truncated_lengths(*drawn, 2, max_len, MIN_RESPONSE_LEN)
    cut = (p != drawn[0]) | (c != drawn[1]) | (r != drawn[2])
    keep = p > 0
    return p[keep], c[keep], r[keep], cut[keep]


def population_positions(name: str, max_len: int, seed: int, n: int = 20_000) -> dict:
    """Token positions the model runs per pair, padding included, in each layout with the
    benchmark's batching, over `n` pairs: the work ratio the timed sample estimates."""
    p, c, r, _ = cut_lengths(name, n, max_len, seed)
    rng = np.random.default_rng(seed)
    out = {}
    for layout in LAYOUTS:
        if layout == "padded":  # each pair: two documents, a batch pads to its longest
            docs = np.maximum(p + c, p + r)[rng.permutation(len(p))]
            groups = docs[: len(docs) // PAIRS_PER_STEP * PAIRS_PER_STEP]
            longest = groups.reshape(-1, PAIRS_PER_STEP).max(axis=1)
            out[layout] = float(2 * PAIRS_PER_STEP * longest.sum() / groups.size)
            continue
        packer = RowPacker(layout, max_len, block_size=BLOCK_SIZE)
        batches = [*packer.add(synthetic_tokenized(p, c, r)), *packer.finish()]
        tokens = np.concatenate([ragged.lengths_of(b.column("input_ids")) for b in batches])
        pairs = np.concatenate([ragged.lengths_of(b.column("pair_start")) for b in batches])
        size = max(1, round(PAIRS_PER_STEP / pairs.mean()))
        order = rng.permutation(len(tokens))[: len(tokens) // size * size].reshape(-1, size)
        out[layout] = float(size * tokens[order].max(axis=1).sum() / pairs[order].sum())
    return out


@dataclass(frozen=True)
class Round:
    """One round's pairs, packed in every layout."""

    rows: dict[str, list[PackedRow]]
    pairs: int


def make_rounds(
    name: str,
    pairs: int,
    rounds: int,
    max_len: int,
    vocab: int,
    seed: int,
    block_size: int | None = None,
) -> tuple[list[Round], dict]:
    """Draw, cut and pack `pairs` pairs into `rounds` rounds; their length statistics."""
    p, c, r, cut = cut_lengths(name, pairs, max_len, seed)
    stats = {
        "pairs": len(p),
        "max_len": max_len,
        "cut_to_fit_unshared": int(cut.sum()),
        "median_pair": float(np.median(p + c + r)),
        "median_ratio": float(np.median(p / ((c + r) / 2))),
        "tokens": {"shared": int((p + c + r).sum()), "unshared": int((2 * p + c + r).sum())},
    }
    stats["ideal_token_ratio"] = stats["tokens"]["unshared"] / stats["tokens"]["shared"]
    table = tokenized_pairs(p, c, r, vocab, seed)
    out = []
    for chunk in np.array_split(np.arange(len(p)), rounds):
        part = table.take(pa.array(chunk))
        rows = {layout: pack_rows(part, layout, max_len, block_size) for layout in LAYOUTS}
        out.append(Round(rows, len(chunk)))
    return out, stats


# ---------------------------------------------------------------------------- timing


def computed_positions(rows: list[PackedRow], layout: Layout) -> int:
    """Token positions the model runs for one batch, padding included: packed rows are
    padded to the longest row; padded rows become two documents each, all padded to the
    longest document."""
    if layout != "padded":
        return len(rows) * max(r.num_tokens for r in rows)
    docs = [
        int(r.prompt_len[0]) + int(x) for r in rows for x in (r.chosen_len[0], r.rejected_len[0])
    ]
    return len(docs) * max(docs)


def batch_rows(rows: list[PackedRow]) -> int:
    """Rows per step so that a step holds about PAIRS_PER_STEP pairs."""
    per_row = sum(r.num_pairs for r in rows) / len(rows)
    return max(1, round(PAIRS_PER_STEP / per_row))


def timed_train(
    model: CausalLM,
    rows: list[PackedRow],
    layout: Layout,
    max_len: int,
    root: Path,
    steps: int = 0,
    **settings: object,
) -> dict:
    """Train a copy of `model` once over `rows` (whole steps, or the first `steps`); the
    timing of the steps after the first. `settings` override the TrainConfig (backend,
    device, precision)."""
    size = batch_rows(rows)
    steps = steps or len(rows) // size
    if steps < 2:
        raise ValueError(
            f"{layout}: {len(rows)} rows make {steps} step(s) of {size} rows; the first step "
            "is not timed, so give more --pairs per --rounds"
        )
    config = TrainConfig(
        out_dir=Path(tempfile.mkdtemp(dir=root)),
        steps=steps,
        batch_rows=size,
        lr=1e-5,
        warmup_steps=0,
        progress=False,
        **{"device": "cpu", **settings},
    )
    rows = rows[: steps * size]
    marks: list[tuple[dict, float]] = []  # each step's metrics and this process's CPU clock

    def record(metrics: dict) -> None:
        marks.append((metrics, time.process_time()))

    data = PackedRows(rows, layout, BLOCK_SIZE, max_len)
    train(config, data, copy.deepcopy(model), on_step=record)
    timed = [m for m, _ in marks[1:]]
    # CPU time of step k: between the sinks of steps k-1 and k (steps 2.. are timed).
    cpu_seconds = marks[-1][1] - marks[0][1]
    seconds = sum(m["seconds"] for m in timed)
    pairs, tokens = sum(m["pairs"] for m in timed), sum(m["tokens"] for m in timed)
    positions = sum(
        computed_positions(
            [rows[i] for i in global_step_rows(step, len(rows), size, config.seed)], layout
        )
        for step in range(1, steps)
    )
    return {
        "steps": len(timed),
        "positions": positions,
        "pairs": pairs,
        "tokens": tokens,
        "wall": {"seconds": seconds, "pairs/s": pairs / seconds, "tokens/s": tokens / seconds},
        "cpu": {
            "seconds": cpu_seconds,
            "pairs/s": pairs / cpu_seconds,
            "tokens/s": tokens / cpu_seconds,
        },
    }


def run_dataset(label: str, model: CausalLM, args: argparse.Namespace, root: Path) -> dict:
    """Warm up, then train every round in every layout; print and return the medians."""
    name, max_len, pairs = DATASETS[label]
    vocab = model.config.vocab_size
    rounds, stats = make_rounds(name, args.pairs or pairs, args.rounds, max_len, vocab, args.seed)
    print(
        f"\n== {label}: {stats['pairs']} pairs ({stats['cut_to_fit_unshared']} cut to fit "
        f"2P+C+R <= {max_len}), median pair {stats['median_pair']:.0f} tokens, median "
        f"P/mean(C,R) {stats['median_ratio']:.2f}, ideal token ratio "
        f"{stats['ideal_token_ratio']:.3f}, {args.rounds} rounds"
    )
    population = population_positions(name, max_len, args.seed + 1)
    for layout in LAYOUTS:  # warm-up, untimed
        timed_train(model, rounds[0].rows[layout], layout, max_len, root, steps=2)

    def ideal(r: dict) -> float:  # unshared / shared tokens per pair of the timed steps
        per_pair = {k: r[k]["tokens"] / r[k]["pairs"] for k in ("shared", "unshared")}
        return per_pair["unshared"] / per_pair["shared"]

    def speedup(r: dict, other: str) -> float:
        return r["shared"][args.clock]["pairs/s"] / r[other][args.clock]["pairs/s"]

    per_round: list[dict[str, dict]] = []
    for i, round_ in enumerate(rounds):
        order = LAYOUTS[i % 3 :] + LAYOUTS[: i % 3]
        result = {
            layout: timed_train(model, round_.rows[layout], layout, max_len, root)
            for layout in order
        }
        per_round.append(result)
        print(
            f"round {i}: "
            + "  ".join(f"{k} {result[k][args.clock]['pairs/s']:.2f} pairs/s" for k in LAYOUTS)
            + f"  shared/unshared vs ideal {speedup(result, 'unshared') / ideal(result):.3f}"
        )
    summary = {
        layout: {
            "pairs/s": statistics.median(r[layout][args.clock]["pairs/s"] for r in per_round),
            "tokens/s": statistics.median(r[layout][args.clock]["tokens/s"] for r in per_round),
            "wall pairs/s": statistics.median(r[layout]["wall"]["pairs/s"] for r in per_round),
            # positions the model ran per pair, padding included (the work done)
            "positions/pair": sum(r[layout]["positions"] for r in per_round)
            / sum(r[layout]["pairs"] for r in per_round),
            "positions/pair, 20k pairs": population[layout],
            "rows": sum(len(r.rows[layout]) for r in rounds),
            "batch_rows": [batch_rows(r.rows[layout]) for r in rounds],
        }
        for layout in LAYOUTS
    }

    ratios = {
        "shared/padded pairs/s": statistics.median(speedup(r, "padded") for r in per_round),
        "shared/unshared pairs/s": statistics.median(speedup(r, "unshared") for r in per_round),
        # per round: pairs/s ratio over the tokens-per-pair ratio of the timed steps
        "shared/unshared vs ideal token ratio": statistics.median(
            speedup(r, "unshared") / ideal(r) for r in per_round
        ),
    }
    print(
        f"{'layout':10} {'pairs/s':>9} {'tokens/s':>9} {'wall pairs/s':>12} {'rows':>5} "
        f"{'positions/pair (timed)':>22} {'(20k pairs)':>11}"
    )
    for layout in LAYOUTS:
        s = summary[layout]
        print(
            f"{layout:10} {s['pairs/s']:>9.2f} {s['tokens/s']:>9.0f} {s['wall pairs/s']:>12.2f} "
            f"{s['rows']:>5} {s['positions/pair']:>22.0f} {s['positions/pair, 20k pairs']:>11.0f}"
        )
    for ratio, value in ratios.items():
        print(f"{ratio:38} {value:.3f}")
    return {"stats": stats, "median": summary, "ratios": ratios, "rounds": per_round}


# ---------------------------------------------------------------------------- kernels

KERNEL_MAX_LEN = 4096
KERNEL_ROWS = 8


def _fullest_rows(name: str, max_len: int, rows: int, seed: int) -> list[PackedRow]:
    """The `rows` fullest `shared` rows the packer makes of pairs drawn like `name`."""
    p, c, r, _ = cut_lengths(name, 40 * rows, max_len, seed)
    packed = pack_rows(tokenized_pairs(p, c, r, 1000, seed), "shared", max_len, BLOCK_SIZE)
    return sorted(packed, key=lambda row: -row.num_tokens)[:rows]


def _rows_of(pairs_per_row: int, max_len: int, rows: int) -> list[PackedRow]:
    """`rows` rows of exactly `pairs_per_row` pairs filling `max_len` (P:C:R = 2:1:1)."""
    size = max_len // pairs_per_row
    n = rows * pairs_per_row
    p = np.full(n, size // 2)
    c = np.full(n, (size - size // 2) // 2)
    r = size - p - c
    table = tokenized_pairs(p, c, r, 1000, 0)
    return pack_rows(table, "shared", max_len, BLOCK_SIZE)[:rows]


class _CountSDPA(torch.overrides.TorchFunctionMode):
    """Counts `F.scaled_dot_product_attention` calls as they run."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.nn.functional.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def attention_calls(rows: list[PackedRow], backend: str) -> int:
    """Attention kernel calls of one layer's forward over the micro-batch `rows`."""
    from training.attention import FLAT_BACKENDS, build_attention

    length = max(r.num_tokens for r in rows)
    attention = build_attention(backend, rows, "shared", length, BLOCK_SIZE, torch.device("cpu"))
    calls = []
    if backend == "varlen":

        def counting_kernel(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            calls.append(len(q))
            return torch.zeros_like(q)

        attention = dataclasses.replace(attention, kernel=counting_kernel)
    shape = (
        (1, sum(r.num_tokens for r in rows)) if backend in FLAT_BACKENDS else (len(rows), length)
    )
    q, kv = torch.randn(*shape, 2, 16), torch.randn(*shape, 1, 16)
    with _CountSDPA() as counter:
        attention(q, kv, kv)
    return len(calls) if backend == "varlen" else counter.calls


def kernels_per_layer(seed: int) -> dict:
    """Calls per layer per micro-batch of each backend, as pairs per row grow."""
    batches = {
        f"{label}, {KERNEL_ROWS} rows of {KERNEL_MAX_LEN}": _fullest_rows(
            DATASETS[label][0], KERNEL_MAX_LEN, KERNEL_ROWS, seed
        )
        for label in DATASETS
    }
    for per_row in (4, 16, 64, 256):
        batches[f"{per_row} pairs per row x 4 rows"] = _rows_of(per_row, KERNEL_MAX_LEN, 4)
    out = {}
    print(f"\n== attention calls per layer per micro-batch (rows of <= {KERNEL_MAX_LEN} tokens)")
    print(
        f"{'micro-batch':44} {'pairs':>6} {'dense':>6} {'segments':>9} {'varlen':>7} "
        f"{'flex':>5} {'per-pair (before)':>18}"
    )
    for label, rows in batches.items():
        pairs = sum(r.num_pairs for r in rows)
        counts = {b: attention_calls(rows, b) for b in ("dense", "segments", "varlen")}
        counts |= {"flex": 1, "per-pair segments (before)": 2 * pairs, "pairs": pairs}
        out[label] = counts
        print(
            f"{label:44} {pairs:>6} {counts['dense']:>6} {counts['segments']:>9} "
            f"{counts['varlen']:>7} {1:>5} {2 * pairs:>18}"
        )
    return out


# ---------------------------------------------------------------------------- log-prob memory

LOGPS_VOCAB, LOGPS_HIDDEN, LOGPS_TOKENS, LOGPS_CHECK_TOKENS = 128_256, 2048, 16_384, 2048


def _logps_inputs(tokens: int, vocab: int, hidden: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(tokens, hidden, generator=g).mul_(0.02).requires_grad_(),
        torch.randn(vocab, hidden, generator=g).mul_(0.02).requires_grad_(),
        torch.randint(0, vocab, (tokens,), generator=g),
        torch.randn(tokens, generator=g),
    )


def _step(tokens: int, vocab: int, hidden: int, chunk: int) -> None:
    """The log-prob step with its inputs: hidden states, output weight, labels, and the
    per-token upstream gradient of a DPO loss; forward and backward."""
    from training.logps import token_logps

    hidden_states, weight, labels, upstream = _logps_inputs(tokens, vocab, hidden)
    (token_logps(hidden_states, weight, labels, chunk) * upstream).sum().backward()


def tracked_logps_peak(tokens: int, vocab: int, hidden: int, chunk: int) -> float:
    """Peak bytes of live tensors of the log-prob step, inputs and gradients included,
    tracked on fake tensors (the same ops, no real allocation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        tracker = MemTracker()
        with tracker:
            _step(tokens, vocab, hidden, chunk)
        return float(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def _status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def logps_child(tokens: int, vocab: int, hidden: int, chunk: int) -> None:
    """In a fresh process: print the peak RSS of the log-prob step over the RSS before it."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    _step(tokens, vocab, hidden, chunk)
    print(_status("VmHWM") - before)


def real_logps_peak(tokens: int, vocab: int, hidden: int, chunk: int) -> float:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.train",
            "--logps-child",
            *map(str, (tokens, vocab, hidden, chunk)),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.split()[-1])


def logps_memory() -> dict:
    """Peak memory of the log-prob step, chunked vs unchunked (see the module docstring)."""
    from training.logps import DEFAULT_LOGITS_CHUNK

    chunks = {"chunked": DEFAULT_LOGITS_CHUNK, "unchunked": 0}
    gib = 2**30
    print(f"\n== log-prob step peak memory, vocab {LOGPS_VOCAB}, hidden {LOGPS_HIDDEN}")
    out: dict = {"vocab": LOGPS_VOCAB, "hidden": LOGPS_HIDDEN, "chunk": DEFAULT_LOGITS_CHUNK}
    for tokens in (LOGPS_TOKENS, LOGPS_CHECK_TOKENS):
        row = {
            name: {"tracked_gib": tracked_logps_peak(tokens, LOGPS_VOCAB, LOGPS_HIDDEN, c) / gib}
            for name, c in chunks.items()
        }
        if tokens == LOGPS_CHECK_TOKENS:
            for name, c in chunks.items():
                row[name]["rss_gib"] = real_logps_peak(tokens, LOGPS_VOCAB, LOGPS_HIDDEN, c) / gib
        row["chunked/unchunked (tracked)"] = (
            row["chunked"]["tracked_gib"] / row["unchunked"]["tracked_gib"]
        )
        out[f"{tokens} response tokens"] = row
        print(
            f"{tokens:>6} tokens: "
            + "  ".join(
                f"{name} {v['tracked_gib']:.2f} GiB tracked"
                + (f" / {v['rss_gib']:.2f} GiB RSS" if "rss_gib" in v else "")
                for name, v in row.items()
                if isinstance(v, dict)
            )
            + f"  ratio {row['chunked/unchunked (tracked)']:.3f}"
        )
    return out


# ---------------------------------------------------------------------------- step memory

STEP_MAX_LEN = 4096


def step_child(activation_checkpointing: int, logits_chunk: int) -> None:
    """In a fresh process: one training step (fp32, live reference) of the SmolLM2-135M
    shape on the fullest UltraFeedback-like 4096 row; print its tokens and the peak RSS."""
    from training.configs import smollm2_135m
    from training.train import setup

    row = _fullest_rows("UltraFeedback", STEP_MAX_LEN, 1, 0)
    config = TrainConfig(
        out_dir=Path(tempfile.mkdtemp()),
        steps=1,
        batch_rows=1,
        warmup_steps=0,
        device="cpu",
        progress=False,
        activation_checkpointing=bool(activation_checkpointing),
        logits_chunk=logits_chunk,
    )
    torch.manual_seed(0)
    data = PackedRows(row, "shared", BLOCK_SIZE, STEP_MAX_LEN)
    run = setup(config, data, CausalLM(smollm2_135m()))
    metrics = train_step(run, 0)
    print(row[0].num_tokens, metrics["seconds"], _status("VmHWM"))


def step_memory() -> dict:
    """Peak RSS of one step, whole process, with and without recomputation."""
    from training.logps import DEFAULT_LOGITS_CHUNK

    print("\n== one training step, SmolLM2-135M shape, fp32, live reference, one row")
    out = {}
    for name, ac, chunk in (
        ("default", 0, DEFAULT_LOGITS_CHUNK),
        ("activation checkpointing", 1, DEFAULT_LOGITS_CHUNK),
        ("unchunked logits", 0, 0),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.train", "--step-child", str(ac), str(chunk)],
            check=True,
            capture_output=True,
            text=True,
        )
        tokens, seconds, peak = done.stdout.split()[-3:]
        out[name] = {
            "row_tokens": int(tokens),
            "seconds": float(seconds),
            "peak_rss_gib": int(peak) / 2**30,
        }
        print(
            f"{name:26} {int(tokens)} tokens  peak RSS {int(peak) / 2**30:.2f} GiB  {float(seconds):.1f} s"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=0, help="pairs per dataset (0: 144 and 96)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: this process's CPU seconds per step, which other processes' load does not "
        "stretch (one thread); wall: elapsed seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; on a busy 2-core machine 2 threads ran ~10x slower",
    )
    parser.add_argument("--logps-child", nargs=4, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--step-child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--skip-throughput", action="store_true", help="only kernels per layer and memory"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.logps_child:
        logps_child(*args.logps_child)
        return
    if args.step_child:
        step_child(*args.step_child)
        return
    torch.manual_seed(args.seed)
    model = CausalLM(small())
    results: dict = {
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
        f"{args.threads} torch thread(s), {args.clock} clock",
        "settings": {**vars(args), "pairs_per_step": PAIRS_PER_STEP, "model": "small"},
    }
    print(results["machine"])
    start = time.perf_counter()
    results["kernels per layer"] = kernels_per_layer(args.seed)
    results["log-prob step memory"] = logps_memory()
    results["one step memory"] = step_memory()
    with tempfile.TemporaryDirectory() as tmp:
        for label in DATASETS if not args.skip_throughput else ():
            results[label] = run_dataset(label, model, args, Path(tmp))
    results["seconds"] = time.perf_counter() - start
    print(f"\ntotal {results['seconds']:.0f} s")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
