"""Test tiers.

- Unit and property tests (the default): pure functions on tiny inputs, hypothesis for
  invariants. Fast; every run.
- `slow`: end-to-end runs (whole Dagster graph, the real webserver, multi-process DDP).
  Still part of `make test`, which stays well under 15 minutes on 2 cores.
- `gpu`: needs CUDA (FlexAttention backward). Skipped with a stated reason on machines
  without a GPU, and reported by pytest's `-ra` summary, never silently.

Tests never touch the network or `../shared`; fixtures live in `tests/fixtures`, written
by us in each source's real schema.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

FIXTURES = Path(__file__).parent / "fixtures"

# Shared, noisy machines: no per-example deadline; property tests assert invariants, not time.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("default")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run `prefpack.main(argv)` as the shell would: (exit status, stderr)."""
    import prefpack

    def run(argv: list[str]) -> tuple[int, str]:
        try:
            status = prefpack.main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code if isinstance(exit_.code, int) else 1
        return status, capsys.readouterr().err

    return run


def assert_one_error_line(status: int, err: str, command: str, *named: str) -> None:
    """A user error: exit status 2, one line `prefpack COMMAND: error: ...` naming each of
    `named`, and no traceback."""
    assert status == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"prefpack {command}: error:")]
    assert len(lines) == 1, err
    for text in named:
        assert text in lines[0], (text, err)
