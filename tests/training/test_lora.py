"""LoRA (`training/lora.py`): the base stays the base, PEFT reads what we write, and a LoRA
run trains, resumes and parallelises exactly.

peft and transformers (test-only dependencies) are the oracle for the export: our merged
`final/` loaded by transformers equals the transformers base with our `final/adapter/`
applied by `peft.PeftModel.from_pretrained`, logit for logit.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

import prefpack
from core.settings import SettingError
from tests.conftest import assert_one_error_line
from tests.training.conftest import tiny_checkpoint, with_model
from tests.training.dist_worker import (
    LORA_DROPOUT,
    LORA_RANK,
    STEPS,
    seeded_model,
    torchrun_prefpack,
    torchrun_workers,
    worker_config,
    worker_eval_data,
)
from tests.training.pairs import varied_rows
from training.attention import CausalAttention
from training.batch import PackedRows, collate
from training.checkpoint import load_pretrained, model_fingerprint, save_pretrained
from training.configs import tiny, tiny_phi3
from training.logps import pair_logps
from training.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    LoraSettings,
    adapted,
    adapters_off,
    add_adapters,
    initial_adapters,
)
from training.model import CausalLM
from training.parallel import fill_tensors
from training.reference import ReferenceKey, ReferenceLogps, compute_reference_logps
from training.train import release, setup, train, train_step
from training.train_config import TrainConfig

RANK = 4
ROWS = varied_rows(0, "shared")


def _data(rows: list | None = None) -> PackedRows:
    return PackedRows(rows or ROWS, "shared", block_size=16, max_len=512)


def _config(out_dir: Path, **changes: object) -> TrainConfig:
    base = TrainConfig(
        out_dir=out_dir,
        steps=4,
        lr=1e-2,
        warmup_steps=1,
        batch_rows=2,
        progress=False,
        lora_rank=RANK,
    )
    return replace(base, **changes)


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# -----------------------------------------------------------------------------
# The adapters and the base


def test_settings_are_refused_before_anything_is_read() -> None:
    """Unknown names and LoRA settings without a rank stop when the config is built."""
    with pytest.raises(SettingError, match=r"--lora-targets qkv attn: not a projection"):
        TrainConfig(Path("o"), lora_rank=4, lora_targets=("qkv", "q_proj", "attn"))
    with pytest.raises(SettingError, match="all-linear stands alone"):
        TrainConfig(Path("o"), lora_rank=4, lora_targets=("all-linear", "q_proj"))
    with pytest.raises(SettingError, match="--lora-alpha, --no-lora-merge without --lora-rank"):
        TrainConfig(Path("o"), lora_alpha=32.0, lora_merge=False)
    with pytest.raises(SettingError, match="--lora-dropout must be >= 0 and < 1"):
        TrainConfig(Path("o"), lora_rank=4, lora_dropout=1.0)


@pytest.mark.parametrize(
    ("builder", "targets", "named"),
    [
        (tiny, ("qkv_proj",), "its projections are q_proj k_proj v_proj o_proj gate_proj"),
        (tiny_phi3, ("q_proj", "o_proj"), "its projections are o_proj down_proj qkv_proj"),
    ],
)
def test_a_target_the_model_lacks_is_named_with_the_models_names(
    tmp_path: Path, builder, targets: tuple[str, ...], named: str
) -> None:
    model = CausalLM(builder())
    config = _config(tmp_path / "run", lora_targets=targets)
    with pytest.raises(ValueError, match=f"--lora-targets {targets[0]}: .*{named}"):
        setup(config, _data(), model)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_adapters_off_is_the_base_model_exactly() -> None:
    """With the adapters off (the live reference) the log-probs are the base model's, bit
    for bit, even with B far from 0; on, they differ; at init (B = 0) they are the base's
    too, so a LoRA run starts where its base is. Base weights keep their keys and tensors."""
    base = seeded_model()
    model = copy.deepcopy(base)
    weights = {name: p for name, p in model.named_parameters()}
    batch = collate(ROWS[:3], "shared", "segments", 16)
    with torch.no_grad():
        want = pair_logps(base, batch)
        add_adapters(model, LoraSettings(RANK, 8.0, 0.0, ("all-linear",), 0))
        fill_tensors(model, initial_adapters(model, 0))
        at_init = pair_logps(model, batch)
        for module in adapted(model).values():
            module.lora_B.weight.normal_(0.0, 0.1)
        with adapters_off(model):
            off = pair_logps(model, batch)
        on = pair_logps(model, batch)
    for got in (off, at_init):
        assert torch.equal(got.chosen, want.chosen) and torch.equal(got.rejected, want.rejected)
    assert (on.chosen - want.chosen).abs().min() > 1e-3
    assert len(adapted(model)) == 2 * 7  # every projection of both blocks
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            assert weights[name] is p and not p.requires_grad  # the same frozen tensor
    assert model_fingerprint(model) == model_fingerprint(base)  # adapters are not part of it


def test_only_the_adapters_train_and_the_base_stays_bit_identical(tmp_path: Path) -> None:
    """Step 1 is the base model against itself: the loss is log 2 and every reward 0, with
    no second copy of the weights (no reference model); only adapter parameters have
    optimizer state; after training the base weights are bit-identical and the adapters
    (B from zero) have moved."""
    model = seeded_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = setup(_config(tmp_path / "run"), _data(), model)
    try:
        assert run.ref_model is None
        first = train_step(run, 0)
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
        assert first["rewards/chosen"] == first["rewards/rejected"] == 0
        for step in range(1, 4):
            last = train_step(run, step)
        adapter_params = {p for n, p in model.named_parameters() if ".lora_" in n}
        assert set(run.optimizer.state) == adapter_params
        assert {p for g in run.optimizer.param_groups for p in g["params"]} == adapter_params
    finally:
        release(run)
    assert last["loss"] < first["loss"]
    state = model.state_dict()
    for key, value in before.items():
        assert torch.equal(state[key], value), key
    assert all(m.lora_B.weight.abs().max() > 0 for m in adapted(model).values())


def test_a_stored_reference_is_the_base_models_and_trains_as_the_live_one(tmp_path: Path) -> None:
    """Stored log-probs are unchanged by LoRA: computed once from the base and keyed by
    its fingerprint, they train the run as the adapters-off reference does."""
    base = seeded_model()
    table = compute_reference_logps(base, ROWS, "shared", progress=False)
    stored = ReferenceLogps(table, ReferenceKey(model_fingerprint(base), "", "fp32"))
    train(_config(tmp_path / "live"), _data(), seeded_model())
    train(_config(tmp_path / "stored"), _data(), seeded_model(), reference=stored)
    live, kept = _metrics(tmp_path / "live"), _metrics(tmp_path / "stored")
    np.testing.assert_allclose([m["loss"] for m in kept], [m["loss"] for m in live], rtol=1e-5)
    state = json.loads((tmp_path / "stored" / "final" / "adapter" / ADAPTER_CONFIG).read_text())
    assert state["r"] == RANK


def test_activation_checkpointing_recomputes_the_same_dropout_masks(tmp_path: Path) -> None:
    """Recomputed blocks redraw the masks they drew (torch's checkpoint restores the
    generator): the same losses and adapters with and without recomputation."""
    runs = {}
    for recompute in (False, True):
        out = tmp_path / str(recompute)
        config = _config(out, lora_dropout=0.2, activation_checkpointing=recompute)
        train(config, _data(), seeded_model())
        runs[recompute] = (_metrics(out), load_file(out / "final" / "adapter" / ADAPTER_WEIGHTS))
    (plain, plain_adapter), (again, again_adapter) = runs[False], runs[True]
    np.testing.assert_allclose([m["loss"] for m in again], [m["loss"] for m in plain], rtol=1e-6)
    for key, value in plain_adapter.items():
        torch.testing.assert_close(again_adapter[key], value, rtol=1e-5, atol=1e-7)


def test_a_lora_run_resumes_exactly(tmp_path: Path) -> None:
    """Run A: 4 steps with dropout, uninterrupted. Run B: the same, its step-4 checkpoint
    and export deleted (a crash after step 2), resumed with a fresh base model: the losses,
    the adapter and the merged weights are A's, bit for bit. A LoRA checkpoint holds the
    adapter (PEFT's files), the optimizer and the trainer state, not the frozen base."""
    config = {"lora_dropout": 0.1, "checkpoint_every": 2}
    train(_config(tmp_path / "a", **config), _data(), seeded_model())
    train(_config(tmp_path / "b", **config), _data(), seeded_model())
    checkpoint = tmp_path / "b" / "checkpoints" / "step_000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        "optimizer",
        "trainer_state.json",
    ]
    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000004")
    train(_config(tmp_path / "b", **config), _data(), seeded_model())
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [m["loss"] for m in b] == [m["loss"] for m in a]
    for name in (f"adapter/{ADAPTER_WEIGHTS}", "model.safetensors"):
        want, got = (
            load_file(tmp_path / "a" / "final" / name),
            load_file(tmp_path / "b" / "final" / name),
        )
        for key, value in want.items():
            assert torch.equal(got[key], value), key
    # Another rank is another run: refused before step 1.
    shutil.rmtree(tmp_path / "b" / "final")
    with pytest.raises(ValueError, match=r"config\.lora_rank was 4, now 8"):
        train(_config(tmp_path / "b", **config, lora_rank=8), _data(), seeded_model())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_lora_is_eager_lora_and_resumes_exactly(tmp_path: Path) -> None:
    """`--compile` (inductor, about a minute of compiling on a CPU) with activation
    checkpointing: without dropout the losses are eager's (step 1 still log 2: the
    adapters-off reference is its own compiled graph); with dropout (inductor draws its
    own masks from the same seeded generator) a resumed run equals the uninterrupted one."""
    torch._dynamo.reset()
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        config = _config(tmp_path / name, compile=compiled, activation_checkpointing=compiled)
        train(config, _data(), seeded_model())
        runs[name] = [m["loss"] for m in _metrics(tmp_path / name)]
    assert runs["compiled"][0] == pytest.approx(math.log(2), abs=1e-7)
    np.testing.assert_allclose(runs["compiled"], runs["eager"], rtol=1e-5)

    config = {"compile": True, "activation_checkpointing": True, "lora_dropout": 0.2}
    config |= {"checkpoint_every": 2}
    train(_config(tmp_path / "a", **config), _data(), seeded_model())
    train(_config(tmp_path / "b", **config), _data(), seeded_model())
    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000004")
    train(_config(tmp_path / "b", **config), _data(), seeded_model())
    assert [m["loss"] for m in _metrics(tmp_path / "b")] == [
        m["loss"] for m in _metrics(tmp_path / "a")
    ]


