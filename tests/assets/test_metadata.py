"""Metadata tables say what their numbers are."""

from __future__ import annotations

import numpy as np
import pytest

from assets.metadata import binned, count_table, histogram, layout_table


def test_layout_table_gives_tokens_and_their_share_of_the_padded_layout() -> None:
    table = layout_table(
        {"shared": 300, "unshared": 400, "padded": 500, "padded_to_max_len": 2000}
    ).value
    lines = table.splitlines()
    assert lines[0].startswith("| layout | tokens | of padded |")
    assert lines[2].startswith("| shared | 300 | 60.0% |")
    assert lines[3].startswith("| unshared | 400 | 80.0% |")
    assert lines[4].startswith("| padded | 500 | 100.0% |")
    assert lines[5] == "| padded_to_max_len | 2,000 | 400.0% |"
    assert lines[7].startswith("- shared: prompt once")


def test_count_table_names_its_unit_and_gives_shares_of_the_total() -> None:
    lines = count_table({"empty": 1, "too_long": 3}, total=8, unit="pairs").value.splitlines()
    assert lines[0] == "| reason | pairs | share |"
    assert lines[2:] == ["| too_long | 3 | 37.5% |", "| empty | 1 | 12.5% |"]


def test_histogram_bins_on_power_of_two_edges_up_to_the_largest() -> None:
    """7 | 20, 20 | 33 | 100 | 214: one value per bin but 16-32, no empty tail."""
    text = histogram(np.array([7, 20, 20, 33, 100, 214]), unit="chars").value
    summary, _, header, _, *rows = text.splitlines()
    assert summary == "n=6, median 26, p95 186, max 214"  # p95: 100 + 0.75 * 114
    assert header == "| chars | count | |"
    bins = [(row.split("|")[1].strip(), int(row.split("|")[2])) for row in rows]
    assert bins == [("0–16", 1), ("16–32", 2), ("32–64", 1), ("64–128", 1), ("128–256", 1)]


def test_binned_counts_stop_at_the_last_non_empty_bin() -> None:
    """Prompt lengths on the edges of the longest pair: no empty bins after the longest
    prompt; an empty bin between filled ones stays."""
    rows = binned([0, 16, 32, 64, 128, 256], [3, 0, 2, 0, 0], "tokens").value.splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["0–16", "16–32", "32–64"]
    assert binned([0, 16], [0], "tokens").value.splitlines()[2:] == []
    with pytest.raises(ValueError, match="3 counts for 2 bins"):
        binned([0, 16, 32], [1, 2, 3])
