"""Throughput and peak memory of normalize + curate on UltraFeedback-shaped rows.

    python -m benchmarks.normalize_curate [--rows 100000]
    python -m benchmarks.normalize_curate --ingest LABEL [--data /tmp/prefpack_bench] [--mib 1024]

The first form generates a seeded Parquet file in the UltraFeedback-binarized schema
(prompt, prompt_id, chosen/rejected and messages as conversations, scores; ~10% ties, ~2%
duplicates), then runs normalize and curate (default config plus a 1,000-prompt
contamination check) in a fresh process, so the peak resident memory is that of the stages,
not of the generator. It writes benchmarks/results/normalize_curate.json.

The second form measures normalize alone: the 100k binarized rows as Parquet and as JSON
lines (where ingest does the work), and a raw-UltraFeedback-shaped JSONL of about `--mib`
MiB (four rated completions per instruction, as openbmb/UltraFeedback). The files are
generated once under `--data` and reused, so a run before a change and one after read the
same bytes; each measurement runs in a fresh process. The numbers go to
benchmarks/results/normalize_ingest.json under LABEL (e.g. "before", "after").
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
INGEST_RESULTS = Path(__file__).parent / "results" / "normalize_ingest.json"
ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
VOCABULARY = (
    "the model answer question data train value because system user result example number "
    "people water energy light first second always often rarely should could would explain "
    "simple complex python function return list string memory speed river city history"
)
WORDS = VOCABULARY.split()


def _text_maker(rng: np.random.Generator):
    """texts(count, low, high): `count` texts of low..high-1 seeded random sentences."""
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

    return texts


def generate(rows: int, seed: int, path: Path, jsonl: bool = False) -> None:
    """Write `rows` UltraFeedback-binarized rows to `path` (Parquet, or JSON lines)."""
    rng = np.random.default_rng(seed)
    texts = _text_maker(rng)

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
    if jsonl:
        with path.open("w", encoding="utf-8") as out:
            for row in table.to_pylist():
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        pq.write_table(table, path, compression="zstd")


def generate_ultrafeedback(mib: int, seed: int, path: Path) -> None:
    """Write raw-UltraFeedback rows (instruction, models, four completions with per-aspect
    Rating/Rationale, critique, overall and fine-grained scores) until `path` holds `mib` MiB."""
    rng = np.random.default_rng(seed)
    texts = _text_maker(rng)
    sources = ["evol_instruct", "false_qa", "flan_v2_niv2", "sharegpt", "ultrachat"]
    written, batch = 0, 2000
    with path.open("w", encoding="utf-8") as out:
        while written < mib * 2**20:
            instructions = texts(batch, 1, 5)
            responses, rationales = texts(batch * 4, 4, 30), texts(batch * 4 * 5, 1, 3)
            ratings = rng.integers(1, 6, size=(batch * 4, 4)).astype(str)
            ratings[rng.random((batch * 4, 4)) < 0.03] = "N/A"
            overall = rng.integers(2, 21, size=batch * 4) / 2
            for i in range(batch):
                completions = []
                for k in range(4 * i, 4 * i + 4):
                    notes = rationales[5 * k : 5 * k + 5]
                    annotations = {
                        a: {"Rating": ratings[k, j], "Rationale": notes[j]}
                        for j, a in enumerate(ASPECTS)
                    }
                    rated = [float(r) for r in ratings[k] if r != "N/A"]
                    completions.append(
                        {
                            "annotations": annotations,
                            "critique": notes[4],
                            "custom_system_prompt": "You are a helpful assistant.",
                            "fine-grained_score": float(np.mean(rated)) if rated else None,
                            "model": f"model-{k % 17}",
                            "overall_score": float(overall[k]),
                            "principle": "helpfulness",
                            "response": responses[k],
                        }
                    )
                row = {
                    "source": sources[i % len(sources)],
                    "instruction": instructions[i],
                    "models": [c["model"] for c in completions],
                    "completions": completions,
                    "correct_answers": ["None"],
                    "incorrect_answers": ["None"],
                }
                line = json.dumps(row, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode())


def measure_normalize(source: str, path: Path) -> dict:
    """Run normalize alone on `path`; throughput and this process's peak memory."""
    from pipeline.normalize import normalize

    start = time.perf_counter()
    normalized = normalize(source, path)
    seconds = time.perf_counter() - start
    rows = normalized.report["rows_in"]
    return {
        "source": source,
        "input": path.name,
        "input_mib": round(path.stat().st_size / 2**20, 1),
        "rows": rows,
        "pairs_out": normalized.report["pairs_out"],
        "quarantined": sum(normalized.report["quarantined"].values()),
        "normalize_s": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "mib_per_s": round(path.stat().st_size / 2**20 / seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def ingest_benchmark(label: str, data: Path, rows: int, mib: int, seed: int) -> dict:
    """Generate (once) and measure each case in a fresh process (Parquet for reference)."""
    data.mkdir(parents=True, exist_ok=True)
    cases = {
        "ultrafeedback_binarized_parquet": (
            "ultrafeedback_binarized",
            data / f"binarized_{rows}.parquet",
            lambda path: generate(rows, seed, path),
        ),
        "ultrafeedback_binarized_jsonl": (
            "ultrafeedback_binarized",
            data / f"binarized_{rows}.jsonl",
            lambda path: generate(rows, seed, path, jsonl=True),
        ),
        "ultrafeedback_raw_jsonl": (
            "ultrafeedback",
            data / f"ultrafeedback_{mib}mib.jsonl",
            lambda path: generate_ultrafeedback(mib, seed, path),
        ),
    }
    results = {}
    for name, (source, path, make) in cases.items():
        if not path.exists():
            partial = path.with_name(path.name + ".partial")
            make(partial)
            partial.rename(path)
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.normalize_curate", "--normalize", source, path],
            check=True,
            capture_output=True,
            text=True,
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    results["cpu_count"] = len(os.sched_getaffinity(0))
    return results


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
    parser.add_argument("--normalize", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--ingest", metavar="LABEL", help="measure the JSONL cases as LABEL")
    parser.add_argument(
        "--data", type=Path, default=Path("/tmp/prefpack_bench"), help="generated inputs"
    )
    parser.add_argument("--mib", type=int, default=1024, help="size of the raw JSONL")
    args = parser.parse_args()
    if args.measure:  # the child process
        print(json.dumps(measure(*args.measure)))
        return
    if args.normalize:  # the child process
        print(json.dumps(measure_normalize(args.normalize[0], Path(args.normalize[1]))))
        return
    if args.ingest:
        result = ingest_benchmark(args.ingest, args.data, args.rows, args.mib, args.seed)
        old = json.loads(INGEST_RESULTS.read_text()) if INGEST_RESULTS.exists() else {}
        INGEST_RESULTS.write_text(json.dumps({**old, args.ingest: result}, indent=2) + "\n")
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
