"""A Llama-family decoder that loads Llama, Qwen2/3, Mistral, SmolLM, Gemma 3 (text),
OLMo 2 and Phi-3 checkpoints.

Notable choices (the union of what those families need, nothing more):
- RMSNorm computed in fp32 and cast back, as the reference implementations do; Gemma's
  `(1 + weight)` scale, and OLMo 2's and Gemma's order (scale in fp32, then cast).
- RoPE (rotate-half convention) from *explicit* position ids: a packed row restarts
  positions per pair and the rejected response reuses the chosen one's positions.
  Optional Llama 3.1 or linear frequency scaling; Gemma 3's sliding layers use their own
  base (`rope_local_theta`).
- Grouped-query attention; optional bias on q/k/v (Qwen2); no bias elsewhere. Optional
  q/k RMSNorm before RoPE, per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2);
  Gemma's own score scale (`query_pre_attn_scalar`).
- Sliding-window attention on every layer (Mistral, Phi-3) or on the layers Gemma 3 marks;
  the window travels with each attention call, so one batch serves both kinds of layer.
- Norm placement: pre-norm (Llama), post-norm (OLMo 2: x + norm(f(x))), or sandwich
  (Gemma 3: x + norm(f(norm(x)))).
- SwiGLU or GeGLU (Gemma) MLP; fused `qkv_proj` / `gate_up_proj` (Phi-3, as its checkpoints
  store them); embeddings scaled by sqrt(hidden) (Gemma); optional tied embeddings.
- What each Hugging Face architecture fixes of these is one table, `FAMILY_TRAITS`.
- Attention itself is a callable passed in with the batch (`training/attention.py`), so the
  same weights run the dense, segments, varlen and FlexAttention backends; q/k/v travel as
  (B, T, heads, head_dim), the layout FlashAttention's varlen kernel reads.
- With labels, the output projection runs in chunks of response positions and returns
  their log-probs only (`training/logps.py`): no (tokens x vocab) logits are held.
- Module and parameter names equal the Hugging Face checkpoint keys, so loading is a
  shape-checked `load_state_dict` (`training/checkpoint.py`), no renaming table.

References: Llama (Touvron et al. 2023, arXiv:2302.13971), RoFormer (Su et al. 2021,
arXiv:2104.09864), GQA (Ainslie et al. 2023, arXiv:2305.13245), SwiGLU and GeGLU (Shazeer
2020, arXiv:2002.05202), Mistral 7B (Jiang et al. 2023, arXiv:2310.06825), Qwen3 (arXiv:
2505.09388), Gemma 3 (arXiv:2503.19786), OLMo 2 (arXiv:2501.00656), Phi-3 (arXiv:
2404.14219); the Llama 3.1 rope scaling follows Meta's llama-models reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from training.logps import DEFAULT_LOGITS_CHUNK, token_logps

Family = Literal["llama", "qwen2", "mistral", "qwen3", "gemma3", "olmo2", "phi3"]


class AttentionFn(Protocol):
    """(q, k, v) -> attention output (B, T, nh, hd); q (B, T, nh, hd), k and v (B, T, nkv,
    hd); `window`: the layer's sliding window (None: none); `scale`: the score scale (None:
    1/sqrt(hd))."""

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, window: int | None = None, scale: float | None = None
    ) -> Tensor: ...


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 rope scaling: long wavelengths are stretched by `factor`, short ones kept,
    the band between interpolated smoothly (values of Llama 3.1 as defaults)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192  # context length the model was trained at


@dataclass(frozen=True)
class LinearRopeScaling:
    """Linear rope scaling (position interpolation, Chen et al. 2023, arXiv:2306.15595):
    every frequency divided by `factor` (Gemma 3 4B+ on its full-attention layers)."""

    factor: float = 8.0


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of the decoder; field names follow our code, `checkpoint.py` maps
    them to and from Hugging Face `config.json` keys."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128  # SwiGLU hidden width (Llama uses about 8/3 x hidden)
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # < num_heads: grouped-query attention; == num_heads: multi-head
    head_dim: int | None = None  # None: hidden_size // num_heads (Mistral Nemo sets it apart)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # RoPE base; Llama 3 uses 500_000, Qwen2 1_000_000
    # Long-context frequency scaling: Llama 3.1+'s, or linear (Gemma 3's full layers).
    rope_scaling: RopeScaling | LinearRopeScaling | None = None
    max_position_embeddings: int = 2048  # recorded for export; RoPE itself has no table
    tie_embeddings: bool = False  # output projection reuses the input embedding (SmolLM)
    # Sliding-window attention: a query sees keys less than `sliding_window` positions
    # back (Mistral v0.1, Phi-3: every layer; Gemma 3: the layers `sliding_layers` marks).
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None  # per layer; None: every layer
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3: 10k)
    query_pre_attn_scalar: int | None = None  # Gemma: scores scaled by this**-0.5
    initializer_range: float = 0.02  # std of the normal init, as in the HF configs
    family: Family = "llama"  # which Hugging Face architecture export writes
    # Architecture traits: Llama's by default; what each family fixes is FAMILY_TRAITS.
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v projections (not on o_proj)
    qk_norm: Literal["none", "head", "proj"] = "none"  # RMSNorm on q, k: per head / all heads
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"  # around attention and MLP
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + weight), weights stored near 0
    norm_scale_fp32: bool = False  # OLMo 2, Gemma: weight applied in fp32, then cast back
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    activation: Literal["silu", "gelu_tanh"] = "silu"  # SwiGLU, or GeGLU (Gemma)
    fused_projections: bool = False  # Phi-3: one qkv_proj and one gate_up_proj tensor

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                f"({self.num_heads}); set head_dim"
            )
        if self.dim_per_head % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.dim_per_head}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
            raise ValueError(
                f"sliding_layers names {len(self.sliding_layers)} layers, the model has "
                f"{self.num_layers}"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` is a sliding-window layer (its own RoPE base when set)."""
        if self.sliding_layers is None:
            return self.sliding_window is not None
        return self.sliding_layers[layer]

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for full attention."""
        return self.sliding_window if self.is_sliding(layer) else None


# What each Hugging Face architecture fixes of the traits (the other traits keep Llama's
# values): `training.checkpoint` sets them on load and refuses to export a config that
# differs. Sizes, RoPE and windows are per checkpoint, in config.json.
FAMILY_TRAITS: dict[Family, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": "head"},
    "olmo2": {"qk_norm": "proj", "norm_placement": "post", "norm_scale_fp32": True},
    "gemma3": {
        "qk_norm": "head",
        "norm_placement": "sandwich",
        "norm_offset": 1.0,
        "norm_scale_fp32": True,
        "embed_scale": True,
        "activation": "gelu_tanh",
    },
    "phi3": {"fused_projections": True},
}
TRAITS = (
    "qkv_bias",
    "qk_norm",
    "norm_placement",
    "norm_offset",
    "norm_scale_fp32",
    "embed_scale",
    "activation",
    "fused_projections",
)


def family_traits(family: Family) -> dict[str, Any]:
    """Every trait's value for `family` (Llama's where the family does not fix it)."""
    defaults = {name: ModelConfig.__dataclass_fields__[name].default for name in TRAITS}
    return {**defaults, "family": family, **FAMILY_TRAITS[family]}


# -----------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(
    config: ModelConfig, device: torch.device | None = None, sliding: bool = False
) -> Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, scaled when configured; `sliding`: those
    of the sliding layers (their own base, unscaled, when `rope_local_theta` is set)."""
    d = config.dim_per_head
    local = sliding and config.rope_local_theta is not None
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
    )
    s = None if local else config.rope_scaling
    if s is None:
        return inv_freq
    if isinstance(s, LinearRopeScaling):
        return inv_freq / s.factor
    # Wavelengths shorter than original/high_freq_factor keep their frequency, longer than
    # original/low_freq_factor are divided by factor, and the band between is interpolated.
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin (B, T, 1, head_dim/2) in fp32 for the given (B, T) position ids."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    freqs = freqs[:, :, None]  # (B, T, 1, hd/2), broadcast over heads
    return freqs.cos(), freqs.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, T, h, hd) by the position angles (rotate-half convention of HF/Meta):
    [x1 cos - x2 sin, x2 cos + x1 sin], the same arithmetic as `x * cos + rotate_half(x) *
    sin` on half-width angles."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# -----------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 for stability.

    Scales by `offset + weight` (Gemma stores weights around 0 and adds 1). Llama casts the
    normalised x back before scaling; OLMo 2 and Gemma scale in fp32 and cast the result
    (`scale_fp32`): the same in fp32, and each family's own rounding in bf16.
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0, scale_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset
        self.scale_fp32 = scale_fp32

    def forward(self, x: Tensor) -> Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x^2) + eps)
        if self.scale_fp32:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        weight = self.weight + self.offset if self.offset else self.weight
        return weight * h.to(x.dtype)


