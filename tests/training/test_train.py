"""The training loop: normalisation, resume, DDP, export, and failing fast."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import training.train
from tests.training.dist_worker import (
    STEPS,
    seeded_model,
    torchrun_workers,
    worker_config,
    worker_eval_data,
)
from tests.training.pairs import varied_rows
from training.batch import PackedRows
from training.checkpoint import load_pretrained
from training.configs import tiny
from training.device import flex_problems
from training.model import CausalLM
from training.reference import ReferenceKey, ReferenceLogps, compute_reference_logps
from training.train import (
    TrainConfig,
    evaluate,
    global_step_rows,
    learning_rate,
    release,
    setup,
    train,
    train_step,
)

REPO = Path(__file__).resolve().parents[2]
METRIC_NAMES = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "tokens/s",
    "pairs/s",
}


def _model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(tiny())


def _config(out_dir: Path, **changes: object) -> TrainConfig:
    base = TrainConfig(
        out_dir=out_dir, steps=4, lr=1e-3, warmup_steps=1, batch_rows=2, progress=False
    )
    return replace(base, **changes)


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(out_dir: Path) -> list[float]:
    return [m["loss"] for m in _metrics(out_dir)]


def _run(out_dir: Path, rows: list, model: CausalLM | None = None, **changes: object) -> Path:
    return train(
        _config(out_dir, **changes),
        PackedRows(rows, "shared", block_size=16, max_len=512),
        model=model or _model(),
    )


def test_metrics_export_and_learning(tmp_path: Path) -> None:
    rows = varied_rows(0, "shared")
    (tmp_path / "tok.json").write_text("{}")
    model = _model()
    seen: list[dict] = []
    final = train(
        _config(tmp_path / "run", steps=6),
        PackedRows(rows, "shared", block_size=16, max_len=512),
        model=model,
        tokenizer=tmp_path / "tok.json",
        on_step=seen.append,
    )
    metrics = _metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert seen == metrics  # the sink gets each step's metrics line
    assert set(metrics[0]) >= METRIC_NAMES
    # Step 1: policy == reference, so every reward is 0 and the loss is log 2.
    assert metrics[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert metrics[0]["rewards/margins"] == 0
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # lr 1e-3 on a tiny model learns
    assert metrics[-1]["rewards/margins"] > 0
    exported = load_pretrained(final)
    assert (final / "tok.json").exists()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(exported.model.norm.weight, _model().model.norm.weight)


def test_evaluation_runs_at_its_steps_and_equals_dpo_on_the_final_weights(
    tmp_path: Path,
) -> None:
    """--eval-every 2 of 5 steps: eval/ metrics (TRL's names) on steps 2, 4 and 5 (the
    last) and on no other line. The last evaluation is DPO by hand on the held-out pairs:
    with c = beta (log pi(chosen) - log ref(chosen)) and r alike, from the exported
    weights' and the initial model's log-probs, loss = mean -log sigmoid(c - r),
    accuracy = mean [c > r], margin = mean (c - r). Evaluating changes no training
    number."""
    rows, held_out = varied_rows(0, "shared"), varied_rows(1, "shared")
    data = PackedRows(rows, "shared", 16, 512)
    eval_data = PackedRows(held_out, "shared", 16, 512)
    final = train(
        _config(tmp_path / "run", steps=5, eval_every=2), data, _model(), eval_data=eval_data
    )
    metrics = _metrics(tmp_path / "run")
    assert [m["step"] for m in metrics if "eval/loss" in m] == [2, 4, 5]
    assert {k for m in metrics for k in m if k.startswith("eval/")} == {
        *(f"eval/{name}" for name in sorted(METRIC_NAMES) if "/s" not in name),
        "eval/loss",
        "eval/pairs",
        "eval/seconds",
    }

    def logps(model: CausalLM) -> tuple[np.ndarray, np.ndarray]:
        table = compute_reference_logps(model, held_out, "shared", progress=False)
        return (table[c].to_numpy().astype(np.float64) for c in ("chosen_logps", "rejected_logps"))

    (policy_c, policy_r), (ref_c, ref_r) = logps(load_pretrained(final)), logps(_model())
    chosen, rejected = 0.1 * (policy_c - ref_c), 0.1 * (policy_r - ref_r)
    last = metrics[-1]
    assert last["eval/pairs"] == sum(row.num_pairs for row in held_out) == len(chosen)
    assert last["eval/loss"] == pytest.approx(np.logaddexp(0, rejected - chosen).mean(), rel=1e-5)
    assert last["eval/rewards/accuracies"] == pytest.approx((chosen > rejected).mean())
    assert last["eval/rewards/margins"] == pytest.approx((chosen - rejected).mean(), rel=1e-4)
    assert last["eval/rewards/chosen"] == pytest.approx(chosen.mean(), rel=1e-4, abs=1e-7)
    assert last["eval/logps/rejected"] == pytest.approx(policy_r.mean(), rel=1e-5)
    assert last["eval/loss"] != metrics[1]["eval/loss"]  # the policy moved between them

    _run(tmp_path / "plain", rows, steps=5)
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "run")


def test_loss_is_normalised_by_pairs_in_the_global_step(tmp_path: Path) -> None:
    """Rows hold 1-4 pairs. The same 4 rows per step split as 4x1, 2x2 or 1x4 (rows per
    micro-batch x accumulation) give the same losses and the same weights: each pair
    weighs 1/pairs_in_step wherever it lands (a per-micro-batch mean would not)."""
    rows = varied_rows(0, "shared")
    runs = {}
    for batch_rows, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"{batch_rows}x{accum}"
        model = _model()
        _run(out, rows, model, steps=3, batch_rows=batch_rows, grad_accum=accum)
        runs[(batch_rows, accum)] = (_losses(out), model.state_dict())
    (base_losses, base_state), *others = runs.values()
    for losses, state in others:
        np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
        # Adam divides by sqrt(v): on a weight whose gradient is near zero, float rounding
        # of a different split moves the update by ~1e-6; a wrong normalisation moves the
        # weights by about lr = 1e-3 (and already breaks the losses above).
        for key, value in base_state.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5)


def test_a_run_from_step_0_starts_its_metrics_over(tmp_path: Path) -> None:
    """A run that died before its first checkpoint left metrics lines: the next run in that
    directory starts from step 0, so it writes its own lines only."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    _run(out, varied_rows(0, "shared"), steps=2)
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]
    assert 9.0 not in [m["loss"] for m in metrics]


