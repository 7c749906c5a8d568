"""Prepared GPU benchmark: one script, under 8 minutes on one H100/H200.

Run on a CUDA machine: `python -m benchmarks.gpu OUT_DIR` (OUT_DIR defaults to `$OUT`, else
`benchmarks/results`). It writes `OUT_DIR/gpu.json` and `OUT_DIR/pytest_gpu.txt`. Without
CUDA it stops at once with exit code 2 and says why; `--smoke` runs the same code path on
the CPU with a tiny model and a few pairs (the test suite does, to keep this script working).

1. `pytest -m gpu tests/`: the flex and varlen kernels against `dense` (values and
   gradients), and anything else marked gpu.
2. DPO training throughput of a ~1B Llama-like model (Llama 3.2 1B's shape: 16 layers,
   width 2048, 32 heads / 8 kv heads, vocab 128,256, tied embeddings; random init), bf16
   autocast with fp32 master weights and AdamW, stored reference log-probs (what a run at
   scale uses), rows of up to 8192 tokens, on UltraFeedback-like and HelpSteer-like
   lengths (`benchmarks.train`'s drawing and cutting, so every layout holds the same
   tokens). Timed: `padded` (one pair per row, causal SDPA: FlashAttention), `unshared`
   with varlen, and `shared` with varlen, flex and segments; then shared varlen with
   `--compile` if time is left. About `--pairs-per-step` (32) pairs per optimizer step in
   every layout.
   LoRA (Hu et al. 2021, arXiv:2106.09685), on the first dataset, shared varlen: full
   fine-tuning and LoRA (rank 16, alpha 32, every projection) both with the *live*
   reference, the frozen copy of the initial weights for full fine-tuning and the same
   weights with the adapters off for LoRA (`training/lora.py`): peak memory and pairs/s
   side by side, beside the full run with stored log-probs above (their MFU counts full
   fine-tuning's FLOPs without a reference pass, so compare them by pairs/s).
   Each run: 2 untimed steps (the first compiles flex / the blocks), then timed steps until
   `--seconds` per run have passed; CUDA-synchronised wall clock (the trainer's metrics
   `.tolist()` waits for the GPU each step).

Reported per run: tokens/s (real tokens), pairs/s, MFU (model FLOPs of that layout's real
tokens: 6 x non-embedding parameters per token, 6 x hidden x vocab per response token for
the head, 12 x heads x head_dim per visible query-key pair for attention; over the GPU's
dense bf16 peak) and peak CUDA memory; and shared/padded pairs/s. Targets: MFU >= 40% for
shared, shared >= 2.5x padded pairs/s on UltraFeedback-like lengths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from benchmarks.train import cut_lengths, pack_rows, tokenized_pairs
from data_contracts.packed_row import Layout, PackedRow
from training.batch import PackedRows
from training.configs import llama3_2_1b, tiny
from training.model import CausalLM, ModelConfig
from training.reference import ReferenceKey, ReferenceLogps
from training.train import TrainConfig, global_step_rows, setup, train_step
from training.train_config import Precision

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 8192
PADDED_MICRO_PAIRS = 4
# Packed rows per micro-batch at most: 4 x 8192 tokens of a 1B model take ~94 GiB without
# activation checkpointing (HelpSteer-like, H200); unshared rows hold fewer pairs, so more
# rows, and 5 ran out of memory. More rows accumulate.
MAX_MICRO_ROWS = 4
BLOCK_SIZE = 128
DATASETS = {"UltraFeedback-like": "UltraFeedback", "HelpSteer-like": "Tulu-HelpSteer"}
LORA_RANK = 16


@dataclass(frozen=True)
class Run:
    """One timed run: the rows' layout, the attention backend (padded runs causal SDPA),
    `--compile`, LoRA's rank (0: full fine-tuning) and whether the reference is live (a
    model pass every step) rather than stored log-probs."""

    layout: Layout
    backend: str
    compile: bool = False
    lora_rank: int = 0
    live_reference: bool = False

    @property
    def first_dataset_only(self) -> bool:
        """Compile time and LoRA are measured once, on the first dataset."""
        return self.compile or self.live_reference

    @property
    def label(self) -> str:
        words = [self.backend] + ["compiled"] * self.compile
        words += [f"LoRA r{self.lora_rank}"] * bool(self.lora_rank)
        return " ".join(words + ["live reference"] * self.live_reference)


# Timed per dataset, in this order.
RUNS: tuple[Run, ...] = (
    Run("padded", "auto"),
    Run("unshared", "varlen"),
    Run("shared", "varlen"),
    Run("shared", "flex"),
    Run("shared", "segments"),
    Run("shared", "varlen", compile=True),
    Run("shared", "varlen", live_reference=True),
    Run("shared", "varlen", lora_rank=LORA_RANK, live_reference=True),
)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}


# ---------------------------------------------------------------------------- FLOPs


def visible_pairs(row: PackedRow, layout: Layout) -> int:
    """Query-key pairs the definition mask lets attend in one row (causal, per pair)."""
    p, c, r = (a.astype(np.int64) for a in (row.prompt_len, row.chosen_len, row.rejected_len))

    def tri(n: np.ndarray) -> np.ndarray:
        return n * (n + 1) // 2

    if layout == "shared":  # prompt causal; each response sees the prompt and itself
        return int((tri(p) + c * p + tri(c) + r * p + tri(r)).sum())
    return int((tri(p + c) + tri(p + r)).sum())


def model_flops(config: ModelConfig, rows: list[PackedRow], layout: Layout) -> float:
    """Training FLOPs (forward + backward) of the rows' real tokens under `layout`."""
    d, layers = config.hidden_size, config.num_layers
    hd = config.dim_per_head
    attn_params = d * hd * (2 * config.num_heads + 2 * config.num_kv_heads)
    body = layers * (attn_params + 3 * d * config.intermediate_size)
    tokens = sum(r.num_tokens for r in rows)
    responses = sum(int(r.chosen_len.sum() + r.rejected_len.sum()) for r in rows)
    attention = sum(visible_pairs(r, layout) for r in rows)
    return (
        6 * body * tokens
        + 6 * d * config.vocab_size * responses
        + 12 * config.num_heads * hd * layers * attention
    )


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return float(os.environ.get("PEAK_BF16_FLOPS", "nan"))


