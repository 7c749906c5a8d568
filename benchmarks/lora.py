"""Benchmark LoRA against full fine-tuning: peak memory and pairs/s of DPO steps.

Run: `python -m benchmarks.lora` (about 15 minutes on 2 busy cores). Prints a table and
writes `benchmarks/results/lora.json`.

What is compared, fairly:
- Same model: SmolLM2-135M's shape (`training.configs.smollm2_135m`: 30 layers, width 576,
  vocabulary 49,152, tied embeddings), one seeded random init, fp32 on the CPU.
- Same rows and steps: UltraFeedback-like pairs (`benchmarks.train`'s drawing and cutting)
  packed `shared` into rows of `--max-len` tokens; every run trains the same
  `--batch-rows` rows per step for one untimed step (optimizer state is allocated there)
  and `--steps` timed ones, with the trainer itself (`training.train.setup` and
  `train_step`: collate, reference pass, policy forward and backward, AdamW).
- Same reference: the live one, as a run without `--reference` has it: full fine-tuning
  holds a frozen copy of the initial weights; LoRA runs the same weights with its adapters
  off (Hu et al. 2021, arXiv:2106.09685; `training/lora.py`).
- Memory: each run once more in a fresh process, with glibc's mmap threshold fixed at
  1 MiB (`MALLOC_MMAP_THRESHOLD_`): every tensor of that size is its own mapping, given
  back to the system when freed, so the peak resident set (VmHWM) is the peak of live
  memory rather than of a fragmented heap (with the default, growing threshold, freed
  memory stays in the heap: those peaks, higher, are listed per round). Reported: the
  peak over the process before the model was built (imports and rows), and the whole
  peak. The model's own bytes are listed beside: weights, the reference copy, and
  gradients and AdamW's two moments of what trains.
- Time: with the default allocator, this process's CPU time per step (one torch thread),
  which other processes on a shared machine stretch less than wall time; wall-clock rates
  beside. Runs alternate (full, LoRA, LoRA, full, ...) over `--rounds`; the median over
  rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.train import cut_lengths, pack_rows, tokenized_pairs
from training.batch import PackedRows
from training.configs import smollm2_135m
from training.model import CausalLM
from training.train import TrainConfig, release, setup, train_step

RESULTS = Path(__file__).parent / "results" / "lora.json"
BLOCK_SIZE = 128
# The LoRA run: a common DPO setting (r 16, alpha 32, dropout 0.05) on every projection.
LORA = {"lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.05}
RUNS = ("full", "lora")
# What a timing child measures and a memory child measures again (under other settings).
MEASURED = ("pairs/s", "wall pairs/s", "tokens/s", "peak_rss_gib", "peak_over_start_gib")


def _status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(name: str, args: argparse.Namespace) -> dict:
    """In a fresh process: the run `name` on the benchmark's rows; its numbers."""
    torch.set_num_threads(args.threads)
    config = smollm2_135m()
    p, c, r, _ = cut_lengths("UltraFeedback", args.pairs, args.max_len, seed=0)
    rows = pack_rows(tokenized_pairs(p, c, r, config.vocab_size, seed=0), "shared", args.max_len)
    steps = args.steps + 1
    needed = steps * args.batch_rows
    if len(rows) < needed:
        raise SystemExit(f"{len(rows)} rows, {needed} needed: give more --pairs")
    rows = rows[:needed]
    data = PackedRows(rows, "shared", BLOCK_SIZE, args.max_len)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the RSS now
    before = _status("VmRSS")
    torch.manual_seed(0)
    model = CausalLM(config)
    train_config = TrainConfig(
        out_dir=Path(tempfile.mkdtemp()),
        steps=steps,
        batch_rows=args.batch_rows,
        lr=1e-5,
        warmup_steps=0,
        device="cpu",
        progress=False,
        **(LORA if name == "lora" else {}),
    )
    run = setup(train_config, data, model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    copies = 0 if run.ref_model is None else total  # the frozen reference copy
    losses, cpu, wall, pairs, tokens = [], [], [], [], []
    for step in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        metrics = train_step(run, step)
        if step:  # the first step allocates the optimizer state
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            pairs.append(metrics["pairs"])
            tokens.append(metrics["tokens"])
        losses.append(metrics["loss"])
    release(run)
    return {
        "run": name,
        "parameters": total,
        "trainable_parameters": trainable,
        # fp32: weights + reference copy, and gradient + AdamW's two moments per trainable
        "model_state_gib": 4 * (total + copies + 3 * trainable) / 2**30,
        "peak_rss_gib": _status("VmHWM") / 2**30,
        "peak_over_start_gib": (_status("VmHWM") - before) / 2**30,
        "pairs/s": sum(pairs) / sum(cpu),
        "tokens/s": sum(tokens) / sum(cpu),
        "wall pairs/s": sum(pairs) / sum(wall),
        "timed_steps": len(cpu),
        "pairs_per_step": sum(pairs) / len(pairs),
        "losses": losses,
    }


def spawn(name: str, args: argparse.Namespace, memory: bool = False) -> dict:
    """The run `name` in a fresh process; `memory`: one timed step, under a fixed mmap
    threshold (the module docstring says why)."""
    values = {**vars(args), "steps": 1} if memory else vars(args)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in values.items() if k != "child"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)} if memory else None
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.lora", "--child", name, *flags],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shown(result: dict, *names: str) -> str:
    return "  ".join(f"{name} {result[name]:.3f}" for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per run")
    parser.add_argument("--batch-rows", type=int, default=2, help="packed rows per step")
    parser.add_argument("--max-len", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--pairs", type=int, default=64, help="pairs drawn (enough rows)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    start = time.perf_counter()
    results: dict = {
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
        f"{args.threads} torch thread(s), CPU clock",
        "settings": {**{k: v for k, v in vars(args).items() if k != "child"}, "lora": LORA},
        "model": "SmolLM2-135M shape (random init), fp32, live reference",
    }
    print(results["machine"])
    samples: dict[str, list[dict]] = {name: [] for name in RUNS}
    for i in range(args.rounds):
        for name in RUNS if i % 2 == 0 else RUNS[::-1]:
            samples[name].append(spawn(name, args))
            print(name, "time", _shown(samples[name][-1], "pairs/s", "wall pairs/s"))
    for name, runs in samples.items():
        memory = spawn(name, args, memory=True)
        print(name, "memory", _shown(memory, "peak_rss_gib", "peak_over_start_gib"))
        results[name] = {
            **{k: v for k, v in runs[0].items() if k not in MEASURED},
            "pairs/s": statistics.median(r["pairs/s"] for r in runs),
            "wall pairs/s": statistics.median(r["wall pairs/s"] for r in runs),
            "tokens/s": statistics.median(r["tokens/s"] for r in runs),
            "rounds (default allocator)": [
                {k: r[k] for k in ("pairs/s", "wall pairs/s", "peak_over_start_gib")} for r in runs
            ],
            "peak_rss_gib": memory["peak_rss_gib"],
            "peak_over_start_gib": memory["peak_over_start_gib"],
        }
    full, lora = results["full"], results["lora"]
    results["lora/full"] = {
        "peak_over_start": lora["peak_over_start_gib"] / full["peak_over_start_gib"],
        "peak_rss": lora["peak_rss_gib"] / full["peak_rss_gib"],
        "pairs/s": lora["pairs/s"] / full["pairs/s"],
    }
    results["seconds"] = time.perf_counter() - start
    print(f"\n{'run':6} {'trainable':>12} {'model state':>12} {'peak RSS':>10} "
          f"{'over start':>11} {'pairs/s':>8}")  # fmt: skip
    for name in RUNS:
        r = results[name]
        print(
            f"{name:6} {r['trainable_parameters']:>12,} {r['model_state_gib']:>10.2f} G "
            f"{r['peak_rss_gib']:>8.2f} G {r['peak_over_start_gib']:>9.2f} G {r['pairs/s']:>8.3f}"
        )
    ratio = results["lora/full"]
    print(
        f"LoRA / full: peak over start {ratio['peak_over_start']:.2f}x, pairs/s "
        f"{ratio['pairs/s']:.2f}x  ({results['seconds']:.0f} s)"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
