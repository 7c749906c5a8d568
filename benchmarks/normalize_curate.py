"""Throughput and peak memory of normalize + curate on UltraFeedback-binarized-shaped rows.

    python -m benchmarks.normalize_curate [--rows 100000]

Generates a seeded Parquet file in the real schema (prompt, prompt_id, chosen/rejected and
messages as conversations, scores; ~10% ties, ~2% duplicates), then runs normalize and
curate (default config plus a 1,000-prompt contamination check) in a fresh process, so the
peak resident memory is that of the stages, not of the generator. Prints the numbers and
writes them to benchmarks/results/normalize_curate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RESULTS = Path(__file__).parent / "results" / "normalize_curate.json"
VOCABULARY = (
    "the model answer question data train value because system user result example number "
    "people water energy light first second always often rarely should could would explain "
    "simple complex python function return list string memory speed river city history"
)
WORDS = VOCABULARY.split()


def generate(rows: int, seed: int, path: Path) -> None:
    """Write `rows` UltraFeedback-binarized rows to `path` (Parquet)."""
    rng = np.random.default_rng(seed)
    sentences = [
        " ".join(rng.choice(WORDS, size=rng.integers(6, 18))).capitalize() + "."
        for _ in range(4000)
    ]

    def texts(count: int, low: int, high: int) -> list[str]:
        lengths = rng.integers(low, high, size=count)
        picks = rng.integers(0, len(sentences), size=int(lengths.sum()))
        ends = np.cumsum(lengths)
        return [
            " ".join(sentences[i] for i in picks[e - n : e])
            for n, e in zip(lengths, ends, strict=True)
        ]

    prompts = texts(rows, 1, 4)
    duplicates = rng.random(rows) < 0.02
    source = rng.integers(0, rows, size=rows)
    chosen, rejected = texts(rows, 3, 12), texts(rows, 2, 10)
    for i in np.flatnonzero(duplicates):
        j = source[i]
        prompts[i], chosen[i], rejected[i] = prompts[j], chosen[j], rejected[j]
    score_chosen = rng.choice([7.0, 7.5, 8.0, 8.5, 9.0, 10.0], size=rows)
    tie = rng.random(rows) < 0.10
    score_rejected = np.where(tie, score_chosen, rng.choice([2.0, 3.0, 4.5, 5.0, 6.0], rows))

    def conversation(answers: list[str]) -> pa.Array:
        pairs = [
            [{"content": p, "role": "user"}, {"content": a, "role": "assistant"}]
            for p, a in zip(prompts, answers, strict=True)
        ]
        return pa.array(pairs)

    table = pa.table(
        {
            "prompt": prompts,
            "prompt_id": [f"{i:064x}" for i in range(rows)],
            "chosen": conversation(chosen),
            "rejected": conversation(rejected),
            "messages": conversation(chosen),
            "score_chosen": score_chosen,
            "score_rejected": score_rejected,
        }
    )
    pq.write_table(table, path, compression="zstd")


def measure(path: Path, eval_path: Path) -> dict:
    """Run normalize + curate on `path`; timings and this process's peak memory."""
    from pipeline.curate import CurateConfig, curate
    from pipeline.normalize import normalize

    evals = json.loads(eval_path.read_text())
    start = time.perf_counter()
    normalized = normalize("ultrafeedback_binarized", path)
    mid = time.perf_counter()
    curated = curate(normalized.pairs, CurateConfig(), evals)
    end = time.perf_counter()
    rows = normalized.report["rows_in"]
    return {
        "rows": rows,
        "pairs_out": normalized.report["pairs_out"],
        "curated_out": curated.report["rows_out"],
        "dropped": {k: v for k, v in curated.report["dropped"].items() if v},
        "normalize_s": round(mid - start, 3),
        "curate_s": round(end - mid, 3),
        "total_s": round(end - start, 3),
        "rows_per_s": round(rows / (end - start)),
        "normalize_rows_per_s": round(rows / (mid - start)),
        "curate_rows_per_s": round(normalized.report["pairs_out"] / (end - mid)),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "arrow_peak_mib": round(pa.default_memory_pool().max_memory() / 2**20, 1),
        "input_parquet_mib": round(path.stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows to generate")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--measure", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child process
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path, eval_path = Path(tmp) / "train_prefs.parquet", Path(tmp) / "evals.json"
        generate(args.rows, args.seed, path)
        eval_rng = np.random.default_rng(args.seed + 1)
        evals = [" ".join(eval_rng.choice(WORDS, size=20)) for _ in range(1000)]
        eval_path.write_text(json.dumps(evals))
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.normalize_curate", "--measure", path, eval_path],
            check=True,
            capture_output=True,
            text=True,
        )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu_count"] = len(os.sched_getaffinity(0))
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
