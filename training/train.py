"""DPO on packed rows: the trainer, in pieces read top to bottom (torchtune's shape).

    from training.batch import PackedRows
    from training.train import TrainConfig, train
    final = train(TrainConfig(out_dir=Path("runs/x"), steps=100), reader, model)

`data` is a shard reader (`pipeline.shards.open_shards`) or `PackedRows` held in memory:
the rows together with their layout, block size, max_len and shard key.

- `check_config`: the settings alone, before any data or model is read (the recipe,
  `training/recipe.py`, calls it first; `train` does for a caller that did not).
- `setup`: check the data and model once (every row's length and token ids, every pair's
  stored reference log-probs; rank 0 decides for all ranks), refuse a checkpoint of
  another run, prepare the policy (DDP or FSDP2, `training/parallel.py`), the reference (a
  frozen copy sharded the same way, stored log-probs, or a cache computed now by all
  ranks), the eval set's reference log-probs, the optimizer, and resume. A reference-free
  loss (SimPO, ORPO: `is_reference_free`) gets no reference at all: no copy, no stored or
  computed log-probs, for training or evaluation.
- `train_step`: one optimizer step over `grad_accum` micro-batches; the reference pass runs
  first (unless the loss is reference-free), under `torch.inference_mode`, in the training
  precision.
- `evaluate`: the loss and metrics on the eval set, each rank scoring its share.
- `fit`: the loop: metrics, evaluation every `eval_every` steps and at the end, progress
  and checkpoints.
- `export`: the final Hugging Face folder (rank 0, from the gathered full weights).

`model` is the initial policy; it is also the reference unless stored reference log-probs
are given or the loss is reference-free. With `--lora-rank` (`training/lora.py`, Hu et al.
2021, arXiv:2106.09685) `setup` freezes it and adds adapters in place (before compiling and
DDP/FSDP), the optimizer holds the adapters alone, and the live reference is the same
model with its adapters off (`adapters_off`): no copy of the weights. Its checkpoints hold
the adapters (PEFT's layout) rather than the whole frozen base, which the run record's
fingerprint names, and `final/` is the merged model plus `final/adapter/` (or, with
`--no-lora-merge`, the adapter alone). Dropout masks are drawn from the global generator
seeded per (seed, step, micro-batch slice), so a resume, and any split of the global batch
over processes and micro-batches, draws the same masks.

Multi-process: launch the calling script with `torchrun --nproc_per_node N`; `train` joins
torchrun's process group (gloo on CPU, NCCL on CUDA) unless the caller did.
Outputs under `out_dir`:

    metrics.jsonl                one line per optimizer step (rank 0), eval/ metrics on
                                 the steps that evaluate
    checkpoints/step_000010/     HF folder + optimizer/ (DCP, sharded) + trainer_state.json
                                 (LoRA: adapter_config.json + adapter_model.safetensors
                                 in place of the HF folder)
    final/                       HF folder (config.json, safetensors, tokenizer files,
                                 generation_config.json, README.md: a model card)
    final/adapter/               LoRA: the adapter as PEFT loads it (+ its card)

A global step covers `batch_rows * grad_accum * world_size` packed rows. Packed rows hold
different numbers of pairs, so the loss is the *sum* of per-pair losses divided by the
number of pairs in the global step: every pair weighs the same whatever row, micro-batch or
rank it lands in, exactly as in an unpacked DPO batch of those pairs. The row order is a
pure function of (seed, step), so resuming from a checkpoint replays exactly the same steps;
a checkpoint records the settings, the shard key, the initial model's fingerprint, the init
seed and the reference's key, and a rerun that differs in any of them is refused.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from core.atomic import atomic_directory
from core.progress import progress
from data_contracts.packed_row import LAYOUTS
from training.attention import FLAT_BACKENDS
from training.batch import Batch, PackedData, check_rows, collate
from training.checkpoint import (
    README_NAME,
    companion_files,
    export_config,
    model_fingerprint,
    save_pretrained,
    write_companions,
    write_pretrained,
)
from training.device import (
    autocast,
    backend_problems,
    check_precision,
    flex_problems,
    resolve_backend,
    resolve_device,
    use_gpu_defaults,
)
from training.export_files import ExportTokenizer
from training.logps import pair_logps, table_logps
from training.lora import (
    LoraSettings,
    adapter_config,
    adapters_off,
    add_adapters,
    check_adapters,
    has_adapters,
    initial_adapters,
    lora_settings,
    read_adapter,
    resolve_targets,
    write_adapter,
)
from training.losses import ChosenNLL, PairLogps, PreferenceLoss, build_loss
from training.model import CausalLM
from training.parallel import (
    adapter_tensors,
    clip_grad_norm,
    fill_tensors,
    fill_weights,
    gradient_sync,
    is_sharded,
    load_optimizer,
    merged_tensors,
    prepare,
    save_optimizer,
    write_full_weights,
)
from training.ranks import agree, from_rank0, process_group, world_and_rank
from training.reference import (
    REFERENCE_VERSION,
    ReferenceCache,
    ReferenceKey,
    ReferenceLogps,
    cached_reference_logps,
    compute_reference_logps,
)
from training.report import METRICS
from training.train_config import Backend, TrainConfig

METRICS_NAME = "metrics.jsonl"
STATE_NAME = "trainer_state.json"
OPTIMIZER_DIR = "optimizer"
ADAPTER_DIR = "adapter"  # final/adapter/: a LoRA run's adapter beside the merged model
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
    "activation_checkpointing",
    "logits_chunk",
    "compile",  # (with LoRA dropout, inductor draws other masks than eager from the seed)
    "eval_every",
    "report_to",
    "lora_merge",  # how final/ is written, not what trains
}


# -----------------------------------------------------------------------------
# Settings: fail fast, before any work


def check_config(config: TrainConfig, device: torch.device) -> None:
    """Refuse settings that cannot train on `device`, before loading any data or model.

    Raises:
        ValueError: every problem named at once; a bad precision or loss setting.
    """
    problems = backend_problems(
        resolve_backend(config.backend, device, config.precision), device, config.precision
    )
    if (config.out_dir / "final").exists():
        problems.append(f"{config.out_dir / 'final'} exists; use a new --out")
    if problems:
        raise ValueError("cannot train: " + "; ".join(problems))
    check_precision(config.precision, device)
    loss_of(config)  # raises on bad settings


def loss_of(config: TrainConfig) -> PreferenceLoss:
    """The run's loss module, with the hyperparameters of `config`.

    Raises:
        ValueError: a loss setting the loss does not take (label smoothing).
    """
    return build_loss(
        config.loss, config.beta, config.label_smoothing, config.simpo_gamma, config.orpo_lambda
    )


def _data_problems(
    config: TrainConfig,
    data: PackedData,
    model: CausalLM,
    device: torch.device,
    references: list[ReferenceLogps | ReferenceCache],
) -> list[str]:
    """What keeps these rows, this model and these stored log-probs from training (the
    settings alone are `check_config`'s)."""
    problems = []
    if resolve_backend(config.backend, device, config.precision) == "flex":
        problems += flex_problems(data.block_size, model.config.dim_per_head, device)
    for reference in references:
        problems += _reference_problems(reference.key, config)
    if data.layout not in LAYOUTS:
        problems.append(f"unknown layout {data.layout!r} (choose one of {LAYOUTS})")
    if not len(data):
        problems.append("no rows to train on")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        problems.append("train fp32 parameters (load with dtype=float32; bf16 is autocast)")
    return problems


def _reference_problems(key: ReferenceKey, config: TrainConfig) -> list[str]:
    """Stored log-probs computed in another precision (or by other code) than this run's
    would make the policy/reference ratio differ from 1 at step 0."""
    problems = []
    if key.precision != config.precision:
        problems.append(
            f"the reference log-probs were computed in {key.precision}, the run trains in "
            f"{config.precision} (--precision); compute them in {config.precision}"
        )
    if key.reference_version != REFERENCE_VERSION:
        problems.append(
            f"the reference log-probs are of reference code version {key.reference_version}, "
            f"this prefpack computes version {REFERENCE_VERSION}; compute them again"
        )
    return problems


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
# Setup


@dataclass
class Run:
    """Everything a run holds between steps, made once by `setup`.

    Attributes:
        data: the training rows and their packing settings.
        model: the policy's parameters (sharded in place under FSDP); export reads it.
        policy: what the forward pass runs on: `model`, or its DDP wrapper.
        ref_model: the frozen initial policy when no stored log-probs are given (None
            too for a reference-free loss, and for LoRA, whose live reference is `model`
            with its adapters off).
        reference: stored reference log-probs, looked up by pair id.
        eval_data, eval_reference: the eval rows (None: no evaluation) and their
            reference log-probs (None too for a reference-free loss).
        backend: the resolved attention backend.
        start: steps already done (from a checkpoint).
        record: the settings a checkpoint stores, to refuse a mismatched resume.
        lora: the adapters' settings (None: full fine-tuning).
        base_model: what a LoRA adapter's `base_model_name_or_path` names (the --model
            folder; None for a model not read from one).
    """

    config: TrainConfig
    data: PackedData
    device: torch.device
    backend: Backend
    world: int
    rank: int
    model: CausalLM
    policy: nn.Module | None
    ref_model: nn.Module | None
    reference: ReferenceLogps | None
    eval_data: PackedData | None
    eval_reference: ReferenceLogps | None
    optimizer: torch.optim.Optimizer
    loss_fn: PreferenceLoss
    sft: ChosenNLL | None
    record: dict[str, Any]
    start: int
    lora: LoraSettings | None = None
    base_model: str | None = None

    @property
    def rows_per_step(self) -> int:
        return self.config.batch_rows * self.config.grad_accum * self.world


def _run_record(
    config: TrainConfig, data: PackedData, rows_per_step: int, inputs: dict[str, Any]
) -> dict[str, Any]:
    """What a checkpoint stores about its run (JSON types), to refuse a mismatched resume:
    the settings, the data's shape and the inputs (`_inputs`)."""
    settings = {  # as JSON reads them back: tuples (adam_betas, lora_targets) are lists
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
    settings["out_dir"] = str(config.out_dir)
    shape = {
        "layout": data.layout,
        "rows": len(data),
        "block_size": data.block_size,
        "rows_per_step": rows_per_step,
    }
    return {"config": settings, "data": shape, "inputs": inputs}


def _inputs(
    data: PackedData,
    model: CausalLM,
    init_seed: int | None,
    reference: ReferenceLogps | ReferenceCache | None,
    reference_free: bool,
) -> dict[str, Any]:
    """The run's inputs: shards, the initial model's content fingerprint (taken before any
    step or resume changes the weights), its init seed, and the reference: `none` (a
    reference-free loss), `live` (the frozen initial model) or the stored log-probs' key,
    wherever they are read from."""
    if reference_free:
        used: str | dict[str, str] = "none"
    elif reference is None:
        used = "live"
    else:
        used = dataclasses.asdict(reference.key)
    return {
        "shard_key": data.key,
        "model_fingerprint": model_fingerprint(model),
        "init_seed": init_seed,
        "reference": used,
    }


def _fit_batch_rows(config: TrainConfig, num_rows: int, world: int, rank: int) -> TrainConfig:
    """`config` with batch_rows at most each process's share of the rows, rounded up
    (warned), so a global step never holds the same rows many times over."""
    fits = max(1, -(-num_rows // world))
    if config.batch_rows <= fits:
        return config
    if rank == 0:
        print(
            f"warning: --batch-rows {config.batch_rows} is more than the {fits} rows per "
            f"process there are; using {fits}",
            file=sys.stderr,
        )
    return dataclasses.replace(config, batch_rows=fits)


def setup(
    config: TrainConfig,
    data: PackedData,
    model: CausalLM,
    reference: ReferenceLogps | ReferenceCache | CausalLM | None = None,
    init_seed: int | None = None,
    eval_data: PackedData | None = None,
    eval_reference: ReferenceLogps | ReferenceCache | None = None,
    base_model: str | None = None,
) -> Run:
    """Check the data and model (the settings were checked by `check_config`), refuse a
    checkpoint this run cannot continue, check every row (and every pair against stored
    log-probs) once, prepare policy and reference, build the optimizer, and resume.
    Arguments as for `train`; under torchrun, inside the process group.

    Raises:
        ValueError: a reference (model or log-probs) given with a reference-free loss, a
            reference model given with LoRA, a LoRA target the model does not have; as
            for `train`.
    """
    loss_fn = loss_of(config)
    reference_free = loss_fn.is_reference_free
    lora = lora_settings(config)
    if reference_free and (reference is not None or eval_reference is not None):
        raise ValueError(
            f"loss {config.loss} is reference-free: it takes no reference model or log-probs"
        )
    if lora is not None:
        resolve_targets(model, lora.targets)  # raises naming the model's projections
    ref_model = reference if isinstance(reference, nn.Module) else None
    if ref_model is not None and lora is not None:
        raise ValueError(
            "--lora-rank: the live reference is the policy with its adapters off; give no "
            "reference model (a second copy of the weights is what LoRA saves)"
        )
    if ref_model is not None:  # a live reference, given (a sharded policy is not copied)
        if model_fingerprint(ref_model) != model_fingerprint(model):
            raise ValueError(
                "the reference model given is not the initial policy (other weights); the "
                "live reference must be the policy's starting point"
            )
        reference = None
    elif reference is None and is_sharded(model) and not reference_free and lora is None:
        raise ValueError(
            "a policy loaded sharded cannot be copied into the live reference: give the "
            "reference model loaded the same way, or stored log-probs"
        )
    if is_sharded(model) and lora is not None and not has_adapters(model):
        raise ValueError(
            "--lora-rank: a policy loaded sharded must get its adapters before sharding "
            "(training.parallel.load_sharded's lora)"
        )
    world, rank = world_and_rank()
    device = resolve_device(config.device)
    stored = [r for r in (reference, eval_reference) if r is not None]
    problems = _data_problems(config, data, model, device, stored)
    if eval_data is not None and not len(eval_data):
        problems.append("no rows to evaluate on")
    if problems:
        raise ValueError("cannot train: " + "; ".join(problems))
    config = _fit_batch_rows(config, len(data), world, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_gpu_defaults(device)
    rows_per_step = config.batch_rows * config.grad_accum * world
    # The base's fingerprint (adapters are never part of it), before any step or resume.
    inputs = _inputs(data, model, init_seed, reference, reference_free)
    record = _run_record(config, data, rows_per_step, inputs)
    checkpoint = _agreed_checkpoint(config.out_dir, record)
    mc = model.config
    check_rows(data, data.max_len, mc.vocab_size)
    if eval_data is not None:
        check_rows(eval_data, eval_data.max_len, mc.vocab_size)
    if isinstance(reference, ReferenceLogps):
        reference.check_covers(data)
    config.out_dir.mkdir(parents=True, exist_ok=True)

    # The live reference is the initial policy: copy it before resuming changes the weights
    # (LoRA: no copy, the frozen base is the reference with the adapters off).
    if reference is None and not reference_free and lora is None:
        if ref_model is None:
            ref_model = copy.deepcopy(model)
        ref_model = ref_model.requires_grad_(False).eval()
        ref_model = prepare(ref_model, config.parallel, device, config.precision, False)
    if lora is not None:
        if has_adapters(model):  # added before sharding (`load_sharded`)
            check_adapters(model, lora)
        else:  # before compile and DDP/FSDP, which must see the adapters
            add_adapters(model, lora)
            fill_tensors(model, initial_adapters(model, lora.seed))
    model.activation_checkpointing = config.activation_checkpointing
    model.logits_chunk = config.logits_chunk
    backend = resolve_backend(config.backend, device, config.precision)
    if config.compile:  # flat batches change length every step: dynamic shapes from the start
        model.compile_blocks(dynamic=True if backend in FLAT_BACKENDS else None)
    policy = prepare(model, config.parallel, device, config.precision)
    # Stored log-probs computed now, by all ranks, with the initial weights (LoRA: the base).
    initial = (ref_model if ref_model is not None else model, inputs["model_fingerprint"])
    with adapters_off(model):
        if isinstance(reference, ReferenceCache):
            reference = _initial_logps(initial, data, reference, config, backend, device)
        if eval_data is not None and not reference_free:
            eval_reference = _initial_logps(
                initial, eval_data, eval_reference, config, backend, device
            )
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],  # LoRA: the adapters alone
        lr=config.lr,
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
        fused=device.type == "cuda",  # one kernel for every parameter's update (unrun here)
    )
    run = Run(
        config=config,
        data=data,
        device=device,
        backend=backend,
        world=world,
        rank=rank,
        model=model,
        policy=policy,
        ref_model=ref_model,
        reference=reference,
        eval_data=eval_data,
        eval_reference=eval_reference,
        optimizer=optimizer,
        loss_fn=loss_fn,
        sft=ChosenNLL(config.sft_weight) if config.sft_weight else None,
        record=record,
        start=0,
        lora=lora,
        base_model=base_model,
    )
    if checkpoint is not None:
        run.start = _resume(run, checkpoint)
    elif rank == 0:  # from step 0: lines of a run that died before its first checkpoint go
        (config.out_dir / METRICS_NAME).unlink(missing_ok=True)
    return run


def _initial_logps(
    initial: tuple[nn.Module, str],
    data: PackedData,
    stored: ReferenceLogps | ReferenceCache | None,
    config: TrainConfig,
    backend: Backend,
    device: torch.device,
) -> ReferenceLogps:
    """The reference log-probs of `data`: given, read from (or computed into) a cache, or
    computed now in memory with the initial weights (`initial`: a model holding them and
    their fingerprint), on all ranks; checked to cover every pair of `data` (a cached file
    reused under a key that other rows share)."""
    model, fingerprint = initial
    if isinstance(stored, ReferenceLogps):
        stored.check_covers(data)
        return stored
    kwargs = {
        "block_size": data.block_size,
        "backend": backend,
        "batch_rows": config.batch_rows,
        "device": device,
        "progress": config.progress,
        "max_len": data.max_len,
    }
    if isinstance(stored, ReferenceCache):
        logps = cached_reference_logps(model, data, data.layout, stored, **kwargs)
    else:
        table = compute_reference_logps(
            model, data, data.layout, precision=config.precision, **kwargs
        )
        key = ReferenceKey(fingerprint, data.key or "", config.precision)
        logps = ReferenceLogps(table, key)
    logps.check_covers(data)
    return logps


# -----------------------------------------------------------------------------
# Checkpoints


def _latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted((out_dir / "checkpoints").glob(f"step_*/{STATE_NAME}"))
    return done[-1].parent if done else None


def _barrier(run: Run) -> None:
    if run.world > 1:
        dist.barrier()


def save_checkpoint(run: Run, step: int) -> None:
    """HF folder (rank 0) + optimizer state (DCP, every rank its shard) + trainer state,
    all written into rank 0's `atomic_directory`, so the folder appears complete or not at
    all. A LoRA run writes its adapter (PEFT's layout, fp32) where the HF folder goes: the
    frozen base is the run's input, named by the fingerprint in the trainer state. A
    collective: every rank calls it."""
    final = run.config.out_dir / "checkpoints" / f"step_{step:06d}"
    with atomic_directory(final) if run.rank == 0 else contextlib.nullcontext() as own:
        tmp = Path(from_rank0(lambda: str(own)))  # rank 0's temp directory, on every rank
        if run.lora is not None:
            _write_adapter(run, tmp, torch.float32)
        else:
            write_full_weights(
                run.model,
                run.rank,
                lambda weights: write_pretrained(run.model, tmp, tensors=weights),
            )
        _barrier(run)
        save_optimizer(run.model, run.optimizer, tmp / OPTIMIZER_DIR)
        _barrier(run)
        if run.rank == 0:
            state = json.dumps({**run.record, "step": step}, indent=2) + "\n"
            (tmp / STATE_NAME).write_text(state)
    _barrier(run)


def _checkpoint_to_resume(out_dir: Path, record: dict[str, Any]) -> Path | None:
    """The latest checkpoint, if any, once it is known to continue this very run.

    Raises:
        ValueError: the checkpoint's settings or inputs differ from this run's, each
            difference named with both values, before any work.
    """
    ckpt = _latest_checkpoint(out_dir)
    if ckpt is None:
        return None
    saved = json.loads((ckpt / STATE_NAME).read_text())
    changed = [
        f"{part}.{k} was {_as_json(saved.get(part, {}).get(k))}, now {_as_json(value)}"
        for part in ("data", "inputs", "config")
        for k, value in record[part].items()
        if not (part == "config" and k in _RESUMABLE_CHANGES)
        and saved.get(part, {}).get(k) != value
    ]
    if changed:
        raise ValueError(
            f"{ckpt}: cannot resume, this run differs from the checkpoint's: "
            + "; ".join(changed)
            + "; use another --out to start a new run"
        )
    return ckpt


def _agreed_checkpoint(out_dir: Path, record: dict[str, Any]) -> Path | None:
    """`_checkpoint_to_resume` as rank 0 sees it, on every rank: the ranks of a job on a
    shared filesystem resume from one checkpoint (or refuse alike), whatever each one's
    directory listing shows at that moment."""

    def look() -> tuple[Path | None, str | None]:
        try:
            return _checkpoint_to_resume(out_dir, record), None
        except ValueError as err:
            return None, str(err)

    found, problem = from_rank0(look)
    agree(lambda: problem)
    return found


def _as_json(value: object) -> str:
    """A recorded value for a message: JSON, so that absent (null) and dicts read plainly."""
    return json.dumps(value, sort_keys=True)


def _resume(run: Run, ckpt: Path) -> int:
    """Load `ckpt` (checked by `_checkpoint_to_resume`) and return the steps it holds."""
    out_dir = run.config.out_dir
    saved = json.loads((ckpt / STATE_NAME).read_text())
    if run.lora is not None:  # the base is this run's own (its fingerprint was checked)
        fill_tensors(run.model, read_adapter(ckpt, run.model))
    else:
        fill_weights(run.model, ckpt)
    load_optimizer(run.model, run.optimizer, ckpt / OPTIMIZER_DIR)
    step = int(saved["step"])
    metrics = out_dir / METRICS_NAME
    if run.rank == 0 and metrics.exists():  # drop lines of steps the checkpoint does not hold
        kept = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= step]
        metrics.write_text("".join(ln + "\n" for ln in kept))
    return step


# -----------------------------------------------------------------------------
# One optimizer step


def _reference_logps(run: Run, batch: Batch) -> PairLogps | None:
    """Stored log-probs, or the frozen model's (LoRA: the policy's own base, adapters
    off), computed without any autograd state; None for a reference-free loss."""
    if run.loss_fn.is_reference_free:
        return None
    if run.reference is not None:
        return run.reference.lookup(batch.pair_ids, run.device)
    if run.ref_model is not None:
        with torch.inference_mode():
            ref = pair_logps(run.ref_model, batch)
    else:
        # The unwrapped module (DDP's hooks are for the training pass); no_grad rather than
        # inference mode under FSDP2, whose gathered parameters the training pass reuses.
        no_autograd = torch.no_grad() if is_sharded(run.model) else torch.inference_mode()
        with adapters_off(run.model), no_autograd:
            ref = pair_logps(run.model, batch)
    # Clones outside inference mode are ordinary tensors the loss may save for backward.
    return PairLogps(chosen=ref.chosen.clone(), rejected=ref.rejected.clone())


@contextlib.contextmanager
def _dropout_masks(run: Run, step: int, micro: int) -> Iterator[None]:
    """Inside the block, the global torch generator is seeded by (seed, step, the
    micro-batch's slice of the global batch), and restored after: LoRA's dropout masks are
    then a function of the rows' place in the run, so a resumed run and any split of the
    global batch over processes and micro-batches (slice `micro * world + rank`) draw the
    masks the uninterrupted one-process run drew. Nothing else draws; without LoRA
    dropout the generator is left alone."""
    if run.lora is None or not run.lora.dropout:
        yield
        return
    part = micro * run.world + run.rank
    seed = int(np.random.SeedSequence([run.config.seed, step, part]).generate_state(1)[0])
    cuda = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def train_step(run: Run, step: int) -> dict[str, float]:
    """Run global step `step` (0-based) on this rank and return its metrics (all ranks')."""
    config, device, data = run.config, run.device, run.data
    t0 = time.perf_counter()
    lr = learning_rate(step, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_rows = global_step_rows(step, len(data), run.rows_per_step, config.seed)
    pairs_in_step = sum(data[int(i)].num_pairs for i in step_rows)
    # micro-batch m of rank r: a fixed slice, so any (world, grad_accum) split of the same
    # global batch sees the same rows.
    slices = step_rows.reshape(config.grad_accum, run.world, config.batch_rows)
    sums = torch.zeros(8, dtype=torch.float64, device=device)  # summed over pairs
    for micro in range(config.grad_accum):
        micro_rows = [data[i] for i in slices[micro, run.rank].tolist()]
        batch = collate(
            micro_rows, data.layout, run.backend, data.block_size, device, pad_to=data.max_len
        )
        last = micro == config.grad_accum - 1
        with autocast(device, config.precision), _dropout_masks(run, step, micro):
            ref = _reference_logps(run, batch)
            with gradient_sync(run.policy, enabled=last or run.world == 1):
                logps = pair_logps(run.policy, batch)
                losses, chosen_rewards, rejected_rewards = run.loss_fn(logps, ref)
                if run.sft is not None:
                    losses = losses + run.sft(logps)
                # DDP and FSDP average gradients over ranks: scale by world for sum / pairs.
                (losses.sum() * run.world / pairs_in_step).backward()
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
    grad_norm = clip_grad_norm(run.model, config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)

    if run.world > 1:
        dist.all_reduce(sums)
    (loss, chosen, rejected, accurate, logp_c, logp_r, pairs, tokens) = sums.tolist()
    seconds = time.perf_counter() - t0
    return {
        "step": step + 1,
        "lr": lr,
        "loss": loss / pairs,
        "rewards/chosen": chosen / pairs,
        "rewards/rejected": rejected / pairs,
        "rewards/margins": (chosen - rejected) / pairs,
        "rewards/accuracies": accurate / pairs,
        "logps/chosen": logp_c / pairs,
        "logps/rejected": logp_r / pairs,
        "grad_norm": grad_norm,
        "pairs": int(pairs),
        "tokens": int(tokens),
        "seconds": seconds,
        "tokens/s": tokens / seconds,
        "pairs/s": pairs / seconds,
    }


# -----------------------------------------------------------------------------
# Evaluation


def evaluate(run: Run) -> dict[str, float]:
    """The run's loss and metrics on its eval set now, as TRL names them with `eval/`.

    Every rank scores its share of the eval rows and gets every pair's log-probs
    (`compute_reference_logps` under the policy, no gradients, in the training
    precision), so the numbers, means over the eval pairs, are the same on every rank and
    for any number of processes. A reference-free loss scores them alone; the others
    against the eval set's reference log-probs. A collective: every rank calls it.
    """
    assert run.eval_data is not None
    data, config = run.eval_data, run.config
    t0 = time.perf_counter()
    table = compute_reference_logps(
        run.model,
        data,
        data.layout,
        block_size=data.block_size,
        backend=run.backend,
        batch_rows=config.batch_rows,
        device=run.device,
        precision=config.precision,
        progress=False,
        max_len=data.max_len,
    )
    run.model.train()
    policy = table_logps(table, data)
    ref = None  # a reference-free loss has none
    if run.eval_reference is not None:
        ref = run.eval_reference.lookup(table.column("pair_id").to_pylist())
    with torch.no_grad():
        losses, chosen, rejected = run.loss_fn(policy, ref)
        if run.sft is not None:
            losses = losses + run.sft(policy)
    values = {
        "loss": losses,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "logps/chosen": policy.chosen,
        "logps/rejected": policy.rejected,
    }
    metrics = {f"eval/{name}": float(values[name].double().mean()) for name in METRICS}
    return metrics | {"eval/pairs": table.num_rows, "eval/seconds": time.perf_counter() - t0}


def _evaluates_at(run: Run, step: int) -> bool:
    """Whether the run evaluates after `step` (1-based): every `eval_every`, and last."""
    every = run.config.eval_every
    return run.eval_data is not None and (
        step == run.config.steps or (every > 0 and step % every == 0)
    )


# -----------------------------------------------------------------------------
# The loop and the export


def metrics_line(metrics: dict[str, float]) -> str:
    """One strict JSON line (a non-finite number becomes null)."""
    clean = {
        k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in metrics.items()
    }
    return json.dumps(clean, allow_nan=False) + "\n"


def fit(run: Run, on_step: Callable[[dict[str, float]], None] | None = None) -> None:
    """Train from `run.start` to `config.steps`: each step's metrics line (with the eval
    metrics on the steps that evaluate) on rank 0, checkpoints every `checkpoint_every`.

    Raises:
        ValueError: the loss or the gradient norm is not finite (the run diverged).
    """
    config = run.config
    bar = progress(
        range(run.start, config.steps),
        initial=run.start,
        total=config.steps,
        desc="train",
        unit="step",
        enabled=config.progress and run.rank == 0,
    )
    shown: dict[str, str] = {}
    for step in bar:
        metrics = train_step(run, step)
        finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        if finite and _evaluates_at(run, step + 1):
            metrics |= evaluate(run)
        if run.rank == 0:
            with (config.out_dir / METRICS_NAME).open("a") as f:
                f.write(metrics_line(metrics))
            shown |= {
                "loss": f"{metrics['loss']:.4f}",
                "acc": f"{metrics['rewards/accuracies']:.3f}",
            }
            if "eval/loss" in metrics:
                shown |= {
                    "eval_loss": f"{metrics['eval/loss']:.4f}",
                    "eval_acc": f"{metrics['eval/rewards/accuracies']:.3f}",
                }
            bar.set_postfix(**shown)
            if on_step is not None and finite:
                on_step(metrics)
        if not finite:
            raise ValueError(
                f"step {step + 1}: loss {metrics['loss']}, gradient norm "
                f"{metrics['grad_norm']}: training diverged and stopped, no final/ "
                f"written; lower --lr (now {config.lr:g}) or check the data"
            )
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save_checkpoint(run, step + 1)


def export(
    run: Run,
    tokenizer: str | Path | ExportTokenizer | None = None,
    card: str | None = None,
    adapter_card: str | None = None,
) -> Path:
    """Write `out_dir/final` from the full weights (rank 0; a collective under FSDP), with
    the tokenizer files (`training.checkpoint.save_pretrained`) and the model card `card`
    (README.md) when given.

    A LoRA run writes `final/` as the merged model (base + scaling B A, the base's
    architecture) and the adapter in `final/adapter/` (PEFT's layout, with `adapter_card`
    as its README.md); with `--no-lora-merge`, `final/` is the adapter alone beside the
    tokenizer files, generation_config.json and `card` (no config.json: it is not a
    model folder).
    """
    final = run.config.out_dir / "final"
    dtype = getattr(torch, run.config.export_dtype)
    if run.lora is None:
        write_full_weights(
            run.model,
            run.rank,
            lambda weights: save_pretrained(
                run.model, final, tokenizer, dtype, tensors=weights, readme=card
            ),
        )
        _barrier(run)
        return final
    with atomic_directory(final) if run.rank == 0 else contextlib.nullcontext() as own:
        tmp = Path(from_rank0(lambda: str(own)))  # rank 0's temp directory, on every rank
        if run.config.lora_merge:
            write_full_weights(
                run.model,
                run.rank,
                lambda weights: write_pretrained(
                    run.model, tmp, tokenizer, dtype, tensors=weights, readme=card
                ),
                merged_tensors(run.model),
            )
            if run.rank == 0:
                (tmp / ADAPTER_DIR).mkdir()
            _write_adapter(run, tmp / ADAPTER_DIR, dtype, adapter_card)
        else:
            extra = {}  # the tokenizer files and card, first: they may fail
            if run.rank == 0:
                extra = companion_files(export_config(run.model, dtype), tokenizer, card)
            _write_adapter(run, tmp, dtype)
            if run.rank == 0:
                write_companions(tmp, extra, tokenizer)
        _barrier(run)
    _barrier(run)
    return final


def _write_adapter(run: Run, folder: Path, dtype: torch.dtype, card: str | None = None) -> None:
    """The run's adapter in PEFT's layout into the existing `folder` (rank 0; a collective:
    the adapters are gathered one at a time), with `card` as README.md when given."""
    assert run.lora is not None
    config = adapter_config(run.model, run.lora, run.base_model)

    def write(tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        write_adapter(folder, config, tensors, dtype)
        if card is not None:
            (folder / README_NAME).write_text(card)

    write_full_weights(run.model, run.rank, write, adapter_tensors(run.model))


def release(run: Run) -> None:
    """Drop the run's DDP wrappers while the process group is still joined: freed after
    it, DDP's reducer runs gloo's blocking destructor with the GIL held, which deadlocks
    against gloo's worker threads (seen in 1 of ~10 runs)."""
    run.policy = run.ref_model = None


def train(
    config: TrainConfig,
    data: PackedData,
    model: CausalLM,
    reference: ReferenceLogps | ReferenceCache | CausalLM | None = None,
    init_seed: int | None = None,
    eval_data: PackedData | None = None,
    eval_reference: ReferenceLogps | ReferenceCache | None = None,
    tokenizer: str | Path | ExportTokenizer | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    base_model: str | None = None,
) -> Path:
    """Train `model` with the configured preference loss and export it.

    Args:
        config: the run's settings.
        data: packed rows with their layout, block size, max_len and shard key (a shard
            reader, or `training.batch.PackedRows`); the key is recorded in checkpoints,
            so that a resume from other shards (of the same row count) is refused.
        model: the initial policy, fp32 on CPU (or loaded sharded by
            `training.parallel.load_sharded`); also the reference unless `reference` or
            a reference-free loss. With `--lora-rank` it gets its adapters in place.
        reference: stored reference log-probs covering every pair of `data`, a cache to
            compute them into first (with the initial weights, on all ranks), or the
            frozen reference model itself (required for a policy loaded sharded, which
            cannot be copied; load it the same way with `trainable=False`; not with LoRA,
            whose live reference is the policy with its adapters off). None for a
            reference-free loss (`--loss simpo` or `orpo`), which refuses one.
        init_seed: the seed of a random init (recorded: a resume must match it); None for
            a loaded model. The model's fingerprint and the reference's key are recorded
            whatever is given.
        eval_data: rows to evaluate on every `eval_every` steps and at the end (None: no
            evaluation).
        eval_reference: their reference log-probs: stored, a cache, or None to compute
            them once now with the initial weights (a reference-free loss: None, and
            nothing is computed).
        tokenizer: what the exported folder's tokenizer files come from
            (`training.checkpoint.save_pretrained`).
        on_step: called on rank 0 with each step's metrics (the metrics.jsonl line), after
            the line is written; a progress sink (e.g. `training.report.PipesReporter`).
        base_model: with `--lora-rank`, the `base_model_name_or_path` the adapter names
            (the folder or hub id `model` was loaded from; None: not named).

    Returns:
        The exported Hugging Face folder `out_dir/final`.

    Raises:
        ValueError: before step 1: unsupported settings (all named at once), a bad row
            (named by index) or a pair without stored log-probs (named with its row),
            a reference given with a reference-free loss, or a checkpoint whose settings
            or inputs differ from this run's.
    """
    device = resolve_device(config.device)
    check_config(config, device)
    with process_group(device):
        run = setup(
            config, data, model, reference, init_seed, eval_data, eval_reference, base_model
        )
        try:
            fit(run, on_step)
            return export(run, tokenizer)
        finally:
            release(run)
