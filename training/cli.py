"""Subcommands of `prefpack` that belong to `training/`: `train`, `logps` and `difficulty`.

    prefpack logps --shards DIR --model DIR --out ref.arrow       # reference log-probs, once
    prefpack train --shards DIR --model DIR --out runs/dpo --reference ref.arrow
    torchrun --nproc_per_node 2 -m prefpack train --shards DIR --config small --out runs/x
    prefpack difficulty --shards DIR --model DIR --reference ref.arrow --out scores/ --folds 5

The run-setting flags of `train` are made from `TrainConfig`'s fields (help text, defaults,
choices), in the groups below. torch is imported inside the handlers, so `prefpack --help`
stays fast. Under torchrun every process runs the command; rank 0 alone verifies the
shards' sha256 (the others wait for its verdict), prints, writes the reference file and
metrics, and reports to Dagster Pipes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.flags import add_flags, config_from
from training.difficulty_config import DifficultyConfig
from training.train_config import TrainConfig

if TYPE_CHECKING:  # names for annotations only: the handlers import torch when they run
    from pipeline.shards import ShardReader
    from training.difficulty import Difficulty
    from training.model import CausalLM
    from training.reference import ReferenceCache, ReferenceKey, ReferenceLogps

# The `prefpack train` flag groups; together they hold every TrainConfig field but out_dir
# (that is --out).
TRAIN_FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("backend",),
    "objective": ("loss", "beta", "label_smoothing", "sft_weight"),
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
    "precision, memory and parallelism": (
        "precision",
        "activation_checkpointing",
        "logits_chunk",
        "compile",
        "device",
        "parallel",
    ),
    "outputs": ("checkpoint_every", "export_dtype", "progress"),
}
# At or below this peak learning rate a run only fine-tunes: a random init learns nothing.
FINE_TUNING_LR = 1e-5
# The TrainConfig fields that `prefpack logps` takes as flags too.
LOGPS_FIELDS = ("backend", "precision", "device", "parallel", "logits_chunk", "progress")
# The fold models of `prefpack difficulty` are not kept: no export dtype. (Checkpoints are:
# a fold a crash interrupted resumes from its latest one.)
DIFFICULTY_TRAIN_FIELDS = ("export_dtype",)


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
        help="Hugging Face folder (Llama, Qwen2, Mistral, SmolLM)",
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


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="DPO-train a model on packed shards; export a Hugging Face folder",
        description="Train on the shards of --shards and write OUT/metrics.jsonl (one line "
        "per step), OUT/checkpoints/ (with --checkpoint-every; a rerun resumes from the "
        "latest) and OUT/final/ (Hugging Face folder with the shards' tokenizer). Run under "
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
    _add_reference(p, "reference (default: a frozen copy of the initial model, run every step)")
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
    _add_reference(p, "reference (default: computed here once, in memory)")
    add_flags(p.add_argument_group("folds and scoring"), DifficultyConfig)
    for title, names in TRAIN_FLAG_GROUPS.items():
        names = tuple(n for n in names if n not in DIFFICULTY_TRAIN_FIELDS)
        add_flags(p.add_argument_group(f"fold models: {title}"), TrainConfig, names)
    p.set_defaults(handler=_difficulty)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `prefpack train` arguments.

    Raises:
        SettingError: a flag out of range (every one named), before anything is read.
    """
    return config_from(TrainConfig, args, out_dir=args.out)


# -----------------------------------------------------------------------------
# Handlers


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def _process_group(device_name: str) -> Iterator[None]:
    """Under torchrun, the process group for the whole command (the reference cache and
    training share it); nothing in a single process."""
    import torch
    import torch.distributed as dist

    from training.device import resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        yield
        return
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _loads_sharded(args: argparse.Namespace) -> bool:
    """Whether --model is loaded already sharded (`training.parallel.load_sharded`): under
    FSDP with several processes, so that no process holds the whole model (in `train`, a
    live reference is then loaded sharded too). Not with --compile: blocks are compiled
    before they are sharded (FSDP's hooks stay outside the compiled code), so that run
    loads the model whole first."""
    from training.parallel import world_and_rank

    sharded = args.model is not None and args.parallel == "fsdp" and world_and_rank()[0] > 1
    return sharded and not getattr(args, "compile", False)


