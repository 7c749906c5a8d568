"""A Llama-family decoder that loads Llama, Qwen2, Mistral and SmolLM checkpoints.

Notable choices (the union of what those families need, nothing more):
- RMSNorm computed in fp32 and cast back, as the reference implementations do.
- RoPE (rotate-half convention) from *explicit* position ids: a packed row restarts
  positions per pair and the rejected response reuses the chosen one's positions.
  Optional Llama 3.1 frequency-dependent scaling.
- Grouped-query attention; optional bias on q/k/v (Qwen2); no bias elsewhere.
- SwiGLU MLP; optional tied input/output embeddings (SmolLM, small Qwen2).
- Attention itself is a callable passed in with the batch (`training/attention.py`), so the
  same weights run the dense, segments, varlen and FlexAttention backends; q/k/v travel as
  (B, T, heads, head_dim), the layout FlashAttention's varlen kernel reads.
- With labels, the output projection runs in chunks of response positions and returns
  their log-probs only (`training/logps.py`): no (tokens x vocab) logits are held.
- Module and parameter names equal the Hugging Face checkpoint keys, so loading is a
  shape-checked `load_state_dict` (`training/checkpoint.py`), no renaming table.

References: Llama (Touvron et al. 2023, arXiv:2302.13971), RoFormer (Su et al. 2021,
arXiv:2104.09864), GQA (Ainslie et al. 2023, arXiv:2305.13245), SwiGLU (Shazeer 2020,
arXiv:2002.05202); the Llama 3.1 rope scaling follows Meta's llama-models reference code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from training.logps import DEFAULT_LOGITS_CHUNK, token_logps

Family = Literal["llama", "qwen2", "mistral"]
# (q, k, v) -> attention output (B, T, nh, hd); q (B, T, nh, hd), k and v (B, T, nkv, hd).
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 rope scaling: long wavelengths are stretched by `factor`, short ones kept,
    the band between interpolated smoothly (values of Llama 3.1 as defaults)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192  # context length the model was trained at


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
    rope_scaling: RopeScaling | None = None  # Llama 3.1+ long-context frequency scaling
    max_position_embeddings: int = 2048  # recorded for export; RoPE itself has no table
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v projections (not on o_proj)
    tie_embeddings: bool = False  # output projection reuses the input embedding (SmolLM)
    sliding_window: int | None = None  # Mistral v0.1: keys further back are invisible
    initializer_range: float = 0.02  # std of the normal init, as in the HF configs
    family: Family = "llama"  # which Hugging Face architecture export writes

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

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


# -----------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with Llama 3.1 scaling when configured."""
    d = config.dim_per_head
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
    )
    s = config.rope_scaling
    if s is None:
        return inv_freq
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
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 for stability."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x^2) + eps)
        return self.weight * h.to(x.dtype)


@torch.compiler.disable
def _attend(attention: AttentionFn, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The backend call, kept out of `torch.compile`'s graphs (a graph break per layer):
    each backend runs its own kernel (FlashAttention varlen, compiled FlexAttention, SDPA),
    and the per-batch index tensors and lengths it holds never trigger a recompile."""
    return attention(q, k, v)


class Attention(nn.Module):
    """Grouped-query self-attention; the masking rule comes with the batch."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hd, nh, nkv = config.dim_per_head, config.num_heads, config.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, hd
        self.q_proj = nn.Linear(config.hidden_size, nh * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, nkv * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, nkv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, T, nh|nkv, hd)
        y = _attend(attention, q, k, v)  # (B, T, nh, hd)
        return self.o_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionFn) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, blocks and final norm (the `model.` prefix of HF checkpoint keys)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


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
        | lm_head.weight (untied)                  | normal(0, initializer_range)|
        | q/k/v_proj biases (qkv_bias)             | zeros                       |
        | RMSNorm weights                          | ones                        |
        """
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

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
        cos, sin = rope_cos_sin(rope_inv_freq(self.config, input_ids.device), position_ids)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        for block in self.model.layers:
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