def _norm_of(config: ModelConfig, dim: int) -> RMSNorm:
    """An RMSNorm over `dim` with the family's flavour."""
    return RMSNorm(dim, config.rms_norm_eps, config.norm_offset, config.norm_scale_fp32)


@torch.compiler.disable
def _attend(
    attention: AttentionFn, q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float | None
) -> Tensor:
    """The backend call, kept out of `torch.compile`'s graphs (a graph break per layer):
    each backend runs its own kernel (FlashAttention varlen, compiled FlexAttention, SDPA),
    and the per-batch index tensors and lengths it holds never trigger a recompile."""
    if window is None and scale is None:
        return attention(q, k, v)
    return attention(q, k, v, window=window, scale=scale)


class Attention(nn.Module):
    """Grouped-query self-attention; the masking rule comes with the batch, the layer's
    sliding window (if any) goes with each call."""

    def __init__(self, config: ModelConfig, window: int | None = None) -> None:
        super().__init__()
        hd, nh, nkv = config.dim_per_head, config.num_heads, config.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, hd
        self.window = window
        scalar = config.query_pre_attn_scalar
        self.scale = None if scalar is None else scalar**-0.5
        D = config.hidden_size
        self.fused = config.fused_projections
        if self.fused:  # Phi-3: rows [q | k | v] of one weight
            self.qkv_proj = nn.Linear(D, (nh + 2 * nkv) * hd, bias=config.qkv_bias)
        else:
            self.q_proj = nn.Linear(D, nh * hd, bias=config.qkv_bias)
            self.k_proj = nn.Linear(D, nkv * hd, bias=config.qkv_bias)
            self.v_proj = nn.Linear(D, nkv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, D, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm != "none":
            per_head = config.qk_norm == "head"
            self.q_norm = _norm_of(config, hd if per_head else nh * hd)
            self.k_norm = _norm_of(config, hd if per_head else nkv * hd)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.fused:
            q, k, v = self.qkv_proj(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, nh|nkv * hd)
        if self.qk_norm == "proj":  # OLMo 2: over all heads at once
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if self.qk_norm == "head":  # Qwen3, Gemma 3: each head alone
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, T, nh|nkv, hd)
        y = _attend(attention, q, k, v, self.window, self.scale)  # (B, T, nh, hd)
        return self.o_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU (silu) or GeGLU (gelu, tanh)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D, H = config.hidden_size, config.intermediate_size
        self.fused = config.fused_projections
        if self.fused:  # Phi-3: rows [gate | up] of one weight
            self.gate_up_proj = nn.Linear(D, 2 * H, bias=False)
        else:
            self.gate_proj = nn.Linear(D, H, bias=False)
            self.up_proj = nn.Linear(D, H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)
        self.gelu = config.activation == "gelu_tanh"

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, H) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)


