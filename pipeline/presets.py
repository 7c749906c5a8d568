"""Public cleaning recipes as presets: named bundles of adapter options and curation rules.

A preset sets two layers, each under what the user sets explicitly:
- adapter options per source it covers (`normalize --preset`, `-o KEY=VALUE` on top);
- `CurateConfig` fields (`curate --preset`, every rule flag on top), some of them on one
  source's score scale (`thresholds`: AIR's margin band and minimum chosen score).

Nothing here is a new kind of rule: a preset only chooses options and rules that exist, so
every pair it removes is counted under the rule's reason (`tie`, `domain_excluded`,
`benchmark_prompt`, `margin_below_min`, ...) like any other drop.

    defaults  <  preset  <  what the user sets
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from core.settings import config_from
from pipeline.curate import CurateConfig, Curated
from pipeline.sources import get_source


@dataclass(frozen=True)
class Preset:
    """One recipe: where it comes from, what it sets and why.

    Attributes:
        name: what `--preset` takes.
        summary: one line for `--help`.
        notes: what the recipe does and why, sources cited; shown by `--list-presets`.
        options: source -> adapter options; the sources the preset covers.
        curate: `CurateConfig` fields for pairs of any source.
        thresholds: source -> `CurateConfig` fields on that source's score scale (the
            scale the preset's own options give); every source curated must have them.
        benchmark_prompts: what `--benchmark-prompts` should list, in words (None: the
            preset needs no list).
    """

    name: str
    summary: str
    notes: tuple[str, ...]
    options: Mapping[str, Mapping[str, Any]]
    curate: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    benchmark_prompts: str | None = None

    def options_for(self, source: str) -> dict[str, Any]:
        """The adapter options for `source`.

        Raises:
            ValueError: the preset does not cover `source`.
        """
        if source not in self.options:
            raise ValueError(
                f"preset {self.name} does not cover source {source}; "
                f"it covers {', '.join(self.options)}"
            )
        return dict(self.options[source])

    def curate_settings(self, sources: Iterable[str], scales: Mapping[str, str]) -> dict[str, Any]:
        """The `CurateConfig` fields for pairs of `sources`, whose score scales (the pairs'
        `score_scale` metadata) are `scales`.

        Raises:
            ValueError: a source without thresholds, on another scale than the preset's
                options give, or sources whose thresholds differ.
        """
        if not self.thresholds:
            return dict(self.curate)
        chosen: dict[str, dict[str, Any]] = {}
        for source in sorted(set(sources)):
            if source not in self.thresholds:
                raise ValueError(
                    f"preset {self.name} has no thresholds for source {source}; "
                    f"it has them for {', '.join(self.thresholds)}"
                )
            expected, found = self.scale(source), scales.get(source, "(none named)")
            if found != expected:
                raise ValueError(
                    f"preset {self.name}'s thresholds for {source} are on the scale "
                    f"'{expected}', these pairs are on '{found}': normalize {source} with "
                    f"--preset {self.name}"
                )
            chosen[source] = dict(self.thresholds[source])
        if len({repr(sorted(t.items())) for t in chosen.values()}) > 1:
            raise ValueError(
                f"preset {self.name}'s thresholds are on each source's own scale and differ "
                f"between {', '.join(chosen)}: curate them in separate runs (each with "
                f"--preset {self.name}), then together without it"
            )
        return {**self.curate, **next(iter(chosen.values()), {})}

    def scale(self, source: str) -> str:
        """The score scale of `source` under this preset's options."""
        adapter = get_source(source)
        return adapter.score_scale(adapter.make_options(self.options_for(source)))