# -----------------------------------------------------------------------------
# Export: PEFT reads what we write


# peft 0.21 asks transformers 5.24 a question transformers renamed: their warning, not ours.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("builder", "targets"),
    [(tiny, ("all-linear",)), (tiny_phi3, ("qkv_proj", "gate_up_proj"))],
    ids=["llama", "phi3-fused"],
)
def test_merged_export_equals_peft_on_the_transformers_base(
    tmp_path: Path, builder, targets: tuple[str, ...]
) -> None:
    """A LoRA run from a base folder: transformers' base with our adapter applied by
    `PeftModel.from_pretrained` gives the logits of our merged `final/` (loaded by
    transformers) and of our own adapted model; the adapter's config is PEFT's."""
    torch.manual_seed(0)
    base = CausalLM(builder())
    base.hf_config = {"pad_token_id": None}  # (Phi-3's default pad id is past 512)
    folder = save_pretrained(base, tmp_path / "base")
    model = load_pretrained(folder)
    config = _config(tmp_path / "run", lora_targets=targets, lora_dropout=0.1, lora_alpha=8.0)
    final = train(config, _data(), model, base_model=str(folder))
    adapter = final / "adapter"
    settings = json.loads((adapter / ADAPTER_CONFIG).read_text())
    names = sorted(targets) if targets != ("all-linear",) else sorted(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )  # fmt: skip
    assert (
        settings
        | {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(folder),
            "r": RANK,
            "lora_alpha": 8,
            "lora_dropout": 0.1,
            "target_modules": names,
            "bias": "none",
            "fan_in_fan_out": False,
        }
        == settings
    )
    keys = load_file(adapter / ADAPTER_WEIGHTS)
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys or (
        "base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight" in keys
    )

    ids = torch.randint(0, 512, (2, 24))
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        plain = hf_base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(hf_base, adapter).eval()
        with_adapter = peft(input_ids=ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        ours = model.eval()(ids, pos, CausalAttention())
        exported = merged(input_ids=ids).logits
    torch.testing.assert_close(exported, with_adapter, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, with_adapter, rtol=1e-5, atol=1e-5)
    assert (with_adapter - plain).abs().max() > 1e-3  # the adapter changed the model
    assert type(merged).__name__ == type(hf_base).__name__
    assert load_pretrained(final).config == base.config  # the base's architecture


def test_adapters_are_lora_linear_in_place_of_the_projections() -> None:
    """Phi-3's fused projections take adapters like any other; the others keep theirs."""
    model = CausalLM(tiny_phi3())
    add_adapters(model, LoraSettings(2, 4.0, 0.0, ("qkv_proj",), 0))
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.qkv_proj, LoRALinear)
    assert not isinstance(attention.o_proj, LoRALinear)
    assert attention.qkv_proj.lora_A.weight.shape == (2, 64)
    assert attention.qkv_proj.lora_B.weight.shape == (attention.qkv_proj.weight.shape[0], 2)