def _open_inputs(
    args: argparse.Namespace, sharded: bool = False, trainable: bool = True
) -> tuple[ShardReader, CausalLM]:
    """(shard reader, fp32 model) of --shards and --model/--config; with `sharded`, the
    model of --model comes sharded over the process group, on this rank's device (for
    training unless `trainable` is False).

    Raises:
        ValueError: unknown config name, or a model whose vocabulary is smaller than the
            shards' tokenizer; ShardError (a ValueError) for a bad shard directory.
    """
    import torch

    from training.checkpoint import load_pretrained
    from training.configs import named_config
    from training.model import CausalLM

    reader = _open_shards_once(args.shards, verify=not args.no_verify)
    vocab = int(reader.manifest["tokenizer"]["vocab_size"])
    if args.model is not None:
        if not (args.model / "config.json").is_file():
            raise FileNotFoundError(f"{args.model}: no config.json; not a Hugging Face folder")
        if sharded:
            from training.device import resolve_device
            from training.parallel import load_sharded

            device = resolve_device(args.device)
            model = load_sharded(args.model, device, args.precision, trainable)
        else:
            model = load_pretrained(args.model)
    else:
        config = dataclasses.replace(named_config(args.config), vocab_size=vocab)
        torch.manual_seed(args.init_seed)
        model = CausalLM(config)
    if model.config.vocab_size < vocab:
        raise ValueError(
            f"the shards' tokenizer has {vocab} tokens but the model only "
            f"{model.config.vocab_size}; pack with the model's tokenizer"
        )
    return reader, model


def _open_shards_once(directory: Path, verify: bool) -> ShardReader:
    """Open the shards; under torchrun rank 0 alone checks their sha256 (every byte read
    once per job, not once per process) while the others wait for its verdict, which
    every rank then raises alike.

    Raises:
        ShardError: a missing or corrupt shard directory, on every rank.
    """
    import torch.distributed as dist

    from pipeline.shards import ShardError, open_shards

    if not (verify and dist.is_initialized() and dist.get_world_size() > 1):
        return open_shards(directory, verify=verify)
    verdict: list[str | None] = [None]
    reader = None
    if dist.get_rank() == 0:
        try:
            reader = open_shards(directory, verify=True)
        except (ValueError, OSError) as err:
            verdict = [str(err)]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ShardError(verdict[0])
    return reader or open_shards(directory, verify=False)


def _reference_key(reader: ShardReader, model: CausalLM, precision: str) -> ReferenceKey:
    """The key of this model's log-probs over these shards in this precision."""
    from training.checkpoint import model_fingerprint
    from training.reference import ReferenceKey

    return ReferenceKey(model_fingerprint(model), reader.key, precision)


def _reference(
    args: argparse.Namespace, reader: ShardReader, model: CausalLM, precision: str
) -> ReferenceLogps | ReferenceCache | None:
    """Stored reference log-probs (--reference; refused unless their key is this model's,
    these shards' and this precision's), a cache that training fills first if it is
    empty (--reference-cache), or None (a reference model in memory)."""
    from training.reference import ReferenceCache, read_reference_logps

    if args.reference is None and args.reference_cache is None:
        return None
    key = _reference_key(reader, model, precision)
    if args.reference is not None:
        if not args.reference.is_file():
            raise FileNotFoundError(f"{args.reference}: no such file; write it with prefpack logps")
        return read_reference_logps(args.reference, key)
    cache = ReferenceCache(args.reference_cache, key)
    if _rank() == 0:
        print(
            f"prefpack {args.command}: reference log-probs: "
            f"{'reusing' if cache.path.exists() else 'computing'} "
            f"{cache.path}",
            file=sys.stderr,
        )
    return cache


def _train(args: argparse.Namespace) -> int:
    from training.device import resolve_backend, resolve_device
    from training.report import format_summary, pipes_reporter, summarize
    from training.train import RunIdentity, check_config, train

    config = train_config(args)
    rank = _rank()
    # Pipes first, so that Dagster also hears of a run that fails its checks.
    with pipes_reporter(config.steps) as reporter, _process_group(config.device):
        _hint_fine_tuning_lr(args, config.lr, reporter and reporter.context)
        check_config(config, resolve_device(config.device))
        sharded = _loads_sharded(args)
        reader, model = _open_inputs(args, sharded=sharded)
        reference = _reference(args, reader, model, config.precision)
        if reference is None and sharded:  # the live reference, loaded as the policy was
            from training.parallel import load_sharded

            device = resolve_device(config.device)
            reference = load_sharded(args.model, device, config.precision, trainable=False)
        identity = RunIdentity(reader.key, args.init_seed if args.config else None)
        if rank == 0:
            print(f"prefpack train: metrics: {config.out_dir / 'metrics.jsonl'}", file=sys.stderr)
        train(
            config,
            reader,
            reader.layout,
            reader.block_size,
            reader.max_len,
            model,
            reference=reference,
            tokenizer=reader.directory,  # its tokenizer.json + tokenizer_config.json
            on_step=reporter,
            identity=identity,
        )
        if rank == 0:
            summary = summarize(config.out_dir)
            if reporter is None:  # under Pipes, Dagster shows the summary (one summary)
                print(format_summary(summary))
            else:
                reporter.materialize(
                    summary,
                    extra={
                        "backend": resolve_backend(
                            config.backend, resolve_device(config.device), config.precision
                        ),
                        "layout": reader.layout,
                        "shard_key": reader.key,
                        "model": str(args.model or f"config {args.config}"),
                    },
                )
    return 0