# The norms around each sublayer, by checkpoint name: (before attention, after attention,
# before MLP, after MLP). Llama's `post_attention_layernorm` is the MLP's input norm.
_NORMS: dict[str, tuple[str | None, str | None, str | None, str | None]] = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
    "sandwich": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
}


class Block(nn.Module):
    """Residual block: x + attn(x), then x + mlp(x), each sublayer wrapped in the norms
    of `config.norm_placement` (pre: x + f(norm(x)); post: x + norm(f(x)); sandwich:
    x + norm(f(norm(x))))."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm_names = _NORMS[config.norm_placement]
        before_attn, after_attn, before_mlp, after_mlp = self.norm_names
        # Registered in checkpoint order (Llama: input norm, attention, norm, MLP), which
        # keeps parameter order, and so optimizer state, as it always was.
        self._add_norm(config, before_attn)
        self.self_attn = Attention(config, config.window(layer))
        self._add_norm(config, after_attn)
        self._add_norm(config, before_mlp)
        self.mlp = MLP(config)
        self._add_norm(config, after_mlp)
        self.sliding = config.is_sliding(layer)  # takes the sliding layers' RoPE

    def _add_norm(self, config: ModelConfig, name: str | None) -> None:
        if name is not None:
            self.add_module(name, _norm_of(config, config.hidden_size))

    def _normed(self, i: int, x: Tensor) -> Tensor:
        """x through the i-th norm of (before attn, after attn, before MLP, after MLP)."""
        name = self.norm_names[i]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        x = x + self._normed(1, self.self_attn(self._normed(0, x), cos, sin, attention))
        return x + self._normed(3, self.mlp(self._normed(2, x)))


class Decoder(nn.Module):
    """Embedding, blocks and final norm (the `model.` prefix of HF checkpoint keys)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = _norm_of(config, config.hidden_size)


