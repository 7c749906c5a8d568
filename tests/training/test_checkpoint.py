"""Hugging Face folders: round trips, sharding, `transformers` as the oracle, and atomic
saves (a kill leaves no folder; the next save removes the leftover; ordinary modes).

transformers is a test-only dependency: it reads the folders we write and writes folders
we read, and its logits must equal ours for the same tiny random weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

import training.checkpoint as checkpoint
from training.attention import CausalAttention
from training.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    UnsupportedCheckpointError,
    load_pretrained,
    model_fingerprint,
    save_pretrained,
)
from training.configs import tiny, tiny_llama3, tiny_qwen2
from training.model import CausalLM, ModelConfig


@pytest.fixture(autouse=True)
def _torch_seed() -> None:
    torch.manual_seed(0)


def _random_model(config_builder: Callable[[], ModelConfig]) -> CausalLM:
    """A model whose every tensor is random, biases and norm weights included, so a
    mis-mapped or ignored tensor changes the logits."""
    model = CausalLM(config_builder())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    return model


def _our_logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, CausalAttention())


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return hf(input_ids=ids).logits


@pytest.mark.parametrize(
    ("builder", "architecture"),
    [(tiny_llama3, "LlamaForCausalLM"), (tiny_qwen2, "Qwen2ForCausalLM")],
)
def test_transformers_reads_our_folder_with_equal_logits(
    tmp_path: Path, builder, architecture: str
) -> None:
    """Llama with GQA and Llama 3.1 rope scaling (sequence longer than the original context
    of 64, so the scaling matters); Qwen2 with q/k/v biases and tied embeddings."""
    model = _random_model(builder)
    folder = save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=40_000)
    assert (folder / INDEX_NAME).exists()  # sharded: the index path is exercised too
    assert json.loads((folder / "config.json").read_text())["architectures"] == [architecture]
    ids = torch.randint(0, 512, (2, 80))
    ours, theirs = _our_logits(model, ids), _hf_logits(folder, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.std() > 0.3  # logits far from zero: equality is not trivial


@pytest.mark.parametrize(
    ("config_cls", "model_cls", "extra"),
    [
        ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),  # SmolLM shape
        ("MistralConfig", "MistralForCausalLM", {"sliding_window": None, "head_dim": 8}),
        ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    ],
)
def test_we_read_folders_transformers_wrote(
    tmp_path: Path, config_cls: str, model_cls: str, extra: dict
) -> None:
    """transformers 5 writes `rope_parameters` instead of `rope_theta`; both must parse."""
    hf_config = getattr(transformers, config_cls)(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=123_456.0,
        **extra,
    )
    hf_model = getattr(transformers, model_cls)(hf_config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.rope_theta == 123_456.0
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        theirs = hf_model(input_ids=ids).logits
    torch.testing.assert_close(_our_logits(ours, ids), theirs, rtol=1e-4, atol=1e-4)


def test_round_trip_keeps_weights_extra_keys_and_tokenizer(tmp_path: Path) -> None:
    model = _random_model(tiny)
    model.hf_config = {"bos_token_id": 7, "eos_token_id": 8}
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    folder = save_pretrained(model, tmp_path / "ckpt", tokenizer=tmp_path / "tok")
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {
        p.name for p in folder.iterdir()
    }
    loaded = load_pretrained(folder)
    assert loaded.config == model.config
    assert loaded.hf_config["bos_token_id"] == 7
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert model_fingerprint(loaded) == model_fingerprint(model)
    with pytest.raises(FileExistsError):
        save_pretrained(model, folder)


def test_bf16_export_loads_back_to_fp32_and_changes_the_fingerprint(tmp_path: Path) -> None:
    model = _random_model(tiny)
    folder = save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_pretrained(folder)
    assert loaded.model.norm.weight.dtype == torch.float32
    torch.testing.assert_close(
        loaded.model.norm.weight, model.model.norm.weight.bfloat16().float(), rtol=0, atol=0
    )
    assert model_fingerprint(loaded) != model_fingerprint(model)


def _write_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel.. not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act must be silu"),
        ({"quantization_config": {"bits": 4}}, "quantized checkpoints"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_interleaved": True}, "rope_interleaved"),
    ],
)
def test_unsupported_settings_are_named(tmp_path: Path, changes: dict, message: str) -> None:
    folder = save_pretrained(CausalLM(tiny()), tmp_path / "ckpt")
    _write_config(folder, **changes)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        load_pretrained(folder)


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    folder = save_pretrained(CausalLM(tiny()), tmp_path / "ckpt")
    _write_config(folder, intermediate_size=96)
    with pytest.raises(
        ValueError,
        match=r"mlp.gate_proj.weight has shape \(128, 64\), the config implies \(96, 64\)",
    ):
        load_pretrained(folder)


def test_untied_config_over_tied_weights_names_the_missing_tensor(tmp_path: Path) -> None:
    folder = save_pretrained(CausalLM(tiny_qwen2()), tmp_path / "ckpt")
    _write_config(folder, tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        load_pretrained(folder)


def test_pickled_weights_are_not_read(tmp_path: Path) -> None:
    folder = save_pretrained(CausalLM(tiny()), tmp_path / "ckpt")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pickled \.bin weights are not read"):
        load_pretrained(folder)


def test_qwen2_export_refuses_a_config_it_cannot_express(tmp_path: Path) -> None:
    model = CausalLM(dataclasses.replace(tiny(), family="qwen2"))
    with pytest.raises(UnsupportedCheckpointError, match="needs qkv_bias=True"):
        save_pretrained(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# Saves a tiny model to argv[1] and kill -9s itself once the weights file is written.
_KILLED_SAVE = """
import os, signal, sys
import training.checkpoint as checkpoint
from training.configs import tiny
from training.model import CausalLM

