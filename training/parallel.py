"""Data parallelism under torchrun: DDP (replicated parameters) or FSDP2 (parameters,
gradients and optimizer state sharded per decoder block), behind one small interface, so
the train loop reads the same for both.

- `prepare` puts a model on its device and wraps or shards it: `fully_shard` on every
  decoder block, then on the root (embeddings, final norm and the output projection, tied
  or not, live there), each moving only its own parameters to the device before keeping
  this rank's shard. On CUDA in bf16 FSDP computes with bf16 parameters and reduces
  gradients in fp32 (`MixedPrecisionPolicy`); the fp32 master weights stay sharded.
- Checkpoints are the same for both: a full Hugging Face folder written by rank 0
  (`full_tensors` gathers the shards one tensor at a time) and the optimizer state through
  `torch.distributed.checkpoint`, each rank writing its own shard (DDP ranks write their
  replicated state once, de-duplicated by DCP). DCP's `.metadata` file is a pickle: we only
  read checkpoints this trainer wrote.
- LoRA (`training.lora`): the adapters live inside the blocks they adapt, so DDP reduces
  and FSDP2 shards them with their block; only they require grad, so only their
  gradients are reduced (DDP buckets, FSDP2's reduce-scatter) and the frozen base is never
  synchronised again. A model loaded sharded gets its adapters before it is sharded
  (`load_sharded`'s `lora`). Their checkpoints and exports are gathered one tensor at a
  time like the weights (`adapter_tensors`, `merged_tensors`).
- One process (no torchrun) is the plain module: no wrapper, no process group needed.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar, get_args

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from training.checkpoint import (
    fingerprint_of,
    hf_state_dict,
    read_config,
    remember_fingerprint,
    stream_weights,
)
from training.lora import (
    LoraSettings,
    adapted,
    add_adapters,
    initial_adapters,
    is_adapter_key,
    merged_weight,
)
from training.model import CausalLM
from training.ranks import is_distributed
from training.train_config import Parallel, Precision

PARALLELS: tuple[Parallel, ...] = get_args(Parallel)
T = TypeVar("T")


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def prepare(
    model: CausalLM,
    parallel: Parallel,
    device: torch.device,
    precision: Precision,
    trainable: bool = True,
) -> nn.Module:
    """Move `model` to `device` and make it data parallel across the process group.

    Args:
        model: the unwrapped model (sharded in place under `fsdp`).
        parallel: `ddp` or `fsdp`.
        device: this process's device.
        precision: `bf16` gives FSDP bf16 compute with fp32 gradient reduction on CUDA.
        trainable: False for a frozen reference model (DDP needs no wrapper for it).

    Returns:
        What forward is called on: the model itself (one process, FSDP, or a frozen DDP
        reference) or its DDP wrapper.
    """
    if not is_distributed():
        return model.to(device)
    if is_sharded(model):  # sharded as it was loaded (`load_sharded`)
        return model
    if parallel == "fsdp":
        # `fully_shard` moves one block's parameters at a time to the mesh's device and keeps
        # this rank's shard, so the device never holds the whole model (a model larger than
        # one GPU's memory still shards onto the GPUs). An explicit mesh: the default one is
        # CUDA whenever CUDA exists, even for a CPU run.
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        policy = MixedPrecisionPolicy()
        if precision == "bf16" and device.type == "cuda":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        # The root keeps its parameters gathered between forward and backward by default; a
        # frozen reference has no backward, so it must reshard after its forward.
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=not trainable)
        return model
    model.to(device)
    if not trainable:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def load_sharded(
    folder: Path,
    device: torch.device,
    precision: Precision,
    trainable: bool = True,
    lora: LoraSettings | None = None,
) -> CausalLM:
    """A Hugging Face folder's model under FSDP, never whole in any process's memory: built
    on the meta device, sharded, then filled one tensor at a time from the safetensors
    files, each rank keeping its chunk. The fingerprint is hashed on the way and equals the
    one the whole model gets in one process (reference files stay shared). With `lora`,
    the adapters are added before sharding (FSDP2 manages the parameters a block has
    when it is sharded) and filled with their initial values after the weights.

    Raises:
        As `training.checkpoint.stream_weights` and `read_config`; a LoRA target the
        model does not have (`training.lora.resolve_targets`).
    """
    config, hf = read_config(folder)
    with torch.device("meta"):
        model = CausalLM(config)
    model.hf_config = hf
    if lora is not None:
        add_adapters(model, lora)
    prepare(model, "fsdp", device, precision, trainable)
    model.to_empty(device=device)
    remember_fingerprint(model, fill_weights(model, folder, fingerprint=True))
    if lora is not None:
        fill_tensors(model, initial_adapters(model, lora.seed))
    return model


def fill_weights(model: CausalLM, folder: Path, fingerprint: bool = False) -> str | None:
    """Copy a Hugging Face folder's weights into `model` in place, one tensor at a time:
    each rank's chunk of a sharded parameter, the whole of any other.

    Returns:
        The fingerprint of the weights read (`fingerprint`), hashed as they stream by.

    Raises:
        As `training.checkpoint.stream_weights`.
    """
    targets = hf_state_dict(model)
    # Writes into a shard's local tensor leave the DTensor's version as it was: a cached
    # fingerprint cannot tell, so it goes (`load_sharded` keeps the one hashed here).
    model.__dict__.pop("_fingerprint", None)

    def filling() -> Iterator[tuple[str, Tensor]]:
        for key, whole in stream_weights(folder, model):
            _copy_whole(targets[key], whole)
            yield key, whole

    with torch.no_grad():
        if fingerprint:
            return fingerprint_of(model.config, filling())
        collections.deque(filling(), maxlen=0)
    return None


def fill_tensors(model: nn.Module, tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Copy whole tensors, by state-dict key, into `model` in place (each rank its chunk of
    a sharded one): LoRA adapters' initial values, or a checkpoint's."""
    targets = model.state_dict()
    with torch.no_grad():
        for key, whole in tensors:
            _copy_whole(targets[key], whole)


