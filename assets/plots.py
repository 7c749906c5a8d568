"""PNG plots for the Dagster UI, as markdown metadata holding a data-URI image.

The UI renders markdown metadata through react-markdown with rehype-sanitize, whose schema
in Dagster's `ui-core/src/ui/MarkdownWithPlugins.tsx` adds `data` to the protocols allowed
in `img src`, so `![title](data:image/png;base64,...)` shows as an image (entries over
1,000 characters open from a "[Show Markdown]" button). No image file has to be served.

Figures use the object API (`matplotlib.figure.Figure` on an Agg canvas), not pyplot, so
no global state is touched from Dagster's threads. A fixed pixel size and a PNG without
text or time chunks make the bytes a function of the input only: the same data gives the
same metadata on every materialization.
"""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

DPI = 100
SIZE = (640, 320)  # pixels, width x height
TALL = (640, 480)  # the three stacked axes of the loss plot
COLORS = {"prompt": "#4c72b0", "chosen": "#55a868", "rejected": "#c44e52"}
EVAL_COLOR = "#dd8452"  # the eval set's curve over the training one


def loss_plot(
    curve: Sequence[tuple[int, float, float, float]],
    eval_curve: Sequence[tuple[int, float, float, float]] = (),
) -> dg.MetadataValue:
    """Loss, reward accuracy and reward margin at every logged step (`RunSummary.curve`),
    one axis each, so the whole run shows rather than a thinned table; with the eval set's
    at each evaluation (`RunSummary.eval_curve`) drawn over them, learning and memorising
    tell apart."""
    if not curve:
        return _placeholder("training curve", "0 steps")
    runs = [("train", np.asarray(curve, dtype=float).T, "#4c72b0", ".")]
    if eval_curve:
        runs.append(("eval", np.asarray(eval_curve, dtype=float).T, EVAL_COLOR, "o"))
    fig = _figure(TALL)
    axes = fig.subplots(3, 1, sharex=True)
    for name, (steps, *values), color, marker in runs:
        for ax, series in zip(axes, values, strict=True):
            dense = len(steps) >= 50 and name == "train"
            ax.plot(steps, series, color=color, linewidth=1.2, marker="" if dense else marker,
                    markersize=4, label=name)  # fmt: skip
    for ax, label in zip(axes, ("loss", "reward accuracy", "reward margin"), strict=True):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if eval_curve:
        axes[0].legend(fontsize=8)
    axes[1].set_ylim(-0.05, 1.05)
    axes[-1].set_xlabel("step")
    evaluated = f", {len(eval_curve)} evaluations" if eval_curve else ""
    fig.suptitle(f"DPO training, {len(curve)} steps{evaluated}")
    return _image(fig, "training curve")


def length_plot(histograms: Mapping[str, Sequence[float]]) -> dg.MetadataValue:
    """Token-length distributions of prompt, chosen and rejected side by side, from the
    tokenize report's `length_histograms` (power-of-two `edges`, counts per part)."""
    edges = list(histograms["edges"])
    parts = ("prompt", "chosen", "rejected")
    if not any(sum(histograms[p]) for p in parts):
        return _placeholder("token lengths", "0 pairs")
    fig = _figure(SIZE)
    ax = fig.subplots()
    x = np.arange(len(edges) - 1)
    width = 0.8 / len(parts)
    for i, part in enumerate(parts):
        ax.bar(x + (i - 1) * width, histograms[part], width, label=part, color=COLORS[part])
    ax.set_xticks(x, [f"{lo:g}–{hi:g}" for lo, hi in itertools.pairwise(edges)])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("tokens")
    ax.set_ylabel("pairs")
    ax.legend()
    ax.set_title("token lengths")
    return _image(fig, "token lengths")


def fill_plot(row_tokens: np.ndarray, max_len: int) -> dg.MetadataValue:
    """How full the packed rows are (tokens per row / max_len): the mean alone hides a tail
    of nearly empty rows, which cost a whole row of compute each."""
    row_tokens = np.asarray(row_tokens)
    if row_tokens.size == 0:
        return _placeholder("row fill", "0 rows")
    fill = row_tokens / max_len
    fig = _figure(SIZE)
    ax = fig.subplots()
    ax.hist(fill, bins=np.linspace(0, 1, 21), color="#4c72b0", edgecolor="white")
    ax.axvline(fill.mean(), color="#c44e52", linestyle="--", label=f"mean {fill.mean():.1%}")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"fill (tokens per row / max_len {max_len})")
    ax.set_ylabel("rows")
    ax.legend(loc="upper left")
    ax.set_title(f"row fill, {row_tokens.size:,} rows")
    return _image(fig, "row fill")


def funnel_plot(dropped: Mapping[str, int], kept: int, held_out: int = 0) -> dg.MetadataValue:
    """The curation funnel as horizontal bars: training pairs kept, pairs held out for eval
    (when any), then pairs dropped by each rule, largest first, so the rule that costs most
    data stands out; the title gives the held-out share."""
    rows_in = kept + held_out + sum(dropped.values())
    if rows_in == 0:
        return _placeholder("curation funnel", "0 rows")
    drops = sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))
    held = [("held out for eval", held_out)] if held_out else []
    bars = [("kept", kept), *held, *drops]
    labels, counts = [name for name, _ in bars], [n for _, n in bars]
    fig = _figure(SIZE)
    ax = fig.subplots()
    y = np.arange(len(labels))
    ax.barh(y, counts, color=["#55a868"] + ["#4c72b0"] * len(held) + ["#c44e52"] * len(drops))
    for i, n in enumerate(counts):
        ax.annotate(
            f"{n:,} ({n / rows_in:.1%})",
            (n, i),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, max(counts) * 1.25 or 1)
    ax.set_xlabel("pairs")
    title = f"curation funnel, {rows_in:,} pairs in"
    if held_out:
        title += f", {held_out / (kept + held_out):.1%} of the kept held out for eval"
    ax.set_title(title)
    return _image(fig, "curation funnel")


