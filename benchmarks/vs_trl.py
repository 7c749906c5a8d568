"""Benchmark prefpack's packed DPO trainer against TRL's `DPOTrainer`, same model, same pairs.

Run: `python -m benchmarks.vs_trl` (`--quick` for a smoke test: 4 pairs, 1 round). Needs
`trl` and `accelerate` in the environment (benchmark only: nothing else in prefpack imports
them). Prints a table and writes `benchmarks/results/vs_trl.json` (not with `--quick`).

What is compared:
- Model: a Llama-architecture Hugging Face folder with random weights in SmolLM2-135M's
  shape (30 layers, width 576, 9 heads / 3 KV heads, MLP 1536, vocabulary 49152, tied
  embeddings), written once, fp32. TRL loads it with `AutoModelForCausalLM` (SDPA
  attention), prefpack with `training.checkpoint.load_pretrained`.
- Pairs: UltraFeedback-like (prompt, chosen, rejected) lengths from
  `benchmarks.pack.draw_lengths`, kept when 2P+C+R <= 4096 (so nothing is ever cut), with
  random token ids; each response ends with the end-of-sequence token, as a tokenized
  response ends with its end of turn, so TRL appends nothing and both trainers see exactly
  the same tokens. TRL gets them as text ("t123" words) through a word-level tokenizer
  whose word "t{i}" is id i; the script checks that TRL's tokenized columns equal the ids.
  prefpack gets them as `shared` rows of the real packer (`benchmarks.train.pack_rows`).
- Settings: `live`, a reference model in memory on both sides (TRL loads its own copy,
  prefpack copies the policy), and `precomputed`, reference log-probs computed before
  training (TRL `precompute_ref_log_probs=True`, prefpack `compute_reference_logps`), not
  timed. In `precomputed` the two sides' reference log-probs are compared pair by pair:
  the same model on the same tokens must give the same numbers.
- Same work per step: fp32 on CPU, 8 pairs per optimizer step (TRL: 2 pairs per
  micro-batch, 4 micro-batches; prefpack: packed rows per step so that a step holds about
  8 pairs), AdamW (torch) at lr 1e-6, no warmup, gradient clipping at 1, sigmoid DPO with
  beta 0.1, no gradient checkpointing (TRL's default turns it on), no logging, evaluation
  or checkpoints in TRL.
- Timing: each trainer runs in a fresh child process (its own peak RSS, VmHWM), one torch
  thread by default. Every run trains one untimed warm-up step on 8 extra pairs first, then
  the measured pairs; the timed steps hold exactly the measured pairs on both sides (TRL
  reads the data in order; prefpack's rows are placed where its seeded order visits them,
  checked against each step's metrics). A step's time runs from the end of the previous
  step to the end of this one (collate included), on the wall clock and on this process's
  CPU clock. The trainers alternate (TRL, prefpack, TRL, prefpack, ...) over `--rounds`
  so that load from other processes hits both alike; medians over rounds are reported.
- Work counted: positions each trainer runs through the model per pair, padding included
  (TRL: every micro-batch is 2 x pairs sequences padded to the longest; prefpack: the rows'
  tokens), and TRL's padding share (pad positions / all positions it runs).
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
from dataclasses import asdict, dataclass
from importlib.metadata import version
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.pack import draw_lengths
from data_contracts import tokenized_pair
from pipeline import ragged

# prefpack's attention backend on CPU (the backend names may change: set it here only).
BACKEND = "segments"
RESULTS = Path(__file__).parent / "results" / "vs_trl.json"
DATASET = "UltraFeedback"  # a benchmarks.pack.PUBLISHED name
MAX_LEN = 4096
BLOCK_SIZE = 128
PAIRS_PER_STEP = 8
TRL_MICRO_BATCH, TRL_GRAD_ACCUM = 2, 4  # 8 pairs per optimizer step
WARMUP_PAIRS = TRL_MICRO_BATCH * TRL_GRAD_ACCUM  # one whole untimed step
LR = 1e-6
DRAWN = 1000  # lengths drawn per seed (the calibration of draw_lengths uses them all)
SETTINGS = ("live", "precomputed")
TRAINERS = ("trl", "prefpack")
# Token ids 0..3 are the special tokens; random ids are drawn from [FIRST_ID, VOCAB).
SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
EOS_ID = 2
FIRST_ID = len(SPECIALS)
MODEL = {  # SmolLM2-135M's shape
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": EOS_ID,
    "pad_token_id": 3,
}


# ---------------------------------------------------------------------------- inputs


def draw_pairs(n: int, skip: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, C, R) of `n` UltraFeedback-like pairs that fit 2P+C+R <= MAX_LEN, after the
    first `skip` that fit."""
    p, c, r = draw_lengths(DATASET, DRAWN, seed)
    keep = np.flatnonzero(2 * p + c + r <= MAX_LEN)[skip : skip + n]
    if len(keep) < n:
        raise ValueError(f"only {len(keep)} of {DRAWN} drawn pairs fit; ask for fewer")
    return p[keep], c[keep], r[keep]


