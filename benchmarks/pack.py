"""Benchmark tokenize + pack: fill ratio, tokens per layout, throughput, peak RSS.

Run: `python -m benchmarks.pack` (about 6 minutes on 2 cores). Prints tables and
writes `benchmarks/results/pack.json`.

Generated pairs follow the published statistics quoted in issue 3 (from the prefix-sharing
DPO paper, Wang & Hegde 2024, arXiv:2410.20305): per dataset, the median pair
length (we read it as P + C + R tokens) and the median prefix:completion ratio (we read
it as P / mean(C, R)). Prompt and response lengths are drawn lognormal (sigma 0.8 for
prompts, 0.6 for each response, independent), with the two medians calibrated so the
drawn medians hit the published ones; the achieved medians are printed.

Text for the throughput runs is real: windows of the HelpSteer2 sample's token stream
(`../shared/data`), decoded with GPT-2's tokenizer, cut to the drawn lengths. Without
those files, random words and a BPE trained on them stand in (the results JSON says which).

Baselines: the per-row tokenization of trainers that duplicate the prompt (TRL-style):
`datasets.Dataset.map` over rows, rendering the same chat template and tokenizing prompt,
prompt+chosen and prompt+rejected per row, once with the same `tokenizers.Tokenizer`
(the strongest version of that baseline) and once through transformers'
`PreTrainedTokenizerFast.__call__` (what TRL actually calls).
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
from tokenizers import Tokenizer

from data_contracts import preference_pair, tokenized_pair
from pipeline import ragged
from pipeline.pack import PackConfig, apply_length_policy, build_shards
from pipeline.packer import RowPacker
from pipeline.templates import builtin_template, render_pairs
from pipeline.tokenize import BoundaryReport, boundary_agreement, load_tokenizer, tokenize_pairs
from pipeline.tokenize import train_tokenizer as train_bpe
from pipeline.tokenized import TokenizeConfig, build_tokenized

RESULTS = Path(__file__).parent / "results" / "pack.json"
# The shared samples sit beside the checkout (`../shared/data`), or one level up for a
# worktree under `wt/`; PREFPACK_SHARED_DATA overrides both.
_CANDIDATES = [Path(__file__).resolve().parents[n] / "shared" / "data" for n in (2, 3)]
SHARED = Path(
    os.environ.get("PREFPACK_SHARED_DATA")
    or next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
)
GPT2 = SHARED / "gpt2_tokenizer.json"
HELPSTEER = SHARED / "helpsteer2_pairs_sample.jsonl"

# dataset -> (median P+C+R, median P / mean(C, R))
PUBLISHED = {
    "UltraFeedback": (409, 0.42),
    "Tulu-HelpSteer": (775, 6.34),
    "Capybara": (1160, 1.59),
    "HH-RLHF": (186, 2.15),
    "TLDR": (416, 11.14),
    "MetaMath": (872, 3.91),
}
SIGMA_PROMPT, SIGMA_RESPONSE = 0.8, 0.6
MAX_LENS = (1024, 2048, 4096)
FILL_PAIRS = 20_000
SPEED_PAIRS = 5_000
SPEED_SETS = ("UltraFeedback", "TLDR")  # shortest and longest prompts relative to responses
BIG_PAIRS = 100_000


# ---------------------------------------------------------------------------- timing


class Timer:
    """Wall seconds and CPU seconds of this process (all threads) over a block."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def rates(self, pairs: int, tokens: int) -> dict:
        return {
            "seconds": self.wall,
            "cpu_seconds": self.cpu,
            "pairs_per_s": pairs / self.wall,
            "tokens_per_s": tokens / self.wall,
            "pairs_per_cpu_s": pairs / self.cpu,
            "tokens": tokens,
        }


# ---------------------------------------------------------------------------- lengths


