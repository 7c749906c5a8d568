"""How hard each pair is, measured by models that never saw it (Selective DPO).

"Principled Data Selection for Alignment: The Hidden Risks of Difficult Examples" finds
that the pairs with the highest validation loss under models trained on *other* data hurt
alignment, and that dropping them helps. This module measures that loss with the trainer
prefpack already has:

    pairs = unpack_pairs(shards)               # exactly the packed pairs
    fold  = assign_folds(pair ids, k, seed)    # by a seeded hash of the id
    for each fold f:
        train a fresh initial model on the pairs of the other folds (training.train)
        score fold f's pairs with it: log-probs of chosen and rejected, then the run's
        loss and implicit reward margin against the reference log-probs (or, for a
        reference-free loss, from the fold model's log-probs alone)

Each fold's pairs are packed again (`pipeline.shards.pack_pairs`, the pack stage's packer,
same layout and max_len), so a fold model's rows hold none of the pairs it scores. The
reference log-probs are the shards' own (`ReferenceLogps`, keyed by the shard key): every
fold trains and is scored against the same reference as a run on all the shards. A
reference-free loss (SimPO, ORPO) has none: its folds train and score without one.

Under torchrun every rank runs the folds together (DDP or FSDP, as `train` does); rank 0
writes (`pipeline.shards.write_scores`): `scores.parquet` (`data_contracts.difficulty_scores`,
sorted by pair id) and `report.json` (inputs, settings, code versions, one entry per fold),
the same bytes for the same inputs. The fold runs live beside the output
(`folds_directory`) until the scores are written: after a crash, a rerun with the same
inputs and settings keeps the folds that finished and starts the interrupted one over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import torch
import torch.distributed as dist

from core.atomic import atomic_directory, atomic_file
from data_contracts import difficulty_scores as contract
from pipeline.shards import ShardReader, assign_folds, pack_pairs, table_rows, unpack_pairs
from training.batch import PackedRows
from training.device import resolve_backend, resolve_device
from training.difficulty_config import DIFFICULTY_VERSION, FOLD_UNUSED_FIELDS, DifficultyConfig
from training.logps import table_logps
from training.losses import PreferenceLoss
from training.model import CausalLM
from training.ranks import from_rank0, is_distributed, world_and_rank
from training.reference import (
    REFERENCE_VERSION,
    ReferenceKey,
    ReferenceLogps,
    compute_reference_logps,
)
from training.report import summarize
from training.train import loss_of, train
from training.train_config import TRAINER_VERSION, TrainConfig

HELD_OUT_FILE = "held_out.arrow"  # a fold's scores, written once the fold is done


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """Scores of every pair and what each fold did.

    Attributes:
        scores: a `difficulty_scores` table, sorted by pair id.
        folds: one `difficulty_scores.FOLD_FIELDS` entry per fold (on rank 0; empty on
            the other ranks, which write nothing).
    """

    scores: pa.Table
    folds: list[dict[str, Any]]


def score_difficulty(
    train_config: TrainConfig,
    config: DifficultyConfig,
    reader: ShardReader,
    initial_model: Callable[[], CausalLM],
    reference: ReferenceLogps | None,
    init_seed: int | None = None,
    on_fold: Callable[[dict[str, Any]], None] | None = None,
) -> Difficulty:
    """Train one model per fold on the other folds' pairs and score the fold with it.

    Args:
        train_config: the fold models' training; fold f runs in `out_dir/fold-f`, and a
            fold whose held-out scores are there already (written when it finished, before
            a crash) is not run again; one without them resumes from its latest
            checkpoint, if it saved one, or starts over.
        config: folds, fold seed, scoring batch.
        reader: the packed shards.
        initial_model: a fresh initial policy (fp32) for each fold: a copy of one in
            memory, or under FSDP one loaded sharded (a sharded model is not copied).
        reference: stored reference log-probs covering every pair of `reader`; None
            for a reference-free loss (which takes none).
        init_seed: the seed of a random initial model, as `train` records it.
        on_fold: called on rank 0 with each fold's entry once it is scored.

    Raises:
        ValueError: fewer pairs than folds; a setting or row `train` refuses.
    """
    pairs = unpack_pairs(reader.table, reader.layout)
    if pairs.num_rows < config.folds:
        raise ValueError(
            f"{pairs.num_rows} pairs cannot be split into --folds {config.folds}; use fewer folds"
        )
    folds = assign_folds(pairs.column("pair_id").to_pylist(), config.folds, config.fold_seed)
    device = resolve_device(train_config.device)
    backend = resolve_backend(train_config.backend, device, train_config.precision)
    loss_fn = loss_of(train_config)
    window = int(reader.manifest["config"]["pack_window"])

    def rows(mask: np.ndarray) -> PackedRows:
        """The pairs of `mask` packed again like the shards, under the shards' key (a
        resume must come from the same shards)."""
        packed = pack_pairs(
            pairs.filter(pa.array(mask)), reader.layout, reader.max_len, reader.block_size, window
        )
        return PackedRows(
            table_rows(packed), reader.layout, reader.block_size, reader.max_len, reader.key
        )

    tables, entries = [], []
    rank = world_and_rank()[1]
    for fold in range(config.folds):
        held = folds == fold
        train_rows, held_rows = rows(~held), rows(held)
        out = train_config.out_dir / f"fold-{fold}"
        if from_rank0((out / HELD_OUT_FILE).is_file):  # done before a crash
            table = feather.read_table(out / HELD_OUT_FILE)
        else:
            # A fold a crash interrupted resumes from its latest checkpoint (when
            # --checkpoint-every saved one; `train` checks it is this very run) or starts
            # over; one that finished training but not scoring starts over.
            if rank == 0 and (out / "final").exists():
                shutil.rmtree(out)
            _barrier()
            fold_model = initial_model()
            fold_config = dataclasses.replace(train_config, out_dir=out)
            train(fold_config, train_rows, fold_model, reference=reference, init_seed=init_seed)
            # The reference pass, under the fold model: its log-probs of the held-out pairs.
            policy = compute_reference_logps(
                fold_model,
                held_rows,
                reader.layout,
                block_size=reader.block_size,
                backend=backend,
                batch_rows=config.score_batch_rows,
                device=device,
                precision=train_config.precision,
                progress=train_config.progress,
                max_len=reader.max_len,
            )
            del fold_model
            table = _fold_scores(policy, held_rows, reference, loss_fn, fold)
            if rank == 0:
                with atomic_file(out / HELD_OUT_FILE) as tmp:
                    feather.write_feather(table, tmp, compression="uncompressed")
            _barrier()
        tables.append(table)
        if rank == 0:  # rank 0 alone writes the fold run's metrics
            entries.append(_fold_entry(fold, out, table, int((~held).sum()), len(train_rows)))
            if on_fold is not None:
                on_fold(entries[-1])
    scores = pa.concat_tables(tables).sort_by("pair_id")
    return Difficulty(contract.CONTRACT.validate(scores, source="difficulty scores"), entries)


def _fold_scores(
    policy: pa.Table,
    rows: PackedRows,
    reference: ReferenceLogps | None,
    loss_fn: PreferenceLoss,
    fold: int,
) -> pa.Table:
    """The held-out pairs' loss, margin and rewards under the fold model's log-probs
    (`policy`, computed over `rows`), against the reference unless the loss is
    reference-free (`reference` None)."""
    ref = None if reference is None else reference.lookup(policy.column("pair_id").to_pylist())
    with torch.no_grad():
        losses, chosen_rewards, rejected_rewards = loss_fn(table_logps(policy, rows), ref)
    f32 = pa.float32()
    return pa.table(
        {
            "pair_id": policy.column("pair_id"),
            "fold": pa.array(np.full(policy.num_rows, fold, np.int32)),
            "loss": pa.array(losses.float().numpy(), f32),
            "margin": pa.array((chosen_rewards - rejected_rewards).float().numpy(), f32),
            "chosen_reward": pa.array(chosen_rewards.float().numpy(), f32),
            "rejected_reward": pa.array(rejected_rewards.float().numpy(), f32),
            "chosen_logps": policy.column("chosen_logps"),
            "rejected_logps": policy.column("rejected_logps"),
        }
    )


def _fold_entry(fold: int, out: Path, scores: pa.Table, train_pairs: int, train_rows: int) -> dict:
    """What a fold did: its data, its training's last step and curve, its held-out scores
    (numbers only, no timings, so the report is the same bytes for the same inputs)."""
    summary = summarize(out)
    loss = scores.column("loss").to_numpy()
    margin = scores.column("margin").to_numpy()
    return {
        "fold": fold,
        "train_pairs": train_pairs,
        "train_rows": train_rows,
        "held_out_pairs": scores.num_rows,
        "steps": summary.steps,
        "train_loss": float(summary.final["loss"]),
        "train_accuracy": float(summary.final["rewards/accuracies"]),
        "held_out_loss": float(loss.mean()),
        "held_out_accuracy": float((margin > 0).mean()),
        "curve": [list(point) for point in summary.curve],
    }


# -----------------------------------------------------------------------------
# Files


def identity_of(
    reader: ShardReader,
    init_seed: int | None,
    model_fingerprint: str,
    reference: ReferenceKey | None,
    train_config: TrainConfig,
    config: DifficultyConfig,
) -> dict[str, Any]:
    """What the scores depend on, as the report records it: inputs (the shards, the
    initial model, which is also the reference, by content, its init seed, and the
    reference log-probs' key, or `none` for a reference-free loss), settings (the device
    class and the process count too: both change the numbers) and code versions."""
    training = dataclasses.asdict(train_config)
    for name in ("out_dir", "progress", "device", "checkpoint_every", *FOLD_UNUSED_FIELDS):
        training.pop(name)
    training = {k: list(v) if isinstance(v, tuple) else v for k, v in training.items()}  # JSON
    return {
        "inputs": {
            "shard_key": reader.key,
            "model_fingerprint": model_fingerprint,
            "init_seed": init_seed,
            "reference": "none" if reference is None else dataclasses.asdict(reference),
        },
        "settings": {
            **dataclasses.asdict(config),
            "train": training,
            "device": resolve_device(train_config.device).type,
            "processes": world_and_rank()[0],
        },
        "code": {
            "difficulty": DIFFICULTY_VERSION,
            "trainer": TRAINER_VERSION,
            "reference": REFERENCE_VERSION,
        },
    }


def folds_directory(out: Path, identity: dict[str, Any]) -> Path:
    """Where the fold runs of `out` with this identity live: beside it, named by a hash of
    the identity, so that a rerun after a crash finds the folds it finished (and a run with
    other inputs or settings never does). Rank 0 removes those of other identities."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folds = out.parent / f".{out.name}.folds-{digest}"
    if world_and_rank()[1] == 0:
        named = re.compile(rf"\.{re.escape(out.name)}\.folds-[0-9a-f]{{16}}")
        for other in out.parent.glob(f".{out.name}.folds-*"):
            if other != folds and named.fullmatch(other.name):
                shutil.rmtree(other, ignore_errors=True)
    return folds


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """`core.atomic.atomic_directory` for a command that every rank runs: rank 0 stages
    the directory, every rank gets its temporary path (the fold runs need one path on all
    ranks), and rank 0 installs it once every rank is done. The scores' stage in
    `core.atomic.keyed_directory` (`training.recipe.run_difficulty`)."""
    if not is_distributed():
        with atomic_directory(out, keep_identical=True) as tmp:
            yield tmp
        return
    if dist.get_rank() == 0:
        with atomic_directory(out, keep_identical=True) as tmp:
            from_rank0(lambda: str(tmp))
            yield tmp
            dist.barrier()
        return
    yield Path(from_rank0(lambda: ""))  # rank 0's path (the others do not call this)
    dist.barrier()
