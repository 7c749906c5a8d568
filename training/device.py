"""Device, precision and attention-backend choices shared by training and the reference pass."""

from __future__ import annotations

import contextlib
import os

import torch

from training.train_config import BACKENDS, PRECISIONS, Backend, Precision


def resolve_device(name: str) -> torch.device:
    """`auto` -> this process's GPU (LOCAL_RANK under torchrun) when CUDA is present, else CPU.

    Raises:
        ValueError: CUDA requested but not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse precisions we do not run (fail fast, before any work).

    Raises:
        ValueError: fp16 (needs loss scaling), an unknown name, or bf16 off CUDA.
    """
    if precision == "fp16":
        raise ValueError("fp16 needs loss scaling and is not supported; use bf16 on CUDA")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("bf16 autocast runs on CUDA only; use precision fp32 on CPU")


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (parameters stay fp32), nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_backend(backend: Backend, device: torch.device, precision: Precision) -> Backend:
    """`auto` -> the default attention backend of the device and precision.

    CPU: `segments` (the fastest exact backend measured there). CUDA: `varlen` in bf16
    (FlashAttention kernels, no compilation, no recompiles), `flex` in fp32 (FlashAttention
    has no fp32 kernels). Measured on an H200 (`benchmarks/results/gpu.json`): in bf16
    varlen and flex train equally fast, varlen without flex's compilation; segments is 3x
    slower there.
    """
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "segments"
    return "varlen" if precision == "bf16" else "flex"


def flex_problems(block_size: int, head_dim: int, device: torch.device) -> list[str]:
    """What keeps FlexAttention's CUDA kernels from compiling for these shards and model
    (seen on an H200 with torch 2.11: its tiles are up to 128 tokens and the mask's blocks
    must hold whole tiles; head dimensions under 16 are not implemented)."""
    if device.type != "cuda":
        return []
    problems = []
    if block_size % 128:
        problems.append(
            f"backend flex on CUDA needs shards packed with a mask block size that is a "
            f"multiple of 128 (FlexAttention's kernel tiles); these have {block_size} "
            f"(pack with --block-size 128, or train with --backend varlen)"
        )
    if head_dim < 16:
        problems.append(
            f"backend flex needs a head dimension of 16 or more; the model has {head_dim}"
        )
    return problems


def backend_problems(backend: str, device: torch.device, precision: str) -> list[str]:
    """What keeps `backend` from training on `device` in `precision` (empty: nothing)."""
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r} (choose one of {BACKENDS})"]
    if backend == "flex" and device.type != "cuda":
        return ["backend flex trains on CUDA only (no FlexAttention backward on CPU)"]
    if backend == "varlen" and (device.type != "cuda" or precision != "bf16"):
        return ["backend varlen needs CUDA and precision bf16 (FlashAttention kernels)"]
    return []


def use_gpu_defaults(device: torch.device) -> None:
    """TF32 matmuls on CUDA (fp32 parameters and reductions stay fp32); nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
