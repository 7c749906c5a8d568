"""`prefpack normalize` and `prefpack curate` end to end on the bundled samples."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

import prefpack
from pipeline.sample_data import eval_prompts_path, sample_path
from tests.conftest import assert_one_error_line


def test_normalize_then_curate(tmp_path, capsys) -> None:
    for source, options in (
        ("ultrafeedback", ["-o", "rejected=random", "-o", "seed=3"]),
        ("helpsteer", ["-o", "weights=helpfulness:1,correctness:0.5"]),
    ):
        code = prefpack.main(
            [
                "normalize",
                "--source",
                source,
                "--input",
                str(sample_path(source)),
                "--out",
                str(tmp_path / source),
                *options,
            ]
        )
        assert code == 0
    report = json.loads((tmp_path / "helpsteer" / "report.json").read_text())
    assert report["options"]["weights"] == {"helpfulness": 1.0, "correctness": 0.5}
    assert (
        json.loads((tmp_path / "ultrafeedback" / "report.json").read_text())["options"]["rejected"]
        == "random"
    )

    code = prefpack.main(
        [
            "curate",
            "--pairs",
            str(tmp_path / "ultrafeedback"),
            str(tmp_path / "helpsteer"),
            "--out",
            str(tmp_path / "curated"),
            "--eval-prompts",
            str(eval_prompts_path()),
            "--min-margin",
            "0.5",
            "--no-dedup",
            "--max-prompt-chars",
            "none",
            "--exclude-domains",
            "sharegpt",
        ]
    )
    assert code == 0
    funnel = json.loads((tmp_path / "curated" / "report.json").read_text())
    assert funnel["config"]["dedup"] is False
    assert funnel["config"]["max_prompt_chars"] is None
    assert funnel["config"]["exclude_domains"] == ["sharegpt"]
    assert funnel["dropped"]["contaminated"] > 0 and funnel["dropped"]["domain_excluded"] > 0
    assert "duplicate" not in funnel["dropped"]
    kept = pq.read_table(tmp_path / "curated" / "pairs.parquet")
    assert kept.num_rows == funnel["rows_out"]
    assert min(kept["margin"].to_pylist()) >= 0.5
    assert "curate:" in capsys.readouterr().out


def test_bad_option_is_named(tmp_path, cli) -> None:
    status, err = cli(
        [
            "normalize",
            "--source",
            "helpsteer3",
            "--input",
            str(sample_path("helpsteer3")),
            "--out",
            str(tmp_path / "o"),
            "-o",
            "colour=red",
        ]
    )
    assert_one_error_line(status, err, "normalize", "bad option 'colour=red'; helpsteer3 takes")
