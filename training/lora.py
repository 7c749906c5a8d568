"""LoRA on our own decoder: low-rank adapters beside frozen projection weights.

LoRA (Hu et al. 2021, arXiv:2106.09685) trains, for a frozen weight W (out, in), two small
matrices A (r, in) and B (out, r) and computes

    y = W x + b + (alpha / r) * B A dropout(x)

A starts Kaiming-uniform and B at zeros (PEFT's init), so at step 0 the model *is* the base
model, bit for bit: B A x is exactly 0. Only A and B train and get optimizer state.

- `LoRALinear` replaces a target `nn.Linear` and keeps its `weight` and `bias` under the
  same names, so the base keys of the state dict stay the Hugging Face keys and the
  adapters add `<module>.lora_A.weight` and `<module>.lora_B.weight`, the names PEFT saves
  (under its `base_model.model.` prefix). Those keys are apart from the model's Hugging
  Face weights (`is_adapter_key`): `training.checkpoint` writes, reads and fingerprints
  only the base's, so a LoRA run's fingerprint is its frozen base's.
- `adapters_off` switches every adapter off for a block of code: the live DPO reference of
  a LoRA run is its own base weights (one copy in memory, as TRL + PEFT do), and the
  reference log-probs are those of the base model exactly.
- `add_adapters` freezes the model and wraps the targets (`LORA_TARGETS` by name, or
  `all-linear`: every attention and MLP projection the model has; never the embeddings or
  the output projection); `initial_adapters` gives their initial values from one seeded
  generator, whole, so one process, every DDP rank and a sharded load
  (`training.parallel.load_sharded`) start from the same adapters.
- PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`): `write_adapter`,
  `read_adapter`; `merged_weight` folds an adapter into its weight for a merged export.

Dropout masks come from the global torch generator, which the trainer seeds per step and
micro-batch (`training.train`), so a resumed run draws the masks the uninterrupted one did.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from training.model import CausalLM
from training.train_config import ALL_LINEAR, LORA_TARGETS, TrainConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the transformers model twice
_ADAPTER_PARTS = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class LoraSettings:
    """A run's adapters (the `--lora-*` settings).

    Attributes:
        rank: r, the inner dimension of B A.
        alpha: the adapters' output is scaled by alpha / r.
        dropout: dropout on the adapters' input (training only).
        targets: projection names, or (`all-linear`,).
        seed: seeds A's initialisation (the run's `--seed`).
    """

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    seed: int

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def lora_settings(config: TrainConfig) -> LoraSettings | None:
    """The adapters `config` asks for; None for full fine-tuning (`--lora-rank 0`)."""
    if not config.lora_rank:
        return None
    return LoraSettings(
        config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets, config.seed
    )


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (the module docstring's
    formula); `enabled` False computes the frozen layer alone, exactly `nn.Linear`'s op.

    Args:
        base: the layer to adapt; its `weight` and `bias` are taken over as they are.
        settings: rank, alpha and dropout.
    """

    def __init__(self, base: nn.Linear, settings: LoraSettings) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), the checkpoint's tensor under its own key
        self.bias = base.bias
        r, device, dtype = settings.rank, base.weight.device, base.weight.dtype
        # Built on the meta device, then given storage: no default init draws from the
        # global generator; the values come from `initial_adapters`.
        with torch.device("meta"):
            lora_A = nn.Linear(self.in_features, r, bias=False, dtype=dtype)
            lora_B = nn.Linear(r, self.out_features, bias=False, dtype=dtype)
        self.lora_A = lora_A.to_empty(device=device)  # (r, in)
        self.lora_B = lora_B.to_empty(device=device)  # (out, r)
        self.lora_dropout = nn.Dropout(settings.dropout) if settings.dropout else nn.Identity()
        self.scaling = settings.scaling
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        if self.training and torch.is_grad_enabled() and isinstance(self.lora_dropout, nn.Dropout):
            # Recomputed in backward (the same mask: checkpoint restores the generator):
            # kept, dropout(x) would be a copy of x per adapter (+1.5 GiB on the
            # benchmark's 2k-token SmolLM2 step); recomputing costs one (r x in) matmul.
            down = checkpoint(self._down, x, use_reentrant=False)
        else:
            down = self._down(x)
        # PEFT's order of operations: result + lora_B(lora_A(dropout(x))) * scaling.
        return y + self.lora_B(down) * self.scaling

    def _down(self, x: Tensor) -> Tensor:
        return self.lora_A(self.lora_dropout(x))  # (..., r)