def draw_lengths(name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, C, R) token lengths whose medians match the published pair length and ratio."""
    total, ratio = PUBLISHED[name]
    rng = np.random.default_rng(seed)
    zp, zc, zr = (rng.standard_normal(n) for _ in range(3))
    response = total / (ratio + 2)
    prompt = ratio * response
    for _ in range(30):  # fixed-point calibration of the two medians
        p = np.maximum(1, np.round(prompt * np.exp(SIGMA_PROMPT * zp)))
        c = np.maximum(1, np.round(response * np.exp(SIGMA_RESPONSE * zc)))
        r = np.maximum(1, np.round(response * np.exp(SIGMA_RESPONSE * zr)))
        got_total = np.median(p + c + r)
        got_ratio = np.median(p / ((c + r) / 2))
        prompt *= (total / got_total) * (ratio / got_ratio) ** 0.5
        response *= (total / got_total) / (ratio / got_ratio) ** 0.5
    return p.astype(np.int64), c.astype(np.int64), r.astype(np.int64)


def synthetic_tokenized(p: np.ndarray, c: np.ndarray, r: np.ndarray) -> pa.Table:
    """tokenized_pair rows of these lengths (ids are irrelevant to packing)."""
    columns = [
        ragged.list_array(pa.array(np.zeros(int(x.sum()), np.int32)), ragged.offsets_of(x))
        for x in (p, c, r)
    ]
    ids = pa.array([f"{i:032x}" for i in range(len(p))])
    return pa.Table.from_arrays([ids, *columns], schema=tokenized_pair.SCHEMA)


def pack_table(table: pa.Table, config: PackConfig) -> dict:
    """Length policy + RowPacker over windows; rows, tokens and wall time."""
    start = time.perf_counter()
    policy = apply_length_policy(table, config)
    packer = RowPacker(config.layout, config.max_len, config.mask_block_size)
    rows = tokens = 0
    kept = policy.kept
    batches = []
    for i in range(0, kept.num_rows, config.pack_window):
        batches += list(packer.add(kept.slice(i, config.pack_window)))
    batches += list(packer.finish())
    for b in batches:
        rows += b.num_rows
        tokens += int(ragged.list_parts(b.column("input_ids"))[1][-1])
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "tokens": tokens,
        "fill_ratio": tokens / (rows * config.max_len),
        "truncated": policy.truncated,
        "dropped": policy.too_long,
        "seconds": seconds,
        "pairs_per_s": table.num_rows / seconds,
        "tokens_per_s": tokens / seconds,
    }


def fill_table() -> list[dict]:
    """Fill ratio and tokens per layout, per dataset and max_len."""
    results = []
    for name in PUBLISHED:
        p, c, r = draw_lengths(name, FILL_PAIRS)
        table = synthetic_tokenized(p, c, r)
        for max_len in MAX_LENS:
            entry = {
                "dataset": name,
                "max_len": max_len,
                "median_pair": float(np.median(p + c + r)),
                "median_ratio": float(np.median(p / ((c + r) / 2))),
            }
            for layout in ("shared", "unshared", "padded"):
                out = pack_table(table, PackConfig(layout=layout, max_len=max_len))
                entry[layout] = out
            # Compute a padding trainer spends: both sequences padded to the longer one.
            pp, cc, rr = p, np.minimum(c, max_len), np.minimum(r, max_len)
            entry["padded_pair_tokens"] = int(
                (2 * np.minimum(np.maximum(pp + cc, pp + rr), max_len)).sum()
            )
            results.append(entry)
    return results


# ------------------------------------------------------------------------------- text


def text_source() -> tuple[Tokenizer, np.ndarray, str]:
    """(tokenizer, a long token stream of real text, description)."""
    if GPT2.is_file() and HELPSTEER.is_file():
        tokenizer = Tokenizer.from_file(str(GPT2))
        texts = []
        for line in HELPSTEER.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["prompt"], row["chosen"], row["rejected"]]
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        stream = np.concatenate([np.array(e.ids, np.int32) for e in encodings])
        return tokenizer, stream, "gpt2 tokenizer.json + HelpSteer2 sample text"
    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(5000)]
    words = [" ".join(rng.choice(vocabulary, 200)) for _ in range(2000)]
    loaded = train_bpe(words, 4096, builtin_template("chatml"))
    stream = np.concatenate(
        [
            np.array(e.ids, np.int32)
            for e in loaded.tokenizer.encode_batch(words, add_special_tokens=False)
        ]
    )
    return loaded.tokenizer, stream, "trained BPE + random words (shared data absent)"


def text_pairs(tokenizer: Tokenizer, stream: np.ndarray, name: str, n: int, seed: int) -> pa.Table:
    """preference_pair rows whose texts are decoded windows of the stream."""
    p, c, r = draw_lengths(name, n, seed)
    rng = np.random.default_rng(seed + 1)
    texts = []
    for lengths in (p, c, r):
        starts = rng.integers(0, len(stream) - int(lengths.max()) - 1, size=n)
        ids = ragged.gather(stream, starts, lengths)
        offsets = ragged.offsets_of(lengths)
        chunks = [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(n)]
        texts.append(tokenizer.decode_batch(chunks))
    prompts = [[{"role": "user", "content": t}] for t in texts[0]]
    ids = [
        preference_pair.make_pair_id("bench", m, a, b)
        for m, a, b in zip(prompts, texts[1], texts[2], strict=True)
    ]
    table = pa.Table.from_pydict(
        {
            "pair_id": ids,
            "source": ["bench"] * n,
            "split": ["train"] * n,
            "prompt": prompts,
            "chosen": texts[1],
            "rejected": texts[2],
        },
    )
    nulls = {
        f.name: pa.nulls(n, f.type)
        for f in preference_pair.SCHEMA
        if f.name not in table.column_names
    }
    for name_, column in nulls.items():
        table = table.append_column(name_, column)
    return preference_pair.CONTRACT.validate(table)


# -------------------------------------------------------------------------- baselines


def baseline_per_row(table: pa.Table, tokenizer: Tokenizer, hf: bool) -> dict:
    """TRL-style: per row, render and tokenize prompt, prompt+chosen, prompt+rejected."""
    template = builtin_template("chatml")
    if hf:
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")

        def encode(text: str) -> list[int]:
            return fast(text, add_special_tokens=False)["input_ids"]
    else:

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_row(row: dict) -> dict:
        prompt = template.render(row["prompt"], True, None, "<|endoftext|>")
        out = {"prompt_input_ids": encode(prompt)}
        for key in ("chosen", "rejected"):
            whole = template.render(
                [*row["prompt"], {"role": "assistant", "content": row[key]}],
                False,
                None,
                "<|endoftext|>",
            )
            out[f"{key}_input_ids"] = encode(whole)
        return out

    import datasets  # here: benchmarks.gpu imports this module where datasets is absent

    dataset = datasets.Dataset(table.select(["pair_id", "prompt", "chosen", "rejected"]))
    datasets.disable_progress_bars()
    with Timer() as timer:
        mapped = dataset.map(tokenize_row, load_from_cache_file=False)
    columns = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    return timer.rates(table.num_rows, sum(len(x) for k in columns for x in mapped[k]))


def ours_tokenize(table: pa.Table, tokenizer: Tokenizer) -> tuple[dict, pa.Table]:
    """Our tokenize stage alone: render + batch-encode, prompt once."""
    template = builtin_template("chatml")
    parts = []
    with Timer() as timer:
        for i in range(0, table.num_rows, 1024):
            t = table.slice(i, 1024)
            ids = t.column("pair_id").to_pylist()
            texts = render_pairs(
                t.column("prompt").to_pylist(),
                t.column("chosen").to_pylist(),
                t.column("rejected").to_pylist(),
                ids,
                template,
                "<|endoftext|>",
                "<|endoftext|>",
            )
            parts.append(tokenize_pairs(texts, ids, tokenizer))
    tokenized = pa.concat_tables(parts)
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    tokens = sum(int(ragged.list_parts(tokenized.column(k))[1][-1]) for k in columns)
    return timer.rates(table.num_rows, tokens), tokenized


def ours_end_to_end(
    path: Path, tokenizer_path: Path | None, config: PackConfig, store: Path
) -> dict:
    """Both stages (build_tokenized, then build_shards) in a fresh process: wall time
    (total and per stage) and that process's peak RSS."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.pack",
        "--child",
        str(path),
        str(tokenizer_path or ""),
        str(config.max_len),
        str(store),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so
    a child would report its parent's peak when that was higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(pairs: str, tokenizer: str, max_len: int, store: str) -> None:
    with Timer() as timer:
        with Timer() as tokenize_timer:
            tokens = build_tokenized(
                pairs,
                tokenizer or None,
                # GPT-2 has no chatml markers: keep the chatml baselines comparable
                TokenizeConfig(allow_multi_token_markers=True),
                store,
            )
        result = build_shards(tokens.directory, PackConfig(max_len=max_len), store)
    stats = result.manifest["stats"]
    out = timer.rates(stats["pairs_in"], stats["tokens"])
    out.update(tokenize_seconds=tokenize_timer.wall, pack_seconds=timer.wall - tokenize_timer.wall)
    out.update({k: stats[k] for k in ("rows", "pairs", "fill_ratio", "truncated", "dropped")})
    out.update(
        peak_rss_mb=peak_rss_mb(),
        tokens_by_layout=stats["tokens_by_layout"],
        boundary_agreement=stats["boundary_agreement"],
    )
    print(json.dumps(out))


