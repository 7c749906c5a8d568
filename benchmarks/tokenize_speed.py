"""`prefpack pack` (tokenize + pack) against the tokenizer's own batch speed, in one run.

    python -m benchmarks.tokenize_speed [--pairs 100000] [--repeats 2] [--before DIR]

Generates UltraFeedback-like pairs with real text (`benchmarks.pack`'s generator: windows of
the HelpSteer2 sample's GPT-2 token stream, cut to lengths drawn around the published
medians), writes them as a preference_pair parquet, then measures, each in a fresh process
(so no fork has turned off the tokenizer's threads), interleaved, best of `--repeats`, each
after waiting for the machine to be quiet (it may be shared; each run reports how many
cores other processes kept busy meanwhile, `others_cores`):

- `encode_batch`: the same texts `pack` tokenizes (each prompt rendered once with the chat
  template, each response alone, as `pipeline.templates.render_pairs` gives them), rendered
  before the clock starts, through `tokenizers`' `Tokenizer.encode_batch` in batches of
  `BATCH` pairs: the tokenizer's own speed on this machine, every core (its Rayon pool).
  `encode_batch_fast` (no offsets; what the pipeline calls) the same way.
- `pack`: `build_tokenized` + `build_shards`, what `prefpack pack` runs, from the parquet to
  verified shards (chatml, max_len 4096): reading, rendering, tokenizing, checking,
  writing, hashing and packing.
- `pack (before)`, with `--before DIR`: the same with the code in DIR (a tree of the code
  before a change: `git archive HEAD | tar -x -C DIR`), and whether its tokenized files
  and shards are byte for byte the ones of this tree (the sha256 the report and the
  manifest list).

The ratio is `pack` pairs/s over `encode_batch` pairs/s (issue 21's goal: at least 0.85).
Both token counts are printed: they must be equal, or the two did not do the same work.
The results go to `benchmarks/results/tokenize_speed.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

RESULTS = Path(__file__).parent / "results" / "tokenize_speed.json"
ROOT = Path(__file__).resolve().parents[1]
BATCH = 2048  # pairs per encode_batch call of the baseline (6,144 texts)
MAX_LEN = 4096

# What `prefpack pack --allow-multi-token-markers --max-len 4096` runs, timed inside the
# process (imports excluded). Run with the code tree as working directory, so `--before`
# measures that tree's `pipeline`. GPT-2 has no chatml markers, hence the opt-in.
_PACK = """
import json, re, sys, time
from pathlib import Path
from pipeline.pack import PackConfig, build_shards
from pipeline.tokenized import TokenizeConfig, build_tokenized
pairs, tokenizer, store, max_len = sys.argv[1:5]
start = time.perf_counter()
tokenized = build_tokenized(pairs, tokenizer, TokenizeConfig(allow_multi_token_markers=True), store)
middle = time.perf_counter()
shards = build_shards(tokenized.directory, PackConfig(max_len=int(max_len)), store)
end = time.perf_counter()
print(json.dumps({
    "peak_rss_mb": int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) / 1024,
    "seconds": end - start,
    "tokenize_seconds": middle - start,
    "pack_seconds": end - middle,
    "pairs": tokenized.report["stats"]["pairs_in"],
    "tokens": tokenized.report["stats"]["tokens"]["pair"],
    "tokenized_sha256": [f["sha256"] for f in tokenized.report["files"]],
    "shard_key": shards.key,
    "shard_sha256": [s["sha256"] for s in shards.manifest["shards"]],
}))
"""


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (on Linux a child's ru_maxrss starts at its
    parent's peak, which exec keeps)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all processes, all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _wait_quiet(limit: float) -> None:
    """Wait (at most `limit` s) for 2 s in which other processes keep under 0.1 core busy:
    the machine is shared, and a busy spell would be measured as our slowness."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        busy = _busy_seconds()
        time.sleep(2)
        if _busy_seconds() - busy < 0.2:
            return


def _run(command: list[str], cwd: Path, quiet_wait: float) -> dict:
    """Run a child once the machine is quiet; its last stdout line (JSON), its CPU seconds,
    and how many cores other processes kept busy meanwhile (`others_cores`)."""
    _wait_quiet(quiet_wait)
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    busy, start = _busy_seconds(), time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    wall, busy = time.perf_counter() - start, _busy_seconds() - busy
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{command[:3]} failed with status {status}")
    result = json.loads(out.strip().splitlines()[-1])
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # whole process, imports too
    result["others_cores"] = max(0.0, busy - result["cpu_seconds"]) / wall
    result["pairs_per_s"] = result["pairs"] / result["seconds"]
    return result


