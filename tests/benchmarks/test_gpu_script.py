"""The prepared GPU benchmark stays runnable: its FLOP accounting against the definition
mask, and its whole code path on the CPU (`--smoke`: tiny model, segments and padded, and
LoRA against the live reference on the first dataset)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu import visible_pairs
from data_contracts.packed_row import attention_mask
from tests.training.pairs import pack, random_pairs

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("layout", ["shared", "unshared", "padded"])
def test_visible_pairs_count_the_definition_mask(layout: str) -> None:
    pairs = random_pairs(np.random.default_rng(0), 9, 100)
    for row in pack(pairs, layout, pairs_per_row=3):
        assert visible_pairs(row, layout) == int(attention_mask(row, layout).sum())


@pytest.mark.slow
def test_smoke_run_writes_numbers_for_every_run(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.gpu", str(tmp_path), "--smoke"]
    command += ["--pairs", "40", "--seconds", "0", "--pairs-per-step", "4"]
    subprocess.run(command, check=True, cwd=REPO, timeout=600, capture_output=True)
    results = json.loads((tmp_path / "gpu.json").read_text())
    for label in ("UltraFeedback-like", "HelpSteer-like"):
        runs = results[label]["runs"]
        assert {(r["layout"], r["backend"]) for r in runs} == {
            ("padded", "causal SDPA"),
            ("shared", "segments"),
        }
        for run in runs:
            assert "error" not in run, run
            assert run["pairs/s"] > 0 and run["timed_steps"] >= 1
            assert all(np.isfinite(run["losses"]))
        assert set(results[label]["shared/padded pairs/s"]) == {"segments"}  # not LoRA's
        assert results[label]["shared/padded pairs/s"]["segments"] > 0
    lora = [r for r in results["UltraFeedback-like"]["runs"] if r["lora_rank"]]
    assert [(r["label"], r["reference"]) for r in lora] == [
        ("segments LoRA r4 live reference", "live")
    ]
    assert lora[0]["trainable_parameters"] < 100_000  # the adapters alone
    assert lora[0]["losses"][0] == pytest.approx(np.log(2), abs=1e-6)  # the base, at step 1
