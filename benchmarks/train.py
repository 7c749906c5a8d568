"""Benchmark DPO training throughput: `padded` vs `unshared` packed vs `shared` packed.

Run: `python -m benchmarks.train` (about 10 minutes on 2 busy cores). Prints tables and
writes `benchmarks/results/train.json`.

What is compared, fairly:
- Same pairs: per dataset, pair lengths are drawn with `benchmarks.pack.draw_lengths`
  (UltraFeedback-like and HelpSteer-like, the published medians), cut with the packer's
  own truncation rule to the *unshared* budget (2P+C+R <= max_len) so that every layout
  holds exactly the same tokens, given random token ids, and packed in each layout by the
  real packer (`pipeline.pack.RowPacker`).
- Same model and seeds: the `small` named config (4 layers, width 256, vocabulary 8192),
  one seeded init, copied for every run; the trainer is `training.train.train` itself
  (segments backend, reference model in memory), so each step's time covers collate,
  policy forward/backward, reference forward and the optimizer step.
- Same batch in pairs: a step holds about `PAIRS_PER_STEP` pairs in every layout (padded
  rows hold one pair; packed rows are batched `PAIRS_PER_STEP / mean pairs per row`).
- Noise: the pairs are split into rounds; every round trains its own pairs in all three
  layouts (the order rotated each round), so load from other processes hits all of them
  alike. One untimed call per layout warms up first, and the first step of every call is
  left out (optimizer state allocation). Reported: per layout the median over rounds of
  pairs/s and tokens/s (real tokens, no padding), and the median over rounds of the
  per-round ratios.

The ideal token ratio of prefix sharing is unshared tokens / shared tokens of the same
pairs (2P+C+R over P+C+R); the target is shared/unshared pairs/s >= 0.9x that ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
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
from pipeline.pack import RowPacker, truncated_lengths
from training.configs import small
from training.model import CausalLM
from training.train import TrainConfig, global_step_rows, train

RESULTS = Path(__file__).parent / "results" / "train.json"
# label -> (benchmarks.pack.PUBLISHED name, row budget about 2.5x the median pair)
DATASETS = {
    "UltraFeedback-like": ("UltraFeedback", 1024),
    "HelpSteer-like": ("Tulu-HelpSteer", 2048),
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
    lines: list[dict] = []
    train(config, rows, layout, BLOCK_SIZE, max_len, copy.deepcopy(model), on_step=lines.append)
    timed = lines[1:]
    seconds = sum(m["seconds"] for m in timed)
    positions = sum(
        computed_positions(
            [rows[i] for i in global_step_rows(step, len(rows), size, config.seed)], layout
        )
        for step in range(1, steps)
    )
    return {
        "steps": len(timed),
        "positions": positions,
        "pairs": sum(m["pairs"] for m in timed),
        "tokens": sum(m["tokens"] for m in timed),
        "seconds": seconds,
        "pairs/s": sum(m["pairs"] for m in timed) / seconds,
        "tokens/s": sum(m["tokens"] for m in timed) / seconds,
    }


def run_dataset(label: str, model: CausalLM, args: argparse.Namespace, root: Path) -> dict:
    """Warm up, then train every round in every layout; print and return the medians."""
    name, max_len = DATASETS[label]
    vocab = model.config.vocab_size
    rounds, stats = make_rounds(name, args.pairs, args.rounds, max_len, vocab, args.seed)
    print(
        f"\n== {label}: {stats['pairs']} pairs ({stats['cut_to_fit_unshared']} cut to fit "
        f"2P+C+R <= {max_len}), median pair {stats['median_pair']:.0f} tokens, median "
        f"P/mean(C,R) {stats['median_ratio']:.2f}, ideal token ratio "
        f"{stats['ideal_token_ratio']:.3f}, {args.rounds} rounds"
    )
    population = population_positions(name, max_len, args.seed + 1)
    for layout in LAYOUTS:  # warm-up, untimed
        timed_train(model, rounds[0].rows[layout], layout, max_len, root, steps=2)
    per_round: list[dict[str, dict]] = []
    for i, round_ in enumerate(rounds):
        order = LAYOUTS[i % 3 :] + LAYOUTS[: i % 3]
        result = {
            layout: timed_train(model, round_.rows[layout], layout, max_len, root)
            for layout in order
        }
        per_round.append(result)
        print(
            f"round {i}: " + "  ".join(f"{k} {result[k]['pairs/s']:.2f} pairs/s" for k in LAYOUTS)
        )
    summary = {
        layout: {
            "pairs/s": statistics.median(r[layout]["pairs/s"] for r in per_round),
            "tokens/s": statistics.median(r[layout]["tokens/s"] for r in per_round),
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
        "shared/padded pairs/s": statistics.median(
            r["shared"]["pairs/s"] / r["padded"]["pairs/s"] for r in per_round
        ),
        "shared/unshared pairs/s": statistics.median(
            r["shared"]["pairs/s"] / r["unshared"]["pairs/s"] for r in per_round
        ),
    }
    ratios["shared/unshared vs ideal token ratio"] = (
        ratios["shared/unshared pairs/s"] / stats["ideal_token_ratio"]
    )
    print(
        f"{'layout':10} {'pairs/s':>9} {'tokens/s':>9} {'rows':>5} "
        f"{'positions/pair (timed)':>22} {'(20k pairs)':>11}"
    )
    for layout in LAYOUTS:
        s = summary[layout]
        print(
            f"{layout:10} {s['pairs/s']:>9.2f} {s['tokens/s']:>9.0f} {s['rows']:>5} "
            f"{s['positions/pair']:>22.0f} {s['positions/pair, 20k pairs']:>11.0f}"
        )
    for ratio, value in ratios.items():
        print(f"{ratio:38} {value:.3f}")
    return {"stats": stats, "median": summary, "ratios": ratios, "rounds": per_round}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=96, help="pairs per dataset")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; on a busy 2-core machine 2 threads ran ~10x slower",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = CausalLM(small())
    results: dict = {
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
        f"{args.threads} torch thread(s)",
        "settings": {**vars(args), "pairs_per_step": PAIRS_PER_STEP, "model": "small"},
    }
    print(results["machine"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for label in DATASETS:
            results[label] = run_dataset(label, model, args, Path(tmp))
    results["seconds"] = time.perf_counter() - start
    print(f"\ntotal {results['seconds']:.0f} s")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
