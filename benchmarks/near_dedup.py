"""Near-duplicate prompts: throughput of pipeline.near_dup against datasketch, and recall.

    python -m benchmarks.near_dedup [--prompts 100000] [--threshold 0.8] [--ngram 5]

Generates seeded prompts from a 6,000-word Zipf vocabulary (a prompt is an instruction
opener and 1-4 sentences): 84% unrelated prompts, 12% near-duplicates of an earlier one
(one or two edits: a word replaced, dropped or added, punctuation changed, case changed,
a short request appended) and 4% from 25 fill-in templates ("What is the capital of
{X}?"-like, the hard case). Then, each in a fresh process (peak memory is the arm's own):
- `numpy`: `pipeline.near_dup.near_duplicates` (vectorised MinHash, LSH, components);
- `datasketch`: `MinHash.bulk` over the same character n-grams (its default SHA-1
  hash), `MinHashLSH` with the same weights (insert, then query every prompt), the
  same verification and components;
- `datasketch_xxh32`: the same with `xxhash.xxh32_intdigest` as the hash function;
- `curate`: `pipeline.curate.curate` on 100k pairs with these prompts, near-duplicates
  off and on (the rule's cost inside the funnel).
For each arm: seconds, prompts per second, groups, and recall of the planted
near-duplicates whose exact Jaccard similarity reaches the threshold (the ones the rule
should find), plus verified pairs below it (estimate error). Writes
benchmarks/results/near_dedup.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

RESULTS = Path(__file__).parent / "results" / "near_dedup.json"
OPENERS = (
    "explain",
    "write a short story about",
    "summarize the following:",
    "what is",
    "give me three ideas for",
    "translate to french:",
    "how do i",
    "compare",
    "list the steps to",
    "why does",
)
APPENDED = (" please be concise.", " answer in one paragraph.", " use simple words.", "!")


class Words:
    """Pseudo-words of 1-4 syllables drawn with Zipf(1.1) frequencies."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ou")]
        self.words = ["".join(rng.choice(syllables, k)) for k in rng.integers(1, 5, size)]
        self.cdf = np.cumsum(1 / np.arange(1, size + 1) ** 1.1)
        self.rng = rng

    def draw(self, count: int) -> list[str]:
        picks = np.searchsorted(self.cdf, self.rng.random(count) * self.cdf[-1])
        return [self.words[i] for i in picks]


def generate(count: int, seed: int) -> tuple[list[str], np.ndarray]:
    """`count` prompts and, per prompt, the index of the prompt it near-duplicates (-1)."""
    rng = np.random.default_rng(seed)
    words = Words(rng, 6000)

    def sentence() -> str:
        return " ".join(words.draw(rng.integers(5, 20))).capitalize() + "."

    templates = [
        f"{rng.choice(OPENERS).capitalize()} the {words.draw(1)[0]} of {{}} "
        f"{' '.join(words.draw(3))}?"
        for _ in range(25)
    ]
    kind = rng.choice(3, size=count, p=[0.84, 0.12, 0.04])
    kind[0] = 0
    prompts: list[str] = []
    source = np.full(count, -1)
    for i in range(count):
        if kind[i] == 1:
            source[i] = rng.integers(0, i)
            prompts.append(_edit(prompts[source[i]], rng, words))
        elif kind[i] == 2:
            prompts.append(rng.choice(templates).format(words.draw(1)[0]))
        else:
            body = " ".join(sentence() for _ in range(rng.integers(1, 5)))
            prompts.append(f"{rng.choice(OPENERS).capitalize()} {body}")
    return prompts, source


