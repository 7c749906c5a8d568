"""`prefpack difficulty`: k fold models, each scoring the pairs it never trained on.

On the tiny shards (48 pairs packed by the real packer) with the tiny model, 2 steps per
fold: the scores are right by construction (every pair by the one fold model that held it
out), consistent (loss and rewards from the stored reference log-probs), byte-identical
across runs, and reused by content.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

import prefpack
import training.difficulty
import training.recipe
import training.train
from pipeline.shards import open_shards, read_report, read_scores
from tests.conftest import assert_one_error_line
from tests.training.conftest import TINY_SHARD_PAIRS, tiny_checkpoint, with_model
from tests.training.dist_worker import torchrun_prefpack
from training.reference import read_reference_logps

FOLDS = 3


def _argv(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "difficulty",
        "--shards", str(shards),
        "--config", "tiny",
        "--out", str(out),
        "--folds", str(FOLDS),
        "--steps", "2",
        "--batch-rows", "2",
        "--lr", "1e-3",
        "--warmup-steps", "1",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def _row_ids(rows) -> set[str]:
    return {pid for row in rows for pid in row.pair_ids}


@pytest.fixture(scope="module")
def scored(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of `prefpack difficulty` with the pairs each fold model trained on and the
    pairs each one scored, recorded as `train` and the scoring pass receive them."""
    trained: list[set[str]] = []
    held_out: list[set[str]] = []
    real_train = training.difficulty.train
    real_logps = training.difficulty.compute_reference_logps

    def recording_train(config, rows, *args, **kwargs):
        trained.append(_row_ids(rows))
        return real_train(config, rows, *args, **kwargs)

    def recording_logps(model, rows, *args, **kwargs):
        held_out.append(_row_ids(rows))
        return real_logps(model, rows, *args, **kwargs)

    out = tmp_path_factory.mktemp("difficulty") / "scores"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.difficulty, "train", recording_train)
        patch.setattr(training.difficulty, "compute_reference_logps", recording_logps)
        assert prefpack.main(_argv(tiny_shards, out)) == 0
    return {"out": out, "trained": trained, "held_out": held_out}


def test_every_pair_is_scored_by_the_fold_model_that_never_saw_it(scored, tiny_shards) -> None:
    all_ids = _row_ids(open_shards(tiny_shards))
    scores = read_scores(scored["out"])
    trained, held_out = scored["trained"], scored["held_out"]
    assert len(trained) == len(held_out) == FOLDS
    for fold in range(FOLDS):
        assert not trained[fold] & held_out[fold]  # the fold model never saw what it scores
        assert trained[fold] | held_out[fold] == all_ids
        scored_here = pc.filter(scores["pair_id"], pc.equal(scores["fold"], fold))
        assert set(scored_here.to_pylist()) == held_out[fold]
    assert sorted(scores["pair_id"].to_pylist()) == scores["pair_id"].to_pylist()
    assert scores.num_rows == TINY_SHARD_PAIRS == len(all_ids)

    report = read_report(scored["out"])
    assert [f["held_out_pairs"] for f in report["folds"]] == [len(h) for h in held_out]
    assert [f["train_pairs"] for f in report["folds"]] == [len(t) for t in trained]
    assert [f["steps"] for f in report["folds"]] == [2] * FOLDS
    assert report["inputs"]["shard_key"] == open_shards(tiny_shards).key


def test_scores_are_the_loss_of_the_fold_logps_against_the_reference(scored, tiny_shards) -> None:
    """Rewards are beta * (fold model - reference) log-probs of each response; the loss is
    sigmoid DPO's -log sigmoid(margin), margin = chosen - rejected reward. The reference
    is the shards' own, as `prefpack logps` computes it."""
    scores = read_scores(scored["out"])
    ref_file = scored["out"].parent / "ref.arrow"
    argv = ["logps", "--shards", str(tiny_shards), "--config", "tiny", "--out", str(ref_file)]
    assert prefpack.main([*argv, "--no-progress"]) == 0
    ref = read_reference_logps(ref_file).lookup(scores["pair_id"].to_pylist())
    beta = read_report(scored["out"])["settings"]["train"]["beta"]
    chosen = scores["chosen_logps"].to_numpy()
    np.testing.assert_allclose(
        scores["chosen_reward"].to_numpy(), beta * (chosen - ref.chosen.numpy()), atol=1e-5
    )
    rejected = scores["rejected_logps"].to_numpy()
    np.testing.assert_allclose(
        scores["rejected_reward"].to_numpy(), beta * (rejected - ref.rejected.numpy()), atol=1e-5
    )
    margin = scores["margin"].to_numpy()
    np.testing.assert_allclose(
        margin, scores["chosen_reward"].to_numpy() - scores["rejected_reward"].to_numpy(), atol=1e-6
    )
    expected = -torch.nn.functional.logsigmoid(torch.tensor(margin)).numpy()
    np.testing.assert_allclose(scores["loss"].to_numpy(), expected, rtol=1e-5)
    # Trained two steps, the fold models moved: not every pair sits at log 2.
    assert np.abs(scores["loss"].to_numpy() - np.log(2)).max() > 1e-4