def boundary_table(tokenizer_path: Path | None) -> list[dict]:
    """Boundary agreement per template x tokenizer on real pairs (when present)."""
    if not HELPSTEER.is_file():
        return []
    rows = [json.loads(x) for x in HELPSTEER.read_text(encoding="utf-8").splitlines()][:400]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    chosen, rejected = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    ids = [str(i) for i in range(len(rows))]
    tokenizers_ = []
    if tokenizer_path is not None:
        tokenizers_.append(load_tokenizer(tokenizer_path))
    results = []
    for name in ("chatml", "llama3", "plain"):
        template = builtin_template(name)
        corpus = render_pairs(
            prompts, chosen, rejected, ids, template, template.bos_token, template.eos_token
        )
        trained = train_bpe(corpus.prompt + corpus.chosen + corpus.rejected, 4096, template)
        for tok in [*tokenizers_, trained]:
            texts = render_pairs(
                prompts, chosen, rejected, ids, template, tok.bos_token, tok.eos_token
            )
            tokenized = tokenize_pairs(texts, ids, tok.tokenizer)
            report = BoundaryReport(name, tok.name)
            boundary_agreement(texts, tokenized, tok.tokenizer, report)
            results.append(report.to_dict())
    return results


def speed_section(name: str, tokenizer: Tokenizer, stream: np.ndarray) -> dict:
    """Ours vs the per-row baselines on the same pairs, in one run."""
    print(f"\n== throughput on {name}-like text, {SPEED_PAIRS} pairs, one run")
    table = text_pairs(tokenizer, stream, name, SPEED_PAIRS, seed=1)
    speed = {}
    speed["ours_tokenize"], tokenized = ours_tokenize(table, tokenizer)
    speed["ours_pack"] = pack_table(tokenized, PackConfig(max_len=4096))
    speed["baseline_tokenizers_map"] = baseline_per_row(table, tokenizer, hf=False)
    speed["baseline_transformers_map"] = baseline_per_row(table, tokenizer, hf=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.parquet"
        pq.write_table(table, path)
        tok_path = GPT2 if GPT2.is_file() else None
        speed["ours_build_shards"] = ours_end_to_end(  # both stages, in a fresh process
            path, tok_path, PackConfig(max_len=4096), Path(tmp) / "store"
        )
    for k, v in speed.items():
        cpu = f"{v['pairs_per_cpu_s']:>8.0f} pairs/cpu-s" if "pairs_per_cpu_s" in v else ""
        print(f"{k:26} {v['pairs_per_s']:>8.0f} pairs/s {v['tokens_per_s']:>10.0f} tokens/s {cpu}")
    for base in ("baseline_tokenizers_map", "baseline_transformers_map"):
        for ours in ("ours_tokenize", "ours_build_shards"):
            wall = speed[ours]["pairs_per_s"] / speed[base]["pairs_per_s"]
            cpu = speed[ours]["pairs_per_cpu_s"] / speed[base]["pairs_per_cpu_s"]
            speed[f"{ours}_vs_{base}"] = {"wall": wall, "cpu": cpu}
            print(f"{ours} / {base}: {wall:.2f}x pairs/s, {cpu:.2f}x pairs per CPU second")
    return speed


# ------------------------------------------------------------------------------- main


def main() -> None:
    results: dict = {
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
        "published": PUBLISHED,
    }
    print(results["machine"])
    print(f"== fill ratio and tokens per layout (synthetic lengths, {FILL_PAIRS} pairs each)")
    print(
        f"{'dataset':15} {'max_len':>7} {'med pair':>8} {'ratio':>6} {'fill':>7} {'rows sh/un/pad':>20} "
        f"{'tokens shared':>13} {'unshared':>10} {'padded':>10} {'trunc':>6} {'pack pairs/s':>12}"
    )
    fills = fill_table()
    for e in fills:
        sh, un, pa_ = e["shared"], e["unshared"], e["padded"]
        print(
            f"{e['dataset']:15} {e['max_len']:>7} {e['median_pair']:>8.0f} {e['median_ratio']:>6.2f} "
            f"{sh['fill_ratio']:>7.4f} {sh['rows']:>6}/{un['rows']:>6}/{pa_['rows']:>6} "
            f"{sh['tokens']:>13} {un['tokens']:>10} {e['padded_pair_tokens']:>10} {sh['truncated']:>6} "
            f"{sh['pairs_per_s']:>12.0f}"
        )
    results["fill"] = fills

    tokenizer, stream, source = text_source()
    results["text"] = source
    print(f"\ntext: {source}")
    # Each set in a fresh process: once a process has forked (our tokenize+pack child),
    # `tokenizers` may no longer encode in parallel in it, which would skew later sets.
    results["speed"] = {}
    for name in SPEED_SETS:
        command = [sys.executable, "-m", "benchmarks.pack", "--speed", name]
        run = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        print(run[: run.rindex("\n{")])
        results["speed"][name] = json.loads(run.strip().splitlines()[-1])

    print(
        f"\n== tokenize+pack of {BIG_PAIRS} UltraFeedback-like pairs, max_len 4096, fresh process"
    )
    big = text_pairs(tokenizer, stream, "UltraFeedback", BIG_PAIRS, seed=2)
    results["big"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, triple = Path(tmp) / "pairs.parquet", Path(tmp) / "pairs-x3.parquet"
        pq.write_table(big, path)
        # Memory must not grow with the input: the same pairs three times over.
        pq.write_table(pa.concat_tables([big] * 3), triple, row_group_size=8192)
        del big
        given = GPT2 if GPT2.is_file() else None
        # The given tokenizer, none (the sample job's path: train a BPE first), and 3x input.
        runs = (("given", path, given), ("trained", path, None), ("given, 3x pairs", triple, given))
        for label, pairs_path, tok_path in runs:
            store = Path(tmp) / f"store-{len(results['big'])}"
            end = ours_end_to_end(pairs_path, tok_path, PackConfig(max_len=4096), store)
            print(
                f"{label:15} {end['seconds']:.1f} s (tokenize {end['tokenize_seconds']:.1f} s, "
                f"pack {end['pack_seconds']:.1f} s), {end['pairs_per_s']:.0f} pairs/s, "
                f"{end['tokens_per_s']:.0f} tokens/s, peak RSS {end['peak_rss_mb']:.0f} MB, "
                f"fill {end['fill_ratio']:.4f}, rows {end['rows']}, truncated "
                f"{end['truncated']}, tokens by layout {end['tokens_by_layout']}"
            )
            results["big"][label] = end

    print("\n== boundary agreement (prompt_ids + response_ids == ids of the joined text)")
    boundary = boundary_table(GPT2 if GPT2.is_file() else None)
    for b in boundary:
        print(
            f"{b['template']:8} {b['tokenizer']:22} {b['agreed']:>5}/{b['checked']:<5} {b['rate']:.4f}"
        )
    results["boundary"] = boundary

    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--child",
        nargs=4,
        metavar=("PAIRS", "TOKENIZER", "MAX_LEN", "STORE"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--speed", metavar="DATASET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed:
        tokenizer, stream, _ = text_source()
        print(json.dumps(speed_section(args.speed, tokenizer, stream)))
    elif args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.child[3])
    else:
        main()
