"""Each family beyond Llama against transformers, with a tiny random config per family.

transformers (a test-only dependency) is the oracle, in both directions:
- transformers writes, we read: a folder from transformers' own config class and
  `save_pretrained` (its keys, its transformers 5 `rope_parameters`) loads as the named tiny
  config; the log-probs of packed `shared` rows (several pairs per row) on every backend that
  runs on CPU equal those transformers' model gives `prompt+chosen` and `prompt+rejected`
  alone, both computed in float64 from each side's fp32 logits. The sliding windows (8
  positions) are shorter than every pair, and dropping the window changes the log-probs, so
  the window is what is being compared.
- we write, transformers reads: our export of a random model loads with
  `AutoModelForCausalLM.from_pretrained` as the same architecture with equal logits, on
  sequences five windows long.
Hub-style config.json files (older transformers' keys) parse to the intended settings, and
what stays unsupported is refused with the setting named.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tests.training.pairs import Pair, pack, random_pairs, varied_rows
from tests.training.varlen_emulation import emulated_varlen
from training.attention import CausalAttention
from training.batch import PackedRows, collate
from training.checkpoint import (
    UnsupportedCheckpointError,
    config_from_hf,
    load_pretrained,
    save_pretrained,
)
from training.configs import tiny_gemma3, tiny_mistral, tiny_olmo2, tiny_phi3, tiny_qwen3
from training.model import CausalLM, LinearRopeScaling, ModelConfig
from training.train import TrainConfig, train

VOCAB = 512
WINDOW = 8  # the tiny windowed configs' sliding window
# Summed log-probs of about -55 nats agree to ~2e-6 (fp32 summation order); 10x margin.
TOL = {"rtol": 0.0, "atol": 2e-5}
# What our tiny configs hold, as transformers' config classes spell it.
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
}
# family: (our tiny config, transformers config class, model class, its other settings)
FAMILIES: dict[str, tuple[Callable[[], ModelConfig], str, str, dict]] = {
    "mistral": (
        tiny_mistral,
        "MistralConfig",
        "MistralForCausalLM",
        {"head_dim": 16, "rope_theta": 10_000.0, "sliding_window": WINDOW},
    ),
    "qwen3": (tiny_qwen3, "Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24, "rope_theta": 1e6}),
    "gemma3": (
        tiny_gemma3,
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 32,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_theta": 1e6,
            "rope_local_base_freq": 10_000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
            "tie_word_embeddings": True,
        },
    ),
    "olmo2": (tiny_olmo2, "Olmo2Config", "Olmo2ForCausalLM", {"rope_theta": 500_000.0}),
    # Phi-3's default pad id (32000) is outside the tiny vocabulary.
    "phi3": (
        tiny_phi3,
        "Phi3Config",
        "Phi3ForCausalLM",
        {"rope_theta": 10_000.0, "sliding_window": WINDOW, "pad_token_id": None},
    ),
}
WINDOWED = ("mistral", "gemma3", "phi3")


@pytest.fixture(autouse=True)
def _torch_seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    """10 pairs with multi-turn prompts (8 to 33 tokens): both sequences of every pair are
    longer than the window, and half of them more than twice as long."""
    pairs = random_pairs(np.random.default_rng(3), 10, VOCAB)
    assert all(len(p) + min(len(c), len(r)) > WINDOW for p, c, r in pairs)
    assert sum(len(p) + min(len(c), len(r)) > 2 * WINDOW for p, c, r in pairs) >= 5
    return pairs


def _randomize(model: torch.nn.Module, gemma: bool) -> None:
    """Every tensor random, norm weights around their identity (1, or 0 for Gemma's
    `1 + weight`), so a mis-mapped or ignored tensor changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            identity = 0.0 if gemma else 1.0
            p.normal_(identity if name.endswith("norm.weight") else 0.0, 0.1)


def _transformers_model(family: str, folder: Path) -> torch.nn.Module:
    """A random transformers model of the family's tiny config, saved to `folder`."""
    _, config_cls, model_cls, extra = FAMILIES[family]
    hf_config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    model = getattr(transformers, model_cls)(hf_config).eval()
    _randomize(model, family == "gemma3")
    model.save_pretrained(folder)
    return model


