"""Metadata tables say what their numbers are."""

from __future__ import annotations

from assets.metadata import layout_table


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
