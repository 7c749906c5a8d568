"""`TrainConfig` and the names its fields choose from, without importing torch.

Kept apart from `train.py` so that `prefpack --help` and the Dagster layer can build their
flags and configs from these fields without loading torch. Each field is a
`core.settings.setting`: its help, range and default make the `prefpack train` flags
(`training/cli.py`) and the Dagster run config, and a config out of range is refused
when it is built, before any data or model is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from core.settings import SettingError, flag_name, setting, setting_problems

Backend = Literal["auto", "dense", "segments", "varlen", "flex"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
Parallel = Literal["ddp", "fsdp"]
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
LossName = Literal[
    "sigmoid", "robust", "ipo", "hinge", "apo_zero", "apo_down", "simpo", "orpo"
]  # training/losses.py `LOSSES`
LOSS_NAMES: tuple[LossName, ...] = get_args(LossName)
# The losses without a reference model (`is_reference_free` in training/losses.py): their
# runs compute no reference log-probs and load no reference, here for the torch-free
# layers (the recipe's flag checks, the Dagster assets).
REFERENCE_FREE_LOSSES: tuple[LossName, ...] = ("simpo", "orpo")
ExportDtype = Literal["float32", "bfloat16"]
ReportTo = Literal["none", "tensorboard", "wandb", "mlflow"]  # training/trackers.py
# Bumped whenever the numbers of `compute_reference_logps` change (log-prob code, the
# reduction, the stored dtype): stored reference files of another version are refused.
REFERENCE_VERSION = "1"
# Bumped when `prefpack train` would compute other numbers from the same inputs (a loss, a
# kernel, an initialisation). Here, torch-free, so the Dagster keys can include both.
TRAINER_VERSION = "1"
DEFAULT_WARMUP_STEPS = 10  # clamped to `steps` when `warmup_steps` is not given
# The projections LoRA can adapt (`training/lora.py`), by the names of the Hugging Face
# checkpoints: attention and MLP, Phi-3's fused ones last; `all-linear` (PEFT's word): every
# one of them the model has.
LORA_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
)
ALL_LINEAR = "all-linear"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the data and the model."""

    out_dir: Path = field(metadata={"help": "run folder: metrics.jsonl, checkpoints/, final/"})
    # attention
    backend: Backend = setting(
        "auto",
        "attention: auto (segments on CPU, varlen on CUDA in bf16, flex on CUDA in fp32), "
        "dense (the reference), segments, varlen (FlashAttention, CUDA bf16), flex (CUDA)",
    )
    # objective
    loss: LossName = setting(
        "sigmoid",
        "against a reference: sigmoid (DPO/cDPO), robust (rDPO), ipo, hinge (SLiC), apo_zero, "
        "apo_down (anchored: APO); reference-free, no reference model or log-probs at all: "
        "simpo, orpo",
    )
    beta: float = setting(
        0.1,
        "KL strength: the usual DPO range is 0.01-0.5; simpo: the scale of its per-token "
        "rewards (its paper: 2-10); orpo: scales only the reported rewards (see --orpo-lambda)",
        gt=0,
    )
    label_smoothing: float = setting(
        0.0, "cDPO / rDPO label-noise rate (sigmoid and robust)", ge=0, lt=0.5
    )
    sft_weight: float = setting(
        0.0,
        "> 0 adds weight * per-token NLL of the chosen response (RPO; with simpo: CPO-SimPO); "
        "not with orpo, whose loss holds that NLL already, at weight 1",
        ge=0,
    )
    simpo_gamma: float = setting(
        0.5, "simpo: the target margin gamma between the chosen and rejected rewards", ge=0
    )
    orpo_lambda: float = setting(
        0.1,
        "orpo: lambda, the weight of the odds-ratio term beside the chosen NLL (TRL's "
        "ORPOConfig calls it beta; here --beta does not enter orpo's loss)",
        gt=0,
    )
    # batching: a global step = batch_rows * grad_accum * world_size packed rows
    batch_rows: int = setting(
        4, "packed rows per micro-batch per process (at most the rows there are)", ge=1
    )
    grad_accum: int = setting(1, "micro-batches per optimizer step", ge=1)
    # optimisation (AdamW, linear warmup then cosine decay to min_lr_ratio * lr)
    steps: int = setting(100, "optimizer steps", ge=1)
    lr: float = setting(
        5e-7, "peak learning rate; DPO fine-tunes a trained model (Zephyr: 5e-7)", gt=0
    )
    min_lr_ratio: float = setting(0.1, "the cosine decays to this fraction of lr", ge=0, le=1)
    warmup_steps: int | None = setting(
        None,
        f"linear warmup steps; not given: {DEFAULT_WARMUP_STEPS}, or --steps if fewer",
        ge=0,
    )
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas", ge=0, lt=1)
    max_grad_norm: float = setting(
        1.0, "gradient clipping; 0 disables it (the norm is still logged)", ge=0
    )
    seed: int = setting(
        0,
        "row order, and with LoRA the adapters' init and dropout masks (nothing else is "
        "random; a --config model's init is seeded apart)",
        ge=0,
    )
    # LoRA (Hu et al. 2021, arXiv:2106.09685): frozen weights plus trained low-rank adapters
    lora_rank: int = setting(
        0,
        "LoRA: train rank-R adapters beside the frozen weights; the live reference is the "
        "same weights with the adapters off (no copy) and only the adapters get optimizer "
        "state (0: full fine-tuning)",
        ge=0,
    )
    lora_alpha: float = setting(16.0, "LoRA: the adapters' output is scaled by alpha / rank", gt=0)
    lora_dropout: float = setting(
        0.0,
        "LoRA: dropout on the adapters' input (masks seeded per step: resume is exact)",
        ge=0,
        lt=1,
    )
    lora_targets: tuple[str, ...] = setting(
        (ALL_LINEAR,),
        f"LoRA: the projections that get adapters, by name ({' '.join(LORA_TARGETS)}), or "
        f"{ALL_LINEAR}: every attention and MLP projection the model has",
    )
    lora_merge: bool = setting(
        True,
        "LoRA export: final/ is the merged model (base + adapters) and final/adapter/ the "
        "adapter (PEFT); --no-lora-merge: final/ is the adapter alone, with the tokenizer files",
    )
    # precision and memory
    precision: Precision = setting("fp32", "bf16: autocast on CUDA with fp32 master weights")
    activation_checkpointing: bool = setting(
        False, "recompute blocks in backward: less memory, more time"
    )
    logits_chunk: int = setting(
        1024,
        "response tokens per chunk of the output projection + log-softmax, recomputed in "
        "backward, so no (tokens x vocab) logits are held; 0: all at once",
        ge=0,
    )
    compile: bool = setting(
        False, "torch.compile the decoder blocks (attention runs its own kernel)"
    )
    parallel: Parallel = setting(
        "ddp",
        "under torchrun: ddp (replicated parameters) or fsdp (FSDP2, sharded per block; "
        "--model is then read sharded, one tensor at a time, never whole)",
    )
    device: str = setting(
        "auto", "auto, cpu, cuda or cuda:N; auto: CUDA (LOCAL_RANK) when present, else CPU"
    )
    # evaluation and reporting
    eval_every: int = setting(
        0,
        "evaluate on --eval-shards every N steps, and always after the last step (0: only "
        "after the last)",
        ge=0,
    )
    report_to: ReportTo = setting(
        "none",
        "also send the metrics to TensorBoard, Weights & Biases (offline without a login) or "
        "MLflow (a local store under --out unless MLFLOW_TRACKING_URI is set); each needs its "
        "pip extra, e.g. prefpack[tensorboard]",
    )
    # outputs
    checkpoint_every: int = setting(0, "save a resumable checkpoint every N steps (0: never)", ge=0)
    export_dtype: ExportDtype = setting("float32", "dtype of final/ weights")
    progress: bool = setting(
        True, "progress on rank 0: a bar on a terminal, else a line every 5% (core/progress.py)"
    )

    def __post_init__(self) -> None:
        if self.warmup_steps is None:  # frozen: set the clamped default once, here
            object.__setattr__(self, "warmup_steps", min(DEFAULT_WARMUP_STEPS, self.steps))
        problems = setting_problems(self)
        if not _DEVICE.fullmatch(self.device):
            problems.append(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.loss == "orpo" and self.sft_weight:
            problems.append(
                f"--sft-weight {self.sft_weight:g}: --loss orpo holds the chosen NLL already "
                "(weight 1); leave --sft-weight at 0"
            )
        problems += _lora_problems(self)
        if self.warmup_steps > self.steps:
            problems.append(
                f"--warmup-steps must be at most --steps ({self.steps}), got {self.warmup_steps}"
            )
        if problems:
            raise SettingError("; ".join(problems))


def _lora_problems(config: TrainConfig) -> list[str]:
    """LoRA settings that cannot be meant: unknown target names, or settings given without
    --lora-rank, which would silently train every weight."""
    targets = config.lora_targets
    problems = []
    unknown = [t for t in targets if t not in (*LORA_TARGETS, ALL_LINEAR)]
    if unknown:
        problems.append(
            f"--lora-targets {' '.join(unknown)}: not a projection name; choose among "
            f"{' '.join(LORA_TARGETS)}, or {ALL_LINEAR}"
        )
    elif ALL_LINEAR in targets and len(targets) > 1:
        problems.append(f"--lora-targets {ALL_LINEAR} stands alone: it names every projection")
    elif len(set(targets)) < len(targets):
        problems.append(f"--lora-targets {' '.join(targets)}: a projection named twice")
    if not config.lora_rank:
        fields = TrainConfig.__dataclass_fields__
        given = [
            flag_name(fields[name]) if value is not False else "--no-lora-merge"
            for name in ("lora_alpha", "lora_dropout", "lora_targets", "lora_merge")
            if (value := getattr(config, name)) != fields[name].default
        ]
        if given:
            problems.append(
                f"{', '.join(given)} without --lora-rank: LoRA is off (rank 0) and every "
                "weight would train; give --lora-rank R"
            )
    return problems
