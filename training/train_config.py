"""`TrainConfig` and the names its fields choose from, without importing torch.

Kept apart from `train.py` so that `prefpack --help` and the Dagster layer can build their
flags and configs from these fields without loading torch. Each field's `help` says what
it does; the `prefpack train` flags are made from them (`training/cli.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

Backend = Literal["auto", "dense", "segments", "varlen", "flex"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
Parallel = Literal["ddp", "fsdp"]
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
LossName = Literal["sigmoid", "robust", "ipo", "hinge"]  # training/losses.py `LOSSES`
LOSS_NAMES: tuple[LossName, ...] = get_args(LossName)
ExportDtype = Literal["float32", "bfloat16"]


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the data and the model."""

    out_dir: Path = field(metadata=_help("run folder: metrics.jsonl, checkpoints/, final/"))
    # attention
    backend: Backend = field(
        default="auto",
        metadata=_help(
            "attention: auto (segments on CPU, varlen on CUDA in bf16, flex on CUDA in fp32), "
            "dense (the reference), segments, varlen (FlashAttention, CUDA bf16), flex (CUDA)"
        ),
    )
    # objective
    loss: LossName = field(
        default="sigmoid",
        metadata=_help("sigmoid (DPO/cDPO), robust (rDPO), ipo, hinge (SLiC)"),
    )
    beta: float = field(default=0.1, metadata=_help("KL strength: the usual DPO range is 0.01-0.5"))
    label_smoothing: float = field(
        default=0.0, metadata=_help("cDPO / rDPO label-noise rate (sigmoid and robust)")
    )
    sft_weight: float = field(
        default=0.0,
        metadata=_help("> 0 adds weight * per-token NLL of the chosen response (RPO)"),
    )
    # batching: a global step = batch_rows * grad_accum * world_size packed rows
    batch_rows: int = field(default=4, metadata=_help("packed rows per micro-batch per process"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    # optimisation (AdamW, linear warmup then cosine decay to min_lr_ratio * lr)
    steps: int = field(default=100, metadata=_help("optimizer steps"))
    lr: float = field(
        default=5e-7,
        metadata=_help("peak learning rate; DPO fine-tunes a trained model (Zephyr: 5e-7)"),
    )
    min_lr_ratio: float = field(
        default=0.1, metadata=_help("the cosine decays to this fraction of lr")
    )
    warmup_steps: int = field(default=10, metadata=_help("linear warmup steps"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_help("AdamW betas"))
    max_grad_norm: float = field(
        default=1.0, metadata=_help("gradient clipping; 0 disables it (the norm is still logged)")
    )
    seed: int = field(
        default=0,
        metadata=_help(
            "row order (nothing else is random: no dropout; model init is seeded apart)"
        ),
    )
    # precision and memory
    precision: Precision = field(
        default="fp32", metadata=_help("bf16: autocast on CUDA with fp32 master weights")
    )
    activation_checkpointing: bool = field(
        default=False, metadata=_help("recompute blocks in backward: less memory, more time")
    )
    logits_chunk: int = field(
        default=1024,
        metadata=_help(
            "response tokens per chunk of the output projection + log-softmax, recomputed "
            "in backward, so no (tokens x vocab) logits are held; 0: all at once"
        ),
    )
    compile: bool = field(
        default=False,
        metadata=_help("torch.compile the decoder blocks (attention runs its own kernel)"),
    )
    parallel: Parallel = field(
        default="ddp",
        metadata=_help(
            "under torchrun: ddp (replicated parameters) or fsdp (FSDP2, sharded per block)"
        ),
    )
    device: str = field(
        default="auto", metadata=_help("auto: CUDA (LOCAL_RANK) when present, else CPU")
    )
    # outputs
    checkpoint_every: int = field(
        default=0, metadata=_help("save a resumable checkpoint every N steps (0: never)")
    )
    export_dtype: ExportDtype = field(default="float32", metadata=_help("dtype of final/ weights"))
    progress: bool = field(default=True, metadata=_help("tqdm progress bar on rank 0"))