def get_preset(name: str) -> Preset:
    """The preset called `name`.

    Raises:
        ValueError: naming the unknown preset and every known one.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def curate_config(preset: Preset | None, given: Any, pairs: pa.Table) -> CurateConfig:
    """`CurateConfig` for `pairs`: its defaults, then `preset`'s settings for the sources in
    `pairs`, then the fields `given` has (parsed `only_given` flags, or
    `assets.configs.given_values` of a Dagster config).

    Raises:
        ValueError: as `Preset.curate_settings`; SettingError for a value out of range.
    """
    settings: dict[str, Any] = {}
    if preset is not None:
        metadata = pairs.schema.metadata or {}
        scales = json.loads(metadata.get(b"score_scale", b"{}"))
        sources = pairs.column("source").unique().to_pylist()
        settings = preset.curate_settings(sources, scales)
    return config_from(CurateConfig, given, under=settings)


def with_preset(result: Curated, preset: Preset | None) -> Curated:
    """`result` with the preset its config came from named in its report."""
    return dataclasses.replace(result, report={**result.report, "preset": preset and preset.name})


# ---------------------------------------------------------------------------------------
# Showing them


def _setting(name: str, value: Any) -> str:
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    elif isinstance(value, dict):
        value = ",".join(f"{k}:{v:g}" for k, v in value.items())
    return f"{name}={value}"


def summaries() -> str:
    """One line per preset, for a command's `--help`."""
    lines = ["presets (--preset NAME; --list-presets shows their settings):"]
    for p in PRESETS.values():
        lines.append(
            textwrap.fill(
                f"{p.name}: {p.summary}",
                92,
                initial_indent="  ",
                subsequent_indent="      ",
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


def describe(preset: Preset) -> str:
    """What `preset` sets, layer by layer, and its notes."""
    lines = [
        preset.name,
        textwrap.fill(
            preset.summary, 92, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False
        ),
    ]
    for source, options in preset.options.items():
        shown = " ".join(_setting(k, v) for k, v in options.items()) or "(the defaults)"
        lines.append(f"  normalize --source {source}: {shown}")
    lines.append("  curate: " + (" ".join(_setting(k, v) for k, v in preset.curate.items()) or "-"))
    for source, values in preset.thresholds.items():
        shown = " ".join(_setting(k, v) for k, v in values.items())
        lines.append(f"  curate, {source} ({preset.scale(source)}): {shown}")
    if preset.benchmark_prompts:
        lines.append(f"  curate --benchmark-prompts: {preset.benchmark_prompts}")
    for note in preset.notes:
        lines.append(
            textwrap.fill(
                note, 92, initial_indent="  - ", subsequent_indent="    ", break_on_hyphens=False
            )
        )
    return "\n".join(lines)


def describe_all() -> str:
    return "\n\n".join(describe(p) for p in PRESETS.values())


# ---------------------------------------------------------------------------------------
# The recipes

_HELPFULNESS = {"weights": {"helpfulness": 1.0}}

ARGILLA_ULTRAFEEDBACK_CLEAN = Preset(
    name="argilla-ultrafeedback-clean",
    summary="raw UltraFeedback binarized as argilla's ultrafeedback-binarized-preferences-"
    "cleaned: mean aspect rating, random lower-rated rejected, no ties, no TruthfulQA prompts",
    notes=(
        "From the cards of argilla/ultrafeedback-binarized-preferences(-cleaned). Each "
        "completion is scored by the mean of its four aspect ratings (helpfulness, honesty, "
        "instruction_following, truthfulness; N/A left out), not by overall_score, which "
        "holds a known bug (critiques that gave 1 were stored as 10). Chosen: the best mean. "
        "Rejected: a seeded random completion with a strictly lower mean.",
        "When every completion has the same mean the pair keeps margin 0 and curate drops it "
        "as `tie`. The draws are prefpack's own (seeded per row), so where several "
        "completions score lower the rejected can differ from the published dataset's.",
        "TruthfulQA: rows of UltraFeedback source truthful_qa (the pairs' domain) are dropped "
        "as `domain_excluded`. Argilla also removed prompts of other sources that are "
        "TruthfulQA questions; give those questions with --benchmark-prompts and a prompt "
        "with a user turn equal to one (case and whitespace aside) is dropped as "
        "`benchmark_prompt`. The list: the `question` column of the hub dataset "
        "truthfulqa/truthful_qa (configuration generation or multiple_choice, split "
        "validation: the same 817 questions) saved as .txt (one per line), .jsonl or "
        ".parquet. A flag you give replaces the preset's value: --exclude-domains X alone "
        "keeps truthful_qa.",
    ),
    options={"ultrafeedback": {"score": "fine_grained", "rejected": "random_lower", "seed": 0}},
    curate={"drop_ties": True, "exclude_domains": ("truthful_qa",)},
    benchmark_prompts="TruthfulQA's questions",
)

HELPSTEER2_PAPER = Preset(
    name="helpsteer2-paper",
    summary="HelpSteer2 rating rows paired as in the HelpSteer2 paper's DPO runs: higher "
    "helpfulness is chosen, equal helpfulness dropped",
    notes=(
        "HelpSteer2 (Wang et al. 2024, arXiv:2406.08673) rates each of a prompt's two "
        "responses 0-4 on five attributes. Its reward models regress all five attributes; "
        "its DPO runs take the response with the higher helpfulness as chosen, the other as "
        "rejected, and leave out pairs of equal helpfulness. Here the ranking weights are "
        "helpfulness alone and equal helpfulness gives margin 0, dropped by curate as `tie`.",
        "The later preference subset (HelpSteer2-Preference, arXiv:2410.01257) is source "
        "helpsteer2_preference: preference_strength -3..3, < 0 response_1 better, > 0 "
        "response_2 better, 0 a tie (dropped as `tie` by the default rules).",
    ),
    options={"helpsteer2": _HELPFULNESS},
    curate={"drop_ties": True},
)

HELPSTEER3_NO_TIES = Preset(
    name="helpsteer3-no-ties",
    summary="HelpSteer3 preference by the sign of overall_preference, ties dropped and counted",
    notes=(
        "overall_preference is -3..3: < 0 response1 better, > 0 response2 better, 0 a tie; "
        "the margin is its absolute value. A tie stays a pair of margin 0 through normalize "
        "and curate drops it as `tie`, counted in the funnel. NVIDIA NeMo RL's HelpSteer3 "
        "adapter (nemo_rl/data/hf_datasets/helpsteer3.py) keeps a tie with chosen and "
        "rejected both response1; prefpack never makes chosen == rejected.",
    ),
    options={"helpsteer3": {}},
    curate={"drop_ties": True},
)

AIR = Preset(
    name="air",
    summary="the AIR study's response-pair rule: a moderate margin and a high absolute chosen "
    "score, on each source's own scale",
    notes=(
        "AIR (He et al. 2025, arXiv:2504.03612) finds that pairs with moderate margins and "
        "high absolute scores train best. The paper states it on its own reward model's "
        "scores; the thresholds here are prefpack's reading of 'moderate' and 'high' on each "
        "source's scale: UltraFeedback's aspect mean 1-5: chosen >= 4, margin 0.5-2; its "
        "binarized scores 1-10: chosen >= 8, margin 1-4; HelpSteer helpfulness 0-4: chosen "
        ">= 3, margin 1-2. Sources without per-response scores (helpsteer2_preference, "
        "helpsteer3: margin = |strength| 0-3) get the margin band 1-2 only: slightly better "
        "or better, not ties and not 'much better'.",
        "UltraFeedback's rejected is a seeded random completion rated strictly lower than "
        "the chosen one (not any random one: a drawn tie would only be dropped), so the "
        "margin band chooses among real preferences.",
        "The thresholds differ per source: curate one source per run (or sources with the "
        "same thresholds); curate refuses pairs on another scale than the preset's options "
        "give. Generic files have no known scale and are not covered.",
    ),
    options={
        "ultrafeedback": {"score": "fine_grained", "rejected": "random_lower", "seed": 0},
        "ultrafeedback_binarized": {},
        "helpsteer": _HELPFULNESS,
        "helpsteer2": _HELPFULNESS,
        "helpsteer2_preference": {},
        "helpsteer3": {},
    },
    curate={"drop_ties": True},
    thresholds={
        "ultrafeedback": {"min_chosen_score": 4.0, "min_margin": 0.5, "max_margin": 2.0},
        "ultrafeedback_binarized": {"min_chosen_score": 8.0, "min_margin": 1.0, "max_margin": 4.0},
        "helpsteer": {"min_chosen_score": 3.0, "min_margin": 1.0, "max_margin": 2.0},
        "helpsteer2": {"min_chosen_score": 3.0, "min_margin": 1.0, "max_margin": 2.0},
        "helpsteer2_preference": {"min_margin": 1.0, "max_margin": 2.0},
        "helpsteer3": {"min_margin": 1.0, "max_margin": 2.0},
    },
)

PRESETS: dict[str, Preset] = {
    p.name: p for p in (ARGILLA_ULTRAFEEDBACK_CLEAN, HELPSTEER2_PAPER, HELPSTEER3_NO_TIES, AIR)
}
