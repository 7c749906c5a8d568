"""The trainer's CUDA paths end to end, against the CPU oracles (`gpu` marker).

`test_attention.py` checks the flex and varlen kernels alone against `dense`; these tests
put them inside the model and the training loop:

- packed log-probs of a whole model on CUDA equal the two separate sequences: `flex` in
  fp32 as tightly as fp32 allows, `varlen`/`flex`/`segments` under bf16 autocast within
  bf16 rounding (against `dense` run in the same precision on the same rows); the same
  with sliding windows shorter than the pairs (Gemma 3's and Phi-3's tiny shapes: the
  narrowed flex block lists, varlen's `window_size`);
- three optimizer steps on CUDA follow the CPU run's losses: fp32 `flex`, bf16 `varlen`,
  and bf16 `varlen` with compiled blocks against the same run eager.

Skipped, with the reason, where there is no CUDA device.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.dist_worker import torchrun_workers
from tests.training.pairs import pack, random_pairs, separate_logps, varied_rows
from training.batch import PackedRows, collate
from training.configs import tiny, tiny_gemma3, tiny_phi3
from training.logps import pair_logps
from training.model import CausalLM
from training.train import TrainConfig, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA paths need a CUDA GPU"),
]
CUDA = torch.device("cuda") if torch.cuda.is_available() else None
VOCAB = 512
BLOCK = 128  # FlexAttention's CUDA tiles (training.device.flex_problems)


@pytest.fixture
def model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(tiny()).to(CUDA)


@pytest.fixture
def pairs() -> list:
    return random_pairs(np.random.default_rng(3), 10, VOCAB)


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls() -> None:
    """The fp32 oracle comparisons need IEEE fp32 matmuls (the trainer turns TF32 on)."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision = previous


def _bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16)


def _packed(model: CausalLM, pairs: list, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = pack(pairs, "shared", pairs_per_row=4, block_size=BLOCK)  # rows of 4, 4, 2 pairs
    batch = collate(rows, "shared", backend, block_size=BLOCK, device=CUDA)
    got = pair_logps(model, batch)
    return got.chosen.float(), got.rejected.float()


def test_fp32_flex_logps_equal_separate_sequences(model, pairs) -> None:
    chosen, rejected = separate_logps(model, pairs)
    got_chosen, got_rejected = _packed(model, pairs, "flex")
    torch.testing.assert_close(got_chosen, chosen, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(got_rejected, rejected, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("builder", [tiny_gemma3, tiny_phi3])
def test_fp32_flex_logps_with_sliding_windows_equal_separate_sequences(pairs, builder) -> None:
    """8-position windows, shorter than every pair; Gemma 3's full layer beside its
    sliding one (two compiled mask_mods in one model)."""
    torch.manual_seed(0)
    model = CausalLM(builder()).to(CUDA)
    chosen, rejected = separate_logps(model, pairs)
    got_chosen, got_rejected = _packed(model, pairs, "flex")
    torch.testing.assert_close(got_chosen, chosen, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(got_rejected, rejected, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("backend", ["varlen", "flex", "segments"])
def test_bf16_logps_and_gradients_equal_dense(model, pairs, backend: str) -> None:
    """Same rows, same bf16 autocast: only the attention kernel differs from `dense`."""
    _bf16_against_dense(model, pairs, backend)


@pytest.mark.parametrize("backend", ["varlen", "flex", "segments"])
def test_bf16_sliding_window_logps_and_gradients_equal_dense(pairs, backend: str) -> None:
    """As above on Gemma 3's tiny shape: windowed and full layers in one model."""
    torch.manual_seed(0)
    _bf16_against_dense(CausalLM(tiny_gemma3()).to(CUDA), pairs, backend)


def _bf16_against_dense(model: CausalLM, pairs: list, backend: str) -> None:
    results = []
    for name in ("dense", backend):
        model.zero_grad()
        with _bf16():
            chosen, rejected = _packed(model, pairs, name)
        (chosen - rejected).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((chosen, rejected, grads))
    (dense_c, dense_r, dense_g), (c, r, g) = results
    scale = dense_c.abs().mean()
    assert (c - dense_c).abs().max() / scale < 1e-2
    assert (r - dense_r).abs().max() / scale < 1e-2
    assert torch.nn.functional.cosine_similarity(g, dense_g, dim=0) > 0.999
    fp32_chosen, _ = separate_logps(model, pairs)  # bf16 vs the fp32 oracle
    assert (c - fp32_chosen).abs().max() / fp32_chosen.abs().mean() < 3e-2


def _train(out: Path, device: str, **changes: object) -> dict[str, np.ndarray]:
    """4 steps of the tiny model from seed 0 on the same rows: each metric per step."""
    torch.manual_seed(0)
    config = TrainConfig(
        out_dir=out,
        steps=4,
        lr=1e-3,
        warmup_steps=1,
        batch_rows=2,
        progress=False,
        device=device,
        **changes,
    )
    rows = varied_rows(0, "shared", block_size=BLOCK)
    train(config, PackedRows(rows, "shared", BLOCK, 512), model=CausalLM(tiny()))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {key: np.array([m[key] for m in lines]) for key in ("loss", "logps/chosen")}


def test_training_steps_on_cuda_follow_the_cpu_run(tmp_path: Path) -> None:
    """Per-step log-probs move with the weights (-29 to -45 here): a wrong update shows."""
    cpu = _train(tmp_path / "cpu", "cpu", backend="segments")
    flex = _train(tmp_path / "flex", "cuda", backend="flex", precision="fp32")
    varlen = _train(tmp_path / "varlen", "cuda", backend="varlen", precision="bf16")
    for key, fp32_rtol, bf16_rtol in (("loss", 1e-3, 2e-2), ("logps/chosen", 2e-3, 3e-2)):
        np.testing.assert_allclose(flex[key], cpu[key], rtol=fp32_rtol, err_msg=key)
        np.testing.assert_allclose(varlen[key], cpu[key], rtol=bf16_rtol, err_msg=key)
    assert cpu["loss"][-1] < cpu["loss"][0]  # it learns: not three constant losses


def test_compiled_blocks_train_as_eager_on_cuda(tmp_path: Path) -> None:
    eager = _train(tmp_path / "eager", "cuda", backend="varlen", precision="bf16")
    compiled = _train(
        tmp_path / "compiled", "cuda", backend="varlen", precision="bf16", compile=True
    )
    for key in eager:
        np.testing.assert_allclose(compiled[key], eager[key], rtol=1e-2, err_msg=key)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="sharding across GPUs needs two CUDA devices"
)
def test_fsdp_never_puts_the_whole_model_on_one_gpu(tmp_path: Path) -> None:
    """The model is built on the CPU and sharded by two NCCL ranks: each GPU's peak
    memory stays near half the model (one block at a time travels whole), not all of it."""
    torchrun_workers("shard_peak", str(tmp_path), "fsdp")
    for rank in (0, 1):
        numbers = json.loads((tmp_path / f"peak-rank{rank}.json").read_text())
        assert numbers["peak"] < 0.75 * numbers["full"], (rank, numbers)
