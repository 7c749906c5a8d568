"""The README's step-by-step block runs as written, on the bundled samples; every other
`prefpack` command it and the reference pages in docs/ show parses with the real parser;
every file they link exists; the README stays a five-minute read."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import prefpack

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = {path: path.read_text(encoding="utf-8") for path in sorted((REPO / "docs").glob("*.md"))}
PAGES = {REPO / "README.md": README, **DOCS}  # every page a reader opens
README_LINES = 250  # what a newcomer reads in five minutes; the reference is in docs/


def _step_by_step_block() -> str:
    section = README.split("## The command line, step by step", 1)[1]
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


def _prefpack_commands() -> list[str]:
    """The arguments of every `prefpack` command in the pages' bash blocks: continuation
    lines joined, comments cut, `$(prefpack ...)` and `torchrun ... -m prefpack` included."""
    commands = []
    blocks = [b for text in PAGES.values() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            code = line.split(" #")[0]
            match = re.search(r"(?:^|\s|\$\()prefpack (\w.*)", code)
            if match and not code.lstrip().startswith("#"):
                commands.append(match.group(1).strip().rstrip(")"))
    return commands


def test_every_prefpack_command_shown_parses() -> None:
    """Flags, choices and required arguments as `prefpack` takes them (placeholders such as
    `...` or `store/shards/<key>` stand for values)."""
    parser = prefpack.build_parser()
    commands = _prefpack_commands()
    assert len(commands) > 20
    refused = []
    for command in commands:
        try:
            parser.parse_args(shlex.split(command))
        except SystemExit:
            refused.append(command)
    assert refused == []


def test_every_linked_file_exists() -> None:
    """Relative links resolve from the page that holds them, README and docs alike."""
    missing = []
    for path, text in PAGES.items():
        for link in re.findall(r"\]\(((?!https?:)[^)#\s]+)\)", text):
            if not (path.parent / link).exists():
                missing.append(f"{path.name}: {link}")
    assert missing == []
    assert (
        "docs/design.md" in README
        and "plots/trained_model-loss_plot.png" in DOCS[REPO / "docs" / "dagster.md"]
    )


def test_the_readme_is_short_and_every_docs_page_is_linked() -> None:
    assert len(README.splitlines()) <= README_LINES
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README))
    assert linked == {path.name for path in DOCS}


def test_every_dagster_home_shown_is_absolute() -> None:
    """Dagster refuses a relative $DAGSTER_HOME (`must be an absolute path`), so a command
    shown with one would fail as written."""
    shown = [v for text in PAGES.values() for v in re.findall(r"DAGSTER_HOME=(\S+)", text)]
    assert shown
    assert [v for v in shown if not v.lstrip('"').startswith(("/", "$PWD", "$(pwd)"))] == []
