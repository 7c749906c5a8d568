"""Typed metadata for the UI: counts as numbers (Dagster plots them across runs), tables
as markdown, histograms as markdown bars."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import numpy as np

from pipeline.lengths import power_of_two_edges


def count_table(
    counts: Mapping[str, int], key: str = "reason", total: int | None = None, unit: str = "rows"
) -> dg.MetadataValue:
    """A markdown table of `key | unit | share`, largest first; the share is of `total`
    (default: the sum)."""
    lines = [f"| {key} | {unit} | share |", "| --- | ---: | ---: |"]
    denominator = total or sum(counts.values()) or 1
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {name} | {n:,} | {n / denominator:.1%} |")
    if len(lines) == 2:
        lines.append("| (none) | 0 | |")
    return dg.MetadataValue.md("\n".join(lines))


LAYOUT_NOTES = {
    "shared": "prompt once, then chosen and rejected (what prefpack trains on)",
    "unshared": "prompt + chosen, prompt + rejected: the prompt twice",
    "padded": "both sequences padded to the longer one, one pair per row",
    "padded_to_max_len": "both sequences padded to max_len",
}


def layout_table(tokens_by_layout: Mapping[str, int]) -> dg.MetadataValue:
    """Tokens one epoch computes in each layout, and as a share of the `padded` layout
    (one pair per row: what trainers without packing compute at best). Three narrow
    columns, what each layout holds below them: the UI cuts a wide table at its edge."""
    padded = tokens_by_layout["padded"] or 1
    lines = ["| layout | tokens | of padded |", "| --- | ---: | ---: |"]
    for name, tokens in tokens_by_layout.items():
        lines.append(f"| {name} | {tokens:,} | {tokens / padded:.1%} |")
    lines.append("")
    lines += [f"- {name}: {LAYOUT_NOTES[name]}" for name in tokens_by_layout]
    return dg.MetadataValue.md("\n".join(lines))


def records_table(rows: Sequence[Mapping[str, Any]]) -> dg.MetadataValue:
    """A markdown table of dict rows with the same keys."""
    if not rows:
        return dg.MetadataValue.md("(none)")
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def histogram(values: np.ndarray, unit: str = "") -> dg.MetadataValue:
    """A markdown histogram of raw values on power-of-two edges (0, 16, 32, 64, ... up to
    the largest), as the token-length histograms are binned, with a one-line summary above
    it."""
    values = np.asarray(values)
    if values.size == 0:
        return dg.MetadataValue.md("(no values)")
    edges = power_of_two_edges(int(values.max()))
    counts, _ = np.histogram(values, bins=edges)
    summary = (
        f"n={values.size:,}, median {np.median(values):,.0f}, p95 "
        f"{np.percentile(values, 95):,.0f}, max {values.max():,.0f}"
    )
    return dg.MetadataValue.md(summary + "\n\n" + binned(edges, counts, unit).md_str)


def binned(edges: Sequence[float], counts: Sequence[int], unit: str = "") -> dg.MetadataValue:
    """A markdown histogram of counts already binned: one bar per bin, up to the last
    non-empty one (parts binned on shared edges end below the longest part's last bin)."""
    if len(counts) != len(edges) - 1:
        raise ValueError(f"{len(counts)} counts for {len(edges) - 1} bins")
    last = max((i for i, n in enumerate(counts) if n), default=-1)
    counts = counts[: last + 1]
    peak = max(max(counts, default=0), 1)
    lines = [f"| {unit or 'value'} | count | |", "| ---: | ---: | --- |"]
    for n, lo, hi in zip(counts, edges[:-1], edges[1:], strict=False):
        lines.append(f"| {lo:,.0f}–{hi:,.0f} | {n:,} | {'█' * round(20 * n / peak)} |")
    return dg.MetadataValue.md("\n".join(lines))