def test_a_second_run_writes_the_same_bytes(scored, tiny_shards, tmp_path) -> None:
    again = tmp_path / "again"
    assert prefpack.main(_argv(tiny_shards, again)) == 0
    for name in ("scores.parquet", "report.json"):
        assert (again / name).read_bytes() == (scored["out"] / name).read_bytes(), name
    assert sorted(p.name for p in again.iterdir()) == ["report.json", "scores.parquet"]


def test_same_settings_reuse_and_changed_settings_recompute(
    scored, tiny_shards, tmp_path, capsys
) -> None:
    out = tmp_path / "scores"
    assert prefpack.main(_argv(tiny_shards, out)) == 0
    capsys.readouterr()
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert prefpack.main(_argv(tiny_shards, out)) == 0
    assert "reused" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp

    assert prefpack.main(_argv(tiny_shards, out, "--folds", "4")) == 0
    err = capsys.readouterr().err
    assert "replacing" in err and "settings" in err
    report = read_report(out)
    assert len(report["folds"]) == 4 and report["settings"]["folds"] == 4
    assert set(read_scores(out)["fold"].to_pylist()) == {0, 1, 2, 3}

    assert prefpack.main(_argv(tiny_shards, out, "--folds", "4", "--fold-seed", "1")) == 0
    assert "replacing" in capsys.readouterr().err
    assert read_report(out)["settings"]["fold_seed"] == 1


def test_an_edited_scores_file_is_not_reused(scored, tiny_shards, tmp_path, capsys) -> None:
    out = tmp_path / "scores"
    assert prefpack.main(_argv(tiny_shards, out)) == 0
    report = json.loads((out / "report.json").read_text())
    (out / "scores.parquet").write_bytes(b"PAR1" + b"\0" * (report["files"][0]["bytes"] - 4))
    capsys.readouterr()
    assert prefpack.main(_argv(tiny_shards, out)) == 0
    err = capsys.readouterr().err
    assert "replacing" in err and "scores.parquet: sha256" in err
    assert (out / "scores.parquet").read_bytes() == (scored["out"] / "scores.parquet").read_bytes()


def test_a_fine_tuning_lr_on_random_fold_models_gets_a_hint(tiny_shards, tmp_path, cli) -> None:
    status, err = cli(_argv(tiny_shards, tmp_path / "s", "--lr", "5e-7", "--folds", "2"))
    assert status == 0, err
    assert "prefpack difficulty: hint: --lr 5e-07 is a fine-tuning rate" in err


