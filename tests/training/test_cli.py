"""`prefpack train` and `prefpack logps` end to end on shards made by the real packer."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import prefpack
from pipeline.shards import ShardError, open_shards
from tests.conftest import assert_one_error_line
from tests.training.conftest import TINY_SHARD_PAIRS, tiny_checkpoint, with_model
from tests.training.dist_worker import torchrun_prefpack
from training.checkpoint import load_pretrained, model_fingerprint, save_pretrained
from training.cli import TRAIN_FLAG_GROUPS, train_config
from training.configs import tiny
from training.model import CausalLM
from training.reference import ReferenceKey, read_reference_logps, write_reference_logps
from training.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def _train_argv(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--shards", str(shards),
        "--config", "tiny",
        "--out", str(out),
        "--steps", "3",
        "--batch-rows", "2",
        "--lr", "1e-3",
        "--warmup-steps", "1",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def _logps_argv(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["logps", "--shards", str(shards), "--config", "tiny", "--out", str(out), *extra]


def _losses(out_dir: Path) -> list[float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _tiny_model(shards: Path, seed: int = 0) -> CausalLM:
    """What `--config tiny --init-seed SEED` builds for these shards."""
    vocab = open_shards(shards).manifest["tokenizer"]["vocab_size"]
    torch.manual_seed(seed)
    return CausalLM(dataclasses.replace(tiny(), vocab_size=vocab))


# -----------------------------------------------------------------------------
# Flags


def test_every_train_config_field_is_a_flag() -> None:
    """Each TrainConfig field (but out_dir, which is --out) has one flag, and a non-default
    value given on the command line lands in that field."""
    names = [n for group in TRAIN_FLAG_GROUPS.values() for n in group]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert sorted(names) == sorted(set(fields) - {"out_dir"})
    hints = typing.get_type_hints(TrainConfig)
    argv, expected = ["train", "--shards", "s", "--config", "tiny", "--out", "o"], {}
    for name in names:
        flag, default, hint = "--" + name.replace("_", "-"), fields[name].default, hints[name]
        if hint is bool:
            argv.append(flag if not default else f"--no-{flag[2:]}")
            expected[name] = not default
        elif typing.get_origin(hint) is typing.Literal:
            expected[name] = next(c for c in typing.get_args(hint) if c != default)
            argv += [flag, expected[name]]
        elif typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is str:
            expected[name] = ("q_proj", "v_proj")  # names (--lora-targets), not numbers
            argv += [flag, *expected[name]]
        elif typing.get_origin(hint) is tuple:
            expected[name] = (0.5, 0.75)
            argv += [flag, "0.5", "0.75"]
        elif hint is str:
            expected[name] = "cpu"
            argv += [flag, "cpu"]
        else:  # a number inside the field's range, other than its default
            expected[name] = (default / 2 or 0.25) if hint is float else (default or 0) + 3
            argv += [flag, str(expected[name])]
    config = train_config(prefpack.build_parser().parse_args(argv))
    assert config.out_dir == Path("o")
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert train_config(prefpack.build_parser().parse_args(argv[:7])) == TrainConfig(Path("o"))


def test_help_works_as_a_module_without_loading_torch() -> None:
    """`python -m prefpack` (what torchrun -m runs) answers, and building the parser, which
    `prefpack --help` does, imports no torch."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown = subprocess.run(
        [sys.executable, "-m", "prefpack", "train", "--help"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    assert "--reference-cache DIR" in shown and "--adam-betas FLOAT FLOAT" in shown
    code = "import sys, prefpack; prefpack.build_parser(); print('torch' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    )
    assert loaded.stdout.strip() == "False"


# -----------------------------------------------------------------------------
# End to end


def test_train_segments_and_dense_then_export(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both backends train the same numbers (they are exact); the summary names the metrics
    file and the export, which loads and carries the shards' tokenizer."""
    for backend in ("segments", "dense"):
        assert (
            prefpack.main(_train_argv(tiny_shards, tmp_path / backend, "--backend", backend)) == 0
        )
    shown = capsys.readouterr()
    segments, dense = _losses(tmp_path / "segments"), _losses(tmp_path / "dense")
    assert len(segments) == 3
    assert segments[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    np.testing.assert_allclose(dense, segments, rtol=1e-5)
    final_line = json.loads((tmp_path / "segments" / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"final    loss {final_line['loss']:.4f}" in shown.out
    assert f"metrics  {tmp_path / 'segments' / 'metrics.jsonl'}" in shown.out
    assert f"model    {tmp_path / 'segments' / 'final'}" in shown.out
    assert f"prefpack train: metrics: {tmp_path / 'dense' / 'metrics.jsonl'}" in shown.err

    exported = {b: load_pretrained(tmp_path / b / "final") for b in ("segments", "dense")}
    initial = _tiny_model(tiny_shards)
    for key, value in exported["segments"].state_dict().items():
        torch.testing.assert_close(exported["dense"].state_dict()[key], value, rtol=1e-4, atol=1e-6)
    assert not torch.equal(exported["segments"].model.norm.weight, initial.model.norm.weight)
    # The shards' tokenizer (a random init has no base folder's), with the model's context.
    final = tmp_path / "segments" / "final"
    assert (final / "tokenizer.json").read_bytes() == (tiny_shards / "tokenizer.json").read_bytes()
    ours, theirs = (
        json.loads((d / "tokenizer_config.json").read_text()) for d in (final, tiny_shards)
    )
    assert ours.pop("model_max_length") == tiny().max_position_embeddings
    assert theirs.pop("model_max_length") == open_shards(tiny_shards).max_len
    assert ours == theirs


def test_logps_computed_once_then_reused(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = tmp_path / "ref.arrow"
    assert prefpack.main(_logps_argv(tiny_shards, ref, "--no-progress")) == 0
    first = capsys.readouterr()
    assert first.out.strip() == str(ref)
    assert f"prefpack logps: computed {TINY_SHARD_PAIRS} pairs' log-probs" in first.err
    stamp = ref.stat().st_mtime_ns

    assert prefpack.main(_logps_argv(tiny_shards, ref, "--no-progress")) == 0
    assert "reused" in capsys.readouterr().err
    assert ref.stat().st_mtime_ns == stamp

    # Keyed by this model's fingerprint and the shard key; one row per packed pair.
    reader = open_shards(tiny_shards)
    key = ReferenceKey(model_fingerprint(_tiny_model(tiny_shards)), reader.key, "fp32")
    stored = read_reference_logps(ref, key)
    assert sorted(stored.table["pair_id"].to_pylist()) == sorted(
        pid for row in reader for pid in row.pair_ids
    )
    assert (stored.table["chosen_logps"].to_numpy() < 0).all()

    # Another model (init seed) makes other log-probs: the file is replaced, not reused.
    assert prefpack.main(_logps_argv(tiny_shards, ref, "--init-seed", "1", "--no-progress")) == 0
    assert "replacing" in capsys.readouterr().err
    other = model_fingerprint(_tiny_model(tiny_shards, seed=1))
    assert read_reference_logps(ref).key.model_fingerprint == other


def test_bf16_reference_logps_are_refused_by_an_fp32_run(
    tiny_shards: Path, tmp_path: Path, cli
) -> None:
    """The same numbers under a bf16 key (bf16 runs on CUDA only, so the file is rewritten
    through the library): `--reference` names both precisions; `logps --precision bf16`
    on CPU stops before reading anything."""
    ref = tmp_path / "ref.arrow"
    assert prefpack.main(_logps_argv(tiny_shards, ref, "--no-progress")) == 0
    stored = read_reference_logps(ref)
    bf16 = dataclasses.replace(stored.key, precision="bf16")
    write_reference_logps(stored.table, tmp_path / "bf16.arrow", bf16)
    status, err = cli(
        _train_argv(tiny_shards, tmp_path / "run", "--reference", str(tmp_path / "bf16.arrow"))
    )
    assert_one_error_line(status, err, "train", "bf16.arrow", "precision is bf16, expected fp32")
    assert not (tmp_path / "run").exists()
    status, err = cli(_logps_argv(tiny_shards, tmp_path / "b.arrow", "--precision", "bf16"))
    assert_one_error_line(status, err, "logps", "bf16 autocast runs on CUDA only")


def test_resume_with_another_init_seed_is_refused(tiny_shards: Path, tmp_path: Path, cli) -> None:
    """The checkpoint records the shard key, the initial model's fingerprint and the init
    seed; a rerun into the same --out with --init-seed 1 is refused, both named."""
    run = tmp_path / "run"
    argv = _train_argv(tiny_shards, run, "--steps", "2", "--checkpoint-every", "1")
    assert cli(argv)[0] == 0
    shutil.rmtree(run / "final")
    state = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["inputs"] == {
        "shard_key": open_shards(tiny_shards).key,
        "model_fingerprint": model_fingerprint(_tiny_model(tiny_shards)),
        "init_seed": 0,
        "reference": "live",
    }
    status, err = cli([*argv, "--init-seed", "1"])
    assert_one_error_line(
        status,
        err,
        "train",
        "step_000002: cannot resume",
        "inputs.init_seed was 0, now 1",
        "inputs.model_fingerprint was",
        "use another --out",
    )
    assert cli(argv)[0] == 0  # the same run resumes
    assert (run / "final").is_dir()


class _FakeRanks:
    """torch.distributed as seen by `rank` of 2, rank 0's broadcast being `verdict`."""

    def __init__(self, rank: int, verdict: str | None) -> None:
        self.rank, self.verdict = rank, verdict

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def get_rank(self) -> int:
        return self.rank

    def broadcast_object_list(self, box: list, src: int) -> None:
        if self.rank != src:
            box[0] = self.verdict


@pytest.mark.parametrize(("rank", "verdict"), [(0, None), (1, None), (1, "shard-00000.arrow: bad")])
def test_only_rank_0_hashes_the_shards_and_all_share_its_verdict(
    tiny_shards: Path, monkeypatch: pytest.MonkeyPatch, rank: int, verdict: str | None
) -> None:
    import training.recipe
    from training.recipe import open_shards_once

    opened: list[bool] = []
    real = training.recipe.open_shards

    def spy(directory: Path, verify: bool = True) -> object:
        opened.append(verify)
        return real(directory, verify=verify)

    monkeypatch.setattr(training.recipe, "open_shards", spy)
    monkeypatch.setattr(
        "torch.distributed.is_initialized", _FakeRanks(rank, verdict).is_initialized
    )
    fake = _FakeRanks(rank, verdict)
    for name in ("get_world_size", "get_rank", "broadcast_object_list"):
        monkeypatch.setattr(f"torch.distributed.{name}", getattr(fake, name))
    if verdict is None:
        assert len(open_shards_once(tiny_shards, verify=True)) > 0
        assert opened == [rank == 0]  # rank 0 verifies, rank 1 opens without hashing
    else:
        with pytest.raises(ShardError, match=r"shard-00000\.arrow: bad"):
            open_shards_once(tiny_shards, verify=True)
        assert opened == []


def test_stored_reference_trains_like_the_reference_model(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reference model in memory, `--reference FILE` and `--reference-cache DIR` (computed,
    then reused) give the same losses."""
    assert prefpack.main(_logps_argv(tiny_shards, tmp_path / "ref.parquet", "--no-progress")) == 0
    runs = {
        "with_model": (),
        "with_file": ("--reference", str(tmp_path / "ref.parquet")),
        "with_cache": ("--reference-cache", str(tmp_path / "cache")),
        "with_cache_again": ("--reference-cache", str(tmp_path / "cache")),
    }
    for name, extra in runs.items():
        assert prefpack.main(_train_argv(tiny_shards, tmp_path / name, *extra)) == 0
    err = capsys.readouterr().err
    assert err.index("reference log-probs: computing") < err.index("reference log-probs: reusing")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    base = _losses(tmp_path / "with_model")
    for name in runs:
        np.testing.assert_allclose(_losses(tmp_path / name), base, rtol=1e-5)
    assert base[-1] != base[0]


def test_eval_shards_give_eval_metrics_a_summary_line_and_the_model_card(
    tiny_shards: Path, tiny_eval_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--eval-shards with --eval-every 2 of 3 steps: eval/ metrics on steps 2 and 3, the
    summary's eval line, and final/README.md (a model card whose header parses) with the
    last evaluation's numbers. With --reference-cache the eval reference log-probs are
    computed once beside the training ones and reused by the next run, which evaluates to
    the same numbers."""
    cache = ["--reference-cache", str(tmp_path / "cache")]
    evaluation = ["--eval-shards", str(tiny_eval_shards), "--eval-every", "2", *cache]
    assert prefpack.main(_train_argv(tiny_shards, tmp_path / "run", *evaluation)) == 0
    shown = capsys.readouterr()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "eval/loss" in m] == [2, 3]
    last = lines[-1]
    assert last["eval/pairs"] == open_shards(tiny_eval_shards).manifest["stats"]["pairs"] > 0
    assert f"eval     loss {last['eval/loss']:.4f}" in shown.out
    assert shown.err.count("reference log-probs: computing") == 2  # train and eval shards
    assert len(list((tmp_path / "cache").iterdir())) == 2

    card = (tmp_path / "run" / "final" / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header == {"library_name": "transformers", "tags": ["dpo", "prefpack"]}
    results = card[card.index("## Results") :].splitlines()
    row = next(x for x in results if x.startswith("| `loss` |"))
    assert row == f"| `loss` | {last['loss']:.4f} | {last['eval/loss']:.4f} |"
    assert f"shards key `{open_shards(tiny_eval_shards).key}`" in card

    assert prefpack.main(_train_argv(tiny_shards, tmp_path / "again", *evaluation)) == 0
    assert capsys.readouterr().err.count("reference log-probs: reusing") == 2
    again = json.loads((tmp_path / "again" / "metrics.jsonl").read_text().splitlines()[-1])
    assert again["eval/loss"] == pytest.approx(last["eval/loss"], rel=1e-6)


@pytest.mark.parametrize("loss", ["simpo", "orpo", "apo_zero", "apo_down"])
def test_each_reference_free_and_anchored_loss_trains_two_steps(
    tiny_shards: Path, tiny_eval_shards: Path, tmp_path: Path, loss: str
) -> None:
    """Two steps and an evaluation: finite numbers, final/ written, and the checkpoint
    records the reference the loss uses: `none` for simpo and orpo, the live initial
    model for APO, whose first step (policy = reference, r = 0) costs
    (1 - s(0)) + s(0) = 1 (zero) and s(0) + (1 - s(0)) = 1 (down)."""
    out = tmp_path / "run"
    argv = _train_argv(
        tiny_shards, out, "--loss", loss, "--steps", "2", "--checkpoint-every", "2",
        "--eval-shards", str(tiny_eval_shards),
    )  # fmt: skip
    assert prefpack.main(argv) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in lines) and math.isfinite(lines[-1]["eval/loss"])
    state = json.loads((out / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    reference_free = loss in ("simpo", "orpo")
    assert state["inputs"]["reference"] == ("none" if reference_free else "live")
    if not reference_free:
        assert lines[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    assert (out / "final" / "config.json").is_file()


def test_report_to_tensorboard_gets_every_metrics_line_with_its_eval(
    tiny_shards: Path, tiny_eval_shards: Path, tmp_path: Path
) -> None:
    """`--report-to tensorboard`: the events hold each step's train metrics and, on the
    steps that evaluate, the eval/ ones, as metrics.jsonl has them (TensorBoard keeps
    float32). The choices of --report-to are the trackers there are."""
    pytest.importorskip("tensorboard", reason="pip install 'prefpack[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.trackers import NONE, TRACKERS
    from training.train_config import ReportTo

    assert set(typing.get_args(ReportTo)) == {NONE, *TRACKERS}
    evaluation = ["--eval-shards", str(tiny_eval_shards), "--eval-every", "2"]
    argv = _train_argv(tiny_shards, tmp_path / "run", *evaluation, "--report-to", "tensorboard")
    assert prefpack.main(argv) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in ("loss", "rewards/accuracies", "eval/loss", "eval/rewards/margins"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        expected = [(m["step"], m[name]) for m in lines if name in m]
        assert [step for step, _ in logged] == [step for step, _ in expected], name
        np.testing.assert_allclose([v for _, v in logged], [v for _, v in expected], rtol=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 3]


def test_a_model_folder_with_another_tokenizer_is_refused_before_its_weights(
    tiny_shards: Path, tmp_path: Path, cli
) -> None:
    """A --model folder whose own tokenizer.json is not the shards' stops train, logps and
    difficulty with one line naming both, before any weight is read (this folder has
    none); --allow-tokenizer-mismatch trains on a complete one."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_checkpoint(tiny_shards, tmp_path / "m") / "config.json", bare)
    other = REPO / "tests" / "fixtures" / "gpt2_small_tokenizer.json"
    for folder in (bare, tmp_path / "m"):
        shutil.copy(other, folder / "tokenizer.json")
    commands = {
        "train": _train_argv(tiny_shards, tmp_path / "run"),
        "logps": _logps_argv(tiny_shards, tmp_path / "ref.arrow"),
        "difficulty": ["difficulty", "--shards", str(tiny_shards), "--config", "tiny",
                       "--out", str(tmp_path / "scores")],
    }  # fmt: skip
    for command, argv in commands.items():
        status, err = cli(with_model(argv, bare))
        assert_one_error_line(
            status, err, command, "the shards' tokenizer", f"{bare}/tokenizer.json",
            "--allow-tokenizer-mismatch",
        )  # fmt: skip
        assert "model.safetensors" not in err
    argv = with_model(commands["train"], tmp_path / "m")
    status, err = cli([*argv, "--steps", "1", "--allow-tokenizer-mismatch"])
    assert status == 0, err


# -----------------------------------------------------------------------------
# Errors


def _corrupt_copy(shards: Path, to: Path) -> Path:
    """A copy under `to` (named by its key, as a shard directory must be) with one shard
    a byte longer."""
    copy = to / shards.name
    shutil.copytree(shards, copy)
    with (copy / "shard-00000.arrow").open("ab") as f:
        f.write(b"\0")
    return copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--shards": "missing"}, r"missing/manifest.json: missing; not a complete shard"),
        ({"--shards": "corrupt"}, r"shard-00000.arrow: \d+ bytes, listed as \d+"),
        ({"--config": "huge"}, r"unknown model config 'huge'; known: tiny, "),
        ({"--config": None, "--model": "empty"}, r"empty: no config.json"),
        (
            {"--config": None, "--model": "small_vocab"},
            r"tokenizer has 320 tokens but the model only 64",
        ),
        ({"--backend": "flex"}, r"backend flex trains on CUDA only"),
        ({"--warmup-steps": "9"}, r"--warmup-steps must be at most --steps \(3\), got 9"),
        ({"--beta": "0"}, r"--beta must be > 0, got 0.0"),
        ({"--beta": "-1"}, r"--beta must be > 0, got -1.0"),
        ({"--lr": "-1"}, r"--lr must be > 0, got -1.0"),
        ({"--min-lr-ratio": "5"}, r"--min-lr-ratio must be >= 0 and <= 1, got 5.0"),
        ({"--max-grad-norm": "-1"}, r"--max-grad-norm must be >= 0, got -1.0"),
        ({"--sft-weight": "-1"}, r"--sft-weight must be >= 0, got -1.0"),
        ({"--checkpoint-every": "-1"}, r"--checkpoint-every must be >= 0, got -1"),
        ({"--weight-decay": "-3"}, r"--weight-decay must be >= 0, got -3.0"),
        ({"--adam-betas": "2"}, r"argument --adam-betas: expected 2 arguments"),
        ({"--seed": "-1"}, r"--seed must be >= 0, got -1"),
        ({"--device": "tpu"}, r"--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ({"--lr": "nan"}, r"--lr must be > 0, got nan"),
        ({"--loss": "ipo", "--label-smoothing": "0.1"}, r"'ipo' takes no label_smoothing"),
        (
            {"--loss": "simpo", "--reference": "ref.arrow"},
            r"--reference: --loss simpo is reference-free and reads no reference log-probs; "
            r"leave it out",
        ),
        ({"--loss": "orpo", "--reference-cache": "b"}, r"--reference-cache: --loss orpo is "),
        ({"--loss": "simpo", "--eval-reference": "e.arrow"}, r"--eval-reference: --loss simpo "),
        ({"--loss": "orpo", "--sft-weight": "0.5"}, r"--sft-weight 0.5: --loss orpo holds the "),
        ({"--simpo-gamma": "-1"}, r"--simpo-gamma must be >= 0, got -1.0"),
        ({"--orpo-lambda": "0"}, r"--orpo-lambda must be > 0, got 0.0"),
        ({"--loss": "dpo"}, r"argument --loss: invalid choice: 'dpo'"),
        ({"--model": "empty"}, r"argument --model: not allowed with argument --config"),
        ({"--reference": "none.arrow"}, r"none.arrow: no such file; write it with prefpack logps"),
        ({"--reference": "other.arrow"}, r"model_fingerprint is [0-9a-f]+, expected [0-9a-f]+"),
        ({"--reference": "a", "--reference-cache": "b"}, r"not allowed with argument"),
        ({"--eval-every": "2"}, r"--eval-every needs --eval-shards"),
        ({"--eval-reference": "e.arrow"}, r"--eval-reference needs --eval-shards"),
    ],
)
def test_bad_flags_and_inputs_fail_fast_with_the_cause_named(
    tiny_shards: Path,
    tmp_path: Path,
    cli,
    change: dict[str, str | None],
    message: str,
) -> None:
    (tmp_path / "empty").mkdir()
    save_pretrained(CausalLM(dataclasses.replace(tiny(), vocab_size=64)), tmp_path / "small_vocab")
    if change.get("--reference") == "other.arrow":
        other = tmp_path / "other.arrow"
        assert (
            prefpack.main(_logps_argv(tiny_shards, other, "--init-seed", "7", "--no-progress")) == 0
        )
    if change.get("--shards") == "corrupt":
        change = {"--shards": str(_corrupt_copy(tiny_shards, tmp_path / "corrupt"))}
    argv = _train_argv(tiny_shards, tmp_path / "run")
    for flag, value in change.items():
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
        if value is not None:
            is_path = flag in ("--shards", "--model", "--reference") or value == "b"
            argv += [flag, str(tmp_path / value) if is_path else value]
    status, shown = cli(argv)
    if "usage: prefpack train" in shown:  # argparse's own two lines
        assert status == 2
    else:
        assert_one_error_line(status, shown, "train")
    assert len(re.findall(message, shown)) == 1, shown
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_adam_betas_out_of_range_are_named(tiny_shards: Path, tmp_path: Path, cli) -> None:
    argv = _train_argv(tiny_shards, tmp_path / "run", "--adam-betas", "2", "3")
    status, err = cli(argv)
    assert_one_error_line(status, err, "train", "--adam-betas must be >= 0 and < 1, got (2.0, 3.0)")
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tiny_shards: Path, tmp_path: Path) -> None:
    argv = ["--debug", *_train_argv(tiny_shards, tmp_path / "run", "--beta", "0")]
    with pytest.raises(ValueError, match="--beta must be > 0"):
        prefpack.main(argv)


def test_steps_below_the_default_warmup_train(tiny_shards: Path, tmp_path: Path, cli) -> None:
    """--warmup-steps not given: its default (10) is clamped to --steps."""
    argv = _train_argv(tiny_shards, tmp_path / "run")
    i = argv.index("--warmup-steps")
    del argv[i : i + 2]
    status, err = cli(argv)
    assert status == 0, err
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert lrs[-1] == pytest.approx(1e-3)  # warmup of 3 steps: the last step at the peak


def test_a_diverging_run_stops_without_final(tiny_shards: Path, tmp_path: Path, cli) -> None:
    argv = _train_argv(tiny_shards, tmp_path / "run", "--lr", "1e9", "--steps", "6")
    status, err = cli(argv)
    assert_one_error_line(status, err, "train", "training diverged", "--lr")
    assert not (tmp_path / "run" / "final").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert 1 <= len(lines) < 6
    last = json.loads(lines[-1], parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert last["loss"] is None or last["grad_norm"] is None


def test_a_fine_tuning_lr_on_a_random_init_gets_a_hint(
    tiny_shards: Path, tmp_path: Path, cli
) -> None:
    status, err = cli(_train_argv(tiny_shards, tmp_path / "quiet", "--steps", "1"))
    assert status == 0 and "hint:" not in err  # --lr 1e-3 in _train_argv
    status, err = cli(_train_argv(tiny_shards, tmp_path / "run", "--lr", "5e-7", "--steps", "1"))
    assert status == 0, err
    assert "hint: --lr 5e-07 is a fine-tuning rate" in err and "--config tiny" in err


def test_batch_rows_beyond_the_data_are_clamped(tiny_shards: Path, tmp_path: Path, cli) -> None:
    status, err = cli(_train_argv(tiny_shards, tmp_path / "run", "--batch-rows", "100000"))
    assert status == 0, err
    assert "--batch-rows 100000 is more than the" in err
    pairs = [json.loads(line)["pairs"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert max(pairs) <= open_shards(tiny_shards).manifest["stats"]["pairs"]


def test_logps_refuses_other_suffixes(tiny_shards: Path, tmp_path: Path, cli) -> None:
    status, err = cli(_logps_argv(tiny_shards, tmp_path / "ref.json"))
    assert_one_error_line(status, err, "logps", "ref.json: write .arrow or .parquet")


# -----------------------------------------------------------------------------
# Launched by Dagster Pipes, and by torchrun


def _pipes_run(shards: Path, out: Path, *extra: str) -> tuple[object, object]:
    """Materialize an asset that runs `prefpack train` through PipesSubprocessClient."""
    import dagster as dg

    command = [sys.executable, "-m", "prefpack", *_train_argv(shards, out, *extra)]

    # No annotations: this module's are strings (`from __future__`), which dagster cannot
    # resolve in a local scope; the resource comes by key instead.
    @dg.asset(required_resource_keys={"pipes"})
    def trained_model(context):
        return context.resources.pipes.run(
            command=command, context=context
        ).get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    client = dg.PipesSubprocessClient(env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    result = dg.materialize(
        [trained_model], resources={"pipes": client}, instance=instance, raise_on_error=False
    )
    return result, instance


@pytest.mark.slow
def test_dagster_pipes_gets_progress_and_final_metrics(
    tiny_shards: Path, tiny_eval_shards: Path, tmp_path: Path
) -> None:
    # A fine-tuning rate on a random init: the hint reaches Dagster's log as a warning.
    evaluation = ("--eval-shards", str(tiny_eval_shards), "--eval-every", "2")
    result, instance = _pipes_run(
        tiny_shards, tmp_path / "run", "--steps", "4", "--lr", "5e-7", *evaluation
    )
    assert result.success
    metadata = result.asset_materializations_for_node("trained_model")[0].metadata
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = lines[-1]
    for name in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen"):
        assert metadata[name].value == pytest.approx(final[name], rel=1e-6)
        assert metadata[f"eval/{name}"].value == pytest.approx(final[f"eval/{name}"], rel=1e-6)
    assert metadata["eval/pairs"].value == final["eval/pairs"] > 0
    seconds = sum(m["seconds"] for m in lines)
    assert metadata["pairs/s"].value == pytest.approx(sum(m["pairs"] for m in lines) / seconds)
    assert metadata["tokens/s"].value == pytest.approx(sum(m["tokens"] for m in lines) / seconds)
    assert metadata["steps"].value == 4 and metadata["pairs"].value == sum(
        m["pairs"] for m in lines
    )
    assert metadata["output"].value == str(tmp_path / "run" / "final")
    assert metadata["metrics_file"].value == str(tmp_path / "run" / "metrics.jsonl")
    assert metadata["backend"].value == "segments" and metadata["layout"].value == "shared"
    logs = [e.user_message for e in instance.all_logs(result.run_id) if e.dagster_event is None]
    assert any(x.startswith("step 3/4 loss") for x in logs)
    assert any(x.startswith("step 2/4 eval loss") for x in logs)  # the last: in the metadata
    hints = [
        e.level
        for e in instance.all_logs(result.run_id)
        if e.dagster_event is None and e.user_message.startswith("hint: --lr 5e-07")
    ]
    assert hints == [logging.WARNING]

    # A run refused by its checks reaches Dagster as the pipes process's exception.
    failed, instance = _pipes_run(tiny_shards, tmp_path / "flex", "--backend", "flex")
    assert not failed.success
    errors = [
        e.dagster_event.engine_event_data.error.message
        for e in instance.all_logs(failed.run_id)
        if e.dagster_event is not None
        and e.dagster_event.event_type_value == "ENGINE_EVENT"
        and e.dagster_event.engine_event_data.error is not None
    ]
    assert any("backend flex trains on CUDA only" in e for e in errors)


@pytest.mark.slow
def test_torchrun_two_processes_share_the_reference_cache(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """`torchrun -m prefpack train` with 2 gloo processes x 1 row: rank 0 computes the cached
    reference log-probs, both read them, and the losses equal one process x 2 rows."""
    argv = _train_argv(tiny_shards, tmp_path / "ddp", "--reference-cache", str(tmp_path / "cache"))
    argv[argv.index("--batch-rows") + 1] = "1"
    torchrun_prefpack(*argv)
    assert prefpack.main(_train_argv(tiny_shards, tmp_path / "single")) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 1
    np.testing.assert_allclose(_losses(tmp_path / "ddp"), _losses(tmp_path / "single"), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["cache", "live"])
def test_fsdp_loads_a_checkpoint_sharded_and_trains_as_one_process(
    tiny_shards: Path, tmp_path: Path, reference: str
) -> None:
    """`torchrun -m prefpack train --model F --parallel fsdp` with 2 gloo processes: each
    builds the model on the meta device and reads only its half of every tensor (the live
    reference too); losses and exported weights equal one process x 2 rows. With
    `--reference-cache` the fingerprint hashed on the way is the one process's: the same
    cache file serves both runs. (The reference pass on the FSDP policy also leaves its
    root resharded: before, its gathered parameters outlived the pass and the training
    steps went wrong.)"""
    folder = tiny_checkpoint(tiny_shards, tmp_path / "start")
    cache = ["--reference-cache", str(tmp_path / "c")] if reference == "cache" else []

    def argv(out: str, rows: str) -> list[str]:
        args = with_model(_train_argv(tiny_shards, tmp_path / out, *cache), folder)
        args[args.index("--batch-rows") + 1] = rows
        return args

    stderr = torchrun_prefpack(*argv("fsdp", "1"), "--parallel", "fsdp")
    assert prefpack.main(argv("single", "2")) == 0
    if reference == "cache":  # reused by the single process: the same model fingerprint
        assert "reference log-probs: computing" in stderr
        assert len(list((tmp_path / "c").iterdir())) == 1
    np.testing.assert_allclose(_losses(tmp_path / "fsdp"), _losses(tmp_path / "single"), rtol=1e-5)
    two = load_pretrained(tmp_path / "fsdp" / "final").state_dict()
    one = load_pretrained(tmp_path / "single" / "final").state_dict()
    for key, tensor in one.items():
        torch.testing.assert_close(two[key], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp_logps_loads_sharded_and_equals_one_process(
    tiny_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`torchrun -m prefpack logps --model F --parallel fsdp`: each rank reads its half of
    every tensor, and the file is one process's (same key: reused; same numbers)."""
    folder = tiny_checkpoint(tiny_shards, tmp_path / "model", seed=1)

    def argv(out: str) -> list[str]:
        return with_model(_logps_argv(tiny_shards, tmp_path / out), folder)

    torchrun_prefpack(*argv("two.arrow"), "--parallel", "fsdp")
    assert prefpack.main(argv("two.arrow")) == 0
    assert "reused" in capsys.readouterr().err  # the one process's key
    assert prefpack.main(argv("one.arrow")) == 0
    two, one = (read_reference_logps(tmp_path / f).table for f in ("two.arrow", "one.arrow"))
    assert two["pair_id"].to_pylist() == one["pair_id"].to_pylist()
    for column in ("chosen_logps", "rejected_logps"):
        np.testing.assert_allclose(two[column].to_numpy(), one[column].to_numpy(), rtol=1e-6)


def test_which_runs_load_the_model_sharded(monkeypatch) -> None:
    """Several processes, FSDP and a checkpoint folder: sharded; one process, DDP, a named
    config or --compile (blocks compile before they are sharded): whole."""
    from training.recipe import Inputs, loads_sharded

    folder, named = Inputs(Path("s"), model=Path("m")), Inputs(Path("s"), config="tiny")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert loads_sharded(folder, "fsdp")
    assert not loads_sharded(folder, "ddp")
    assert not loads_sharded(named, "fsdp")
    assert not loads_sharded(folder, "fsdp", compile=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not loads_sharded(folder, "fsdp")
