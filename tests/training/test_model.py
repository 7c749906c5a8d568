"""The decoder's building blocks, on the tiny named configs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.training.pairs import varied_rows
from training.attention import CausalAttention
from training.batch import collate
from training.configs import (
    NAMED_CONFIGS,
    named_config,
    tiny,
    tiny_gemma3,
    tiny_llama3,
    tiny_mistral,
    tiny_olmo2,
    tiny_phi3,
    tiny_qwen2,
)
from training.logps import pair_logps
from training.model import CausalLM, ModelConfig, RMSNorm, family_traits, rope_inv_freq


@pytest.fixture(autouse=True)
def _torch_seed() -> None:
    torch.manual_seed(0)


def _logits(model: CausalLM, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return model(ids, positions, CausalAttention())


def test_named_configs_build_and_run() -> None:
    ids = torch.randint(0, 512, (2, 7))
    for name in NAMED_CONFIGS:
        config = named_config(name)
        if config.hidden_size > 64:
            continue  # the benchmark size; building it is enough
        out = _logits(CausalLM(config), ids, torch.arange(7).expand(2, 7))
        assert out.shape == (2, 7, config.vocab_size)
    with pytest.raises(ValueError, match="unknown model config 'huge'"):
        named_config("huge")


def test_shifting_all_positions_leaves_logits_unchanged() -> None:
    """RoPE attention depends only on position differences, so adding 37 to every position
    id of a causal sequence changes nothing (absolute position codes would)."""
    model = CausalLM(tiny())
    ids = torch.randint(0, 512, (1, 9))
    pos = torch.arange(9)[None]
    torch.testing.assert_close(_logits(model, ids, pos), _logits(model, ids, pos + 37))
    assert not torch.allclose(_logits(model, ids, pos), _logits(model, ids, pos.flip(-1)))


def test_llama3_scaling_divides_only_long_wavelengths() -> None:
    """With original context 64 and factors (1, 4): wavelengths below 64/4 = 16 keep their
    frequency, above 64/1 = 64 are divided by 8, and those between are interpolated."""
    config = tiny_llama3()
    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
    scaled = rope_inv_freq(config)
    wavelen = 2 * math.pi / plain
    short, long_ = wavelen < 16, wavelen > 64
    assert short.any() and long_.any() and (~short & ~long_).any()
    torch.testing.assert_close(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long_], plain[long_] / 8)
    mid = ~short & ~long_
    assert ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all()


def test_rmsnorm_normalises_in_fp32() -> None:
    """rms([3, 4]) = sqrt(12.5); weight 2 gives 2 * x / rms."""
    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.fill_(2.0)
    x = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(norm(x), 2 * x / math.sqrt(12.5))
    assert norm(x.bfloat16()).dtype == torch.float32  # fp32 weight times bf16 promotes


def test_gemma_norm_scales_by_one_plus_weight_in_fp32() -> None:
    """rms([3, 4]) = sqrt(12.5); weight 1 with offset 1 gives 2 * x / rms; the result is
    cast back to the input's dtype (Gemma and OLMo 2 scale in fp32, then cast)."""
    norm = RMSNorm(2, eps=0.0, offset=1.0, scale_fp32=True)
    x = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(norm(x), 2 * x / math.sqrt(12.5))
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_sliding_layers_take_their_window_and_rope_base() -> None:
    """tiny_gemma3: layer 0 slides (window 8, RoPE base 10k, unscaled), layer 1 is full
    (base 1M, frequencies divided by the linear factor 4)."""
    config = tiny_gemma3()
    model = CausalLM(config)
    first, second = model.model.layers
    assert (first.sliding, first.self_attn.window) == (True, 8)
    assert (second.sliding, second.self_attn.window) == (False, None)
    assert first.self_attn.scale == 24**-0.5
    exponents = torch.arange(0, 32, 2).float() / 32
    torch.testing.assert_close(rope_inv_freq(config, sliding=True), 1 / 10_000.0**exponents)
    torch.testing.assert_close(rope_inv_freq(config), 1 / 1_000_000.0**exponents / 4)
    mistral = tiny_mistral()  # no base of its own: sliding layers rotate as full ones
    torch.testing.assert_close(rope_inv_freq(mistral, sliding=True), rope_inv_freq(mistral))


def test_a_window_only_matters_past_its_length() -> None:
    """An 8-position window: a sequence of 8 tokens gives full attention's logits, the
    ninth token's differ (it no longer sees token 0)."""
    windowed = CausalLM(tiny_mistral())
    full = CausalLM(dataclasses.replace(tiny_mistral(), sliding_window=None))
    full.load_state_dict(windowed.state_dict())
    ids = torch.randint(0, 512, (1, 9))
    pos = torch.arange(9)[None]
    a, b = _logits(windowed, ids, pos), _logits(full, ids, pos)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert (a[:, 8] - b[:, 8]).abs().max() > 1e-3


