"""Subcommands of `prefpack` that belong to `training/`: `train`, `logps` and `difficulty`.

    prefpack logps --shards DIR --model DIR --out ref.arrow       # reference log-probs, once
    prefpack train --shards DIR --model DIR --out runs/dpo --reference ref.arrow \
        --eval-shards EVAL --eval-every 50
    prefpack train --shards DIR --model DIR --out runs/lora --lora-rank 16   # adapters only
    torchrun --nproc_per_node 2 -m prefpack train --shards DIR --config small --out runs/x
    prefpack difficulty --shards DIR --model DIR --reference ref.arrow --out scores/ --folds 5

Flags only: the run-setting flags are made from `TrainConfig`'s and `DifficultyConfig`'s
fields (help text, defaults, choices), in the groups below, and each handler hands a
config and `training.recipe.Inputs` to its recipe (`training/recipe.py`), which does the
work. torch is imported inside the handlers, so `prefpack --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from core.settings import add_flags, config_from
from training.difficulty_config import FOLD_UNUSED_FIELDS, DifficultyConfig
from training.train_config import TrainConfig

if TYPE_CHECKING:  # for annotations only: the handlers import torch when they run
    from training.recipe import Inputs

# The `prefpack train` flag groups; together they hold every TrainConfig field but out_dir
# (that is --out).
TRAIN_FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("backend",),
    "objective": ("loss", "beta", "label_smoothing", "sft_weight", "simpo_gamma", "orpo_lambda"),
    "batching (a global step is batch_rows x grad_accum x processes packed rows)": (
        "batch_rows",
        "grad_accum",
    ),
    "optimisation (AdamW, linear warmup, then cosine decay to min_lr_ratio x lr)": (
        "steps",
        "lr",
        "min_lr_ratio",
        "warmup_steps",
        "weight_decay",
        "adam_betas",
        "max_grad_norm",
        "seed",
    ),
    "LoRA (low-rank adapters on frozen weights, Hu et al. 2021; rank 0: full fine-tuning)": (
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_targets",
        "lora_merge",
    ),
    "precision, memory and parallelism": (
        "precision",
        "activation_checkpointing",
        "logits_chunk",
        "compile",
        "device",
        "parallel",
    ),
    "evaluation and reporting": ("eval_every", "report_to"),
    "outputs": ("checkpoint_every", "export_dtype", "progress"),
}
# The TrainConfig fields that `prefpack logps` takes as flags too.
LOGPS_FIELDS = ("backend", "precision", "device", "parallel", "logits_chunk", "progress")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `train`, `logps` and `difficulty`."""
    _add_train(subparsers)
    _add_logps(subparsers)
    _add_difficulty(subparsers)


# -----------------------------------------------------------------------------
# Flags


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    """--shards, and the model as --model DIR or --config NAME (+ --init-seed)."""
    inputs = parser.add_argument_group("data and model")
    inputs.add_argument(
        "--shards",
        required=True,
        type=Path,
        metavar="DIR",
        help="shard directory printed by `prefpack pack`",
    )
    model = inputs.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="Hugging Face folder (Llama, SmolLM, Qwen2, Qwen3, Mistral, Gemma 3 text, "
        "OLMo 2, Phi-3)",
    )
    model.add_argument(
        "--config",
        metavar="NAME",
        help="a named size from training/configs.py (tiny, small, ...), randomly initialised "
        "with the shards' vocabulary",
    )
    inputs.add_argument(
        "--init-seed",
        type=int,
        metavar="INT",
        default=0,
        help="torch seed of the random init with --config (default: %(default)s)",
    )
    inputs.add_argument(
        "--no-verify",
        action="store_true",
        help="skip hashing the shard files when opening (the manifest, its checksum and the tokenizer files are always checked)",
    )
    inputs.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="use a --model folder whose own tokenizer is not the one the shards were "
        "tokenized with (compared by content); without it such a run stops before reading "
        "any weight",
    )


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="DPO-train a model on packed shards; export a Hugging Face folder",
        description="Train on the shards of --shards and write OUT/metrics.jsonl (one line "
        "per step, with eval/ metrics on the steps that evaluate --eval-shards), "
        "OUT/checkpoints/ (with --checkpoint-every; a rerun resumes from the latest) and "
        "OUT/final/ (Hugging Face folder with the base model's tokenizer files, or the "
        "shards', a generation_config.json and a model card, README.md; with --lora-rank the "
        "merged model, and the adapter in OUT/final/adapter/ as PEFT loads it). Run under "
        "`torchrun --nproc_per_node N -m prefpack train ...` for data parallel. Launched by "
        "Dagster Pipes, it reports progress and the final metrics there.",
    )
    _add_inputs(p)
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="run folder (metrics, checkpoints, final/)",
    )
    # reference log-probs: from a file, cached beside the run, or a reference model in memory
    _add_reference(
        p,
        "reference (default: a frozen copy of the initial model, run every step; none for a "
        "reference-free --loss, which refuses these flags)",
    )
    evaluation = p.add_argument_group("eval set (the loss and rewards on held-out pairs)")
    evaluation.add_argument(
        "--eval-shards",
        type=Path,
        metavar="DIR",
        help="shards of held-out pairs, packed like --shards (`prefpack pack --eval`); "
        "evaluated after the last step and every --eval-every steps, as eval/* metrics",
    )
    p.add_argument_group("model card").add_argument(
        "--card-source",
        action="append",
        default=[],
        metavar="NAME[=HUB_ID]",
        help="a source of the pairs, for final/README.md (the model card); a HUB_ID goes "
        "into its datasets (repeatable)",
    )
    evaluation.add_argument(
        "--eval-reference",
        type=Path,
        metavar="FILE",
        help="their stored log-probs from `prefpack logps --shards EVAL`; default: read from "
        "or computed into --reference-cache when given, else computed once at the start "
        "(none for a reference-free --loss)",
    )
    for title, names in TRAIN_FLAG_GROUPS.items():
        add_flags(p.add_argument_group(title), TrainConfig, names)
    p.set_defaults(handler=_train)