def _logps(args: argparse.Namespace) -> int:
    from training.device import check_precision, resolve_device
    from training.parallel import prepare
    from training.reference import (
        compute_reference_logps,
        read_reference_logps,
        write_reference_logps,
    )
    from training.report import pipes_context, reference_metadata

    if args.out.suffix not in (".arrow", ".parquet"):
        raise ValueError(f"--out {args.out}: write .arrow or .parquet")
    config_from(TrainConfig, args, out_dir=args.out)  # the ranges of its flags
    check_precision(args.precision, resolve_device(args.device))
    rank = _rank()
    with pipes_context() as pipes, _process_group(args.device):
        reader, model = _open_inputs(args, sharded=_loads_sharded(args), trainable=False)
        key = _reference_key(reader, model, args.precision)
        table = None
        if args.out.exists():
            try:
                table = read_reference_logps(args.out, key).table
                if rank == 0:
                    print(
                        f"reused {table.num_rows} pairs' log-probs (same model, shards and "
                        "precision)",
                        file=sys.stderr,
                    )
            except ValueError as err:
                if rank == 0:
                    print(f"replacing {args.out}: {err}", file=sys.stderr)
        reused = table is not None
        if not reused:  # every rank computes its share of the rows
            device = resolve_device(args.device)
            model.logits_chunk = args.logits_chunk
            prepare(model, args.parallel, device, args.precision, trainable=False)
            table = compute_reference_logps(
                model,
                reader,
                reader.layout,
                block_size=reader.block_size,
                backend=args.backend,
                batch_rows=args.batch_rows,
                device=device,
                precision=args.precision,
                progress=args.progress,
                max_len=reader.max_len,
            )
            if rank == 0:
                write_reference_logps(table, args.out, key)
                print(
                    f"prefpack logps: computed {table.num_rows} pairs' log-probs", file=sys.stderr
                )
        if pipes is not None:
            pipes.report_asset_materialization(
                metadata=reference_metadata(args.out, table, key, reused)
            )
    if rank == 0 and pipes is None:  # under Pipes, the materialization names the file
        print(args.out)
    return 0


def _hint_fine_tuning_lr(args: argparse.Namespace, lr: float, pipes: Any | None) -> None:
    """On rank 0, a hint when a randomly initialised `--config` model is to train at a
    fine-tuning rate (it would barely move): to Dagster's log under Pipes, else stderr."""
    if _rank() != 0 or args.config is None or lr > FINE_TUNING_LR:
        return
    line = (
        f"hint: --lr {lr:g} is a fine-tuning rate; a randomly initialised "
        f"--config {args.config} model barely moves at it (try --lr 1e-3)"
    )
    if pipes is not None:
        pipes.log.warning(line)
    else:
        print(f"prefpack {args.command}: {line}", file=sys.stderr)


def _initial_models(
    args: argparse.Namespace, model: CausalLM, sharded: bool, precision: str
) -> Callable[[], CausalLM]:
    """A fresh initial policy per fold: a copy of `model`, or one loaded sharded again
    (a sharded model is not copied)."""
    if not sharded:
        return lambda: copy.deepcopy(model)
    from training.device import resolve_device
    from training.parallel import load_sharded

    return lambda: load_sharded(args.model, resolve_device(args.device), precision)