class CausalLM(nn.Module):
    """The decoder plus its output projection (tied to the embedding when configured).

    `activation_checkpointing` recomputes each block in the backward pass instead of
    storing its activations (less memory, about a third more compute); `logits_chunk` is
    how many response positions go through the output projection at a time.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        # Tied: no separate parameter, so the state dict has no lm_head.weight (as HF saves).
        self.lm_head = (
            None
            if config.tie_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.activation_checkpointing = False
        # Response positions per chunk of the output projection (0: all at once).
        self.logits_chunk = DEFAULT_LOGITS_CHUNK
        # The raw config.json when loaded from a folder; export carries its other keys
        # (token ids, generation defaults) through unchanged.
        self.hf_config: dict[str, Any] = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor (the scheme of the HF Llama/Qwen2 code).

        | tensor                                   | init                        |
        | ---------------------------------------- | --------------------------- |
        | embed_tokens.weight                      | normal(0, initializer_range)|
        | q/k/v/o_proj, gate/up/down_proj weights  | normal(0, initializer_range)|
        | (qkv_proj, gate_up_proj when fused)      | normal(0, initializer_range)|
        | lm_head.weight (untied)                  | normal(0, initializer_range)|
        | q/k/v_proj biases (qkv_bias)             | zeros                       |
        | RMSNorm weights (q/k norms included)     | 1 - offset: a scale of 1    |
        """
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0 - module.offset)

    def compile_blocks(self, **options: Any) -> None:
        """`torch.compile` every decoder block in place (parameter names unchanged): the
        norms, projections, RoPE and MLP fuse; attention stays its backend's kernel.

        Args:
            **options: passed to `torch.compile` (default: inductor, shapes made dynamic
                after the first change, as flat batches change length every step).
        """
        for block in self.model.layers:
            block.compile(**options)

    @property
    def output_weight(self) -> Tensor:
        """(vocab, hidden) weight of the output projection."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention: AttentionFn,
        logit_index: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Logits, or the log-probs of given labels, for a batch.

        Args:
            input_ids: (B, T) token ids.
            position_ids: (B, T) RoPE positions (restart per pair / document).
            attention: the batch's attention backend (holds its mask rule).
            logit_index: optional (M,) indices into the flattened (B*T) positions: only
                those positions go through the output projection, which is where most of
                the memory of a large-vocabulary model goes.
            labels: optional (M,) token ids predicted at `logit_index`: then the head runs
                in chunks of `logits_chunk` positions (`training.logps.token_logps`) and
                only their log-probs come back. Inside `forward`, so that DDP and FSDP see
                the output weight used.

        Returns:
            (B, T, vocab) logits, (M, vocab) logits when `logit_index` is given, or (M,)
            fp32 log-probs when `labels` are given too.
        """
        c = self.config
        rope = rope_cos_sin(rope_inv_freq(c, input_ids.device), position_ids)
        # Gemma 3's sliding layers rotate with their own base.
        local = rope
        if c.rope_local_theta is not None:
            local = rope_cos_sin(rope_inv_freq(c, input_ids.device, sliding=True), position_ids)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        if c.embed_scale:  # the scale rounded to the embedding dtype first, as Gemma does
            x = x * torch.tensor(c.hidden_size**0.5, dtype=x.dtype, device=x.device)
        for block in self.model.layers:
            cos, sin = local if block.sliding else rope
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, attention, use_reentrant=False)
            else:
                x = block(x, cos, sin, attention)
        x = self.model.norm(x)
        if logit_index is not None:
            x = x.flatten(0, 1)[logit_index]  # (M, D)
        if labels is not None:
            return token_logps(x, self.output_weight, labels, self.logits_chunk)
        return F.linear(x, self.output_weight)
