"""Time and peak memory of normalize and curate, per stage, on UltraFeedback-shaped rows.

    python -m benchmarks.normalize_curate [--rows 100000 1000000 10000000] [--label after]
        [--code DIR] [--data /tmp/prefpack_bench] [--keep]
    python -m benchmarks.normalize_curate --ingest LABEL [--data /tmp/prefpack_bench] [--mib 1024]

The first form, for each size: generates a seeded Parquet file in the UltraFeedback-binarized
schema (prompt, prompt_id, chosen/rejected and messages as conversations, scores; ~10% ties,
~2% duplicates), written batch by batch so that ten million rows take the memory of a
hundred thousand; then runs `prefpack normalize` and `prefpack curate` on it (curate with
the default rules plus a 1,000-prompt contamination check; and, with `--compare-rules`,
again with the rules that compare pairs on: near-duplicates, a per-prompt cap, a
chosen-longer share and a 5% eval split), each stage in a fresh process, and records its
wall time and peak resident memory (`wait4`'s `ru_maxrss`: that process alone). The
generated files and outputs are deleted afterwards unless `--keep`; a kept input is reused.
`--code DIR` runs the stages from another checkout (e.g. `git archive` of an older commit)
on the same input, for a before/after comparison on one machine. `--stages curate
curate_compare_rules` reruns only those stages on a kept normalize output (with `--keep`),
leaving the other numbers of that size as they were. The numbers go to
benchmarks/results/normalize_curate.json under `runs.<label>.<rows>`; other labels stay.

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
import shutil
import subprocess
import sys
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


CHUNK_ROWS = 100_000  # rows generated and written at once


def _chunk(rows: int, first: int, rng: np.random.Generator) -> pa.Table:
    """`rows` UltraFeedback-binarized rows, prompt ids from `first` on; ~2% repeat a row of
    this chunk."""
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
        """[user prompt, assistant answer] per row, built columnar (no dict per message)."""
        contents = pa.array([text for pair in zip(prompts, answers, strict=True) for text in pair])
        roles = pa.array(["user", "assistant"] * rows)
        messages = pa.StructArray.from_arrays([contents, roles], names=["content", "role"])
        return pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * rows + 1, 2, np.int32)), messages)

    return pa.table(
        {
            "prompt": prompts,
            "prompt_id": [f"{i:064x}" for i in range(first, first + rows)],
            "chosen": conversation(chosen),
            "rejected": conversation(rejected),
            "messages": conversation(chosen),
            "score_chosen": score_chosen,
            "score_rejected": score_rejected,
        }
    )


def generate(rows: int, seed: int, path: Path, jsonl: bool = False) -> None:
    """Write `rows` UltraFeedback-binarized rows to `path` (Parquet, or JSON lines), a chunk
    of `CHUNK_ROWS` at a time, so any size takes one chunk's memory. The first chunk is
    seeded by `seed` (the file of earlier versions at 100k rows), chunk k by (seed, k)."""
    chunks = (
        _chunk(
            min(CHUNK_ROWS, rows - first), first, np.random.default_rng([seed, k] if k else seed)
        )
        for k, first in enumerate(range(0, rows, CHUNK_ROWS))
    )
    if jsonl:
        with path.open("w", encoding="utf-8") as out:
            for table in chunks:
                for row in table.to_pylist():
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    writer = None
    for table in chunks:
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
    assert writer is not None, "no rows to generate"
    writer.close()


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


# Curate again with every rule that compares pairs on (`--compare-rules`).
COMPARE_RULES = [
    "--near-dup-threshold",
    "0.8",
    "--max-pairs-per-prompt",
    "2",
    "--max-chosen-longer-share",
    "0.5",
    "--eval-share",
    "0.05",
]


def run_stage(argv: list[str], code: Path, log: Path) -> dict:
    """Run `prefpack ARGV` from checkout `code` in a fresh process: wall seconds and that
    process's peak resident memory (`wait4`, so no other process counts)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefpack", *argv], cwd=code, env=env, stdout=out, stderr=out
        )
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"prefpack {argv[0]} failed:\n{log.read_text()[-3000:]}")
    return {"s": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def _mib(path: Path) -> float:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def measure(rows: int, args: argparse.Namespace) -> dict:
    """Generate (or reuse) `rows` rows, then normalize and curate them stage by stage."""
    data = args.data / f"binarized_{rows}"
    data.mkdir(parents=True, exist_ok=True)
    source, evals = data / "train_prefs.parquet", data / "eval_prompts.txt"
    result: dict = {"rows": rows}
    if not source.exists():
        start = time.perf_counter()
        partial = source.with_name(source.name + ".partial")
        generate(rows, args.seed, partial)
        partial.rename(source)
        result["generate_s"] = round(time.perf_counter() - start, 1)
    eval_rng = np.random.default_rng(args.seed + 1)
    evals.write_text("".join(" ".join(eval_rng.choice(WORDS, size=20)) + "\n" for _ in range(1000)))
    result["input_parquet_mib"] = _mib(source)
    code = (args.code or Path(__file__).resolve().parents[1]).resolve()
    label = f"{args.label}_{rows}"
    outs = {s: data / f"{s}_{args.label}" for s in ("normalize", "curate", "curate_compare_rules")}
    curate = ["curate", "--pairs", str(outs["normalize"]), "--eval-prompts", str(evals)]
    stages = {
        "normalize": ["normalize", "--source", "ultrafeedback_binarized", "--input", str(source)],
        "curate": curate,
    }
    if args.compare_rules:
        stages["curate_compare_rules"] = [*curate, *COMPARE_RULES]
    if args.stages:
        stages = {stage: argv for stage, argv in stages.items() if stage in args.stages}
    for stage, argv in stages.items():
        print(f"{label}: {stage} ...", flush=True)
        out = outs[stage]
        result[stage] = run_stage(
            [*argv, "--out", str(out)], code, data / f"{stage}_{args.label}.log"
        )
        result[stage]["output_mib"] = _mib(out)
        report = json.loads((out / "report.json").read_text())
        if stage == "normalize":
            result["pairs_out"] = report["pairs_out"]
        else:
            result[stage] |= {
                "rows_out": report["rows_out"],
                "eval_pairs": report["eval_pairs"],
                "dropped": {k: v for k, v in report["dropped"].items() if v},
            }
        result[stage]["pairs_per_s"] = round(rows / result[stage]["s"])
        print(f"{label}: {stage} {result[stage]}", flush=True)
    if not args.keep:
        shutil.rmtree(data)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[100_000], help="sizes to generate and measure"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--label", default="after", help="name of this run in the results")
    parser.add_argument(
        "--code", type=Path, help="checkout whose `prefpack` runs the stages (default: this one)"
    )
    parser.add_argument(
        "--compare-rules",
        action="store_true",
        help="also curate with near-duplicates, a prompt cap, a length share and an eval split",
    )
    parser.add_argument("--keep", action="store_true", help="keep inputs and outputs (reused)")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=["normalize", "curate", "curate_compare_rules"],
        help="run only these stages (the others' outputs and numbers are kept)",
    )
    parser.add_argument("--normalize", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--ingest", metavar="LABEL", help="measure the JSONL cases as LABEL")
    parser.add_argument(
        "--data", type=Path, default=Path("/tmp/prefpack_bench"), help="generated inputs"
    )
    parser.add_argument("--mib", type=int, default=1024, help="size of the raw JSONL")
    args = parser.parse_args()
    if args.normalize:  # the child process
        print(json.dumps(measure_normalize(args.normalize[0], Path(args.normalize[1]))))
        return
    if args.ingest:
        result = ingest_benchmark(args.ingest, args.data, args.rows[0], args.mib, args.seed)
        old = json.loads(INGEST_RESULTS.read_text()) if INGEST_RESULTS.exists() else {}
        INGEST_RESULTS.write_text(json.dumps({**old, args.ingest: result}, indent=2) + "\n")
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if "runs" not in results:  # the single-process layout of earlier versions
        results = {"runs": {}, "earlier_layout": results or None}
    results["machine"] = {
        "cpu_count": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
    }
    run = results["runs"].setdefault(args.label, {})
    run["code"] = str(args.code) if args.code else "this checkout"
    for rows in args.rows:
        run[str(rows)] = {**run.get(str(rows), {}), **measure(rows, args)}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