def _difficulty(args: argparse.Namespace) -> int:
    from pipeline.scores import write_scores
    from training.device import resolve_device
    from training.difficulty import (
        folds_directory,
        identity_of,
        score_difficulty,
        staged_directory,
    )
    from training.report import pipes_context
    from training.train import RunIdentity, check_config

    config = config_from(DifficultyConfig, args)
    fold_config = config_from(TrainConfig, args, out_dir=args.out)  # folds: set below
    rank = _rank()
    with pipes_context() as pipes, _process_group(fold_config.device):
        _hint_fine_tuning_lr(args, fold_config.lr, pipes)
        check_config(fold_config, resolve_device(fold_config.device))
        sharded = _loads_sharded(args)
        reader, model = _open_inputs(args, sharded=sharded)
        init_seed = args.init_seed if args.config else None
        reference_key = _reference_key(reader, model, fold_config.precision)
        identity = identity_of(reader, init_seed, reference_key, fold_config, config)

        def log(line: str) -> None:  # under Pipes, Dagster shows it (once)
            if pipes is not None:
                pipes.log.info(line)
            else:
                print(line, file=sys.stderr)

        if _same_scores(args.out, identity, log if rank == 0 else None):
            if rank == 0:
                log(f"reused {args.out}: the same shards, model, reference and settings")
                # fold runs a crash left after the scores were in place
                shutil.rmtree(folds_directory(args.out, identity), ignore_errors=True)
        else:
            reference = _scoring_reference(
                args, reader, model, fold_config, config.score_batch_rows
            )
            folds = folds_directory(args.out, identity)
            with staged_directory(args.out) as tmp:
                result = score_difficulty(
                    dataclasses.replace(fold_config, out_dir=folds),
                    config,
                    reader,
                    _initial_models(args, model, sharded, fold_config.precision),
                    reference,
                    run_identity=RunIdentity(reader.key, init_seed),
                    on_fold=lambda entry: log(_fold_line(entry, config.folds)),
                )
                if rank == 0:
                    write_scores(tmp, result.scores, result.folds, identity)
                    log(_scores_line(result))
            if rank == 0:  # the scores are in place: the fold runs are done with
                shutil.rmtree(folds)
    if rank == 0 and pipes is None:  # under Pipes, the asset names the directory
        print(args.out)
    return 0


def _scoring_reference(
    args: argparse.Namespace,
    reader: ShardReader,
    model: CausalLM,
    config: TrainConfig,
    batch_rows: int,
) -> ReferenceLogps:
    """The reference log-probs every fold trains and is scored against: --reference,
    --reference-cache (computed there first if absent), or computed here in memory."""
    from training.device import resolve_device
    from training.reference import (
        ReferenceLogps,
        cached_reference_logps,
        compute_reference_logps,
    )

    reference = _reference(args, reader, model, config.precision)
    if isinstance(reference, ReferenceLogps):
        return reference
    model.logits_chunk = config.logits_chunk
    kwargs = {
        "block_size": reader.block_size,
        "backend": config.backend,
        "batch_rows": batch_rows,
        "device": resolve_device(config.device),
        "progress": config.progress,
        "max_len": reader.max_len,
    }
    if reference is not None:  # a cache directory
        return cached_reference_logps(model, reader, reader.layout, reference, **kwargs)
    table = compute_reference_logps(
        model, reader, reader.layout, precision=config.precision, **kwargs
    )
    return ReferenceLogps(table, _reference_key(reader, model, config.precision))


def _same_scores(out: Path, identity: dict, log: Callable[[str], None] | None) -> bool:
    """Whether `out` holds scores (intact) of exactly these inputs, settings and code."""
    from pipeline.scores import read_report
    from pipeline.shards import ShardError

    if not out.exists():
        return False
    try:
        report = read_report(out)
    except ShardError as err:
        if log is not None:
            log(f"replacing {out}: {err}")
        return False
    changed = [part for part in identity if report[part] != identity[part]]
    if changed and log is not None:
        log(f"replacing {out}: its {' and '.join(changed)} differ")
    return not changed


def _fold_line(entry: dict, folds: int) -> str:
    return (
        f"fold {entry['fold'] + 1}/{folds}: trained on {entry['train_pairs']} pairs "
        f"({entry['steps']} steps, final loss {entry['train_loss']:.4f}), scored "
        f"{entry['held_out_pairs']} held-out pairs: loss {entry['held_out_loss']:.4f}, "
        f"accuracy {entry['held_out_accuracy']:.3f}"
    )


def _scores_line(result: Difficulty) -> str:
    import numpy as np

    loss = result.scores.column("loss").to_numpy()
    return (
        f"scored {result.scores.num_rows} pairs in {len(result.folds)} folds: held-out loss "
        f"mean {loss.mean():.4f}, median {float(np.median(loss)):.4f}, max {loss.max():.4f}"
    )