def _sum_by_pair(
    logits: torch.Tensor, labels: torch.Tensor, pair: torch.Tensor, rejected: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-softmax of fp32 logits, gathered at the labels, summed per pair."""
    logp = logits.double().log_softmax(-1).gather(-1, labels[:, None])[:, 0]
    sums = torch.zeros(n, 2, dtype=torch.float64).index_put((pair, rejected), logp, True)
    return sums[:, 0], sums[:, 1]


def _transformers_logps(model: torch.nn.Module, pairs: list[Pair]) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected) float64 sums from each pair's two separate sequences."""
    out: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    for prompt, chosen, rejected in pairs:
        for name, response in (("chosen", chosen), ("rejected", rejected)):
            ids = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))[None]
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0]  # (P + R, vocab) fp32
            p = len(prompt)
            logp = logits[p - 1 : -1].double().log_softmax(-1)
            out[name].append(logp.gather(-1, ids[0, p:, None]).sum())
    return torch.stack(out["chosen"]), torch.stack(out["rejected"])


def _packed_logps(
    model: CausalLM, pairs: list[Pair], backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) float64 sums from rows of 4, 4 and 2 `shared` pairs."""
    rows = pack(pairs, "shared", pairs_per_row=4, block_size=16)
    batch = collate(rows, "shared", backend, block_size=16)
    if backend == "varlen":  # its kernel is CUDA-only: the CPU emulation in its place
        batch = dataclasses.replace(
            batch, attention=dataclasses.replace(batch.attention, kernel=emulated_varlen)
        )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # eager flex on CPU says it is unfused
        logits = model(batch.input_ids, batch.position_ids, batch.attention, batch.logit_index)
    return _sum_by_pair(logits, batch.labels, batch.pair_index, batch.is_rejected, batch.num_pairs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_rows_equal_transformers_separate_sequences(
    tmp_path: Path, pairs: list[Pair], family: str
) -> None:
    """On dense, segments, varlen (emulated kernel) and flex (eager forward on CPU)."""
    builder = FAMILIES[family][0]
    theirs = _transformers_model(family, tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config == builder()  # the folder is exactly our tiny config
    want_chosen, want_rejected = _transformers_logps(theirs, pairs)
    assert (want_chosen - want_rejected).abs().min() > 1e-3  # no accidental symmetry
    for backend in ("dense", "segments", "varlen", "flex"):
        chosen, rejected = _packed_logps(ours, pairs, backend)
        torch.testing.assert_close(chosen, want_chosen, **TOL, msg=backend)
        torch.testing.assert_close(rejected, want_rejected, **TOL, msg=backend)
    if family in WINDOWED:  # the window cuts these pairs: without it they differ
        unwindowed = CausalLM(dataclasses.replace(ours.config, sliding_window=None))
        unwindowed.load_state_dict(ours.state_dict())
        chosen, rejected = _packed_logps(unwindowed, pairs, "segments")
        assert (chosen - want_chosen).abs().max() > 1e-2
        assert (rejected - want_rejected).abs().max() > 1e-2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_reads_our_export_with_equal_logits(tmp_path: Path, family: str) -> None:
    builder, _, model_cls, _ = FAMILIES[family]
    model = CausalLM(builder())
    model.hf_config = {"pad_token_id": None}  # a token id the tiny vocabulary has
    _randomize(model, family == "gemma3")
    folder = save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=40_000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(hf).__name__ == model_cls
    ids = torch.randint(0, VOCAB, (2, 5 * WINDOW))
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        ours, theirs = model(ids, pos, CausalAttention()), hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.3  # logits far from zero: equality is not trivial
    assert load_pretrained(folder).config == model.config  # and it reads back as written


def test_gemma3_hub_config_parses() -> None:
    """Gemma 3 configs as older transformers wrote them: no `layer_types` (every sixth
    layer full), `rope_local_base_freq`, the full layers' `rope_scaling`."""
    hf = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "rope_theta": 1000000,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "vocab_size": 262144,
    }
    config = config_from_hf(hf)
    assert config.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(26))
    assert [config.window(i) for i in (0, 4, 5, 11)] == [512, 512, None, None]
    assert (config.rope_theta, config.rope_local_theta) == (1e6, 1e4)
    assert config.rope_scaling == LinearRopeScaling(factor=8.0)
    assert config.query_pre_attn_scalar is None  # 256 = head_dim: the default scale
    assert config.tie_embeddings and config.norm_offset == 1.0