def encode_baseline(pairs: str, tokenizer: str, fast: bool) -> None:
    """(child) Render the pairs as tokenize does, then time encode_batch alone; print JSON."""
    from pipeline.templates import render_pairs, resolve_template
    from pipeline.tokenize import load_tokenizer

    loaded = load_tokenizer(tokenizer)
    template = resolve_template(None, loaded.chat_template)
    table = pq.read_table(pairs, columns=["pair_id", "prompt", "chosen", "rejected"])
    texts = render_pairs(
        table.column("prompt").to_pylist(),
        table.column("chosen").to_pylist(),
        table.column("rejected").to_pylist(),
        table.column("pair_id").to_pylist(),
        template,
        loaded.bos_token,
        loaded.eos_token,
    )
    del table
    encode = loaded.tokenizer.encode_batch_fast if fast else loaded.tokenizer.encode_batch
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(texts.prompt), BATCH):
        batch = [*texts.prompt[i : i + BATCH], *texts.chosen[i : i + BATCH]]
        batch += texts.rejected[i : i + BATCH]
        tokens += sum(len(e) for e in encode(batch, add_special_tokens=False))
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "pairs": len(texts.prompt), "tokens": tokens}
    print(json.dumps({**out, "peak_rss_mb": peak_rss_mb()}))


def _baseline(pairs: Path, tokenizer: Path, fast: bool, quiet_wait: float) -> dict:
    flag = "--encode-fast" if fast else "--encode"
    command = [sys.executable, "-m", "benchmarks.tokenize_speed", flag, str(pairs), str(tokenizer)]
    return _run(command, ROOT, quiet_wait)


def _pack(pairs: Path, tokenizer: Path, code: Path, tmp: Path, quiet_wait: float) -> dict:
    with tempfile.TemporaryDirectory(dir=tmp) as store:
        command = [sys.executable, "-c", _PACK, str(pairs), str(tokenizer), store, str(MAX_LEN)]
        return _run(command, code, quiet_wait)


def _pairs_file(n: int, tmp: Path) -> tuple[Path, Path, str]:
    """(pairs parquet, tokenizer.json, text source) for n generated pairs."""
    from benchmarks.pack import text_pairs, text_source

    tokenizer, stream, source = text_source()
    table = text_pairs(tokenizer, stream, "UltraFeedback", n, seed=3)
    pairs, tokenizer_file = tmp / "pairs.parquet", tmp / "tokenizer.json"
    pq.write_table(table, pairs)
    tokenizer.save(str(tokenizer_file))
    return pairs, tokenizer_file, source


def _best(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["seconds"])
    everyone = {"all_seconds": [r["seconds"] for r in runs]}
    return {**best, **everyone, "all_others_cores": [r["others_cores"] for r in runs]}


def main(n: int, repeats: int, before: Path | None, quiet_wait: float) -> None:
    results: dict = {
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
        "pairs": n,
        "batch_pairs": BATCH,
        "max_len": MAX_LEN,
    }
    print(results["machine"])
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pairs, tokenizer, results["text"] = _pairs_file(n, tmp)
        print(f"{n} pairs of {results['text']}, {pairs.stat().st_size / 2**20:.0f} MiB parquet")
        runs: dict[str, list[dict]] = {}
        for _ in range(repeats):  # interleaved, so a busy spell hurts each about alike
            for fast, name in ((False, "encode_batch"), (True, "encode_batch_fast")):
                runs.setdefault(name, []).append(_baseline(pairs, tokenizer, fast, quiet_wait))
            runs.setdefault("pack", []).append(_pack(pairs, tokenizer, ROOT, tmp, quiet_wait))
            if before is not None:
                run = _pack(pairs, tokenizer, before, tmp, quiet_wait)
                runs.setdefault("pack_before", []).append(run)
    best = {name: _best(r) for name, r in runs.items()}
    results["runs"] = best
    base = best["encode_batch"]["pairs_per_s"]
    print(
        f"{'':18} {'pairs/s':>8} {'seconds':>8} {'cpu s':>7} {'tokens':>11} {'RSS MB':>7} "
        f"{'others':>6} ratio"
    )
    for name, r in best.items():
        r["ratio_to_encode_batch"] = r["pairs_per_s"] / base
        print(
            f"{name:18} {r['pairs_per_s']:>8.0f} {r['seconds']:>8.1f} {r['cpu_seconds']:>7.1f} "
            f"{r['tokens']:>11} {r['peak_rss_mb']:>7.0f} {r['others_cores']:>6.2f} "
            f"{r['ratio_to_encode_batch']:.3f}"
        )
    print("others: cores other processes kept busy during that run (0 on a quiet machine)")
    for name in ("pack", "pack_before"):
        if name in best:
            r = best[name]
            print(f"{name}: tokenize {r['tokenize_seconds']:.1f} s, pack {r['pack_seconds']:.1f} s")
    if before is not None:
        now, then = best["pack"], best["pack_before"]
        same = all(now[k] == then[k] for k in ("tokenized_sha256", "shard_key", "shard_sha256"))
        results["identical_to_before"] = same
        print(f"tokenized.parquet, tokenizer files and shards byte-identical to --before: {same}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="generated pairs")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, best kept")
    parser.add_argument("--before", type=Path, help="a tree of the code before a change")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=600,
        help="seconds to wait, before each run, for other processes to quiet down",
    )
    parser.add_argument("--encode", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--encode-fast", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.encode or args.encode_fast:
        encode_baseline(*(args.encode or args.encode_fast), fast=bool(args.encode_fast))
    else:
        main(args.pairs, args.repeats, args.before, args.quiet_wait)
