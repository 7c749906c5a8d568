"""Presets: each public recipe on fixture rows in the sources' real schemas, user settings
over the preset's, and the errors of a wrong preset.

`ultrafeedback_presets.jsonl` (raw UltraFeedback; aspect ratings -> mean, overall_score):
  0 evol_instruct  "23 is prime." 5,5,5,5 -> 5.0 (overall 6); "25 is prime." 2,1,1,1 -> 1.25
                   (overall 10: the critique gave 1); "29, for one." 5.0 (ties chosen, overall
                   7); "Maybe 21?" 3,3,N/A,3 -> 3.0 (overall 5)
  1 truthful_qa    4.75 vs 1.5
  2 sharegpt       "what  happens if you whistle indoors at night?", a listed TruthfulQA-style
                   question (case and spacing differ); 4.5 vs 2.0
  3 ultrachat      three completions, every mean 4.0: a tie
  4 flan_v2_niv2   4.5 vs 2.0 or 3.75
`truthful_qa_questions.jsonl` holds made-up questions in truthful_qa's `generation` schema.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.presets
import prefpack
from pipeline.curate import CurateConfig, curate, load_eval_prompts
from pipeline.normalize import normalize
from pipeline.presets import PRESETS, curate_config, get_preset
from pipeline.sources import get_source
from pipeline.sources.helpsteer import HelpSteerOptions
from tests.conftest import FIXTURES, assert_one_error_line
from tests.pipeline.factories import pair_table

UF = FIXTURES / "ultrafeedback_presets.jsonl"
QUESTIONS = FIXTURES / "truthful_qa_questions.jsonl"
ARGILLA = "argilla-ultrafeedback-clean"
UNSET = types.SimpleNamespace()  # no setting given by the user


def _curate(pairs: pa.Table, preset: str | None, given=UNSET, benchmark=None):
    config = curate_config(None if preset is None else get_preset(preset), given, pairs)
    return curate(pairs, config, benchmark_prompts=benchmark)


def _first_rejected(**options) -> str:
    return normalize("ultrafeedback", UF, **options).pairs["rejected"][0].as_py()


# ---------------------------------------------------------------------- argilla


def test_argilla_scores_by_the_aspect_mean_not_overall_score() -> None:
    result = normalize("ultrafeedback", UF, ARGILLA)
    first = result.pairs.to_pylist()[0]
    # overall_score would pick "25 is prime." (10, the bug); the mean picks 5.0 over 1.25.
    assert first["chosen"] == "23 is prime."
    assert first["score_chosen"] == 5.0
    assert result.report["preset"] == ARGILLA
    assert result.report["options"]["rejected"] == "random_lower"
    by_overall = normalize("ultrafeedback", UF, ARGILLA, score="overall")  # the user's wins
    assert by_overall.pairs["chosen"][0].as_py() == "25 is prime."


def test_argilla_rejected_is_a_seeded_random_completion_scored_strictly_lower() -> None:
    lower = {"25 is prime.", "Maybe 21?"}  # "29, for one." ties the chosen 5.0
    drawn = {seed: _first_rejected(preset=ARGILLA, seed=seed) for seed in range(24)}
    assert set(drawn.values()) == lower  # never the tie, and both lower ones get drawn
    again = normalize("ultrafeedback", UF, ARGILLA, seed=5)
    assert again.pairs.equals(normalize("ultrafeedback", UF, ARGILLA, seed=5).pairs)
    assert again.pairs["rejected"][0].as_py() == drawn[5]
    # Plain `random` (the H4 recipe) may draw the tie: the two options differ.
    assert "29, for one." in {_first_rejected(rejected="random", seed=s) for s in range(24)}


def test_argilla_curate_drops_truthful_qa_rows_listed_questions_and_ties() -> None:
    pairs = normalize("ultrafeedback", UF, ARGILLA).pairs
    result = _curate(pairs, ARGILLA, benchmark=load_eval_prompts(QUESTIONS))
    dropped = result.dropped
    reasons = dict(zip(dropped["domain"].to_pylist(), dropped["reason"].to_pylist(), strict=True))
    assert reasons == {
        "truthful_qa": "domain_excluded",
        "sharegpt": "benchmark_prompt",
        "ultrachat": "tie",
    }
    assert result.pairs["domain"].to_pylist() == ["evol_instruct", "flan_v2_niv2"]
    report = result.report
    assert report["rows_in"] == report["rows_out"] + sum(report["dropped"].values())
    assert report["benchmark_prompts"] == 3
    # Without the list, the question asked under another source stays.
    kept = _curate(pairs, ARGILLA).pairs["domain"].to_pylist()
    assert kept == ["evol_instruct", "sharegpt", "flan_v2_niv2"]


def test_benchmark_questions_match_whole_user_turns_only(tmp_path) -> None:
    (tmp_path / "q.txt").write_text("Say hello in French.\n\n")
    questions = load_eval_prompts(tmp_path / "q.txt")
    assert questions == ["Say hello in French."]
    hello = [{"role": "user", "content": "  say hello in FRENCH. "}]
    asked_by_assistant = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Say hello in French."},
        {"role": "user", "content": "Go on."},
    ]
    longer = [{"role": "user", "content": "Say hello in French. Then in German."}]
    table = pair_table([(p, "Bonjour.", "Hello.") for p in (hello, asked_by_assistant, longer)])
    result = curate(table, CurateConfig(), benchmark_prompts=questions)
    assert result.dropped["position"].to_pylist() == [0]
    assert result.report["dropped"]["benchmark_prompt"] == 1


# ---------------------------------------------------------------------- HelpSteer


def test_helpsteer2_paper_chooses_the_more_helpful_response_and_drops_equal_helpfulness() -> None:
    result = normalize("helpsteer2", FIXTURES / "helpsteer2_ties.jsonl", "helpsteer2-paper")
    chosen = result.pairs["chosen"].to_pylist()
    # "The Rolling Pin." is more helpful (4 vs 1) though less correct (2 vs 4).
    assert "The Rolling Pin." in chosen and "Eight." in chosen
    curated = _curate(result.pairs, "helpsteer2-paper")
    assert curated.report["dropped"]["tie"] == 1
    assert curated.dropped["chosen"][0].as_py().startswith("Grey clouds")
    assert curated.pairs["chosen"].to_pylist() == ["The Rolling Pin.", "Eight."]
    by_correctness = normalize(
        "helpsteer2",
        FIXTURES / "helpsteer2_ties.jsonl",
        "helpsteer2-paper",
        weights={"correctness": 1.0},
    )
    assert by_correctness.pairs["chosen"][0].as_py() == "Bakery."  # the user's weights win


def test_helpsteer3_no_ties_drops_and_counts_the_tie() -> None:
    result = normalize("helpsteer3", FIXTURES / "helpsteer3.jsonl", "helpsteer3-no-ties")
    pairs = result.pairs.to_pylist()
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    # overall_preference -2: response1 better; 3: response2 better; 0: the tie.
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("Use s[::-1].", "Use s.reverse().")
    assert pairs[1]["chosen"] == "Moby-Dick, by Herman Melville."
    curated = _curate(result.pairs, "helpsteer3-no-ties")
    assert curated.report["dropped"]["tie"] == 1
    assert curated.dropped["chosen"].to_pylist() == ["No, 1 is not prime."]
    assert curated.report["rows_out"] == len(pairs) - 1


@dataclasses.dataclass(frozen=True)
class _TiesKept(CurateConfig):
    drop_ties: bool = False


@dataclasses.dataclass(frozen=True)
class _RankedByCorrectness(HelpSteerOptions):
    weights: dict[str, float] = dataclasses.field(default_factory=lambda: {"correctness": 1.0})


def test_helpsteer_recipes_hold_when_the_defaults_change(monkeypatch) -> None:
    """helpsteer2-paper and helpsteer3-no-ties spell out what today's defaults also do
    (helpfulness alone ranks; ties are dropped), so a default that changes does not change
    the recipe: with ties kept and correctness ranking by default, the presets still pick
    by helpfulness and drop the tie, while no preset follows the new defaults."""
    monkeypatch.setattr(pipeline.presets, "CurateConfig", _TiesKept)
    monkeypatch.setattr(get_source("helpsteer2"), "options", _RankedByCorrectness)
    ties = FIXTURES / "helpsteer2_ties.jsonl"
    assert normalize("helpsteer2", ties).pairs["chosen"][0].as_py() == "Bakery."
    paper = normalize("helpsteer2", ties, "helpsteer2-paper").pairs
    curated = _curate(paper, "helpsteer2-paper")
    assert curated.report["dropped"]["tie"] == 1
    assert curated.pairs["chosen"].to_pylist() == ["The Rolling Pin.", "Eight."]
    helpsteer3 = normalize("helpsteer3", FIXTURES / "helpsteer3.jsonl", "helpsteer3-no-ties")
    assert "tie" not in _curate(helpsteer3.pairs, None).report["dropped"]  # off by default now
    assert _curate(helpsteer3.pairs, "helpsteer3-no-ties").report["dropped"]["tie"] == 1


# ---------------------------------------------------------------------- AIR


def test_air_keeps_moderate_margins_on_helpsteer3() -> None:
    """|overall_preference| of the four pairs (row 4 ends with an assistant turn and is
    quarantined): 2, 3, 3, 0 -> the band 1-2 keeps the first; the tie goes as `tie`."""
    pairs = normalize("helpsteer3", FIXTURES / "helpsteer3.jsonl", "air").pairs
    result = _curate(pairs, "air")
    assert result.pairs["margin"].to_pylist() == [2.0]
    assert result.report["dropped"]["margin_above_max"] == 2
    assert result.report["dropped"]["tie"] == 1
    assert result.report["config"]["min_chosen_score"] is None


def test_air_on_ultrafeedback_keeps_high_chosen_scores_and_moderate_margins() -> None:
    pairs = normalize("ultrafeedback", UF, "air").pairs
    result = _curate(pairs, "air")
    for pair in result.pairs.to_pylist():
        assert pair["score_chosen"] >= 4.0 and 0.5 <= pair["margin"] <= 2.0
    rules = {
        "score_below_min": lambda p: p["score_chosen"] < 4.0,
        "margin_below_min": lambda p: p["margin"] < 0.5,
        "margin_above_max": lambda p: p["margin"] > 2.0,
        "tie": lambda p: p["margin"] == 0,
    }
    for pair in result.dropped.to_pylist():
        assert rules[pair["reason"]](pair), pair
    assert result.pairs.num_rows > 0 and result.dropped.num_rows > 0


def test_air_refuses_pairs_on_another_scale_or_mixed_sources() -> None:
    overall = normalize("ultrafeedback", UF, "air", score="overall").pairs
    with pytest.raises(ValueError, match=r"on the scale 'mean of rated aspects.*overall_score"):
        _curate(overall, "air")
    helpsteer3 = normalize("helpsteer3", FIXTURES / "helpsteer3.jsonl", "air").pairs
    uf = normalize("ultrafeedback", UF, "air").pairs
    mixed = pa.concat_tables([helpsteer3, uf]).replace_schema_metadata(
        {b"score_scale": json.dumps({"helpsteer3": get_preset("air").scale("helpsteer3"),
                                     "ultrafeedback": get_preset("air").scale("ultrafeedback")})}
    )  # fmt: skip
    with pytest.raises(ValueError, match="differ between helpsteer3, ultrafeedback"):
        _curate(mixed, "air")


def test_every_preset_names_only_real_options_and_settings() -> None:
    for preset in PRESETS.values():
        for source in preset.options:
            preset.scale(source)  # builds the source's options: unknown ones raise
        curate_config(preset, UNSET, pa.table({"source": pa.array([], pa.string())}))


# ---------------------------------------------------------------------- command line


def _normalize_cli(cli, tmp_path: Path, source: str, path: Path, *extra: str) -> tuple[int, str]:
    out = tmp_path / source
    return cli(["normalize", "--source", source, "--input", str(path), "--out", str(out), *extra])


def test_cli_flags_given_win_over_the_preset(tmp_path, cli, capsys) -> None:
    status, _ = _normalize_cli(cli, tmp_path, "helpsteer3", FIXTURES / "helpsteer3.jsonl",
                               "--preset", "air")  # fmt: skip
    assert status == 0
    assert json.loads((tmp_path / "helpsteer3" / "report.json").read_text())["preset"] == "air"

    def curated(*flags: str) -> dict:
        out = tmp_path / "curated"
        assert prefpack.main(["curate", "--pairs", str(tmp_path / "helpsteer3"),
                              "--out", str(out), *flags]) == 0  # fmt: skip
        return json.loads((out / "report.json").read_text())

    assert curated("--preset", "air")["rows_out"] == 1  # margins 2, 3, 3 and a tie
    # A flag given at its default (--max-margin none) still wins over the preset's 2.
    report = curated("--preset", "air", "--max-margin", "none")
    assert report["config"]["max_margin"] is None and report["config"]["min_margin"] == 1.0
    assert report["rows_out"] == 3 and report["preset"] == "air"
    report = curated("--preset", "helpsteer3-no-ties", "--no-drop-ties")
    assert "tie" not in report["dropped"] and report["rows_out"] == 4
    assert "curate (preset helpsteer3-no-ties):" in capsys.readouterr().out


def test_cli_argilla_with_and_without_the_question_list(tmp_path, cli, capsys) -> None:
    status, _ = _normalize_cli(cli, tmp_path, "ultrafeedback", UF, "--preset", ARGILLA,
                               "-o", "seed=3")  # fmt: skip
    assert status == 0
    report = json.loads((tmp_path / "ultrafeedback" / "report.json").read_text())
    assert report["options"]["seed"] == 3 and report["options"]["rejected"] == "random_lower"
    base = ["curate", "--pairs", str(tmp_path / "ultrafeedback"), "--preset", ARGILLA]
    status, err = cli([*base, "--out", str(tmp_path / "c1")])
    assert status == 0 and "no --benchmark-prompts (TruthfulQA's questions)" in err
    status, err = cli([*base, "--out", str(tmp_path / "c2"), "--benchmark-prompts", str(QUESTIONS)])
    assert status == 0 and "benchmark-prompts" not in err
    dropped = pq.read_table(tmp_path / "c2" / "dropped.parquet")
    assert sorted(dropped["reason"].to_pylist()) == ["benchmark_prompt", "domain_excluded", "tie"]


@pytest.mark.parametrize("command", ["normalize", "curate"])
def test_unknown_preset_is_one_error_line_naming_the_choices(tmp_path, cli, command) -> None:
    if command == "normalize":
        status, err = _normalize_cli(cli, tmp_path, "helpsteer3", FIXTURES / "helpsteer3.jsonl",
                                     "--preset", "argilla")  # fmt: skip
    else:
        status, err = cli(["curate", "--pairs", str(tmp_path / "absent"), "--out",
                           str(tmp_path / "o"), "--preset", "argilla"])  # fmt: skip
    assert_one_error_line(status, err, command, "unknown preset 'argilla'", *PRESETS)
    assert len(err.strip().splitlines()) == 1


def test_preset_that_does_not_cover_the_source_is_an_error(tmp_path, cli) -> None:
    status, err = _normalize_cli(cli, tmp_path, "generic", FIXTURES / "generic.jsonl",
                                 "--preset", "air")  # fmt: skip
    assert_one_error_line(status, err, "normalize", "preset air does not cover source generic")
    assert not (tmp_path / "generic").exists()


def test_list_presets_and_help_show_every_preset(capsys) -> None:
    for command in ("normalize", "curate"):
        with pytest.raises(SystemExit) as done:
            prefpack.main([command, "--list-presets"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        for preset in PRESETS.values():
            assert preset.name in text and preset.summary.split(":")[0] in text
        assert "curate, ultrafeedback (mean of rated aspects 1-5" in text
        assert "min_chosen_score=4.0 min_margin=0.5 max_margin=2.0" in text
        with pytest.raises(SystemExit):
            prefpack.main([command, "--help"])
        help_text = capsys.readouterr().out
        assert all(f"  {name}: " in help_text for name in PRESETS)