def adapted(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapted projections by module path (Hugging Face's), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter's (not a Hugging Face weight of the base)."""
    return any(part in key for part in _ADAPTER_PARTS)


def projection_names(model: CausalLM) -> tuple[str, ...]:
    """The attention and MLP projections the model's blocks have (in `LORA_TARGETS`
    order): Llama's seven, or Phi-3's fused four."""
    found = {
        name.rsplit(".", 1)[-1]
        for name, m in model.model.layers.named_modules()
        if isinstance(m, nn.Linear | LoRALinear)
    }
    return tuple(t for t in LORA_TARGETS if t in found)


def resolve_targets(model: CausalLM, targets: Iterable[str]) -> tuple[str, ...]:
    """The projection names `targets` means for this model (`all-linear`: all of them).

    Raises:
        ValueError: a name the model has no projection of, with the names it has.
    """
    names = projection_names(model)
    targets = tuple(targets)
    if targets == (ALL_LINEAR,):
        return names
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"--lora-targets {' '.join(missing)}: this {model.config.family} model has no such "
            f"projection; its projections are {' '.join(names)} (or {ALL_LINEAR})"
        )
    return tuple(t for t in names if t in targets)


def add_adapters(model: CausalLM, settings: LoraSettings) -> None:
    """Freeze `model` and put a `LoRALinear` in place of each target projection of every
    block (before compiling, DDP or FSDP see the model). The adapters' values are not set
    here: fill them with `initial_adapters` (or a checkpoint's, `read_adapter`).

    Raises:
        ValueError: a target the model does not have (`resolve_targets`).
    """
    targets = resolve_targets(model, settings.targets)
    model.requires_grad_(False)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in targets:
                if isinstance(child := getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(child, settings))
    for module in adapted(model).values():
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)


def initial_adapters(model: nn.Module, seed: int) -> Iterator[tuple[str, Tensor]]:
    """Each adapter weight's initial value, whole, by state-dict key: A Kaiming-uniform
    with a = sqrt(5) (PEFT's, and `nn.Linear`'s default), B zeros; drawn in module order
    from one generator seeded with `seed`, so the values never depend on the process or on
    how the model is sharded."""
    generator = torch.Generator().manual_seed(seed)
    for name, module in adapted(model).items():
        A, B = module.lora_A.weight, module.lora_B.weight  # shapes whole, even when sharded
        a = nn.init.kaiming_uniform_(
            torch.empty(A.shape, dtype=A.dtype), a=math.sqrt(5), generator=generator
        )
        yield f"{name}.lora_A.weight", a
        yield f"{name}.lora_B.weight", torch.zeros(B.shape, dtype=B.dtype)


def check_adapters(model: nn.Module, settings: LoraSettings) -> None:
    """Raises: ValueError when the adapters `model` holds are not those of `settings`
    (a model loaded with other adapters than the run's)."""
    modules = adapted(model).values()
    ranks = {m.lora_A.weight.shape[0] for m in modules}
    scalings = {m.scaling for m in modules}
    if ranks != {settings.rank} or scalings != {settings.scaling}:
        raise ValueError(
            f"the model holds adapters of rank {sorted(ranks)} and scaling {sorted(scalings)}, "
            f"the run asks for rank {settings.rank}, scaling {settings.scaling:g}"
        )


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Compute with the base weights alone inside the block (the live reference of a LoRA
    run); the adapters come back on after it, even on an error. Under `--compile` the
    switch is a guarded attribute: each state gets its own graph, compiled once."""
    modules = list(adapted(model).values())
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m in modules:
            m.enabled = True


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """W + scaling * B A, in fp32 (what PEFT's `merge_and_unload` computes)."""
    return weight.float() + scaling * (lora_B.float() @ lora_A.float())


# -----------------------------------------------------------------------------
# PEFT's files


def adapter_config(
    model: CausalLM, settings: LoraSettings, base_model: str | None
) -> dict[str, Any]:
    """`adapter_config.json` as PEFT writes it for these adapters (a LoraConfig; the keys
    left out take PEFT's defaults, which are what this module computes: no bias, no DoRA,
    no rsLoRA, W stored (out, in))."""
    alpha = settings.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": settings.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted({path.rsplit(".", 1)[-1] for path in adapted(model)}),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_adapter(
    folder: Path,
    config: dict[str, Any],
    tensors: Iterable[tuple[str, Tensor]],
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write PEFT's two files into the existing directory `folder`: the config and the
    adapter weights (whole, by state-dict key) under PEFT's key names."""
    weights = {
        PEFT_PREFIX + key: tensor.detach().to("cpu", dtype).contiguous() for key, tensor in tensors
    }
    save_file(weights, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_adapter(folder: Path, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The adapter weights `write_adapter` wrote, by `model`'s state-dict keys, in fp32.

    Raises:
        ValueError: the file's adapters are not `model`'s (keys or shapes differ).
    """
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items() if is_adapter_key(key)}
    with safe_open(folder / ADAPTER_WEIGHTS, framework="pt", device="cpu") as f:
        found = {key.removeprefix(PEFT_PREFIX): key for key in f.keys()}  # noqa: SIM118
        shapes = {key: tuple(f.get_slice(peft).get_shape()) for key, peft in found.items()}
        differ = sorted(k for k in {*shapes, *expected} if shapes.get(k) != expected.get(k))
        if differ:
            raise ValueError(
                f"{folder / ADAPTER_WEIGHTS}: its adapters are not this model's (keys or "
                f"shapes differ: {differ[:4]})"
            )
        for key in expected:
            yield key, f.get_tensor(found[key]).float()
