"""One process of the multi-process tests, under
`torchrun --standalone --nproc_per_node 2 dist_worker.py MODE OUT PARALLEL`.

- `train`: trains the same seeded tiny model on the same rows as the single-process runs in
  `test_train.py`, one row per process per step (a global batch of 2 rows), for `STEPS`
  steps with a checkpoint every `CHECKPOINT_EVERY` (resuming from OUT when it holds one),
  evaluating on `worker_eval_data()` every `EVAL_EVERY` steps and at the end.
- `lora`: `train` with LoRA adapters of rank `LORA_RANK` and dropout `LORA_DROPOUT`
  (`test_lora.py`); each rank then writes whether its part of the base weights is still
  the initial model's, bit for bit, to OUT/base-rank<R>.json.
- `reference`: computes the reference log-probs of `REFERENCE_ROWS` with the model sharded
  or replicated by PARALLEL; rank 0 writes them to OUT (Arrow).
  Each rank writes where its parameters live to OUT's folder (`layout-rank<R>.json`).
- `shard_peak` (2 GPUs, NCCL; PARALLEL is ignored): shards a 16-block model onto each
  rank's GPU and writes the peak CUDA memory beside the model's size to OUT.
- `refuse`: starts two runs that must stop before step 1, one with a token outside the
  vocabulary in the last row, one with stored log-probs lacking the last row's pairs;
  each rank writes the two error messages to OUT/rank<R>.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.training.pairs import varied_rows
from training.batch import PackedRows
from training.checkpoint import hf_state_dict
from training.configs import small, tiny
from training.device import resolve_device
from training.model import CausalLM
from training.parallel import prepare
from training.reference import (
    ReferenceKey,
    ReferenceLogps,
    compute_reference_logps,
    write_reference_logps,
)
from training.train import TrainConfig, train

STEPS = 5
CHECKPOINT_EVERY = 3
EVAL_EVERY = 2
LR = 1e-3
REFERENCE_ROWS = 11  # shares of 5 and 6 rows: the short share runs a padding pass
REFERENCE_BATCH_ROWS = 5
LORA_RANK = 4
LORA_DROPOUT = 0.1


REPO = Path(__file__).resolve().parents[2]


def _torchrun(*target: str) -> subprocess.CompletedProcess[str]:
    """`torchrun TARGET` in two gloo processes (one intra-op thread each)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", *target]
    return subprocess.run(command, cwd=REPO, env=env, timeout=300, capture_output=True, text=True)


def torchrun_workers(*args: str) -> None:
    """Run this file in two gloo processes with `args`."""
    done = _torchrun(__file__, *args)
    assert done.returncode == 0, done.stderr[-3000:]


def torchrun_prefpack(*argv: str) -> str:
    """`torchrun -m prefpack ARGV` in two gloo processes; its stderr (the test fails with
    the end of it when the command fails)."""
    done = _torchrun("-m", "prefpack", *argv)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def worker_config(out_dir: Path, batch_rows: int, **changes: object) -> TrainConfig:
    return TrainConfig(
        out_dir=out_dir,
        steps=STEPS,
        lr=LR,
        warmup_steps=0,
        batch_rows=batch_rows,
        checkpoint_every=CHECKPOINT_EVERY,
        eval_every=EVAL_EVERY,
        progress=False,
        **changes,
    )


def worker_eval_data() -> PackedRows:
    """Held-out rows (other pairs than the training rows') that mode `train` evaluates on."""
    return PackedRows(varied_rows(1, "shared"), "shared", 16, 512)


def seeded_model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(tiny())