def _edit(text: str, rng: np.random.Generator, words: Words) -> str:
    """One or two paraphrase-level edits of `text`."""
    for _ in range(rng.integers(1, 3)):
        tokens = text.split(" ")
        at = int(rng.integers(0, len(tokens)))
        match rng.integers(0, 6):
            case 0:  # a word replaced
                tokens[at] = words.draw(1)[0]
            case 1 if len(tokens) > 3:  # a word dropped
                del tokens[at]
            case 2:  # a word added
                tokens.insert(at, words.draw(1)[0])
            case 3:  # punctuation changed
                tokens[-1] = tokens[-1].rstrip(".?!") + str(rng.choice([".", "?", "!", ""]))
            case 4:  # case changed
                tokens[at] = tokens[at].upper()
            case _:  # a short request appended
                tokens[-1] += str(rng.choice(APPENDED))
        text = " ".join(tokens)
    return text


def _normalized(prompts: list[str]) -> pl.Series:
    """As curate compares prompts: lower case, whitespace runs as one space."""
    from pipeline.curate import _normalized

    return pl.select(_normalized(pl.Series(prompts))).to_series()


def _shingles(text: str, n: int) -> set[str]:
    text = text.ljust(n, "\0")
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def _groups_from_edges(size: int, first: np.ndarray, other: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    graph = coo_array((np.ones(len(first), np.int8), (first, other)), (size, size))
    _, label = connected_components(graph, directed=False)
    return label


def run_numpy(texts: pl.Series, threshold: float, n: int, seed: int) -> dict:
    from pipeline.near_dup import near_duplicates

    start = time.perf_counter()
    found = near_duplicates(texts, threshold, n, seed)
    seconds = time.perf_counter() - start
    label = np.where(found.group >= 0, found.group, -np.arange(1, len(texts) + 1))
    return {"seconds": seconds, "label": label.tolist(), "candidate_pairs": found.candidate_pairs}


def run_datasketch(texts: pl.Series, threshold: float, n: int, seed: int, xxh: bool) -> dict:
    from datasketch import MinHash, MinHashLSH

    kwargs = {"num_perm": 128, "seed": seed}
    if xxh:
        import xxhash

        kwargs["hashfunc"] = xxhash.xxh32_intdigest
    start = time.perf_counter()
    shingles = [[s.encode() for s in _shingles(t, n)] for t in texts.to_list()]
    sketches = MinHash.bulk(shingles, **kwargs)
    lsh = MinHashLSH(threshold=threshold, num_perm=128, weights=(0.1, 0.9))
    with lsh.insertion_session() as session:
        for i, sketch in enumerate(sketches):
            session.insert(i, sketch)
    first, other = [], []
    for i, sketch in enumerate(sketches):
        for j in lsh.query(sketch):
            if j < i:
                first.append(j)
                other.append(i)
    similar = [
        k for k in range(len(first)) if sketches[first[k]].jaccard(sketches[other[k]]) >= threshold
    ]
    label = _groups_from_edges(len(texts), np.array(first)[similar], np.array(other)[similar])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "label": label.tolist(), "candidate_pairs": len(first)}


def run_curate(prompts: list[str], threshold: float, n: int) -> dict:
    import pyarrow as pa

    from data_contracts import preference_pair
    from pipeline.curate import CurateConfig, curate

    rng = np.random.default_rng(1)
    rows = []
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}]
        chosen, rejected = f"answer {i} " * int(rng.integers(2, 40)), f"reply {i} " * 3
        rows.append(
            {
                "pair_id": preference_pair.make_pair_id("bench", messages, chosen, rejected),
                "source": "bench",
                "split": "train",
                "prompt": messages,
                "chosen": chosen,
                "rejected": rejected,
                "score_chosen": 8.0,
                "score_rejected": 4.0,
                "margin": float(rng.integers(1, 5)),
            }
        )
    table = pa.Table.from_pylist(rows, schema=preference_pair.SCHEMA)
    out = {}
    for name, config in (
        ("off", CurateConfig()),
        ("on", CurateConfig(near_dup_threshold=threshold, near_dup_ngram=n)),
    ):
        start = time.perf_counter()
        report = curate(table, config).report
        out[f"curate_{name}_s"] = round(time.perf_counter() - start, 3)
        out[f"curate_{name}_dropped"] = {k: v for k, v in report["dropped"].items() if v}
    return out


