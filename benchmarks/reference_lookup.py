"""Benchmark the per-micro-batch lookup of stored reference log-probs, before and after
the sorted index of `training.reference.ReferenceLogps`.

Run: `python -m benchmarks.reference_lookup` (about 20 s on 2 cores). Prints a table
and writes `benchmarks/results/reference_lookup.json`.

Before: `pc.index_in` of the micro-batch's ids against the whole `pair_id` column, which
builds a hash table of all stored ids on every call (the lookup as it was, reimplemented
here). After: `ReferenceLogps.lookup`, a binary search of the micro-batch's ids in ids
sorted once when the file is read. Pair ids are 32-hex strings as the `preference_pair`
contract makes them; each micro-batch draws `BATCH_PAIRS` ids at random from the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from training.reference import ReferenceKey, ReferenceLogps

RESULTS = Path(__file__).parent / "results" / "reference_lookup.json"
TABLE_PAIRS = (10_000, 1_000_000)
BATCH_PAIRS = 64  # pairs of one micro-batch (e.g. 16 rows of 4 pairs)
REPEATS = {"before": 10, "after": 1000}  # micro-batches timed per method


def reference_table(num_pairs: int, seed: int = 0) -> pa.Table:
    """`num_pairs` pairs with 32-hex ids (as `make_pair_id` writes them), random log-probs."""
    rng = np.random.default_rng(seed)
    ids = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()[:32] for i in range(num_pairs)]
    return pa.table(
        {
            "pair_id": pa.array(ids, pa.string()),
            "chosen_logps": pa.array(-100 * rng.random(num_pairs), pa.float32()),
            "rejected_logps": pa.array(-100 * rng.random(num_pairs), pa.float32()),
        }
    )


def lookup_before(table: pa.Table, pair_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The old lookup: hash the whole id column for every micro-batch."""
    index = pc.index_in(pa.array(pair_ids, pa.string()), value_set=table["pair_id"])
    i = index.to_numpy(zero_copy_only=False).astype(np.int64)
    chosen = table["chosen_logps"].to_numpy()[i]
    rejected = table["rejected_logps"].to_numpy()[i]
    return torch.from_numpy(chosen), torch.from_numpy(rejected)


def seconds_per_batch(lookup, batches: list[list[str]]) -> float:
    start = time.perf_counter()
    for batch in batches:
        lookup(batch)
    return (time.perf_counter() - start) / len(batches)


def measure(num_pairs: int) -> dict[str, float]:
    """Seconds per micro-batch before and after, the index build time, and a check that
    both lookups return the same numbers."""
    table = reference_table(num_pairs)
    ids = table["pair_id"].to_pylist()
    rng = np.random.default_rng(1)
    batches = {
        name: [[ids[i] for i in rng.integers(0, num_pairs, BATCH_PAIRS)] for _ in range(n)]
        for name, n in REPEATS.items()
    }
    start = time.perf_counter()
    reference = ReferenceLogps(table, ReferenceKey("0" * 64, "0" * 20, "fp32"))
    build = time.perf_counter() - start
    for batch in batches["before"]:
        got, want = reference.lookup(batch), lookup_before(table, batch)
        assert torch.equal(got.chosen, want[0]) and torch.equal(got.rejected, want[1])
    before = seconds_per_batch(lambda b: lookup_before(table, b), batches["before"])
    after = seconds_per_batch(reference.lookup, batches["after"])
    return {
        "table_pairs": num_pairs,
        "batch_pairs": BATCH_PAIRS,
        "before_ms_per_batch": 1e3 * before,
        "after_ms_per_batch": 1e3 * after,
        "speedup": before / after,
        "index_build_s": build,
    }


def main() -> None:
    machine = f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start"
    results = [measure(n) for n in TABLE_PAIRS]
    print(f"reference lookup, {BATCH_PAIRS} pairs per micro-batch")
    print("| table pairs | before ms/batch | after ms/batch | speedup | index build s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['table_pairs']:,} | {r['before_ms_per_batch']:.3f} | "
            f"{r['after_ms_per_batch']:.3f} | {r['speedup']:.0f}x | {r['index_build_s']:.2f} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