def refusals(out: Path) -> list[str]:
    """The messages of the two runs of mode `refuse` (this rank's)."""
    rows = varied_rows(0, "shared")
    ids = rows[-1].input_ids.copy()
    ids[-1] = 700  # the model has 512 tokens
    bad_token = [*rows[:-1], dataclasses.replace(rows[-1], input_ids=ids)]
    kept = [pid for row in rows[:-1] for pid in row.pair_ids]
    logps = pa.array([-1.0] * len(kept), pa.float32())
    table = pa.table({"pair_id": kept, "chosen_logps": logps, "rejected_logps": logps})
    lacking = ReferenceLogps(table, ReferenceKey("ab", "cd", "fp32"))
    messages = []
    for name, run_rows, reference in (("tokens", bad_token, None), ("pairs", rows, lacking)):
        config = worker_config(out / name, batch_rows=1)
        try:
            data = PackedRows(run_rows, "shared", 16, 512)
            train(config, data, seeded_model(), reference=reference)
        except ValueError as err:
            messages.append(str(err))
    return messages


def layout(model: torch.nn.Module) -> dict:
    """Where this rank's parameters live: the mesh's device type (None when not sharded),
    the elements this rank holds and the model's total."""
    params = list(model.parameters())
    meshes = {p.device_mesh.device_type for p in params if isinstance(p, DTensor)}
    return {
        "mesh": sorted(meshes),
        "local": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
        "total": sum(p.numel() for p in params),
    }


def base_unchanged(model: CausalLM, initial: CausalLM, rank: int, world: int) -> bool:
    """Whether this rank's part of every base weight (its dim-0 chunk of a sharded one)
    equals the initial model's bit for bit (no collective: the group is gone after
    `train`)."""
    now, then = hf_state_dict(model), initial.state_dict()
    for key, tensor in now.items():
        want = then[key]
        if isinstance(tensor, DTensor):
            chunks = torch.chunk(want, world, dim=0)
            want, tensor = chunks[rank] if rank < len(chunks) else want[:0], tensor.to_local()
        if not torch.equal(tensor, want):
            return False
    return True


def shard_peak(out: Path) -> None:
    """On 2 GPUs: shard a 16-block model (12M parameters, 3% of them in the small
    embedding), built on the CPU, onto this rank's GPU; write this rank's peak CUDA memory
    and the whole model's bytes."""
    dist.init_process_group("nccl")
    device = torch.device("cuda", dist.get_rank())
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = CausalLM(dataclasses.replace(small(), num_layers=16, vocab_size=1024))
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    prepare(model, "fsdp", device, "fp32")
    peak = torch.cuda.max_memory_allocated(device)
    (out / f"peak-rank{dist.get_rank()}.json").write_text(json.dumps({"peak": peak, "full": full}))
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, out, parallel = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    if mode == "train":
        config = worker_config(out, batch_rows=1, parallel=parallel)
        data = PackedRows(varied_rows(0, "shared"), "shared", 16, 512)
        train(config, data, seeded_model(), eval_data=worker_eval_data())
    elif mode == "lora":
        config = worker_config(
            out, batch_rows=1, parallel=parallel, lora_rank=LORA_RANK, lora_dropout=LORA_DROPOUT
        )
        data = PackedRows(varied_rows(0, "shared"), "shared", 16, 512)
        model = seeded_model()
        train(config, data, model, eval_data=worker_eval_data())
        rank = int(os.environ["RANK"])
        unchanged = base_unchanged(model, seeded_model(), rank, int(os.environ["WORLD_SIZE"]))
        (out / f"base-rank{rank}.json").write_text(json.dumps({"base_unchanged": unchanged}))
    elif mode == "reference":
        dist.init_process_group("gloo")
        model = seeded_model()
        prepare(model, parallel, resolve_device("cpu"), "fp32", trainable=False)
        (out.parent / f"layout-rank{dist.get_rank()}.json").write_text(json.dumps(layout(model)))
        rows = varied_rows(0, "shared")[:REFERENCE_ROWS]
        table = compute_reference_logps(
            model, rows, "shared", batch_rows=REFERENCE_BATCH_ROWS, progress=False
        )
        if dist.get_rank() == 0:
            write_reference_logps(table, out, ReferenceKey("fingerprint", "shards", "fp32"))
        dist.destroy_process_group()
    elif mode == "shard_peak":
        shard_peak(out)
    elif mode == "refuse":
        dist.init_process_group("gloo")
        messages = refusals(out)
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(messages))
        dist.destroy_process_group()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
