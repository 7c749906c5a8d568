"""Read and write Hugging Face checkpoint folders without importing transformers.

A folder holds `config.json`, the weights as `model.safetensors` or as shards listed in
`model.safetensors.index.json`, and the tokenizer files, so an exported folder loads
anywhere: copied as they are, or the base model's with what training changed
(`training.export_files`: eos, chat template, `generation_config.json`), and a model card
(README.md). Weights are never read through pickle (`pytorch_model.bin` is refused).

Supported, each exported back as the architecture it was loaded as, with the settings
`ModelConfig` can express (what each family fixes: `training.model.FAMILY_TRAITS`):
- LlamaForCausalLM (Llama 2/3.x, SmolLM 1/2; Llama 3.1 rope scaling);
- Qwen2ForCausalLM (q/k/v biases) and Qwen3ForCausalLM (per-head q/k norms);
- MistralForCausalLM (a sliding window on every layer);
- Gemma3ForCausalLM, `gemma3_text` (sandwich `(1 + w)` norms, GeGLU, scaled embeddings,
  `query_pre_attn_scalar`, sliding layers from `layer_types` with `rope_local_base_freq`);
- Olmo2ForCausalLM (post-norms, q/k norms over the whole projection);
- Phi3ForCausalLM (fused `qkv_proj` / `gate_up_proj`, a sliding window, default RoPE).
Any other architecture or setting fails with an error naming it, never a silently
different model: among them longrope/su/yarn RoPE (Phi-3 128k, Phi-3.5), a
`partial_rotary_factor` below 1 (Phi-4-mini), logit softcapping and bidirectional
attention (Gemma), Qwen's `use_sliding_window`, dropout, quantized weights.

A model with LoRA adapters (`training.lora`) reads, writes and fingerprints its base
weights alone (`hf_state_dict`): the adapters are saved apart, in PEFT's layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import shutil
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from core.atomic import atomic_directory
from training.export_files import TOKENIZER_FILES, ExportTokenizer, export_files
from training.lora import is_adapter_key
from training.model import (
    TRAITS,
    CausalLM,
    Family,
    LinearRopeScaling,
    ModelConfig,
    RopeScaling,
    family_traits,
)

ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Olmo2ForCausalLM": "olmo2",
    "Phi3ForCausalLM": "phi3",
}
# config.json's model_type per family (the family's name unless listed).
_MODEL_TYPES: dict[Family, str] = {"gemma3": "gemma3_text"}
# Families whose config classes have no head_dim apart from hidden_size / heads.
_NO_HEAD_DIM: tuple[Family, ...] = ("qwen2", "olmo2", "phi3")
# Families with a sliding window: on every layer, or (Gemma 3) on the `layer_types` it marks.
_WINDOW_EVERY_LAYER: tuple[Family, ...] = ("mistral", "phi3")
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
README_NAME = "README.md"
# Keys some checkpoints carry that hold nothing we need (RoPE tables are recomputed).
_IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)
# config.json keys we interpret; everything else is kept as is and written back on export.
_INTERPRETED = {
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_local_base_freq",
    "max_position_embeddings",
    "tie_word_embeddings",
    "sliding_window",
    "sliding_window_pattern",
    "layer_types",
    "use_sliding_window",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "use_bidirectional_attention",
    "initializer_range",
    "hidden_act",
    "hidden_activation",
    "attention_bias",
    "mlp_bias",
    "attention_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "partial_rotary_factor",
    "quantization_config",
    "rope_interleaved",
    "torch_dtype",
    "dtype",
}


class UnsupportedCheckpointError(ValueError):
    """The folder describes a model or setting this decoder does not implement."""


# -----------------------------------------------------------------------------
# config.json <-> ModelConfig

Scaling = RopeScaling | LinearRopeScaling | None


def _rope(params: dict[str, Any], source: str, where: str = "") -> tuple[float, Scaling]:
    """RoPE base and scaling from one flat parameter dict: `rope_theta`, `rope_type` (or the
    legacy `type`) and the type's own keys, as `rope_parameters` holds them."""
    theta = float(params["rope_theta"])
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = float(params.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedCheckpointError(
            f"{source}: partial_rotary_factor {partial}{where} is not supported (RoPE on part "
            "of each head, e.g. Phi-4-mini); only 1"
        )
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, LinearRopeScaling(factor=float(params["factor"]))
    if rope_type == "llama3":
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedCheckpointError(
        f"{source}: rope scaling type {rope_type!r}{where} is not supported (only default, "
        "linear and llama3)"
    )


def _rope_from_hf(
    hf: dict[str, Any], family: Family, source: str
) -> tuple[float, Scaling, float | None]:
    """(base, scaling, sliding layers' base) from the legacy keys (`rope_theta`,
    `rope_scaling`, Gemma's `rope_local_base_freq`) or transformers 5's `rope_parameters`
    (one dict, or Gemma's one per layer type)."""
    top = {"rope_theta": hf.get("rope_theta", 10_000.0)}
    if "partial_rotary_factor" in hf:
        top["partial_rotary_factor"] = hf["partial_rotary_factor"]
    params = hf.get("rope_parameters") or {}
    if family != "gemma3":
        theta, scaling = _rope({**top, **(params or hf.get("rope_scaling") or {})}, source)
        return theta, scaling, None
    if "full_attention" in params:  # transformers 5
        full, local = params["full_attention"], params.get("sliding_attention") or {}
    else:
        full = {**top, "rope_theta": hf.get("rope_theta", 1_000_000.0)}
        full |= params or hf.get("rope_scaling") or {}
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    theta, scaling = _rope({"rope_theta": 1_000_000.0, **full}, source)
    local_theta, local_scaling = _rope(
        {"rope_theta": 10_000.0, **local}, source, " on the sliding layers"
    )
    if local_scaling is not None:
        raise UnsupportedCheckpointError(
            f"{source}: rope scaling on the sliding layers is not supported (Gemma 3 has none)"
        )
    return theta, scaling, local_theta


def _sliding_from_hf(
    hf: dict[str, Any], family: Family, layers: int, source: str
) -> tuple[int | None, tuple[bool, ...] | None]:
    """(window, which layers slide) of the family: Mistral's and Phi-3's window is on
    every layer; Gemma 3 marks its layers in `layer_types` (older configs: every
    `sliding_window_pattern`-th layer is full, the others slide); other families have none
    (Qwen's `use_sliding_window` is refused before)."""
    if family in _WINDOW_EVERY_LAYER:
        return hf.get("sliding_window"), None
    if family != "gemma3":
        return None, None
    pattern = int(hf.get("sliding_window_pattern", 6))
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
    ]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != layers:
        raise UnsupportedCheckpointError(
            f"{source}: layer_types {unknown or types} not supported (one of sliding_attention "
            f"or full_attention per layer, {layers} layers)"
        )
    return hf.get("sliding_window", 4096), tuple(t == "sliding_attention" for t in types)


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map a Hugging Face `config.json` dict to a `ModelConfig`.

    Args:
        hf: the parsed config.
        source: named in error messages (usually the file path).

    Returns:
        The config; `checkpoint.hf_extra_keys` keeps the keys it does not interpret.

    Raises:
        UnsupportedCheckpointError: naming the architecture or setting we do not implement.
    """
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedCheckpointError(
            f"{source}: architectures {archs} not supported; supported: " + ", ".join(ARCHITECTURES)
        )
    family = ARCHITECTURES[archs[0]]
    gemma = family == "gemma3"
    act_key, act = ("hidden_activation", "gelu_pytorch_tanh") if gemma else ("hidden_act", "silu")
    checks = {
        f"{act_key} must be {act}": hf.get(act_key, act) == act,
        "mlp_bias is not supported": not hf.get("mlp_bias", False),
        # Llama's attention_bias also adds an o_proj bias, which no supported family uses.
        "attention_bias (q/k/v/o biases) is not supported": not hf.get("attention_bias", False),
        "attention_dropout > 0 is not supported": float(hf.get("attention_dropout") or 0) == 0,
        "resid_pdrop > 0 is not supported (no dropout)": float(hf.get("resid_pdrop", 0)) == 0,
        "embd_pdrop > 0 is not supported (no dropout)": float(hf.get("embd_pdrop", 0)) == 0,
        "quantized checkpoints are not supported": "quantization_config" not in hf,
        # Qwen2/3: a window from max_window_layers on; no released checkpoint sets it.
        "use_sliding_window is not supported": not hf.get("use_sliding_window", False),
        # SmolLM configs state this; interleaved (GPT-J style) RoPE pairs other dimensions.
        "rope_interleaved is not supported": not hf.get("rope_interleaved", False),
        "attn_logit_softcapping is not supported": hf.get("attn_logit_softcapping") is None,
        "final_logit_softcapping is not supported": hf.get("final_logit_softcapping") is None,
        "use_bidirectional_attention is not supported": not hf.get(
            "use_bidirectional_attention", False
        ),
        f"model_type must be {_MODEL_TYPES.get(family, family)} (a text-only config)": (
            not gemma or hf.get("model_type", "gemma3_text") == "gemma3_text"
        ),
    }
    failed = [what for what, ok in checks.items() if not ok]
    if failed:
        raise UnsupportedCheckpointError(f"{source}: " + "; ".join(failed))
    theta, scaling, local_theta = _rope_from_hf(hf, family, source)
    if family == "phi3" and scaling is not None:
        raise UnsupportedCheckpointError(
            f"{source}: rope scaling is not supported for Phi3ForCausalLM (transformers' "
            "Phi-3 scales by longrope only)"
        )
    layers = int(hf["num_hidden_layers"])
    window, sliding_layers = _sliding_from_hf(hf, family, layers, source)
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim == int(hf["hidden_size"]) // heads:
        head_dim = None  # the default, stored once
    scalar = int(hf.get("query_pre_attn_scalar", 256)) if gemma else None
    if scalar is not None and scalar == (head_dim or int(hf["hidden_size"]) // heads):
        scalar = None  # scores scaled by head_dim**-0.5, the default
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        sliding_window=None if window is None else int(window),
        sliding_layers=sliding_layers,
        rope_local_theta=local_theta,
        query_pre_attn_scalar=scalar,
        initializer_range=float(hf.get("initializer_range", 0.02)),
        **family_traits(family),
    )


def _export_problems(config: ModelConfig) -> list[str]:
    """What the config's family cannot express (empty: exportable)."""
    family = config.family
    traits = family_traits(family)
    problems = [
        f"needs {name}={traits[name]!r} (the config has {getattr(config, name)!r})"
        for name in TRAITS
        if getattr(config, name) != traits[name]
    ]
    if family in _NO_HEAD_DIM and config.dim_per_head != config.hidden_size // config.num_heads:
        problems.append("cannot express an explicit head_dim")
    windowed = family in _WINDOW_EVERY_LAYER or family == "gemma3"
    if config.sliding_window is not None and not windowed:
        problems.append("has no sliding window")
    if config.sliding_layers is not None and family != "gemma3":
        problems.append("cannot mark sliding layers (a window is on every layer or none)")
    if family == "gemma3" and (config.sliding_window is None or config.rope_local_theta is None):
        problems.append("needs a sliding_window and its rope_local_theta")
    if family != "gemma3" and config.rope_local_theta is not None:
        problems.append("has no RoPE base of its own for sliding layers")
    if family != "gemma3" and config.query_pre_attn_scalar is not None:
        problems.append("has no query_pre_attn_scalar")
    if family == "phi3" and config.rope_scaling is not None:
        problems.append("takes no linear or llama3 rope scaling")
    return problems


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The `config.json` dict for `config` (legacy rope keys, read by transformers 4 and 5).

    Raises:
        UnsupportedCheckpointError: if the family cannot express the config (its traits
            differ from `FAMILY_TRAITS`, or a head_dim, window or RoPE setting it has no
            key for), naming each setting.
    """
    family = config.family
    arch = {f: name for name, f in ARCHITECTURES.items()}[family]
    problems = _export_problems(config)
    if problems:
        raise UnsupportedCheckpointError(f"{arch} " + "; ".join(problems))
    s = config.rope_scaling
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": _MODEL_TYPES.get(family, family),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": (
            None
            if s is None
            else {"rope_type": "linear", "factor": s.factor}
            if isinstance(s, LinearRopeScaling)
            else {"rope_type": "llama3", **dataclasses.asdict(s)}
        ),
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if family == "gemma3":
        hf["hidden_activation"] = "gelu_pytorch_tanh"
    else:
        hf["hidden_act"] = "silu"
    if family not in _NO_HEAD_DIM:
        hf["head_dim"] = config.dim_per_head
    if family in ("llama", "mistral", "qwen3", "gemma3", "olmo2"):
        hf["attention_bias"] = False
    if family == "llama":
        hf["mlp_bias"] = False
    if family in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    if family in _WINDOW_EVERY_LAYER:
        hf["sliding_window"] = config.sliding_window
    if family == "phi3":
        hf |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0}
    if family == "gemma3":
        hf |= {
            "sliding_window": config.sliding_window,
            "layer_types": [
                "sliding_attention" if config.is_sliding(i) else "full_attention"
                for i in range(config.num_layers)
            ],
            "rope_local_base_freq": config.rope_local_theta,
            "query_pre_attn_scalar": config.query_pre_attn_scalar or config.dim_per_head,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "use_bidirectional_attention": False,
        }
    return hf


def hf_extra_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """Keys of a config.json that we carry through unchanged (token ids, use_cache, ...)."""
    return {k: v for k, v in hf.items() if k not in _INTERPRETED}


# -----------------------------------------------------------------------------
# Loading


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS_NAME).exists():
        return [folder / WEIGHTS_NAME]
    raise FileNotFoundError(
        f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} (pickled .bin weights are not read)"
    )


def read_config(folder: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The `ModelConfig` of a checkpoint folder and its raw config.json dict."""
    path = Path(folder) / "config.json"
    hf = json.loads(path.read_text())
    return config_from_hf(hf, str(path)), hf


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors a Hugging Face folder holds, by checkpoint key: its state dict
    without LoRA adapters (`training.lora`), which are saved apart, in PEFT's layout."""
    return {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}


