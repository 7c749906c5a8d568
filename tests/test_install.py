"""prefpack installs into a user's own environment: compatible ranges, not pins, and an
installed torch (a CUDA build, say) is kept."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements() -> list[Requirement]:
    extras = [r for group in PROJECT["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*PROJECT["dependencies"], *extras]]


def test_dependencies_are_ranges_and_the_lock_pins_each_within_them() -> None:
    locked = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            locked[name.lower().replace("_", "-")] = version
    for requirement in _requirements():
        assert not any(s.operator == "==" for s in requirement.specifier), requirement
        assert requirement.specifier.contains(locked[requirement.name.lower()]), requirement
    torch = next(r for r in _requirements() if r.name == "torch")
    assert torch.specifier.contains("2.14.1") and torch.specifier.contains("2.13.0")


@pytest.mark.slow
def test_installing_keeps_the_torch_that_is_there(tmp_path: Path) -> None:
    """pip resolves prefpack against this environment and installs nothing but prefpack."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation"]
    command += ["--quiet", "--report", str(report), "-e", str(REPO)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    installs = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert installs == ["prefpack"]