def test_a_given_reference_model_must_be_the_initial_policy(tmp_path: Path) -> None:
    """The frozen reference may be passed in (a sharded policy is not copied), but only
    one with the policy's weights: another model is refused before step 1; the policy's
    own starting weights train as the copied reference does."""
    rows = varied_rows(0, "shared")

    def run(out: str, reference: CausalLM | None) -> list[float]:
        config = _config(tmp_path / out, steps=2)
        train(config, PackedRows(rows, "shared", 16, 512), _model(), reference=reference)
        return _losses(tmp_path / out)

    with pytest.raises(ValueError, match="not the initial policy"):
        run("other", _model(seed=1))
    assert not (tmp_path / "other").exists()
    assert run("given", _model()) == run("copied", None)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_a_reference_free_loss_builds_no_reference_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss: str
) -> None:
    """No frozen copy and no reference log-probs, for training or the eval set: each
    micro-batch runs one forward pass (the policy's; a live reference adds one), the eval
    set one pass (the policy's), and the checkpoint record says reference `none`. The loss
    falls, and the eval rewards are beta times the policy's per-token log-probs (TRL's
    CPO/ORPO metrics), from the eval rows' own lengths."""
    calls = {"pair_logps": 0, "compute_reference_logps": 0}

    def counted(name: str):
        real = getattr(training.train, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    for name in calls:
        monkeypatch.setattr(training.train, name, counted(name))
    held_out = varied_rows(1, "shared")
    # Every step on all 12 rows: the losses of one set of pairs, step after step.
    config = _config(tmp_path / "run", loss=loss, beta=2.0, steps=5, batch_rows=12)
    run = setup(
        config,
        PackedRows(varied_rows(0, "shared"), "shared", 16, 512),
        _model(),
        eval_data=PackedRows(held_out, "shared", 16, 512),
    )
    try:
        assert run.ref_model is None and run.reference is None and run.eval_reference is None
        assert run.record["inputs"]["reference"] == "none"
        assert calls == {"pair_logps": 0, "compute_reference_logps": 0}
        losses = [train_step(run, step)["loss"] for step in range(config.steps)]
        assert calls == {"pair_logps": config.steps, "compute_reference_logps": 0}
        metrics = evaluate(run)
        assert calls["compute_reference_logps"] == 1
    finally:
        release(run)
    assert losses[-1] < losses[0]
    table = compute_reference_logps(run.model, held_out, "shared", progress=False)
    lengths = np.concatenate([row.chosen_len for row in held_out])
    per_token = table["chosen_logps"].to_numpy() / lengths
    assert metrics["eval/rewards/chosen"] == pytest.approx(2.0 * per_token.mean(), rel=1e-5)


def test_a_reference_free_loss_refuses_a_reference(tmp_path: Path) -> None:
    rows = varied_rows(0, "shared")
    with pytest.raises(ValueError, match="loss simpo is reference-free"):
        train(
            _config(tmp_path / "run", loss="simpo"),
            PackedRows(rows, "shared", 16, 512),
            _model(),
            reference=_stored_reference(rows),
        )
    assert not (tmp_path / "run").exists()


def test_resume_continues_exactly(tmp_path: Path) -> None:
    """Run A: 4 steps uninterrupted. Run B: the same with checkpoints every 2 steps, then
    its last checkpoint and export are deleted (a crash after step 2) and it is resumed
    with a fresh copy of the initial model: only if the weights and optimizer state come
    from the step-2 checkpoint do steps 3-4 match A."""
    rows = varied_rows(0, "shared")
    _run(tmp_path / "a", rows, checkpoint_every=2)
    _run(tmp_path / "b", rows, checkpoint_every=2)
    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_000004")

    _run(tmp_path / "b", rows, checkpoint_every=2)
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3, 4]  # the lines of the lost steps were dropped
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-5)
    final_a, final_b = (
        load_pretrained(tmp_path / "a" / "final"),
        load_pretrained(tmp_path / "b" / "final"),
    )
    for key, value in final_a.state_dict().items():
        torch.testing.assert_close(final_b.state_dict()[key], value, rtol=1e-4, atol=1e-6)


