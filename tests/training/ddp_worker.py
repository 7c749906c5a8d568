"""One process of the DDP test: `torchrun --standalone --nproc_per_node 2 ddp_worker.py OUT`.

Trains the same seeded tiny model on the same rows as the single-process run in
`test_train.py`, with one row per process per step (a global batch of 2 rows).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.training.pairs import varied_rows
from training.configs import tiny
from training.model import CausalLM
from training.train import TrainConfig, train

DDP_STEPS = 3
DDP_LR = 1e-3


def ddp_config(out_dir: Path, batch_rows: int, grad_accum: int) -> TrainConfig:
    return TrainConfig(
        out_dir=out_dir,
        steps=DDP_STEPS,
        lr=DDP_LR,
        warmup_steps=0,
        batch_rows=batch_rows,
        grad_accum=grad_accum,
        progress=False,
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    rows = varied_rows(0, "shared")
    config = ddp_config(Path(sys.argv[1]), batch_rows=1, grad_accum=1)
    train(config, rows, "shared", block_size=16, max_len=512, model=CausalLM(tiny()))