# -----------------------------------------------------------------------------
# The command


def _cli_argv(shards: Path, out: Path, folder: Path, *extra: str) -> list[str]:
    argv = [
        "train",
        "--shards", str(shards),
        "--config", "tiny",
        "--out", str(out),
        "--steps", "2",
        "--batch-rows", "2",
        "--lr", "1e-3",
        "--warmup-steps", "1",
        "--no-progress",
        "--lora-rank", "4",
        *extra,
    ]  # fmt: skip
    return with_model(argv, folder)


def test_prefpack_train_with_lora_rank_4(tiny_shards: Path, tmp_path: Path, cli) -> None:
    """`--lora-rank 4` from a model folder: final/ is the merged model with the tokenizer
    and a card that says LoRA, final/adapter/ the adapter (base: the --model folder, a PEFT
    card); `--no-lora-merge`: final/ is the adapter with the tokenizer files and a PEFT
    card, and no config.json; with --config it is refused (no base folder to name)."""
    folder = tiny_checkpoint(tiny_shards, tmp_path / "base")
    assert cli(_cli_argv(tiny_shards, tmp_path / "run", folder))[0] == 0
    final = tmp_path / "run" / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "adapter"} <= {
        p.name for p in final.iterdir()
    }
    assert sorted(p.name for p in (final / "adapter").iterdir()) == [
        "README.md",
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
    ]
    settings = json.loads((final / "adapter" / ADAPTER_CONFIG).read_text())
    assert settings["base_model_name_or_path"] == str(folder.resolve())
    card, adapter_card = (
        (final / "README.md").read_text(),
        (final / "adapter/README.md").read_text(),
    )
    assert "library_name: transformers" in card and '- "lora"' in card
    assert "merged model" in card and "| `lora_rank` | 4 |" in card
    assert "library_name: peft" in adapter_card and "PeftModel.from_pretrained" in adapter_card
    assert load_pretrained(final).config == load_pretrained(folder).config

    argv = _cli_argv(tiny_shards, tmp_path / "alone", folder, "--no-lora-merge")
    assert cli(argv)[0] == 0
    alone = tmp_path / "alone" / "final"
    names = {p.name for p in alone.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json", "README.md"} <= names
    assert "config.json" not in names and "model.safetensors" not in names
    assert "library_name: peft" in (alone / "README.md").read_text()

    argv = [*_cli_argv(tiny_shards, tmp_path / "random", folder, "--no-lora-merge")]
    at = argv.index("--model")
    argv[at : at + 2] = ["--config", "tiny"]
    status, err = cli(argv)
    assert_one_error_line(status, err, "train", "--no-lora-merge with --config tiny")


def test_difficulty_folds_train_lora_and_are_reused(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`prefpack difficulty --lora-rank 4`: the fold models are LoRA runs (a score is the
    held-out loss of the model the run would train), the report records the settings, a
    rerun reuses the scores, and the fold models' export setting is no flag there."""
    argv = ["difficulty", "--shards", str(tiny_shards), "--config", "tiny", "--folds", "2"]
    argv += ["--steps", "2", "--lr", "1e-3", "--no-progress", "--lora-rank", "4"]
    out = tmp_path / "scores"
    assert prefpack.main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["train"]["lora_rank"] == 4
    assert report["settings"]["train"]["lora_targets"] == ["all-linear"]
    assert "lora_merge" not in report["settings"]["train"]
    capsys.readouterr()
    assert prefpack.main([*argv, "--out", str(out)]) == 0
    assert "reused" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prefpack.main([*argv, "--out", str(out), "--no-lora-merge"])


def test_dagster_runs_carry_lora_into_the_command_and_the_run_key() -> None:
    """The LoRA settings are fields of the asset's TrainingConfig (made from TrainConfig):
    they reach `prefpack train` as its flags, and every one of them moves the run key."""
    from assets.configs import TrainingConfig
    from assets.keys import content_key
    from assets.resources import ComputeResource, ModelResource
    from assets.training import config_flags
    from training.cli import train_config

    lora = {"lora_rank": 8, "lora_alpha": 4.0, "lora_dropout": 0.1}
    lora |= {"lora_targets": ["q_proj", "v_proj"], "lora_merge": False}
    values = TrainingConfig(**lora).model_dump()
    for extra in ("nproc_per_node", "precompute_reference"):
        values.pop(extra)
    argv = ["train", "--shards", "s", "--config", "tiny", "--out", "o", *config_flags(values)]
    config = train_config(prefpack.build_parser().parse_args(argv))
    assert {name: getattr(config, name) for name in lora} == lora | {
        "lora_targets": ("q_proj", "v_proj")
    }

    def key(**changes: object) -> str:
        settings = TrainingConfig(**(lora | changes)).model_dump()
        return content_key(
            "s" * 20, ModelResource(), ComputeResource(device="cpu"), training=settings
        )

    keys = [
        key(),
        *(
            key(**{name: value})
            for name, value in TrainingConfig().model_dump().items()
            if name in lora
        ),
    ]
    assert len(set(keys)) == len(lora) + 1


# -----------------------------------------------------------------------------
# Two processes


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_and_resume_exactly(tmp_path: Path, parallel: str) -> None:
    """torchrun, 2 gloo processes x 1 row per step against 1 process x 2 micro-batches of
    1 row, LoRA with dropout (the masks are drawn per slice of the global batch, so both
    draw the same ones), 5 steps; only the adapters are synchronised (each rank checks its
    base weights are bit-identical to the initial ones), and the losses, eval metrics and
    adapters are one process's. Then the run loses its export and the steps after its
    step-3 checkpoint and is resumed by 2 new processes: the same numbers again."""
    torchrun_workers("lora", str(tmp_path / "two"), parallel)
    config = worker_config(tmp_path / "one", batch_rows=1, grad_accum=2)
    config = replace(config, lora_rank=LORA_RANK, lora_dropout=LORA_DROPOUT)
    train(config, _data(), seeded_model(), eval_data=worker_eval_data())
    two, single = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in single], rtol=1e-5)
    evaluated = [m["eval/loss"] for m in two if "eval/loss" in m]
    want = [m["eval/loss"] for m in single if "eval/loss" in m]
    np.testing.assert_allclose(evaluated, want, rtol=1e-5)
    for rank in (0, 1):
        assert json.loads((tmp_path / "two" / f"base-rank{rank}.json").read_text()) == {
            "base_unchanged": True
        }
    adapter = f"final/adapter/{ADAPTER_WEIGHTS}"
    exported = load_file(tmp_path / "two" / adapter)
    for key, value in load_file(tmp_path / "one" / adapter).items():
        torch.testing.assert_close(exported[key], value, rtol=1e-4, atol=1e-6)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "final")
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step_000003"]
    torchrun_workers("lora", str(resumed), parallel)
    again = _metrics(resumed)
    assert [m["loss"] for m in again] == [m["loss"] for m in two]
    for key, value in exported.items():
        assert torch.equal(load_file(resumed / adapter)[key], value), key


@pytest.mark.slow
def test_fsdp_loads_the_base_sharded_with_its_adapters(tiny_shards: Path, tmp_path: Path) -> None:
    """`torchrun ... prefpack train --model DIR --parallel fsdp --lora-rank 4`: the base is
    read sharded (never whole) with the adapters added before sharding, there is no
    reference model (adapters off), and the run equals one process's with 2 micro-batches."""
    folder = tiny_checkpoint(tiny_shards, tmp_path / "base")
    common = ("--lora-dropout", "0.1", "--steps", "3")
    two = _cli_argv(tiny_shards, tmp_path / "two", folder, *common, "--parallel", "fsdp")
    two[two.index("--batch-rows") + 1] = "1"
    torchrun_prefpack(*two)
    one = _cli_argv(tiny_shards, tmp_path / "one", folder, *common, "--grad-accum", "2")
    one[one.index("--batch-rows") + 1] = "1"
    assert prefpack.main(one) == 0
    losses = [[m["loss"] for m in _metrics(tmp_path / run)] for run in ("two", "one")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    adapter = f"final/adapter/{ADAPTER_WEIGHTS}"
    want = load_file(tmp_path / "one" / adapter)
    for key, value in load_file(tmp_path / "two" / adapter).items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-6)