def _stored_reference(rows: list, precision: str = "fp32") -> ReferenceLogps:
    """The initial model's log-probs of `rows`, as a file would hold them."""
    table = compute_reference_logps(_model(), rows, "shared", progress=False)
    return ReferenceLogps(table, ReferenceKey("ab" * 32, "cd", precision))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"beta": 0.2}, "config.beta was 0.1, now 0.2"),
        ({"model": 1}, r'inputs.model_fingerprint was "[0-9a-f]{64}", now "[0-9a-f]{64}"'),
        ({"init_seed": 1}, "inputs.init_seed was 0, now 1"),
        ({"shard_key": "6b2e"}, 'inputs.shard_key was "5a1d", now "6b2e"'),
        ({"reference": "stored"}, r'inputs.reference was "live", now \{"model_fingerprint"'),
    ],
)
def test_resume_refuses_another_run(tmp_path: Path, change: dict, message: str) -> None:
    """Same rows (so the same row count) each time: only the named difference is left for
    the check to find, and it is refused before step 1 (no metrics line is added)."""
    rows = varied_rows(0, "shared")
    run = tmp_path / "run"
    train(_config(run, steps=2, checkpoint_every=1), PackedRows(rows, "shared", 16, 512, "5a1d"),
          _model(), init_seed=0)  # fmt: skip
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step_000002")
    lines = (run / "metrics.jsonl").read_text()
    config = _config(run, steps=2, checkpoint_every=1, beta=change.get("beta", 0.1))
    reference = _stored_reference(rows) if change.get("reference") else None
    with pytest.raises(ValueError, match="step_000001: cannot resume") as refused:
        data = PackedRows(rows, "shared", 16, 512, change.get("shard_key", "5a1d"))
        train(config, data, _model(change.get("model", 0)), reference=reference,
              init_seed=change.get("init_seed", 0))  # fmt: skip
    assert re.search(message, str(refused.value)), refused.value
    assert str(refused.value).endswith("; use another --out to start a new run")
    assert str(refused.value).count(" was ") == 1  # nothing else is named
    assert (run / "metrics.jsonl").read_text() == lines