def _add_reference(parser: argparse.ArgumentParser, title: str) -> None:
    """--reference FILE or --reference-cache DIR (or neither: `title` says what then)."""
    reference = parser.add_argument_group(title).add_mutually_exclusive_group()
    reference.add_argument(
        "--reference",
        type=Path,
        metavar="FILE",
        help="stored log-probs from `prefpack logps`; must match this model, these shards "
        "and --precision",
    )
    reference.add_argument(
        "--reference-cache",
        type=Path,
        metavar="DIR",
        help="compute the log-probs once into DIR, keyed by model fingerprint, shard key, "
        "precision and reference code version, and reuse them on later runs",
    )


def _add_logps(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "logps",
        help="compute per-pair reference log-probs once (reused when the key matches)",
        description="Write the summed chosen/rejected log-probs of every pair of --shards "
        "under the model (Arrow .arrow or .parquet, with pair ids), keyed by the model "
        "fingerprint, the shard key, --precision and the reference code version. If --out "
        "already holds them for that key, nothing is recomputed. Prints the file.",
    )
    _add_inputs(p)
    p.add_argument(
        "--out", required=True, type=Path, metavar="FILE", help="output file, .arrow or .parquet"
    )
    run = p.add_argument_group("forward pass")
    run.add_argument(
        "--batch-rows", type=int, default=8, help="rows per forward pass (default: %(default)s)"
    )
    add_flags(run, TrainConfig, LOGPS_FIELDS)
    p.set_defaults(handler=_logps)


def _add_difficulty(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "difficulty",
        help="score every pair by the held-out loss of k fold models (Selective DPO)",
        description="Split the pairs of --shards into --folds folds by a seeded hash of the "
        "pair id; for each fold, train a copy of the model on the other folds' pairs (the "
        "`train` settings below) and score the fold's pairs with it: the held-out loss and "
        "implicit reward margin against the reference log-probs. Writes OUT/scores.parquet "
        "(one row per pair) and OUT/report.json (what the scores depend on, one entry per "
        "fold); an OUT with the same inputs and settings is reused. The fold models are not "
        "kept. Runs under torchrun and Dagster Pipes as `train` does. Prints OUT.",
    )
    _add_inputs(p)
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="scores directory; reused when it holds scores of the same inputs and settings, else replaced",
    )
    _add_reference(
        p, "reference (default: computed here once, in memory; none for a reference-free --loss)"
    )
    add_flags(p.add_argument_group("folds and scoring"), DifficultyConfig)
    for title, names in TRAIN_FLAG_GROUPS.items():
        names = tuple(n for n in names if n not in FOLD_UNUSED_FIELDS)
        add_flags(p.add_argument_group(f"fold models: {title}"), TrainConfig, names)
    p.set_defaults(handler=_difficulty)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `prefpack train` arguments.

    Raises:
        SettingError: a flag out of range (every one named), before anything is read.
    """
    return config_from(TrainConfig, args, out_dir=args.out)


def inputs_of(args: argparse.Namespace) -> Inputs:
    """The `Inputs` of parsed arguments (the flags a command lacks stay at their default)."""
    from training.recipe import Inputs

    return Inputs(
        shards=args.shards,
        model=args.model,
        config=args.config,
        init_seed=args.init_seed,
        verify=not args.no_verify,
        reference=getattr(args, "reference", None),
        reference_cache=getattr(args, "reference_cache", None),
        eval_shards=getattr(args, "eval_shards", None),
        eval_reference=getattr(args, "eval_reference", None),
        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch,
        card_sources=tuple(getattr(args, "card_source", ())),
    )


# -----------------------------------------------------------------------------
# Handlers: flags to a config and inputs, then the recipe


def _train(args: argparse.Namespace) -> int:
    from training.recipe import run_train

    run_train(train_config(args), inputs_of(args))
    return 0


def _logps(args: argparse.Namespace) -> int:
    from training.recipe import run_logps

    config = config_from(TrainConfig, args, out_dir=args.out)  # the ranges of its flags
    run_logps(config, inputs_of(args), args.out, args.batch_rows)
    return 0


def _difficulty(args: argparse.Namespace) -> int:
    from training.recipe import run_difficulty

    config = config_from(DifficultyConfig, args)
    fold_config = config_from(TrainConfig, args, out_dir=args.out)  # folds: set per fold
    run_difficulty(config, fold_config, inputs_of(args), args.out)
    return 0