# ---------------------------------------------------------------------------- runs


def random_reference(rows: list[PackedRow], precision: Precision) -> ReferenceLogps:
    """Stored reference log-probs for the rows (values do not change the step's cost)."""
    ids = [pid for r in rows for pid in r.pair_ids]
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "pair_id": pa.array(ids, pa.string()),
            "chosen_logps": pa.array(-rng.uniform(50, 500, len(ids)), pa.float32()),
            "rejected_logps": pa.array(-rng.uniform(50, 500, len(ids)), pa.float32()),
        }
    )
    return ReferenceLogps(table, ReferenceKey("0" * 64, "0" * 20, precision))


def timed_run(
    config: ModelConfig,
    rows: list[PackedRow],
    spec: Run,
    seconds: float,
    device: str,
    precision: str,
    pairs_per_step: int,
    max_len: int,
) -> dict:
    """Train a fresh model on `rows` as `spec` says: 2 untimed steps, then steps until
    `seconds` passed.

    Packed rows: about `pairs_per_step` pairs per step, in micro-batches of at most
    `MAX_MICRO_ROWS` rows. Padded rows (one pair, two documents each): micro-batches of
    `PADDED_MICRO_PAIRS` pairs accumulated to the same pairs per step, as padded trainers
    must to keep (documents x longest) activations in memory.
    """
    layout, backend, compile_blocks = spec.layout, spec.backend, spec.compile
    per_row = sum(r.num_pairs for r in rows) / len(rows)
    if layout == "padded":
        batch_rows = min(PADDED_MICRO_PAIRS, pairs_per_step)
        grad_accum = max(1, pairs_per_step // batch_rows)
    else:
        rows_wanted = max(1, round(pairs_per_step / per_row))
        grad_accum = -(-rows_wanted // MAX_MICRO_ROWS)
        batch_rows = -(-rows_wanted // grad_accum)
    rows_per_step = batch_rows * grad_accum
    steps = len(rows) // rows_per_step
    if steps < 3:
        raise ValueError(
            f"{len(rows)} rows make {steps} steps of {rows_per_step}; give more --pairs"
        )
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: seconds, not a CPU init of 1B weights
        model = CausalLM(config)
    train_config = TrainConfig(
        out_dir=Path(tempfile.mkdtemp()),
        steps=steps,
        batch_rows=batch_rows,
        grad_accum=grad_accum,
        lr=1e-6,
        warmup_steps=0,
        backend=backend,
        precision=precision,
        compile=compile_blocks,
        device=device,
        progress=False,
        lora_rank=spec.lora_rank,
        lora_alpha=2.0 * spec.lora_rank or 16.0,
    )
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reference = None if spec.live_reference else random_reference(rows, precision)
    run = setup(train_config, PackedRows(rows, layout, BLOCK_SIZE, max_len), model, reference)
    start = time.perf_counter()
    warm = [train_step(run, 0), train_step(run, 1)]
    warmup_seconds = time.perf_counter() - start
    timed: list[dict] = []
    t0 = time.perf_counter()
    for step in range(2, steps):
        timed.append(train_step(run, step))
        if time.perf_counter() - t0 > seconds:
            break
    wall = sum(m["seconds"] for m in timed)
    pairs, tokens = sum(m["pairs"] for m in timed), sum(m["tokens"] for m in timed)
    flops = sum(  # of exactly the timed steps' rows
        model_flops(
            config,
            [rows[int(i)] for i in global_step_rows(m["step"] - 1, len(rows), rows_per_step, 0)],
            layout,
        )
        for m in timed
    )
    result = {
        "layout": layout,
        "backend": run.backend if layout != "padded" else "causal SDPA",
        "compile": compile_blocks,
        "lora_rank": spec.lora_rank,
        "reference": "live" if spec.live_reference else "stored",
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "batch_rows": batch_rows,
        "grad_accum": grad_accum,
        "timed_steps": len(timed),
        "warmup_seconds": warmup_seconds,
        "pairs/s": pairs / wall,
        "tokens/s": tokens / wall,
        "pairs_per_step": pairs / len(timed),
        "losses": [m["loss"] for m in warm + timed],
        "model_tflops/s": flops / wall / 1e12,
    }
    if device == "cuda":
        result["mfu"] = flops / wall / peak_flops()
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del run, model
    return result


def gpu_tests(out: Path) -> dict:
    """Run the gpu-marked tests (only their files: collecting the Dagster tests needs
    packages a bare CUDA image lacks); their summary line and exit code."""
    files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("test_*.py")
        if "pytest.mark.gpu" in p.read_text()
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-rA",
            "-q",
            "-p",
            "no:cacheprovider",
            *files,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (out / "pytest_gpu.txt").write_text(run.stdout + run.stderr)
    lines = run.stdout.strip().splitlines()
    return {
        "files": files,
        "returncode": run.returncode,
        "summary": lines[-1] if lines else run.stderr[-500:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=None, help="folder for the JSON")
    parser.add_argument("--pairs", type=int, default=288, help="pairs per dataset")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per run")
    parser.add_argument("--pairs-per-step", type=int, default=32)
    parser.add_argument("--budget", type=float, default=420.0, help="stop starting runs after")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, segments only")
    parser.add_argument("--no-tests", action="store_true", help="skip the gpu-marked tests")
    args = parser.parse_args()
    out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks.gpu needs CUDA (use --smoke to run its code path on the CPU)")
        raise SystemExit(2)
    started = time.perf_counter()
    results: dict = {"settings": {**vars(args), "out": str(out), "max_len": MAX_LEN}}
    if not args.smoke:
        results["device"] = torch.cuda.get_device_name()
        results["torch"] = torch.__version__
        results["peak_bf16_flops"] = peak_flops()
        if not args.no_tests:
            results["gpu_tests"] = gpu_tests(out)
            print("gpu tests:", results["gpu_tests"]["summary"])
    config = llama3_2_1b()
    device, precision, runs = "cuda", "bf16", RUNS
    if args.smoke:  # the CPU's backend for the packed runs: segments (LoRA's too)
        config = dataclasses.replace(tiny(), vocab_size=1024)
        device, precision = "cpu", "fp32"
        runs = tuple(r for r in RUNS if r.backend == "segments" or r.layout == "padded")
        runs += (Run("shared", "segments", lora_rank=4, live_reference=True),)
    max_len = MAX_LEN if not args.smoke else 512
    for label, name in DATASETS.items():
        p, c, r, _ = cut_lengths(name, args.pairs, max_len, seed=0)
        table = tokenized_pairs(p, c, r, config.vocab_size, seed=0)
        rows_by_layout = {
            layout: pack_rows(table, layout, max_len, BLOCK_SIZE)
            for layout in ("shared", "unshared", "padded")
        }
        results[label] = {"pairs": len(p), "runs": []}
        for spec in runs:
            if spec.first_dataset_only and label != next(iter(DATASETS)):
                continue
            named = {"layout": spec.layout, "backend": spec.backend, "label": spec.label}
            if time.perf_counter() - started > args.budget:
                results[label]["runs"].append({**named, "skipped": "time budget"})
                continue
            try:
                result = timed_run(
                    config,
                    rows_by_layout[spec.layout],
                    spec,
                    args.seconds,
                    device,
                    precision,
                    args.pairs_per_step,
                    max_len,
                )
            except Exception as err:  # one failing kernel must not lose the other numbers
                result = {**named, "compile": spec.compile, "error": repr(err)[:2000]}
            results[label]["runs"].append({"label": spec.label, **result})
            print(label, json.dumps({k: v for k, v in result.items() if k != "losses"}))
            (out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
        done = [x for x in results[label]["runs"] if "pairs/s" in x]
        padded = next((x for x in done if x["layout"] == "padded"), None)
        if padded:
            results[label]["shared/padded pairs/s"] = {
                x["label"]: x["pairs/s"] / padded["pairs/s"]
                for x in done
                if x["layout"] == "shared" and not x["lora_rank"] and x["reference"] == "stored"
            }
        live = {x["lora_rank"]: x for x in done if x["reference"] == "live"}
        if len(live) == 2:  # full fine-tuning and LoRA, both with the live reference
            full, lora = live[0], next(x for rank, x in live.items() if rank)
            results[label]["LoRA/full (live reference)"] = {
                "pairs/s": lora["pairs/s"] / full["pairs/s"],
                **(
                    {"peak_memory": lora["peak_memory_gib"] / full["peak_memory_gib"]}
                    if "peak_memory_gib" in full
                    else {}
                ),
            }
    results["seconds"] = time.perf_counter() - started
    (out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'gpu.json'} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
