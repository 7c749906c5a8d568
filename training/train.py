"""DPO on packed rows: one training loop, read top to bottom.

    from training.train import TrainConfig, train
    final = train(TrainConfig(out_dir=Path("runs/x"), steps=100), rows, "shared",
                  block_size=128, max_len=2048, model=model, tokenizer=tokenizer_path)

`rows` is any sequence of `PackedRow` (a shard reader). `model` is the initial policy; it
is also the reference unless stored reference log-probs are given. Multi-process data
parallel: launch the calling script with `torchrun --nproc_per_node N`; this function
reads torchrun's environment (gloo on CPU, NCCL on CUDA). Outputs under `out_dir`:

    metrics.jsonl                one line per optimizer step (rank 0)
    checkpoints/step_000010/     HF folder + optimizer.pt + trainer_state.json
    final/                       HF folder (config.json, safetensors, tokenizer files)

A global step covers `batch_rows * grad_accum * world_size` packed rows. Packed rows hold
different numbers of pairs, so the loss is the *sum* of per-pair losses divided by the
number of pairs in the global step: every pair weighs the same whatever row, micro-batch or
rank it lands in, exactly as in an unpacked DPO batch of those pairs. The row order is a
pure function of (seed, step), so resuming from a checkpoint replays exactly the same steps.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data_contracts.packed_row import LAYOUTS, Layout, PackedRow
from training.batch import check_rows, collate
from training.checkpoint import read_weights, save_pretrained
from training.device import autocast, check_precision, resolve_device
from training.logps import pair_logps
from training.losses import ChosenNLL, build_loss
from training.model import CausalLM
from training.reference import ReferenceLogps
from training.train_config import BACKENDS, TrainConfig

METRICS_NAME = "metrics.jsonl"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
# Config fields that may change when a run resumes: they do not change the numbers (the
# global batch, `rows_per_step`, is checked on its own, so the split over processes may
# change). Every other field must match the checkpoint's.
_RESUMABLE_CHANGES = {
    "out_dir",
    "progress",
    "checkpoint_every",
    "device",
    "batch_rows",
    "grad_accum",
}


# -----------------------------------------------------------------------------
# Settings: fail fast, before any work


def _config_problems(config: TrainConfig, device: torch.device) -> list[str]:
    problems = []
    if config.backend not in BACKENDS:
        problems.append(f"unknown backend {config.backend!r} (choose one of {BACKENDS})")
    if config.backend == "flex" and device.type != "cuda":
        problems.append("backend flex trains on CUDA only (no FlexAttention backward on CPU)")
    if min(config.batch_rows, config.grad_accum, config.steps) < 1:
        problems.append("batch_rows, grad_accum and steps must be >= 1")
    if not 0 <= config.warmup_steps <= config.steps:
        problems.append(f"warmup_steps must be in [0, steps], got {config.warmup_steps}")
    if (config.out_dir / "final").exists():
        problems.append(f"{config.out_dir / 'final'} exists; use a new out_dir")
    return problems


def check_config(config: TrainConfig, device: torch.device) -> None:
    """Refuse settings that cannot train on `device`, before loading any data or model.

    Raises:
        ValueError: every problem named at once; a bad precision or loss setting.
    """
    problems = _config_problems(config, device)
    if problems:
        raise ValueError("cannot train: " + "; ".join(problems))
    check_precision(config.precision, device)
    build_loss(config.loss, config.beta, config.label_smoothing)  # raises on bad settings


def _check_settings(
    config: TrainConfig,
    rows: Sequence[PackedRow],
    layout: str,
    max_len: int,
    model: CausalLM,
    device: torch.device,
) -> None:
    problems = _config_problems(config, device)
    if layout not in LAYOUTS:
        problems.append(f"unknown layout {layout!r} (choose one of {LAYOUTS})")
    if not len(rows):
        problems.append("no rows to train on")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        problems.append("train fp32 parameters (load with dtype=float32; bf16 is autocast)")
    window = model.config.sliding_window
    if window is not None and max_len > window:
        problems.append(f"max_len {max_len} exceeds the model's sliding window {window}")
    if problems:
        raise ValueError("cannot train: " + "; ".join(problems))
    check_config(config, device)


# -----------------------------------------------------------------------------
# Data order and learning rate: pure functions of the step


@lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def global_step_rows(step: int, num_rows: int, rows_per_step: int, seed: int) -> np.ndarray:
    """Row indices of global step `step`: the data is an endless stream of epochs, each a
    fresh seeded permutation, cut into consecutive steps (no row is dropped)."""
    stream = np.arange(step * rows_per_step, (step + 1) * rows_per_step)
    epoch, pos = np.divmod(stream, num_rows)
    out = np.empty(rows_per_step, dtype=np.int64)
    for e in np.unique(epoch):
        out[epoch == e] = _epoch_order(seed, int(e), num_rows)[pos[epoch == e]]
    return out


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio * lr`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


# -----------------------------------------------------------------------------
# Checkpoints


def _run_record(
    config: TrainConfig, layout: str, num_rows: int, block_size: int, rows_per_step: int
) -> dict[str, Any]:
    """What a checkpoint stores about its run (JSON types), to refuse a mismatched resume."""
    settings = dataclasses.asdict(config)
    settings["out_dir"] = str(config.out_dir)
    settings["adam_betas"] = list(config.adam_betas)
    data = {
        "layout": layout,
        "rows": num_rows,
        "block_size": block_size,
        "rows_per_step": rows_per_step,
    }
    return {"config": settings, "data": data}


def _latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted((out_dir / "checkpoints").glob(f"step_*/{STATE_NAME}"))
    return done[-1].parent if done else None


def _save_checkpoint(
    out_dir: Path,
    model: CausalLM,
    optimizer: torch.optim.Optimizer,
    step: int,
    record: dict[str, Any],
) -> None:
    """HF folder + optimizer state + trainer state; the folder appears complete or not."""
    final = out_dir / "checkpoints" / f"step_{step:06d}"
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(model, partial)
    torch.save(optimizer.state_dict(), partial / OPTIMIZER_NAME)
    (partial / STATE_NAME).write_text(json.dumps({**record, "step": step}, indent=2) + "\n")
    partial.rename(final)


def _resume(
    out_dir: Path,
    record: dict[str, Any],
    model: CausalLM,
    optimizer: torch.optim.Optimizer,
    rank: int,
) -> int:
    """Load the latest checkpoint (if any) and return the number of steps already done."""
    ckpt = _latest_checkpoint(out_dir)
    if ckpt is None:
        return 0
    saved = json.loads((ckpt / STATE_NAME).read_text())
    changed = [f"data.{k}" for k in record["data"] if record["data"][k] != saved["data"].get(k)]
    changed += [
        f"config.{k}"
        for k in record["config"]
        if k not in _RESUMABLE_CHANGES and record["config"][k] != saved["config"].get(k)
    ]
    if changed:
        raise ValueError(f"{ckpt}: cannot resume, settings differ from the checkpoint: {changed}")
    model.load_state_dict(read_weights(ckpt, model))
    optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_NAME, weights_only=True))
    step = int(saved["step"])
    metrics = out_dir / METRICS_NAME
    if rank == 0 and metrics.exists():  # drop lines of steps the checkpoint does not hold
        kept = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= step]
        metrics.write_text("".join(ln + "\n" for ln in kept))
    return step


# -----------------------------------------------------------------------------
# The run


def train(
    config: TrainConfig,
    rows: Sequence[PackedRow],
    layout: Layout,
    block_size: int,
    max_len: int,
    model: CausalLM,
    reference: ReferenceLogps | None = None,
    tokenizer: str | Path | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> Path:
    """Train `model` with the configured preference loss and export it.

    Args:
        config: the run's settings.
        rows: packed rows (a shard reader or any sequence of `PackedRow`).
        layout: the rows' layout: `shared`, `unshared` or `padded`.
        block_size: the shards' mask block size (used by the flex backend).
        max_len: the shards' row length limit (checked per row).
        model: the initial policy, fp32 on CPU; also the reference unless `reference`.
        reference: stored reference log-probs covering every pair of `rows`.
        tokenizer: tokenizer.json or tokenizer folder copied into every exported folder.
        on_step: called on rank 0 with each step's metrics (the metrics.jsonl line), after
            the line is written; a progress sink (e.g. `training.report.PipesReporter`).

    Returns:
        The exported Hugging Face folder `out_dir/final`.

    Raises:
        ValueError: unsupported settings (all named at once), bad rows (named by index),
            or a checkpoint whose settings differ from `config`.
    """
    # ---- settings and processes -----------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(config.device)
    _check_settings(config, rows, layout, max_len, model, device)
    own_process_group = world > 1 and not dist.is_initialized()
    if own_process_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    rows_per_step = config.batch_rows * config.grad_accum * world
    record = _run_record(config, layout, len(rows), block_size, rows_per_step)

    # ---- model, reference, optimizer ------------------------------------------------
    # The reference is the initial policy: copy it before resuming overwrites the weights.
    ref_model = None
    if reference is None:
        ref_model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    model.to(device).train()
    model.activation_checkpointing = config.activation_checkpointing
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
    )
    loss_fn = build_loss(config.loss, config.beta, config.label_smoothing)
    sft = ChosenNLL(config.sft_weight) if config.sft_weight else None
    start = _resume(config.out_dir, record, model, optimizer, rank)
    policy = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        policy = DistributedDataParallel(model, device_ids=ids)

    # ---- training loop --------------------------------------------------------------
    metrics_file = config.out_dir / METRICS_NAME
    bar = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        desc="train",
        disable=not config.progress or rank != 0,
    )
    for step in bar:
        t0 = time.perf_counter()
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_rows = global_step_rows(step, len(rows), rows_per_step, config.seed)
        pairs_in_step = sum(rows[int(i)].num_pairs for i in step_rows)
        # micro-batch m of rank r: a fixed slice, so any (world, grad_accum) split of the
        # same global batch sees the same rows.
        slices = step_rows.reshape(config.grad_accum, world, config.batch_rows)
        sums = torch.zeros(8, dtype=torch.float64, device=device)  # summed over pairs
        for micro in range(config.grad_accum):
            row_ids = slices[micro, rank].tolist()
            micro_rows = [rows[i] for i in row_ids]
            check_rows(micro_rows, row_ids, max_len, model.config.vocab_size)
            batch = collate(micro_rows, layout, config.backend, block_size, device)
            last = micro == config.grad_accum - 1
            sync = contextlib.nullcontext() if last or world == 1 else policy.no_sync()
            with sync:
                with autocast(device, config.precision):
                    logps = pair_logps(policy, batch)
                    if reference is not None:
                        ref = reference.lookup(batch.pair_ids, device)
                    else:
                        with torch.no_grad():
                            ref = pair_logps(ref_model, batch)
                losses, chosen_rewards, rejected_rewards = loss_fn(logps, ref)
                if sft is not None:
                    losses = losses + sft(logps, batch.chosen_tokens)
                # DDP averages gradients over ranks: scale by world to get sum / pairs.
                (losses.sum() * world / pairs_in_step).backward()
            sums += torch.stack(
                [
                    losses.detach().sum(),
                    chosen_rewards.sum(),
                    rejected_rewards.sum(),
                    (chosen_rewards > rejected_rewards).sum(),
                    logps.chosen.detach().sum(),
                    logps.rejected.detach().sum(),
                    torch.tensor(batch.num_pairs, device=device),
                    torch.tensor(batch.num_tokens, device=device),
                ]
            ).double()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), config.max_grad_norm or float("inf")
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- metrics and checkpoints ------------------------------------------------
        if world > 1:
            dist.all_reduce(sums)
        (loss, chosen, rejected, accurate, logp_c, logp_r, pairs, tokens) = sums.tolist()
        seconds = time.perf_counter() - t0
        metrics = {
            "step": step + 1,
            "lr": lr,
            "loss": loss / pairs,
            "rewards/chosen": chosen / pairs,
            "rewards/rejected": rejected / pairs,
            "rewards/margins": (chosen - rejected) / pairs,
            "rewards/accuracies": accurate / pairs,
            "logps/chosen": logp_c / pairs,
            "logps/rejected": logp_r / pairs,
            "grad_norm": float(grad_norm),
            "pairs": int(pairs),
            "tokens": int(tokens),
            "seconds": seconds,
            "tokens/s": tokens / seconds,
            "pairs/s": pairs / seconds,
        }
        if rank == 0:
            with metrics_file.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=metrics["rewards/accuracies"])
            if on_step is not None:
                on_step(metrics)
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            if rank == 0:
                _save_checkpoint(config.out_dir, model, optimizer, done, record)
            if world > 1:
                dist.barrier()

    # ---- export -----------------------------------------------------------------------
    final = config.out_dir / "final"
    if rank == 0:
        save_pretrained(model, final, tokenizer, dtype=getattr(torch, config.export_dtype))
    if world > 1:
        dist.barrier()
    if own_process_group:
        dist.destroy_process_group()
    return final