def test_phi3_hub_config_parses() -> None:
    """Phi-3-mini-4k's shape: no head_dim key, a 2047-position window, no rope scaling."""
    hf = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "hidden_act": "silu",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": 2047,
        "tie_word_embeddings": False,
        "vocab_size": 32064,
    }
    config = config_from_hf(hf)
    assert config.fused_projections and config.sliding_window == 2047
    assert config.window(31) == 2047 and config.dim_per_head == 96


def _family_folder(tmp_path: Path, family: str) -> Path:
    model = CausalLM(FAMILIES[family][0]())
    return save_pretrained(model, tmp_path / family)


@pytest.mark.parametrize(
    ("family", "changes", "message"),
    [
        (
            "phi3",
            {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
            "rope scaling type 'longrope' is not supported",
        ),
        ("phi3", {"rope_scaling": {"type": "su", "short_factor": [1.0]}}, "type 'su'"),
        ("phi3", {"partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75 is not supported"),
        ("phi3", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling is not"),
        ("phi3", {"resid_pdrop": 0.1}, "resid_pdrop > 0 is not supported"),
        ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping is not"),
        ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping is not"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation must be gelu_pytorch"),
        ("gemma3", {"model_type": "gemma3"}, "model_type must be gemma3_text"),
        ("gemma3", {"architectures": ["Gemma3ForConditionalGeneration"]}, "not supported"),
        ("gemma3", {"layer_types": ["sliding_attention", "chunked"]}, r"layer_types \['chunked"),
        ("qwen3", {"use_sliding_window": True}, "use_sliding_window is not supported"),
        ("olmo2", {"attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_family_settings_are_named(
    tmp_path: Path, family: str, changes: dict, message: str
) -> None:
    folder = _family_folder(tmp_path, family)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(UnsupportedCheckpointError, match=message):
        load_pretrained(folder)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            dataclasses.replace(tiny_gemma3(), norm_offset=0.0),
            r"Gemma3ForCausalLM needs norm_offset=1.0 \(the config has 0.0\)",
        ),
        (dataclasses.replace(tiny_qwen3(), sliding_window=8), "has no sliding window"),
        (dataclasses.replace(tiny_phi3(), head_dim=32), "cannot express an explicit head_dim"),
        (
            dataclasses.replace(tiny_mistral(), sliding_layers=(True, False)),
            "cannot mark sliding layers",
        ),
        (dataclasses.replace(tiny_olmo2(), query_pre_attn_scalar=8), "no query_pre_attn_scalar"),
    ],
)
def test_export_refuses_what_the_family_cannot_express(
    tmp_path: Path, config: ModelConfig, message: str
) -> None:
    with pytest.raises(UnsupportedCheckpointError, match=message):
        save_pretrained(CausalLM(config), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_sliding_window_model_trains_on_rows_longer_than_its_window(tmp_path: Path) -> None:
    """Rows of up to 4 pairs (100+ tokens) against an 8-position window: no longer refused;
    two steps on `segments`, and the export is a Gemma 3 folder transformers reads with our
    logits."""
    rows = varied_rows(0, "shared")
    assert max(r.num_tokens for r in rows) > 10 * WINDOW
    model = CausalLM(tiny_gemma3())
    config = TrainConfig(
        out_dir=tmp_path / "run",
        steps=2,
        lr=1e-3,
        warmup_steps=1,
        batch_rows=2,
        progress=False,
        backend="segments",
    )
    train(config, PackedRows(rows, "shared", 16, 512), model=model)
    final = tmp_path / "run" / "final"
    ours = load_pretrained(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    ids = torch.randint(0, VOCAB, (1, 5 * WINDOW))
    with torch.no_grad():
        mine = ours(ids, torch.arange(ids.shape[1])[None], CausalAttention())
        torch.testing.assert_close(mine, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