real = checkpoint.save_file
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = save_then_die
checkpoint.save_pretrained(CausalLM(tiny()), sys.argv[1])
"""


def test_a_kill_mid_save_leaves_no_folder_and_the_next_save_removes_the_leftover(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    folder = tmp_path / "ckpt"
    killed = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(folder)], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert not folder.exists()
    [leftover] = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    assert (leftover / WEIGHTS_NAME).is_file()  # killed after the weights, before the rename
    size = sum(p.stat().st_size for p in leftover.iterdir())
    with caplog.at_level(logging.WARNING, logger="core.atomic"):
        save_pretrained(CausalLM(tiny()), folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert any(
        f"removed 1 leftover(s) of interrupted runs, {size} bytes" in m for m in caplog.messages
    )
    assert load_pretrained(folder).config == tiny()


def test_saved_folders_get_the_modes_the_umask_gives(tmp_path: Path) -> None:
    """safetensors writes its file 0600; a checkpoint is shared data: 0644 under umask 022."""
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "tok" / "tokenizer.json").chmod(0o600)
    old = os.umask(0o022)
    try:
        folder = save_pretrained(CausalLM(tiny()), tmp_path / "ckpt", tokenizer=tmp_path / "tok")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == dict.fromkeys(["config.json", WEIGHTS_NAME, "tokenizer.json"], 0o644)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_weights_stream_into_shards_written_as_each_completes(tmp_path: Path, monkeypatch) -> None:
    """Each shard file is written once its tensors have arrived and before the next one
    is asked for: a gathered model is never held whole; the folder loads back equal."""
    model = _random_model(tiny_llama3)
    consumed, written = [], []

    def weights():
        for key, tensor in model.state_dict().items():
            consumed.append(key)
            yield key, tensor.clone()

    real_save = checkpoint.save_file

    def recording_save(shard, path, metadata=None):
        written.append((len(consumed), len(shard)))
        real_save(shard, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", recording_save)
    folder = save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=40_000, tensors=weights())
    assert len(written) > 2
    assert [c for c, _ in written] == list(itertools.accumulate(n for _, n in written))
    loaded = load_pretrained(folder).state_dict()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
