"""The "does it learn" benchmark stays runnable: its pairs carry the rule it claims, and its
whole code path (generate, curate, pack, logps, train through the CLI) writes the JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.quality import LEAD, rule_pairs

REPO = Path(__file__).resolve().parents[2]


def test_rule_pairs_differ_only_in_one_fixed_order() -> None:
    table = rule_pairs(300, seed=0).to_pylist()
    assert len({frozenset(r["chosen"].split()) for r in table}) == 300
    before = set()  # (a, b): a precedes b in some chosen response
    for row in table:
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        assert chosen[0] == rejected[0] == LEAD
        assert chosen != rejected and Counter(chosen) == Counter(rejected)
        assert Counter(chosen[1:]) == Counter(row["prompt"][-1]["content"].split()[3:])
        before |= {(a, b) for i, a in enumerate(chosen[1:], 1) for b in chosen[i + 1 :]}
    assert not {(b, a) for a, b in before} & before  # one total order over every chosen


@pytest.mark.slow
def test_small_run_writes_the_curve_and_before_after(tmp_path: Path) -> None:
    """300 pairs, 20 steps. Deterministic on CPU with fixed seeds (two runs gave the same
    JSON but for the timings): the first evaluation already beats the initial model's
    ranking (0.97 against 0.65 on 34 held-out pairs), so a generous margin holds."""
    results = tmp_path / "quality.json"
    command = [sys.executable, "-m", "benchmarks.quality", "--pairs", "300", "--steps", "20"]
    command += ["--eval-every", "10", "--out", str(tmp_path / "work"), "--results", str(results)]
    subprocess.run(command, check=True, cwd=REPO, timeout=600, capture_output=True)
    out = json.loads(results.read_text())

    assert out["settings"]["pairs"] == 300 and out["settings"]["steps"] == 20
    assert out["train_pairs"] + out["eval_pairs"] == 300 and out["eval_pairs"] > 0
    assert [p["step"] for p in out["curve"]] == [10, 20]
    for point in out["curve"]:
        assert 0 <= point["eval_reward_accuracy"] <= 1
        assert math.isfinite(point["eval_loss"]) and math.isfinite(point["eval_reward_margin"])
    assert out["first_eval"] == out["curve"][0] and out["after"] == out["curve"][-1]
    before = out["before"]["initial_logp_chosen_above_rejected"]
    assert 0 <= before <= 1 and isinstance(out["before"]["initial_logp_ties"], int)
    assert all(s > 0 for s in out["seconds"].values())
    assert out["after"]["eval_reward_accuracy"] >= before + 0.2