def _copy_whole(target: Tensor, whole: Tensor) -> None:
    if isinstance(target, DTensor):
        _copy_chunk(target, whole)
    else:
        target.copy_(whole)


def _copy_chunk(shard: DTensor, whole: Tensor) -> None:
    """Copy this rank's dim-0 chunk of `whole` into `shard` (FSDP2 chunks as `torch.chunk`
    does, ranks past the last chunk holding none)."""
    mesh = shard.device_mesh
    chunks = torch.chunk(whole, mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    mine = chunks[rank] if rank < len(chunks) else whole[:0]
    local = shard.to_local()
    if local.shape != mine.shape:
        raise AssertionError(f"shard {tuple(local.shape)} for a chunk {tuple(mine.shape)}")
    local.copy_(mine)


@contextlib.contextmanager
def gradient_sync(policy: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across processes in this block's backward only when `enabled`
    (the last micro-batch of a step); the others accumulate locally."""
    if isinstance(policy, FSDPModule):
        policy.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(policy, DistributedDataParallel) and not enabled:
        with policy.no_sync():
            yield
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (0: only measure it); the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# -----------------------------------------------------------------------------
# State dicts: full weights for Hugging Face folders, sharded optimizer state via DCP


def full_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every weight, whole, one at a time in state dict order: a sharded one gathered when
    its turn comes, so no process ever holds more than one of them (a collective: every
    rank must consume the whole iterator; see `write_full_weights`)."""
    for key, tensor in model.state_dict().items():
        yield key, _whole(tensor)


def _whole(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def adapter_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Every LoRA adapter weight, whole, one at a time in state dict order (a collective,
    as `full_tensors`)."""
    for key, tensor in model.state_dict().items():
        if is_adapter_key(key):
            yield key, _whole(tensor)


def merged_tensors(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The Hugging Face weights of a LoRA model, whole, with each adapter merged into its
    weight (W + scaling B A, in fp32), one at a time in state dict order: the base's
    architecture, as `training.checkpoint.write_pretrained` writes it (a collective, as
    `full_tensors`)."""
    state = model.state_dict()
    modules = {f"{path}.weight": (path, m.scaling) for path, m in adapted(model).items()}
    for key, tensor in hf_state_dict(model).items():
        whole = _whole(tensor)
        if key in modules:
            path, scaling = modules[key]
            lora_A = _whole(state[f"{path}.lora_A.weight"])
            lora_B = _whole(state[f"{path}.lora_B.weight"])
            whole = merged_weight(whole, lora_A, lora_B, scaling)
        yield key, whole


def write_full_weights(
    model: nn.Module,
    rank: int,
    write: Callable[[Iterator[tuple[str, Tensor]]], object],
    tensors: Iterator[tuple[str, Tensor]] | None = None,
) -> None:
    """Rank 0 calls `write` with `tensors` (default: `full_tensors(model)`); the other
    ranks take part in each tensor's gather. A collective: every rank calls it."""
    weights = full_tensors(model) if tensors is None else tensors
    if rank == 0:
        write(weights)
    else:
        collections.deque(weights, maxlen=0)


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: we know."""
    with warnings.catch_warnings():
        if not is_distributed():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def save_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Write the optimizer state with DCP (every rank its shard; a collective)."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with _one_process_quietly():
        dcp.save(state, checkpoint_id=directory)


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Read what `save_optimizer` wrote into `optimizer` (any number of processes)."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with _one_process_quietly():
        dcp.load(state, checkpoint_id=directory)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