def test_bad_settings_are_one_error_line(tiny_shards, tmp_path, cli) -> None:
    status, err = cli(_argv(tiny_shards, tmp_path / "a", "--folds", "1"))
    assert_one_error_line(status, err, "difficulty", "--folds", ">= 2")
    status, err = cli(_argv(tiny_shards, tmp_path / "b", "--folds", str(TINY_SHARD_PAIRS + 1)))
    assert_one_error_line(status, err, "difficulty", f"{TINY_SHARD_PAIRS} pairs", "--folds")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_reference_free_loss_scores_without_a_reference(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    """--loss simpo: no reference log-probs anywhere (every path that computes them fails
    here), the report's reference is `none`, and each held-out pair's loss is SimPO's,
    -log s(beta (a_c - a_r) - gamma) with a = log-prob / length, the lengths the shards'
    own; rewards beta * a. --reference with it is refused in one line."""

    def no_reference(*args, **kwargs):
        raise AssertionError("reference log-probs computed")

    for module in (training.recipe, training.train):
        monkeypatch.setattr(module, "cached_reference_logps", no_reference)
    monkeypatch.setattr(training.recipe, "compute_reference_logps", no_reference)
    out = tmp_path / "scores"
    assert prefpack.main(_argv(tiny_shards, out, "--loss", "simpo", "--beta", "2")) == 0
    assert read_report(out)["inputs"]["reference"] == "none"
    scores = read_scores(out)
    lengths = {
        pid: (c, r)
        for row in open_shards(tiny_shards)
        for pid, c, r in zip(row.pair_ids, row.chosen_len, row.rejected_len, strict=True)
    }
    c_len, r_len = np.array([lengths[pid] for pid in scores["pair_id"].to_pylist()]).T
    a_c = scores["chosen_logps"].to_numpy() / c_len
    a_r = scores["rejected_logps"].to_numpy() / r_len
    np.testing.assert_allclose(scores["chosen_reward"].to_numpy(), 2 * a_c, rtol=1e-5)
    np.testing.assert_allclose(scores["rejected_reward"].to_numpy(), 2 * a_r, rtol=1e-5)
    expected = np.logaddexp(0, -(2 * (a_c - a_r) - 0.5))
    np.testing.assert_allclose(scores["loss"].to_numpy(), expected, rtol=1e-5)

    refused = tmp_path / "refused"
    status, err = cli(_argv(tiny_shards, refused, "--loss", "orpo", "--reference", "r.arrow"))
    assert_one_error_line(status, err, "difficulty", "--reference: --loss orpo is reference-free")
    assert not refused.exists()


def test_torchrun_two_processes_score_as_one(scored, tiny_shards, tmp_path) -> None:
    """`torchrun -m prefpack difficulty` with 2 gloo processes x 1 row per micro-batch: the
    same global batch as one process x 2 rows, so the same scores (to float rounding), and
    rank 0 alone writes them."""
    argv = _argv(tiny_shards, tmp_path / "ddp")
    argv[argv.index("--batch-rows") + 1] = "1"
    torchrun_prefpack(*argv)
    ddp, single = read_scores(tmp_path / "ddp"), read_scores(scored["out"])
    assert ddp["pair_id"].equals(single["pair_id"]) and ddp["fold"].equals(single["fold"])
    np.testing.assert_allclose(ddp["loss"].to_numpy(), single["loss"].to_numpy(), atol=1e-5)
    assert read_report(tmp_path / "ddp")["settings"]["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # no stray temp directory


@pytest.mark.slow
def test_fsdp_folds_load_the_model_sharded_and_score_as_one(scored, tiny_shards, tmp_path) -> None:
    """`torchrun -m prefpack difficulty --model F --parallel fsdp`: every fold model is
    loaded sharded from F (none is a copy of a whole model), and the scores equal one
    process's with the same initial weights (`--config tiny`, init seed 0, saved as F)."""
    folder = tiny_checkpoint(tiny_shards, tmp_path / "model")
    argv = with_model(_argv(tiny_shards, tmp_path / "fsdp", "--parallel", "fsdp"), folder)
    argv[argv.index("--batch-rows") + 1] = "1"
    torchrun_prefpack(*argv)
    fsdp, single = read_scores(tmp_path / "fsdp"), read_scores(scored["out"])
    assert fsdp["pair_id"].equals(single["pair_id"]) and fsdp["fold"].equals(single["fold"])
    np.testing.assert_allclose(fsdp["loss"].to_numpy(), single["loss"].to_numpy(), atol=1e-5)


def test_a_rerun_after_a_crash_keeps_the_folds_that_finished(scored, tiny_shards, tmp_path) -> None:
    """The run dies in fold 1's training: fold 0's run and held-out scores stay beside the
    output; the rerun trains folds 1 and 2 only, writes the uninterrupted run's bytes and
    removes the fold runs."""
    out = tmp_path / "scores"
    real_train = training.difficulty.train
    calls: list[str] = []

    def crashing_train(config, *args, **kwargs):
        calls.append(config.out_dir.name)
        if config.out_dir.name == "fold-1" and len(calls) == 2:
            raise RuntimeError("killed")
        return real_train(config, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.difficulty, "train", crashing_train)
        with pytest.raises(RuntimeError, match="killed"):
            prefpack.main(_argv(tiny_shards, out))
        (folds,) = tmp_path.glob(".scores.folds-*")
        assert (folds / "fold-0" / "held_out.arrow").is_file()
        assert not (out / "scores.parquet").exists()
        assert prefpack.main(_argv(tiny_shards, out)) == 0
    assert calls == ["fold-0", "fold-1", "fold-1", "fold-2"]
    for name in ("scores.parquet", "report.json"):
        assert (out / name).read_bytes() == (scored["out"] / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]


def test_a_fold_interrupted_mid_training_resumes_from_its_checkpoint(
    scored, tiny_shards, tmp_path
) -> None:
    """With --checkpoint-every 1, a crash in fold 1's second step: the rerun resumes fold 1
    at step 2 (one step, not two) and gives the uninterrupted run's scores."""
    out = tmp_path / "scores"
    real_step = training.train.train_step
    steps: list[int] = []

    def crashing_step(run, step):
        steps.append(step)
        if len(steps) == 4:  # fold 0: steps 0, 1; fold 1: step 0, then this one
            raise RuntimeError("killed")
        return real_step(run, step)

    argv = _argv(tiny_shards, out, "--checkpoint-every", "1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.train, "train_step", crashing_step)
        with pytest.raises(RuntimeError, match="killed"):
            prefpack.main(argv)
        steps.clear()
        assert prefpack.main(argv) == 0
    assert steps == [1, 0, 1]  # fold 1 from its checkpoint at step 1, then fold 2
    single, resumed = read_scores(scored["out"]), read_scores(out)
    assert resumed["pair_id"].equals(single["pair_id"])
    np.testing.assert_allclose(resumed["loss"].to_numpy(), single["loss"].to_numpy(), rtol=1e-6)
