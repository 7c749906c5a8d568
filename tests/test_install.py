"""prefpack installs into a user's own environment: compatible ranges, not pins, and an
installed torch (a CUDA build, say) is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
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


def _user_env(root: Path, torch_version: str) -> Path:
    """A fresh virtual environment standing in for a user's: it holds its own torch (only
    its metadata: `torch_version`, a CUDA build, say) and sees this environment's other
    packages through a .pth line, so pip resolves offline. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dist_info = Path(site, f"torch-{torch_version}.dist-info")
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n"
    )
    (dist_info / "INSTALLER").write_text("pip\n")
    (dist_info / "RECORD").write_text("")
    ours = sysconfig.get_path("purelib")
    Path(site, "tested_environment.pth").write_text(ours + "\n")
    return python


def _pip_install(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pip offline, reading no configuration (no index, find-links or constraints of this
    machine): it can only keep what the environment holds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    command = [python, "-m", "pip", "install", "--no-index", "--no-build-isolation", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("torch_version", ["2.13.0+cpu", "2.15.0+cu130"])
def test_pip_install_e_keeps_the_torch_that_is_there(tmp_path: Path, torch_version: str) -> None:
    """pip resolves prefpack's ranges against the user's environment and installs nothing
    but prefpack: the torch there, whatever build within the range, stays."""
    python = _user_env(tmp_path / "env", torch_version)
    report = tmp_path / "report.json"
    done = _pip_install(python, "--dry-run", "--report", str(report), "-e", str(REPO))
    assert done.returncode == 0, done.stderr
    installs = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert installs == ["prefpack"]
    # Installed for real, quietly: no setuptools warning (license, editable mode) of ours.
    done = _pip_install(python, "--quiet", "--no-deps", "-e", str(REPO))
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    version = "import importlib.metadata as m; print(m.version('torch'), m.version('prefpack'))"
    shown = subprocess.run([python, "-c", version], capture_output=True, text=True, check=True)
    assert shown.stdout.split() == [torch_version, PROJECT["version"]]


@pytest.mark.slow
def test_a_torch_outside_the_range_is_not_kept(tmp_path: Path) -> None:
    """The test above can fail: a torch below the range is one pip must replace (offline,
    it finds none and names the requirement)."""
    python = _user_env(tmp_path / "env", "2.12.0")
    done = _pip_install(python, "--dry-run", "-e", str(REPO))
    assert done.returncode != 0
    assert "No matching distribution found for torch<3,>=2.13" in done.stderr, done.stderr
