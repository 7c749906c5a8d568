"""Named model sizes for tests, the bundled sample job and benchmarks.

Zero-argument builders (torchtune's `_model_builders` habit): the sizes are fixed here, in
one place. The vocabulary must match the tokenizer of the shards; callers that train a
named size on their own tokenizer use `dataclasses.replace(config, vocab_size=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from training.model import LinearRopeScaling, ModelConfig, RopeScaling, family_traits


def tiny() -> ModelConfig:
    """2 layers, width 64, GQA 4:2: fast enough for unit tests on a laptop CPU."""
    return ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )


def tiny_qwen2() -> ModelConfig:
    """`tiny` in the Qwen2 shape: q/k/v biases, tied embeddings, a large RoPE base."""
    return replace(
        tiny(), rope_theta=1_000_000.0, qkv_bias=True, tie_embeddings=True, family="qwen2"
    )


def tiny_llama3() -> ModelConfig:
    """`tiny` with Llama 3.1 rope scaling (original context 64, so scaling bites)."""
    return replace(
        tiny(),
        rope_theta=500_000.0,
        rope_scaling=RopeScaling(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    )


def tiny_mistral() -> ModelConfig:
    """`tiny` with a Mistral v0.1 sliding window on every layer, 8 positions: shorter than
    the test pairs, so the window matters."""
    return replace(tiny(), **family_traits("mistral"), sliding_window=8)


def tiny_qwen3() -> ModelConfig:
    """`tiny` in the Qwen3 shape: per-head q/k RMSNorm, head_dim 24 apart from 64 / 4."""
    return replace(tiny(), **family_traits("qwen3"), head_dim=24, rope_theta=1_000_000.0)


def tiny_gemma3() -> ModelConfig:
    """`tiny` in the Gemma 3 shape: (1 + weight) sandwich norms, per-head q/k norms, GeGLU,
    embeddings scaled by sqrt(64) and tied, head_dim 32 with scores scaled by 24**-0.5;
    layer 0 slides (window 8, RoPE base 10k), layer 1 is full (base 1M, linear scaling 4)."""
    return replace(
        tiny(),
        **family_traits("gemma3"),
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=8,
        sliding_layers=(True, False),
        rope_theta=1_000_000.0,
        rope_local_theta=10_000.0,
        rope_scaling=LinearRopeScaling(factor=4.0),
        tie_embeddings=True,
    )


def tiny_olmo2() -> ModelConfig:
    """`tiny` in the OLMo 2 shape: norms after attention and MLP, q/k RMSNorm over the
    whole projections."""
    return replace(tiny(), **family_traits("olmo2"), rope_theta=500_000.0)


def tiny_phi3() -> ModelConfig:
    """`tiny` in the Phi-3 shape: fused qkv_proj and gate_up_proj, a sliding window of 8 on
    every layer."""
    return replace(tiny(), **family_traits("phi3"), sliding_window=8)


def small() -> ModelConfig:
    """4 layers, width 256: the training benchmark's model (SmolLM-style tied embeddings)."""
    return ModelConfig(
        vocab_size=8_192,
        hidden_size=256,
        intermediate_size=704,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=8_192,
        tie_embeddings=True,
    )


def smollm2_135m() -> ModelConfig:
    """SmolLM2-135M's shape (30 layers, width 576, GQA 9:3, vocab 49,152, tied): the real
    model the benchmarks compare with other trainers, here randomly initialised."""
    return ModelConfig(
        vocab_size=49_152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=100_000.0,
        max_position_embeddings=8_192,
        tie_embeddings=True,
        initializer_range=0.041666666666666664,
    )


def llama3_2_1b() -> ModelConfig:
    """Llama 3.2 1B's shape (16 layers, width 2048, GQA 32:8, vocab 128,256, tied): the
    GPU benchmark's model, randomly initialised."""
    return ModelConfig(
        vocab_size=128_256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500_000.0,
        max_position_embeddings=8_192,
        tie_embeddings=True,
    )


def qwen3_1_7b() -> ModelConfig:
    """Qwen3-1.7B's shape (28 layers, width 2048, GQA 16:8, head_dim 128, vocab 151,936,
    tied), randomly initialised."""
    return ModelConfig(
        vocab_size=151_936,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=40_960,
        tie_embeddings=True,
        **family_traits("qwen3"),
    )


def gemma3_1b() -> ModelConfig:
    """Gemma 3 1B's shape (26 layers, width 1152, GQA 4:1, head_dim 256, vocab 262,144,
    tied; a 512-token window on five of every six layers), randomly initialised."""
    return ModelConfig(
        vocab_size=262_144,
        hidden_size=1152,
        intermediate_size=6912,
        num_layers=26,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_local_theta=10_000.0,
        query_pre_attn_scalar=256,
        sliding_window=512,
        sliding_layers=tuple((i + 1) % 6 != 0 for i in range(26)),
        max_position_embeddings=32_768,
        tie_embeddings=True,
        **family_traits("gemma3"),
    )


NAMED_CONFIGS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "tiny_qwen2": tiny_qwen2,
    "tiny_llama3": tiny_llama3,
    "tiny_mistral": tiny_mistral,
    "tiny_qwen3": tiny_qwen3,
    "tiny_gemma3": tiny_gemma3,
    "tiny_olmo2": tiny_olmo2,
    "tiny_phi3": tiny_phi3,
    "small": small,
    "smollm2_135m": smollm2_135m,
    "llama3_2_1b": llama3_2_1b,
    "qwen3_1_7b": qwen3_1_7b,
    "gemma3_1b": gemma3_1b,
}


def named_config(name: str) -> ModelConfig:
    """The config registered under `name`.

    Raises:
        ValueError: naming the known configs when `name` is not one of them.
    """
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name]()