def test_fused_projections_compute_what_separate_ones_do() -> None:
    """Phi-3's qkv_proj is [q; k; v] stacked by rows and gate_up_proj is [gate; up]: a
    Llama model holding the slices gives the same logits."""
    fused = CausalLM(tiny_phi3())
    plain = CausalLM(dataclasses.replace(tiny_phi3(), **family_traits("mistral")))
    state = {}
    for key, value in fused.state_dict().items():
        if key.endswith("qkv_proj.weight"):
            q, k, v = value.split([64, 32, 32])
            state |= {
                key.replace("qkv_proj", p): t
                for p, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v), strict=True)
            }
        elif key.endswith("gate_up_proj.weight"):
            gate, up = value.chunk(2)
            state |= {
                key.replace("gate_up_proj", "gate_proj"): gate,
                key.replace("gate_up_proj", "up_proj"): up,
            }
        else:
            state[key] = value
    plain.load_state_dict(state)
    ids = torch.randint(0, 512, (1, 12))
    pos = torch.arange(12)[None]
    torch.testing.assert_close(_logits(fused, ids, pos), _logits(plain, ids, pos), rtol=0, atol=0)


def test_norm_placements_name_the_checkpoint_norms() -> None:
    """Each family's block holds exactly its checkpoint's norms (a missing or extra one would
    fail the load); OLMo 2's q/k norms cover the whole projections."""

    def norms(builder) -> list[str]:
        block = CausalLM(builder()).model.layers[0]
        return sorted(n for n, _ in block.named_children() if n.endswith("layernorm"))

    assert norms(tiny) == ["input_layernorm", "post_attention_layernorm"]
    assert norms(tiny_olmo2) == ["post_attention_layernorm", "post_feedforward_layernorm"]
    assert norms(tiny_gemma3) == [
        "input_layernorm",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
        "pre_feedforward_layernorm",
    ]
    attn = CausalLM(tiny_olmo2()).model.layers[0].self_attn
    assert (attn.q_norm.weight.shape, attn.k_norm.weight.shape) == ((64,), (32,))


def test_tied_embeddings_have_one_tensor() -> None:
    model = CausalLM(tiny_qwen2())
    assert "lm_head.weight" not in model.state_dict()
    assert model.output_weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.model.layers[0].self_attn.o_proj.bias is None


def test_init_weights_follows_its_table() -> None:
    model = CausalLM(tiny_qwen2())
    attn = model.model.layers[0].self_attn
    assert abs(model.model.embed_tokens.weight.std().item() - 0.02) < 0.002
    assert abs(model.model.layers[1].mlp.up_proj.weight.std().item() - 0.02) < 0.002
    assert attn.q_proj.bias.abs().sum() == 0
    assert (model.model.norm.weight == 1).all()
    assert (model.model.layers[0].input_layernorm.weight == 1).all()
    gemma = CausalLM(tiny_gemma3())  # (1 + weight) norms start at weight 0: a scale of 1
    assert (gemma.model.layers[0].self_attn.q_norm.weight == 0).all()
    assert (gemma.model.norm.weight == 0).all()


def test_config_rejects_heads_that_do_not_group() -> None:
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelConfig(hidden_size=66, num_heads=4)


def test_config_checks_windows() -> None:
    with pytest.raises(ValueError, match="sliding_layers names 3 layers, the model has 2"):
        ModelConfig(sliding_window=4, sliding_layers=(True, False, True))
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        ModelConfig(sliding_window=0)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    model = CausalLM(tiny())
    ids = torch.randint(0, 512, (2, 11))
    pos = torch.arange(11).expand(2, 11)
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        _logits(model, ids, pos).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)


def test_logit_index_selects_flat_positions() -> None:
    model = CausalLM(tiny())
    ids = torch.randint(0, 512, (2, 5))
    pos = torch.arange(5).expand(2, 5)
    full = _logits(model, ids, pos)
    index = torch.tensor([0, 4, 7, 9])  # (row 0, pos 0), (0, 4), (1, 2), (1, 4)
    picked = model(ids, pos, CausalAttention(), index)
    torch.testing.assert_close(picked, full.flatten(0, 1)[index])


def test_compiled_blocks_give_the_eager_log_probs_and_gradients() -> None:
    """Dynamo captures each block around the attention call (AOTAutograd traces forward and
    backward; inductor's code generation is what `--compile` adds on a GPU, and is left out
    here for time); two batches of different lengths reuse the compiled code."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    batches = [
        collate(varied_rows(0, "shared")[i : i + 3], "shared", "segments", 16) for i in (0, 3)
    ]
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = CausalLM(tiny())
        if compiled:
            model.compile_blocks(backend="aot_eager", dynamic=True)
        for batch in batches:
            model.zero_grad()
            logps = pair_logps(model, batch)
            (logps.chosen - 2 * logps.rejected).sum().backward()
            results.append((logps.chosen.detach(), [p.grad.clone() for p in model.parameters()]))
    for (eager, eager_grads), (comp, comp_grads) in zip(results[:2], results[2:], strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-5)
        for got, want in zip(comp_grads, eager_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] >= 2  # before and after attention