def difficulty_plot(
    loss: np.ndarray, fold: np.ndarray, margin: np.ndarray, threshold: float | None = None
) -> dg.MetadataValue:
    """Held-out loss of every pair, stacked by the fold that scored it, with the drop
    threshold when a selection made one: the hard tail Selective DPO drops is its right end."""
    loss, fold = np.asarray(loss, dtype=float), np.asarray(fold)
    if loss.size == 0:
        return _placeholder("held-out loss", "0 pairs")
    folds = np.unique(fold)
    fig = _figure(SIZE)
    ax = fig.subplots()
    edges = np.histogram_bin_edges(loss, bins=30)
    ax.hist(
        [loss[fold == f] for f in folds],
        bins=edges,
        stacked=True,
        label=[f"fold {f}" for f in folds],
    )
    if threshold is not None:
        dropped = int((loss >= threshold).sum())
        ax.axvline(
            threshold,
            color="#c44e52",
            linestyle="--",
            label=f"dropped: {dropped:,} at >= {threshold:.3g}",
        )
    ax.set_xlabel("held-out loss (higher: harder)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8, ncols=2)
    wrong = float((np.asarray(margin) < 0).mean())
    ax.set_title(
        f"held-out loss, {loss.size:,} pairs, {folds.size} folds; {wrong:.1%} with margin < 0"
    )
    return _image(fig, "held-out loss")


def length_bias_plot(length_bias: Mapping[str, Any]) -> dg.MetadataValue:
    """Length bias per source, from the curation report's `length_bias`: the share of
    pairs whose chosen is longer (left; 50% is no bias) and the chosen / rejected length
    ratio as boxes of its p25-p75, whiskers p05-p95 and the median (right, log scale), for
    the pairs in and the pairs kept, so the effect of the rules shows."""
    stages = {"in": length_bias["in"], "out": length_bias["out"]}
    sources = sorted(stages["in"])
    if not sources:
        return _placeholder("length bias", "0 pairs")
    fig = _figure(TALL)
    share_ax, ratio_ax = fig.subplots(1, 2)
    y = np.arange(len(sources))
    boxes, positions = [], []
    for offset, (stage, color) in zip(
        (-0.2, 0.2), (("in", "#8c8c8c"), ("out", "#4c72b0")), strict=True
    ):
        shares = [(stages[stage].get(s) or {}).get("chosen_longer_share") for s in sources]
        share_ax.barh(y + offset, [v or 0 for v in shares], 0.4, color=color, label=stage)
        for i, source in enumerate(sources):
            q = (stages[stage].get(source) or {}).get("ratio_quantiles") or {}
            if q.get("p50") is None:
                continue
            boxes.append(
                {
                    "med": q["p50"],
                    "q1": q["p25"],
                    "q3": q["p75"],
                    "whislo": q["p05"],
                    "whishi": q["p95"],
                    "label": "",
                }
            )
            positions.append((i + offset, color))
    share_ax.axvline(0.5, color="#c44e52", linestyle="--", linewidth=1)
    share_ax.set_xlim(0, 1)
    share_ax.set_yticks(y, sources)
    share_ax.invert_yaxis()
    share_ax.set_xlabel("share of pairs with chosen longer")
    share_ax.legend(loc="lower right", fontsize=8)
    if boxes:
        drawn = ratio_ax.bxp(
            boxes,
            positions=[p for p, _ in positions],
            widths=0.35,
            orientation="horizontal",
            showfliers=False,
            patch_artist=True,
            manage_ticks=False,
        )
        for patch, (_, color) in zip(drawn["boxes"], positions, strict=True):
            patch.set_facecolor(color)
        ratio_ax.set_xscale("log", base=2)
        ratio_ax.xaxis.set_major_formatter("{x:g}")
    ratio_ax.axvline(1, color="#c44e52", linestyle="--", linewidth=1)
    ratio_ax.set_ylim(share_ax.get_ylim())
    ratio_ax.set_yticks(y, [""] * len(sources))
    ratio_ax.set_xlabel("chosen / rejected characters")
    fig.suptitle(f"length bias ({length_bias.get('unit', 'characters')}), pairs in and kept")
    return _image(fig, "length bias")


def _figure(size: tuple[int, int]) -> Figure:
    """A figure of exactly `size` pixels at `DPI` (constrained layout keeps labels inside)."""
    return Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")


def _image(fig: Figure, title: str) -> dg.MetadataValue:
    """The figure as a PNG in a markdown image. Rendered at its own pixel size, then cut to
    64 colors (antialiased lines over thousands of steps otherwise take over 60 KB); Pillow
    writes no `Software` or time chunk, so the bytes depend on the pixels only."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba())
    buffer = io.BytesIO()
    pixels.convert("RGB").quantize(64).save(buffer, format="png", optimize=True)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def _placeholder(title: str, why: str) -> dg.MetadataValue:
    """What an empty input shows instead of an empty plot."""
    return dg.MetadataValue.md(f"({title}: nothing to plot, {why})")