def score(label: np.ndarray, texts: list[str], source: np.ndarray, threshold: float, n: int):
    """Recall of planted near-duplicates at or above the threshold, groups, and grouped
    pairs (first member to each other) whose exact Jaccard is below threshold - 0.1."""
    planted = np.flatnonzero(source >= 0)
    exact = np.array(
        [
            len(a & b) / len(a | b)
            for a, b in ((_shingles(texts[i], n), _shingles(texts[source[i]], n)) for i in planted)
        ]
    )
    should = planted[exact >= threshold]
    found = label[should] == label[source[should]]
    values, first, sizes = np.unique(label, return_index=True, return_counts=True)
    grouped = np.flatnonzero(sizes[np.searchsorted(values, label)] > 1)
    anchor = first[np.searchsorted(values, label[grouped])]
    pairs = [(int(a), int(g)) for a, g in zip(anchor, grouped, strict=True) if a != g]
    sample = pairs[:: max(1, len(pairs) // 2000)]
    far = sum(
        len((x := _shingles(texts[a], n)) & (y := _shingles(texts[g], n))) / len(x | y)
        < threshold - 0.1
        for a, g in sample
    )
    return {
        "groups": int((sizes > 1).sum()),
        "prompts_in_groups": int(sizes[sizes > 1].sum()),
        "planted_near_duplicates": int(planted.size),
        "planted_at_or_above_threshold": int(should.size),
        "recall": round(float(found.mean()), 4) if should.size else None,
        "grouped_pairs_checked": len(sample),
        "grouped_pairs_below_threshold_minus_0.1": int(far),
    }


def child(arm: str, data: Path, threshold: float, n: int, seed: int) -> dict:
    frame = pl.read_parquet(data)
    prompts, source = frame["prompt"].to_list(), frame["source"].to_numpy()
    texts = _normalized(prompts)
    if arm == "curate":
        return run_curate(prompts, threshold, n)
    if arm == "numpy":
        result = run_numpy(texts, threshold, n, seed)
    else:
        result = run_datasketch(texts, threshold, n, seed, xxh=arm == "datasketch_xxh32")
    label = np.asarray(result.pop("label"))
    return {
        "seconds": round(result["seconds"], 3),
        "prompts_per_s": round(len(prompts) / result["seconds"]),
        "candidate_pairs": result["candidate_pairs"],
        **score(label, texts.to_list(), source, threshold, n),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100_000, help="prompts to generate")
    parser.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold")
    parser.add_argument("--ngram", type=int, default=5, help="shingle size in characters")
    parser.add_argument("--seed", type=int, default=0, help="generator and MinHash seed")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["numpy", "datasketch", "datasketch_xxh32", "curate"],
        help="what to measure",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        arm, data = args.child
        print(json.dumps(child(arm, Path(data), args.threshold, args.ngram, args.seed)))
        return
    arms = list(args.arms)
    if importlib.util.find_spec("datasketch") is None:
        arms = [a for a in arms if not a.startswith("datasketch")]
        print("datasketch is not installed (pip install -e '.[bench]'): its arms are left out")
    prompts, source = generate(args.prompts, args.seed)
    result: dict = {
        "prompts": args.prompts,
        "threshold": args.threshold,
        "ngram": args.ngram,
        "mean_prompt_chars": round(float(np.mean([len(p) for p in prompts])), 1),
        "cpu_count": len(os.sched_getaffinity(0)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.parquet"
        pl.DataFrame({"prompt": prompts, "source": source}).write_parquet(data)
        for arm in arms:
            command = [sys.executable, "-m", "benchmarks.near_dedup", "--child", arm, str(data)]
            command += ["--threshold", str(args.threshold), "--ngram", str(args.ngram)]
            command += ["--seed", str(args.seed)]
            out = subprocess.run(command, check=True, capture_output=True, text=True)
            result[arm] = json.loads(out.stdout.strip().splitlines()[-1])
            print(arm, result[arm], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