def test_every_row_once_per_epoch_whatever_the_step_size() -> None:
    for rows_per_step in (1, 3, 7):
        stream = np.concatenate([global_step_rows(s, 10, rows_per_step, 5) for s in range(20)])
        for epoch in range(len(stream) // 10):
            assert sorted(stream[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert not np.array_equal(global_step_rows(0, 10, 10, 5), global_step_rows(1, 10, 10, 5))
    assert not np.array_equal(global_step_rows(0, 10, 10, 5), global_step_rows(0, 10, 10, 6))


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    config = TrainConfig(out_dir=Path("x"), steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [learning_rate(s, config) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))
    assert learning_rate(10, config) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backend": "flex"}, "backend flex trains on CUDA only"),
        ({"backend": "sparse"}, "--backend must be one of auto, dense"),
        ({"precision": "bf16"}, "bf16 autocast runs on CUDA only"),
        ({"precision": "fp16"}, "--precision must be one of fp32, bf16, got 'fp16'"),
        ({"loss": "ipo", "label_smoothing": 0.1}, "'ipo' takes no label_smoothing"),
        ({"warmup_steps": 9}, r"--warmup-steps must be at most --steps \(\d+\), got 9"),
    ],
)
def test_unsupported_settings_fail_fast(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _run(tmp_path / "run", varied_rows(0, "shared"), **changes)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("block_size", "head_dim", "named"),
    [
        (16, 64, ["mask block size that is a multiple of 128; these have 16"]),
        (128, 8, ["head dimension of 16 or more; the model has 8"]),
        (64, 8, ["these have 64", "the model has 8"]),
        (256, 16, []),
    ],
)
def test_flex_on_cuda_names_what_its_kernels_cannot_compile(
    block_size: int, head_dim: int, named: list[str]
) -> None:
    """Seen on an H200: inductor refuses blocks of part tiles and head dimensions under 16."""
    problems = flex_problems(block_size, head_dim, torch.device("cuda"))
    assert len(problems) == len(named)
    for problem, words in zip(problems, named, strict=True):
        assert words in problem.replace(" (FlexAttention's kernel tiles)", "")
    assert flex_problems(16, 8, torch.device("cpu")) == []  # CPU: flex_attention unrestricted


def test_bad_rows_are_named_before_step_1(tmp_path: Path) -> None:
    """The bad row is the last one: a check per micro-batch would have trained first."""
    rows = varied_rows(0, "shared")
    bad = rows[-1]
    ids = bad.input_ids.copy()
    ids[-1] = 700  # the model has 512 tokens
    rows[-1] = replace(bad, input_ids=ids)
    last = len(rows) - 1
    with pytest.raises(
        ValueError, match=rf"row {last}: token id 700 is outside the model's vocabulary \(512\)"
    ):
        _run(tmp_path / "run", rows)
    with pytest.raises(ValueError, match=r"row \d+: \d+ tokens exceed max_len 20"):
        train(
            _config(tmp_path / "r2"),
            PackedRows(varied_rows(0, "shared"), "shared", 16, 20),
            _model(),
        )
    assert not (tmp_path / "run").exists() and not (tmp_path / "r2").exists()


def test_a_pair_without_reference_logps_fails_before_step_1(tmp_path: Path) -> None:
    rows = varied_rows(0, "shared")
    reference = _stored_reference(rows[:-1])
    missing = rows[-1].pair_ids[0]
    with pytest.raises(
        ValueError,
        match=rf"row {len(rows) - 1}: pair {missing} has no reference log-probs "
        rf"\({rows[-1].num_pairs} of \d+ pairs missing\)",
    ):
        train(
            _config(tmp_path / "run"),
            PackedRows(rows, "shared", 16, 512),
            _model(),
            reference=reference,
        )
    assert not (tmp_path / "run").exists()


def test_reference_logps_of_another_precision_are_refused(tmp_path: Path) -> None:
    rows = varied_rows(0, "shared")
    with pytest.raises(
        ValueError, match="reference log-probs were computed in bf16, the run trains in fp32"
    ):
        train(_config(tmp_path / "run"), PackedRows(rows, "shared", 16, 512), _model(),
              reference=_stored_reference(rows, "bf16"))  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("layout", "pairs_per_row"), [("unshared", (1, 4, 2, 3) * 3), ("padded", (1,) * 30)]
)
def test_baseline_layouts_train_to_the_same_losses(
    tmp_path: Path, layout: str, pairs_per_row: tuple[int, ...]
) -> None:
    """The same pairs grouped into the same rows (padded rows hold one pair each)."""
    runs = {}
    for name in ("shared", layout):
        train(
            _config(tmp_path / name, steps=3),
            PackedRows(varied_rows(0, name, pairs_per_row=pairs_per_row), name, 16, 512),
            model=_model(),
        )
        runs[name] = _metrics(tmp_path / name)
    shared, other = runs["shared"], runs[layout]
    np.testing.assert_allclose([m["loss"] for m in other], [m["loss"] for m in shared], rtol=1e-5)
    assert other[0]["tokens"] > shared[0]["tokens"]  # the prompt is there twice


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_and_resume_exactly(tmp_path: Path, parallel: str) -> None:
    """torchrun, 2 processes x 1 row per step against 1 process x 2 rows, 5 steps; then the
    2-process run loses its export and the steps after its step-3 checkpoint (a crash) and
    is resumed by 2 new processes: the weights (HF folder) and the sharded optimizer state
    (DCP) must both come back for steps 4-5 and the export to match."""
    torchrun_workers("train", str(tmp_path / "two"), parallel)
    one = train(
        worker_config(tmp_path / "one", batch_rows=2),
        PackedRows(varied_rows(0, "shared"), "shared", block_size=16, max_len=512),
        model=seeded_model(),
        eval_data=worker_eval_data(),
    )
    two, single = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    assert [m["pairs"] for m in two] == [m["pairs"] for m in single]
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in single], rtol=1e-5)
    # Each rank evaluates its share of the held-out rows: the numbers of one process.
    evaluated = [m for m in two if "eval/loss" in m]
    assert [m["step"] for m in evaluated] == [m["step"] for m in single if "eval/loss" in m]
    assert [m["step"] for m in evaluated] == [2, 4, 5]
    for name in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/pairs"):
        np.testing.assert_allclose(
            [m[name] for m in evaluated],
            [m[name] for m in single if "eval/loss" in m],
            rtol=1e-5,
            atol=1e-6,  # margins are differences of nearby rewards: rounding is absolute
            err_msg=name,
        )
    assert two[-1]["loss"] != two[0]["loss"]  # the weights moved between steps
    exported = load_pretrained(tmp_path / "two" / "final").state_dict()
    for key, value in load_pretrained(one).state_dict().items():
        torch.testing.assert_close(exported[key], value, rtol=1e-4, atol=1e-5)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "final")
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step_000003"]
    torchrun_workers("train", str(resumed), parallel)
    again = _metrics(resumed)
    assert [m["step"] for m in again] == list(range(1, STEPS + 1))
    for name in ("loss", "eval/loss"):
        np.testing.assert_allclose(
            [m.get(name, 0) for m in again], [m.get(name, 0) for m in two], rtol=1e-6
        )
    final = load_pretrained(resumed / "final").state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(final[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_processes_refuse_bad_data_before_step_1(tmp_path: Path) -> None:
    """Under torchrun (2 gloo processes) a token outside the vocabulary and a pair without
    reference log-probs stop both ranks with the same message naming the row and pair,
    before any metrics line."""
    torchrun_workers("refuse", str(tmp_path), "ddp")
    messages = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert messages[0] == messages[1]
    token, pair = messages[0]
    assert re.fullmatch(r"row \d+: token id 700 is outside the model's vocabulary .*", token)
    assert re.fullmatch(r"row \d+: pair pair-\d+ has no reference log-probs .*", pair)
    assert not list(tmp_path.glob("*/metrics.jsonl"))