def pair_table(lengths: tuple[np.ndarray, ...], seed: int, prefix: str) -> pa.Table:
    """`tokenized_pair` rows of these lengths: random ids in [FIRST_ID, vocab), each
    response ending with EOS_ID (its end of turn)."""
    rng = np.random.default_rng(seed)
    columns = []
    for k, x in enumerate(lengths):
        ids = rng.integers(FIRST_ID, MODEL["vocab_size"], int(x.sum()), dtype=np.int32)
        if k > 0:  # chosen, rejected: the last token of every response
            ids[np.cumsum(x) - 1] = EOS_ID
        columns.append(ragged.list_array(pa.array(ids), ragged.offsets_of(x)))
    ids = pa.array([f"{prefix}-{i:04d}" for i in range(len(lengths[0]))])
    return pa.Table.from_arrays([ids, *columns], schema=tokenized_pair.SCHEMA)


def write_model(folder: Path, seed: int) -> None:
    """A random-weight Llama folder in SmolLM2-135M's shape, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**MODEL)).save_pretrained(folder)


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer: word "t{i}" is token i; the special tokens are ids 0..3."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = list(SPECIALS.values())
    vocab = {s: i for i, s in enumerate(specials)}
    vocab |= {f"t{i}": i for i in range(FIRST_ID, MODEL["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk"]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tokenizer.save(str(path))


def words(ids: list[int]) -> str:
    """Token ids as the text the word-level tokenizer maps back to them."""
    return " ".join(SPECIALS["eos"] if i == EOS_ID else f"t{i}" for i in ids)


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunSpec:
    """What a child process trains: one trainer, one setting, files made by the parent."""

    trainer: str
    setting: str
    model: str  # HF folder
    tokenizer: str  # tokenizer.json
    warmup: str  # tokenized_pair parquet, the untimed first step
    pairs: str  # tokenized_pair parquet, the timed steps
    workdir: str
    result: str  # JSON written by the child
    threads: int
    seed: int


@dataclass
class Mark:
    """Clocks at the end of an optimizer step, and what the step held."""

    wall: float
    cpu: float
    pairs: int
    positions: int  # positions the policy ran, padding included
    real: int  # real (non-pad) positions
    batches: int = 1  # micro-batches


def timing(marks: list[Mark]) -> dict[str, Any]:
    """Rates of the steps after the first (the first ends at marks[0])."""
    timed = marks[1:]
    wall = marks[-1].wall - marks[0].wall
    cpu = marks[-1].cpu - marks[0].cpu
    pairs = sum(m.pairs for m in timed)
    positions = sum(m.positions for m in timed)
    return {
        "timed_steps": len(timed),
        "pairs": pairs,
        "positions": positions,
        "real_positions": sum(m.real for m in timed),
        "wall_s": wall,
        "cpu_s": cpu,
        "pairs/s wall": pairs / wall,
        "pairs/s cpu": pairs / cpu,
        "positions/s wall": positions / wall,
        "step_wall_s": [b.wall - a.wall for a, b in pairwise(marks)],
        "step_pairs": [m.pairs for m in timed],
    }


def run_trl(spec: RunSpec) -> dict[str, Any]:
    """TRL's DPOTrainer on the warm-up pairs, then the measured pairs."""
    import datasets
    import trl
    from transformers import (
        AutoModelForCausalLM,
        PreTrainedTokenizerFast,
        PrinterCallback,
        TrainerCallback,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=spec.tokenizer, **{f"{k}_token": v for k, v in SPECIALS.items()}
    )
    tables = [pq.read_table(spec.warmup), pq.read_table(spec.pairs)]
    table = pa.concat_tables(tables)
    ids = {c: table.column(c).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids")}
    text = {
        "prompt": [words(x) for x in ids["prompt_ids"]],
        # TRL joins prompt + response as strings: the response starts with the separator.
        "chosen": [" " + words(x) for x in ids["chosen_ids"]],
        "rejected": [" " + words(x) for x in ids["rejected_ids"]],
    }
    model = AutoModelForCausalLM.from_pretrained(
        spec.model, dtype=torch.float32, attn_implementation="sdpa"
    )
    config = trl.DPOConfig(
        output_dir=str(Path(spec.workdir) / "trl"),
        per_device_train_batch_size=TRL_MICRO_BATCH,
        gradient_accumulation_steps=TRL_GRAD_ACCUM,
        num_train_epochs=1,
        learning_rate=LR,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=MAX_LEN,  # no sequence reaches it (checked below: nothing cut)
        truncation_mode="keep_start",
        padding_free=False,
        precompute_ref_log_probs=spec.setting == "precomputed",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        train_sampling_strategy="sequential",  # warm-up pairs first, then the measured ones
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        report_to="none",
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=spec.seed,
    )
    start = time.perf_counter()
    trainer = trl.DPOTrainer(
        model=model,
        ref_model=None,  # live: TRL loads its own copy; precomputed: none is kept
        args=config,
        train_dataset=datasets.Dataset.from_dict(text),
        processing_class=tokenizer,
    )
    setup_s = time.perf_counter() - start

    # TRL must see exactly our token ids.
    seen = trainer.train_dataset.select_columns(list(ids)).to_dict()
    same = len(seen["prompt_ids"]) == table.num_rows and all(seen[c] == ids[c] for c in ids)
    counts = {c: sum(map(len, seen[c])) for c in ids}
    expected = {c: sum(map(len, ids[c])) for c in ids}
    print(
        f"  TRL tokenization: {len(seen['prompt_ids'])} pairs, token counts {counts} "
        f"(prefpack: {expected}), identical ids: {same}"
    )
    if not same:
        raise RuntimeError("TRL's tokenized pairs differ from the ids prefpack trains on")

    # What the policy runs, micro-batch by micro-batch: (pairs, positions, real positions).
    # Counted at the forward (the data loader collates a batch ahead of use); the hook is
    # added after __init__, so the precompute pass is not counted.
    batches: list[tuple[int, int, int]] = []

    def count(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs["attention_mask"]
        batches.append((mask.shape[0] // 2, mask.numel(), int(mask.sum())))

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    marks: list[Mark] = []
    threads: list[int] = []

    class StepClock(TrainerCallback):
        """Marks the end of every optimizer step with the micro-batches it ran."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            wall, cpu = time.perf_counter(), time.process_time()
            held = batches[sum(m.batches for m in marks) :]
            pairs, positions, real = (sum(x) for x in zip(*held, strict=True))
            marks.append(Mark(wall, cpu, pairs, positions, real, len(held)))
            threads.append(torch.get_num_threads())

    trainer.add_callback(StepClock())
    trainer.remove_callback(PrinterCallback)  # the end-of-run metrics line
    trainer.train()
    if marks[0].pairs != WARMUP_PAIRS:
        raise RuntimeError(f"TRL's first step held {marks[0].pairs} pairs, not the warm-up")
    result = timing(marks)
    measured = [ids[c][tables[0].num_rows :] for c in ids]
    unshared = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(*measured, strict=True))
    if result["real_positions"] != unshared:
        raise RuntimeError(
            f"TRL ran {result['real_positions']} real positions for the measured pairs, "
            f"not their 2P+C+R = {unshared}: it cut or added tokens"
        )
    pad = result["positions"] - result["real_positions"]
    result |= {
        "setup_s": setup_s,
        "padding_share": pad / result["positions"],
        "torch_threads": max(threads),
        "longest_sequence": max(
            len(p) + max(len(c), len(r)) for p, c, r in zip(*seen.values(), strict=True)
        ),
    }
    if spec.setting == "precomputed":
        n = tables[0].num_rows
        ref = trainer.train_dataset.select_columns(["ref_chosen_logps", "ref_rejected_logps"])
        result["ref_logps"] = {
            "pair_ids": table.column("pair_id").to_pylist()[n:],
            "chosen": ref["ref_chosen_logps"][n:],
            "rejected": ref["ref_rejected_logps"][n:],
        }
    return result


def step_batch_rows(rows: list) -> int:
    """Packed rows per step: the divisor of the row count whose steps hold closest to
    PAIRS_PER_STEP pairs, so every row is trained once."""
    per_row = sum(r.num_pairs for r in rows) / len(rows)
    divisors = [d for d in range(1, len(rows) + 1) if len(rows) % d == 0]
    return min(divisors, key=lambda d: abs(d * per_row - PAIRS_PER_STEP))


def arrange_rows(steps: list[list], seed: int) -> list:
    """The rows in the order that makes prefpack's seeded row order
    (`training.train.global_step_rows`, one epoch) train `steps[k]` at step k."""
    from training.train import global_step_rows

    per_step, total = len(steps[0]), len(steps[0]) * len(steps)
    out: list = [None] * total
    for k, chunk in enumerate(steps):
        for i, row in zip(global_step_rows(k, total, per_step, seed), chunk, strict=True):
            out[int(i)] = row
    return out


def run_prefpack(spec: RunSpec) -> dict[str, Any]:
    """prefpack's trainer on the warm-up rows, then the measured rows."""
    from benchmarks.train import pack_rows
    from training.batch import PackedRows
    from training.checkpoint import load_pretrained
    from training.reference import ReferenceKey, ReferenceLogps, compute_reference_logps
    from training.train import TrainConfig, train

    model = load_pretrained(spec.model)
    pairs = pq.read_table(spec.pairs)
    rows = pack_rows(pairs, "shared", MAX_LEN)
    shared = sum(int(ragged.lengths_of(pairs.column(c)).sum()) for c in pairs.column_names[1:])
    if sum(r.num_tokens for r in rows) != shared or sum(r.num_pairs for r in rows) != len(pairs):
        raise RuntimeError("the packer cut or dropped pairs")
    size = step_batch_rows(rows)
    warm = pack_rows(pq.read_table(spec.warmup), "shared", MAX_LEN)
    warm = (warm * size)[:size]  # one step of rows (repeated when the warm-up packs into fewer)
    steps = [warm] + [rows[i : i + size] for i in range(0, len(rows), size)]
    ordered = arrange_rows(steps, spec.seed)
    reference, setup_s = None, 0.0
    if spec.setting == "precomputed":
        start = time.perf_counter()
        table = compute_reference_logps(
            model,
            ordered,
            "shared",
            block_size=BLOCK_SIZE,
            backend=BACKEND,
            batch_rows=size,
            device="cpu",
            progress=False,
        )
        reference = ReferenceLogps(table, ReferenceKey("0" * 64, "0" * 20, "fp32"))
        setup_s = time.perf_counter() - start
    config = TrainConfig(
        out_dir=Path(spec.workdir) / "prefpack",
        steps=len(steps),
        batch_rows=size,
        grad_accum=1,
        lr=LR,
        warmup_steps=0,
        progress=False,
        device="cpu",
        seed=spec.seed,
        backend=BACKEND,
    )
    marks: list[Mark] = []
    metrics: list[dict[str, float]] = []

    threads: list[int] = []

    def record(step: dict[str, float]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        # segments runs a micro-batch's rows as one flat sequence: no padding.
        tokens = sum(r.num_tokens for r in steps[len(marks)])
        marks.append(Mark(wall, cpu, int(step["pairs"]), tokens, tokens))
        metrics.append(step)
        threads.append(torch.get_num_threads())

    data = PackedRows(ordered, "shared", BLOCK_SIZE, MAX_LEN)
    train(config, data, model, reference=reference, on_step=record)
    for k, (chunk, step) in enumerate(zip(steps, metrics, strict=True)):
        want = (sum(r.num_pairs for r in chunk), sum(r.num_tokens for r in chunk))
        if (step["pairs"], step["tokens"]) != want:
            raise RuntimeError(
                f"prefpack step {k + 1} held {step['pairs']} pairs / {step['tokens']} tokens, "
                f"expected {want}: its row order changed (training.train.global_step_rows)"
            )
    result = timing(marks)
    result |= {
        "setup_s": setup_s,
        "padding_share": 0.0,
        "torch_threads": max(threads),
        "rows": len(rows),
        "batch_rows": size,
        "row_tokens": [r.num_tokens for r in rows],
        "losses": [m["loss"] for m in metrics],
    }
    if reference is not None:
        n = pairs.column("pair_id").to_pylist()
        found = reference.lookup(n)
        result["ref_logps"] = {
            "pair_ids": n,
            "chosen": found.chosen.tolist(),
            "rejected": found.rejected.tolist(),
        }
    return result


def child_main(spec_path: str) -> None:
    """Entry point of a child process: run one spec, write its result with the peak RSS."""
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    torch.set_num_threads(spec.threads)
    result = run_trl(spec) if spec.trainer == "trl" else run_prefpack(spec)
    result["peak_rss_mib"] = peak_rss_mib()
    Path(spec.result).write_text(json.dumps(result) + "\n")


def run_child(spec: RunSpec, log: Path) -> dict[str, Any]:
    """Run `spec` in a fresh interpreter; its result, or the error it died with."""
    Path(spec.result).unlink(missing_ok=True)
    spec_path = Path(spec.workdir) / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(Path(spec.workdir) / "hf"),
        "HF_DATASETS_CACHE": str(Path(spec.workdir) / "hf" / "datasets"),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "benchmarks.vs_trl", "--child", str(spec_path)]
    with log.open("w") as err:
        done = subprocess.run(command, cwd=root, env=env, stderr=err, check=False)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        return {"error": f"exit {done.returncode}", "stderr_tail": tail}
    return json.loads(Path(spec.result).read_text())


# ---------------------------------------------------------------------------- report


def compare_ref_logps(trl: dict[str, Any], ours: dict[str, Any]) -> dict[str, float]:
    """Largest differences between the two sides' reference log-probs of the same pairs."""
    if trl["pair_ids"] != ours["pair_ids"]:
        raise RuntimeError("the two sides' reference log-probs cover different pairs")
    a = np.array([trl["chosen"], trl["rejected"]], dtype=np.float64)
    b = np.array([ours["chosen"], ours["rejected"]], dtype=np.float64)
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "max_rel_diff": float((np.abs(a - b) / np.abs(a)).max()),
    }


def summarize(runs: list[dict[str, Any]], pairs_drawn: int) -> dict[str, Any]:
    """Per setting and trainer: medians over rounds; the per-round prefpack/TRL ratios."""
    out: dict[str, Any] = {}
    for setting in SETTINGS:
        by_trainer = {
            t: [r for r in runs if r["setting"] == setting and r["trainer"] == t] for t in TRAINERS
        }
        summary: dict[str, Any] = {}
        for trainer, rs in by_trainer.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                summary[trainer] = {"error": rs[0]["error"] if rs else "not run"}
                continue
            summary[trainer] = {
                "pairs/s cpu": statistics.median(r["pairs/s cpu"] for r in ok),
                "pairs/s wall": statistics.median(r["pairs/s wall"] for r in ok),
                "positions/pair": sum(r["positions"] for r in ok) / sum(r["pairs"] for r in ok),
                "padding_share": statistics.median(r["padding_share"] for r in ok),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
                "step_wall_s": statistics.median(s for r in ok for s in r["step_wall_s"]),
                "setup_s": statistics.median(r["setup_s"] for r in ok),
                "rounds": len(ok),
            }
        pairs = [
            (a, b)
            for a, b in zip(by_trainer["trl"], by_trainer["prefpack"], strict=True)
            if "error" not in a and "error" not in b
        ]
        if pairs:
            for clock in ("cpu", "wall"):
                key = f"pairs/s {clock}"
                summary[f"prefpack/trl {clock}"] = statistics.median(
                    b[key] / a[key] for a, b in pairs
                )
            summary["positions trl/prefpack"] = pairs[0][0]["positions"] / pairs[0][1]["positions"]
            if setting == "precomputed":
                a, b = pairs[0]
                summary["ref_logps"] = compare_ref_logps(a["ref_logps"], b["ref_logps"])
        out[setting] = summary
    out["pairs"] = pairs_drawn
    return out


def print_summary(summary: dict[str, Any]) -> None:
    header = (
        f"{'setting':12} {'trainer':9} {'pairs/s cpu':>11} {'pairs/s wall':>12} "
        f"{'s/step':>7} {'positions/pair':>14} {'padding':>8} {'peak RSS MiB':>12}"
    )
    print("\n" + header)
    for setting in SETTINGS:
        s = summary[setting]
        for trainer in TRAINERS:
            t = s[trainer]
            if "error" in t:
                print(f"{setting:12} {trainer:9} failed: {t['error']}")
                continue
            print(
                f"{setting:12} {trainer:9} {t['pairs/s cpu']:>11.3f} {t['pairs/s wall']:>12.3f} "
                f"{t['step_wall_s']:>7.1f} {t['positions/pair']:>14.0f} "
                f"{t['padding_share']:>8.1%} {t['peak_rss_mib']:>12.0f}"
            )
        if "prefpack/trl cpu" in s:
            print(
                f"{setting:12} prefpack/TRL pairs/s: {s['prefpack/trl cpu']:.3f} (cpu), "
                f"{s['prefpack/trl wall']:.3f} (wall); positions TRL/prefpack "
                f"{s['positions trl/prefpack']:.3f}"
            )
        if "ref_logps" in s:
            r = s["ref_logps"]
            print(
                f"{setting:12} reference log-probs TRL vs prefpack: max abs diff "
                f"{r['max_abs_diff']:.2e}, max rel diff {r['max_rel_diff']:.2e}"
            )


# ---------------------------------------------------------------------------- main


def prepare(root: Path, pairs: int, seed: int) -> tuple[dict[str, str], dict[str, Any]]:
    """Write the model folder, tokenizer and the two pair tables once; their statistics."""
    files = {
        "model": str(root / "model"),
        "tokenizer": str(root / "tokenizer.json"),
        "warmup": str(root / "warmup.parquet"),
        "pairs": str(root / "pairs.parquet"),
    }
    write_model(Path(files["model"]), seed)
    write_tokenizer(Path(files["tokenizer"]))
    p, c, r = draw_pairs(pairs, 0, seed)
    pq.write_table(pair_table((p, c, r), seed, "pair"), files["pairs"])
    warm = draw_pairs(WARMUP_PAIRS, pairs, seed)
    pq.write_table(pair_table(warm, seed + 1, "warmup"), files["warmup"])
    stats = {
        "pairs": len(p),
        "median_pair": float(np.median(p + c + r)),
        "median_ratio": float(np.median(p / ((c + r) / 2))),
        "longest_pair_2P+C+R": int((2 * p + c + r).max()),
        "tokens": {
            "shared P+C+R": int((p + c + r).sum()),
            "unshared 2P+C+R": int((2 * p + c + r).sum()),
        },
    }
    return files, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16, help="measured pairs per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trainer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 pairs, 1 round")
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON ({RESULTS})")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    if args.quick:
        args.pairs, args.rounds = 4, 1
    out = args.out or (None if args.quick else RESULTS)

    versions = {name: version(name) for name in ("torch", "transformers", "trl", "accelerate")}
    machine = (
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
        f"{args.threads} torch thread(s) per trainer"
    )
    print(machine, versions)
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        root = Path(tmp)
        files, stats = prepare(root, args.pairs, args.seed)
        print(
            f"{stats['pairs']} {DATASET}-like pairs (+{WARMUP_PAIRS} warm-up), median pair "
            f"{stats['median_pair']:.0f} tokens, median P/mean(C,R) {stats['median_ratio']:.2f}, "
            f"tokens {stats['tokens']}; {args.rounds} round(s)"
        )
        for round_ in range(args.rounds):
            for setting in SETTINGS:
                for trainer in TRAINERS:
                    workdir = root / f"{round_}-{setting}-{trainer}"
                    workdir.mkdir()
                    spec = RunSpec(
                        trainer=trainer,
                        setting=setting,
                        workdir=str(workdir),
                        result=str(workdir / "result.json"),
                        threads=args.threads,
                        seed=args.seed,
                        **files,
                    )
                    print(f"round {round_} {setting} {trainer} ...", flush=True)
                    result = run_child(spec, workdir / "stderr.log")
                    result |= {"round": round_, "setting": setting, "trainer": trainer}
                    runs.append(result)
                    if "error" in result:
                        print("  failed:", result["error"], *result["stderr_tail"], sep="\n  ")
                    else:
                        print(
                            f"  {result['pairs']} pairs in {result['timed_steps']} timed step(s): "
                            f"{result['pairs/s cpu']:.3f} pairs/s cpu, "
                            f"{result['pairs/s wall']:.3f} wall, "
                            f"{result['positions'] / result['pairs']:.0f} positions/pair, "
                            f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                            flush=True,
                        )
    summary = summarize(runs, args.pairs)
    print_summary(summary)
    seconds = time.perf_counter() - start
    print(f"\ntotal {seconds:.0f} s")
    if out is None:
        print("results not written (--quick; give --out to write them)")
        return
    results = {
        "machine": machine,
        "versions": versions,
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("child", "out")},
            "backend": BACKEND,
            "pairs_per_step": PAIRS_PER_STEP,
            "trl_micro_batch": TRL_MICRO_BATCH,
            "trl_grad_accum": TRL_GRAD_ACCUM,
            "warmup_pairs": WARMUP_PAIRS,
            "lr": LR,
            "max_len": MAX_LEN,
            "model": MODEL,
        },
        "pairs": stats,
        "summary": summary,
        "runs": runs,
        "seconds": seconds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
