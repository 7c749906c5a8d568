"""The UI's plots: each is a markdown image whose data URI holds a PNG of a fixed size, the
same bytes for the same input, and a text placeholder for an empty input."""

import base64
import io
import re
import struct

import numpy as np
import pytest
from PIL import Image

from assets import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVE = [(s, 0.69 - 0.01 * s, min(1.0, 0.5 + 0.05 * s), 0.02 * s) for s in range(1, 31)]
EVAL_CURVE = [(s, 0.69 - 0.005 * s, 0.5 + 0.01 * s, 0.01 * s) for s in (10, 20, 30)]
HISTOGRAMS = {
    "edges": [0, 16, 32, 64, 128],
    "prompt": [3, 10, 5, 1],
    "chosen": [1, 8, 9, 2],
    "rejected": [2, 9, 7, 2],
    "pair": [0, 1, 12, 7],
}
ROW_TOKENS = np.array([512, 500, 480, 300, 64, 511])
DROPPED = {"dedup": 7, "ties": 3, "too_long": 0, "contamination": 1}
QUANTILES = {"p05": 0.4, "p25": 0.9, "p50": 1.6, "p75": 2.8, "p95": 6.0}
LENGTH_BIAS = {
    "unit": "characters",
    "in": {
        "a": {"chosen_longer_share": 0.8, "ratio_quantiles": QUANTILES},
        "b": {"chosen_longer_share": 0.4, "ratio_quantiles": dict.fromkeys(QUANTILES)},
    },
    "out": {"a": {"chosen_longer_share": 0.5, "ratio_quantiles": QUANTILES}},
}
LOSS = np.array([0.1, 0.3, 0.7, 0.2, 1.5, 0.4])
FOLD = np.array([0, 1, 2, 0, 1, 2])
MARGIN = np.array([2.0, 0.8, -0.1, 1.5, -1.2, 0.5])

CASES = {
    "loss": (lambda: plots.loss_plot(CURVE), plots.TALL),
    "loss_with_eval": (lambda: plots.loss_plot(CURVE, EVAL_CURVE), plots.TALL),
    "length": (lambda: plots.length_plot(HISTOGRAMS), plots.SIZE),
    "fill": (lambda: plots.fill_plot(ROW_TOKENS, 512), plots.SIZE),
    "funnel": (lambda: plots.funnel_plot(DROPPED, kept=40), plots.SIZE),
    "funnel_held_out": (lambda: plots.funnel_plot(DROPPED, kept=36, held_out=4), plots.SIZE),
    "length_bias": (lambda: plots.length_bias_plot(LENGTH_BIAS), plots.TALL),
    "difficulty": (lambda: plots.difficulty_plot(LOSS, FOLD, MARGIN, 1.2), plots.SIZE),
}


def png_bytes(value) -> bytes:
    """The PNG inside a `![title](data:image/png;base64,...)` markdown value (or its text)."""
    text = value if isinstance(value, str) else value.md_str
    match = re.fullmatch(r"!\[[^\]]+\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert match, text[:80]
    return base64.b64decode(match.group(1), validate=True)


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height of a valid PNG: its IHDR chunk, and the whole image decoded (every
    chunk's CRC and the pixel data), so a cut or corrupt image fails here."""
    assert png[:8] == PNG_SIGNATURE
    assert png[12:16] == b"IHDR"  # the first chunk, after its 4-byte length
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        assert image.format == "PNG"
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 1  # something drawn, not a blank canvas
    return struct.unpack(">II", png[16:24])


@pytest.mark.parametrize("name", CASES)
def test_plot_is_a_png_of_the_expected_size(name):
    make, (width, height) = CASES[name]
    png = png_bytes(make())
    assert png_size(png) == (width, height)
    assert b"Software" not in png and b"tIME" not in png
    assert len(png) < 60_000


def test_a_cut_png_is_not_valid() -> None:
    """The check above decodes the image: a PNG cut short fails it."""
    png = png_bytes(CASES["loss"][0]())
    with pytest.raises((OSError, SyntaxError)):
        png_size(png[: len(png) // 2])


@pytest.mark.parametrize("name", CASES)
def test_same_input_same_bytes(name):
    make, _ = CASES[name]
    assert make().md_str == make().md_str


@pytest.mark.parametrize(
    "value",
    [
        plots.loss_plot([]),
        plots.length_plot({**HISTOGRAMS, **{p: [0, 0, 0, 0] for p in HISTOGRAMS if p != "edges"}}),
        plots.fill_plot(np.zeros(0, np.int64), 512),
        plots.funnel_plot({"dedup": 0}, kept=0),
        plots.length_bias_plot({"unit": "characters", "in": {}, "out": {}}),
        plots.difficulty_plot(np.zeros(0), np.zeros(0, np.int64), np.zeros(0)),
    ],
    ids=["loss", "length", "fill", "funnel", "length_bias", "difficulty"],
)
def test_empty_input_gives_a_placeholder(value):
    assert value.md_str.startswith("(") and "nothing to plot" in value.md_str
    assert "data:image" not in value.md_str


def _has_color(png: bytes, rgb: tuple[int, int, int], tolerance: int = 12) -> bool:
    with Image.open(io.BytesIO(png)) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
    return any(all(abs(a - b) <= tolerance for a, b in zip(c, rgb, strict=True)) for _, c in colors)


def test_the_funnel_draws_the_held_out_pairs_as_a_bar_of_their_own() -> None:
    held_blue = (0x4C, 0x72, 0xB0)
    assert _has_color(png_bytes(plots.funnel_plot(DROPPED, kept=36, held_out=4)), held_blue)
    assert not _has_color(png_bytes(plots.funnel_plot(DROPPED, kept=40)), held_blue)


def test_the_loss_plot_draws_the_eval_curve_in_its_own_color() -> None:
    eval_orange = tuple(int(plots.EVAL_COLOR[i : i + 2], 16) for i in (1, 3, 5))
    assert _has_color(png_bytes(plots.loss_plot(CURVE, EVAL_CURVE)), eval_orange)
    assert not _has_color(png_bytes(plots.loss_plot(CURVE)), eval_orange)
