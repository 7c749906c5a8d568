"""Named model sizes for tests, the bundled sample job and benchmarks.

Zero-argument builders (torchtune's `_model_builders` habit): the sizes are fixed here, in
one place. The vocabulary must match the tokenizer of the shards; callers that train a
named size on their own tokenizer use `dataclasses.replace(config, vocab_size=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from training.model import ModelConfig, RopeScaling


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


NAMED_CONFIGS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "tiny_qwen2": tiny_qwen2,
    "tiny_llama3": tiny_llama3,
    "small": small,
    "smollm2_135m": smollm2_135m,
    "llama3_2_1b": llama3_2_1b,
}


def named_config(name: str) -> ModelConfig:
    """The config registered under `name`.

    Raises:
        ValueError: naming the known configs when `name` is not one of them.
    """
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name]()
