"""The README's step-by-step block runs as written, on the bundled samples."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _step_by_step_block() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## The command line, step by step", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "no bash block in the step-by-step section"
    return match.group(1)


@pytest.mark.slow
def test_step_by_step_block_runs(tmp_path: Path) -> None:
    shutil.copytree(REPO / "pipeline" / "sample_data", tmp_path / "pipeline" / "sample_data")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(REPO)
    script = "set -euo pipefail\n" + _step_by_step_block()
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert (tmp_path / "store" / "curated" / "dropped.parquet").is_file()
    assert (tmp_path / "runs" / "readme" / "final" / "config.json").is_file()
    assert (tmp_path / "store" / "difficulty" / "readme" / "scores.parquet").is_file()
    assert (tmp_path / "runs" / "readme-selected" / "final" / "config.json").is_file()