def read_weights(folder: str | Path, model: CausalLM) -> dict[str, torch.Tensor]:
    """The folder's tensors for `model`, every key and shape checked, in the model's dtype.

    Raises:
        FileNotFoundError: no safetensors weights in the folder.
        ValueError: missing, unexpected or wrongly shaped tensors, each named.
    """
    return dict(stream_weights(folder, model))


def stream_weights(folder: str | Path, model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """The folder's tensors for `model` one at a time, by sorted key, in the model's dtype:
    every key and shape is checked from the files' headers before the first is read, and a
    caller that keeps only part of each (a shard) never holds the whole model.

    Raises:
        FileNotFoundError: no safetensors weights in the folder.
        ValueError: missing, unexpected or wrongly shaped tensors, each named.
    """
    folder = Path(folder)
    expected = hf_state_dict(model)  # shapes only: works for a model on the meta device
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    unexpected: list[str] = []
    for path in _weight_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key in expected:
                    where[key] = path
                    shapes[key] = tuple(f.get_slice(key).get_shape())
                elif key.endswith(_IGNORED_KEY_SUFFIXES) or (
                    key == "lm_head.weight" and model.config.tie_embeddings
                ):
                    continue
                else:
                    unexpected.append(key)
    missing = sorted(set(expected) - set(where))
    if missing or unexpected:
        raise ValueError(
            f"{folder}: checkpoint does not match its {model.config.family} config: "
            f"missing {missing[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    for key, want in expected.items():
        if shapes[key] != tuple(want.shape):
            raise ValueError(
                f"{folder}: {key} has shape {shapes[key]}, the config implies {tuple(want.shape)}"
            )
    for key in sorted(expected):
        with safe_open(where[key], framework="pt", device="cpu") as f:
            yield key, f.get_tensor(key).to(expected[key].dtype)


def load_pretrained(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """Build the model described by a Hugging Face folder and load its weights.

    The model is built on the meta device and the checkpoint tensors are assigned to it,
    so no time goes into a random init that would be overwritten.

    Args:
        folder: checkpoint folder (config.json + safetensors).
        dtype: parameter dtype (fp32 for training; the checkpoint may be bf16).
        device: where the parameters live.

    Returns:
        The model, with `hf_config` holding the raw config.json dict.

    Raises:
        UnsupportedCheckpointError: unsupported architecture or setting.
        FileNotFoundError: no safetensors weights in the folder.
        ValueError: missing, unexpected or wrongly shaped tensors, each named.
    """
    config, hf = read_config(folder)
    with torch.device("meta"):
        model = CausalLM(config).to(dtype)
    state = read_weights(folder, model)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True, strict=True)
    model.hf_config = hf
    return model


# -----------------------------------------------------------------------------
# Saving


def copy_tokenizer_files(source: str | Path, folder: Path) -> list[str]:
    """Copy a tokenizer (a tokenizer.json file, or the tokenizer files of a folder).

    Returns:
        The names of the files copied.
    """
    source = Path(source)
    files = [source] if source.is_file() else [source / n for n in TOKENIZER_FILES]
    copied = []
    for path in files:
        if path.exists():
            shutil.copy2(path, folder / path.name)
            copied.append(path.name)
    if not copied:
        raise FileNotFoundError(f"{source}: no tokenizer files found")
    return copied


def save_pretrained(
    model: CausalLM,
    folder: str | Path,
    tokenizer: str | Path | ExportTokenizer | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
    readme: str | None = None,
) -> Path:
    """Write `model` as a Hugging Face folder, atomically (`core.atomic.atomic_directory`):
    a kill at any moment leaves the complete folder or none.

    Args:
        model: the model; keys of its state dict are the HF keys.
        folder: destination; must not exist yet.
        tokenizer, dtype, max_shard_bytes, tensors, readme: as in `write_pretrained`.

    Returns:
        The folder.

    Raises:
        FileExistsError: if `folder` exists.
    """
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists; refusing to overwrite a checkpoint")
    with atomic_directory(folder) as tmp:
        write_pretrained(model, tmp, tokenizer, dtype, max_shard_bytes, tensors, readme)
    return folder


def write_pretrained(
    model: CausalLM,
    folder: Path,
    tokenizer: str | Path | ExportTokenizer | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
    readme: str | None = None,
) -> None:
    """Write the files of a Hugging Face folder into the existing directory `folder`
    (the temp directory of an atomic write: `save_pretrained`, or a checkpoint's).

    The shards are planned from the state dict's shapes, then filled from `tensors` one
    at a time and each written when complete, so at most one shard of weights is held.

    Args:
        model: the model; keys of its state dict are the HF keys.
        folder: an existing, empty directory.
        tokenizer: an `ExportTokenizer` (the shards and the base folder: the base's
            tokenizer files with the end of turn as eos, plus generation_config.json; see
            `training.export_files`), or a tokenizer.json file or tokenizer folder copied
            as it is, or None.
        dtype: dtype of the saved tensors (default: the parameters' dtype).
        max_shard_bytes: above this, weights are split into shards plus an index.
        tensors: the whole weights, in state dict order (default: `hf_state_dict`'s);
            a sharded model passes them gathered one at a time
            (`training.parallel.full_tensors`), a LoRA model merged
            (`training.parallel.merged_tensors`).
        readme: the model card (`training.model_card.render_card`), written as README.md.

    Raises:
        FileNotFoundError, TokenizerError: the tokenizer files to export are missing or
            unreadable (before any weights are written).
    """
    state = hf_state_dict(model)  # shapes and order (values too, unless `tensors` are given)
    dtype = dtype or next(iter(state.values())).dtype
    element = torch.empty((), dtype=dtype).element_size()
    plan: list[list[str]] = [[]]
    size = total = 0
    for key, tensor in state.items():
        nbytes = math.prod(tensor.shape) * element
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(key)
        size += nbytes
        total += nbytes
    hf = export_config(model, dtype)
    extra = companion_files(hf, tokenizer, readme)  # before any weights: it may fail
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    names = (
        [WEIGHTS_NAME]
        if len(plan) == 1
        else [f"model-{i:05d}-of-{len(plan):05d}.safetensors" for i in range(1, len(plan) + 1)]
    )
    stream = iter(state.items() if tensors is None else tensors)
    for keys, name in zip(plan, names, strict=True):
        shard = {}
        for want in keys:
            key, tensor = next(stream)
            if key != want:
                raise AssertionError(f"weights out of order: {key} where {want} belongs")
            shard[key] = tensor.detach().to("cpu", dtype).contiguous()
        save_file(shard, folder / name, metadata={"format": "pt"})
        del shard
    if len(plan) > 1:
        weight_map = {key: name for keys, name in zip(plan, names, strict=True) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    write_companions(folder, extra, tokenizer)


def export_config(model: CausalLM, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json of `model` exported in `dtype`: the keys we interpret, and the
    loaded folder's others carried through."""
    return {**hf_extra_keys(model.hf_config), **config_to_hf(model.config, dtype)}


def companion_files(
    hf: dict[str, Any], tokenizer: str | Path | ExportTokenizer | None, readme: str | None
) -> dict[str, bytes]:
    """What an exported folder holds beside config.json and the weights, by file name:
    the tokenizer files and generation_config.json of an `ExportTokenizer` (for the
    exported config `hf`) and the model card.

    Raises:
        FileNotFoundError, TokenizerError: as `training.export_files.export_files`.
    """
    extra = export_files(tokenizer, hf) if isinstance(tokenizer, ExportTokenizer) else {}
    if readme is not None:
        extra[README_NAME] = readme.encode("utf-8")
    return extra


def write_companions(
    folder: Path, extra: dict[str, bytes], tokenizer: str | Path | ExportTokenizer | None
) -> None:
    """Write `companion_files`' bytes into `folder`, and copy a tokenizer given as a file or
    folder as it is."""
    if tokenizer is not None and not isinstance(tokenizer, ExportTokenizer):
        copy_tokenizer_files(tokenizer, folder)
    for name, data in extra.items():
        (folder / name).write_bytes(data)


def model_fingerprint(model: CausalLM) -> str:
    """sha256 over the config and every Hugging Face tensor's name, dtype, shape and bytes.

    Independent of how the weights were stored (sharding, file order), and different for
    the same weights in another dtype, since log-probs differ too. LoRA adapters are not
    part of it (`hf_state_dict`): a LoRA run's fingerprint is its frozen base's, the model
    its reference log-probs (stored, cached, or live with the adapters off) belong to.
    Hashing reads every byte (seconds for a large model), and a run asks for the
    fingerprint of its initial model more than once (reference key, resume record), so
    the digest is kept on the model while it still holds: see `_weights_stamp`.
    """
    cached = getattr(model, "_fingerprint", None)
    if cached is not None and _same_stamp(cached[0], _weights_stamp(model)):
        return cached[1]
    return remember_fingerprint(
        model, fingerprint_of(model.config, sorted(hf_state_dict(model).items()))
    )


def fingerprint_of(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The fingerprint of a model of `config` whose whole tensors, by sorted key, are
    `tensors` (consumed one at a time: a sharded load hashes them as it reads them)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for key, tensor in tensors:
        if isinstance(tensor, DTensor):  # sharded: gathered (a collective, on every rank)
            tensor = tensor.full_tensor()
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def remember_fingerprint(model: CausalLM, digest: str) -> str:
    """Keep `digest` as `model`'s fingerprint while its tensors stay as they are now."""
    model._fingerprint = (_weights_stamp(model), digest)
    return digest


_Stamp = list[tuple[str, weakref.ref, int]]


def _weights_stamp(model: CausalLM) -> _Stamp:
    """Which tensor objects the model holds, at which version: an in-place write (an
    optimizer step, `load_state_dict`) bumps a tensor's version counter, and assigning
    new tensors changes the objects; either makes a cached fingerprint stale. Weak
    references, so a replaced tensor is freed and its id cannot be mistaken for a new
    one. (Writes through `.data` bypass the counter; nothing in prefpack makes them.) LoRA
    adapters are left out, as from the fingerprint: training them changes nothing here."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return [(n, weakref.ref(t), t._version) for n, t in tensors if not is_adapter_key(n)]


def _same_stamp(old: _Stamp, new: _Stamp) -> bool:
    return len(old) == len(new) and all(
        a[0] == b[0] and a[1]() is b[1]() and a[2] == b[2] for a, b in zip(old, new, strict=True)
    )
