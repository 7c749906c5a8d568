"""NVIDIA HelpSteer (v1), HelpSteer2, HelpSteer2 `preference` and HelpSteer3 `preference`.

HelpSteer and HelpSteer2 hold one row per response with five 0-4 attributes. Responses to
the same prompt (within a split) are ranked by a weighted sum of attributes (default:
helpfulness alone); the best becomes chosen and the worst rejected. A prompt with one
response forms no pair (`single_response`); with more than two, the middle ones are
`not_selected`. Equal scores make a tie pair (margin 0), which curation drops by default.

The `preference` subsets hold two responses and a signed strength in -3..3; the margin is
its absolute value and 0 is a tie (response 1 is then listed as chosen).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from data_contracts import raw_sources as raw
from pipeline.ingest import HubOptions
from pipeline.sources.base import (
    DROPPED_SCHEMA,
    KEYS,
    PAIR_COLUMNS,
    Source,
    SourceOptions,
    attribute_list,
    first_reason,
    joined_text,
    messages_from_markers,
    single_turn,
    strings_to_messages,
)


@dataclass(frozen=True)
class HelpSteerOptions(SourceOptions):
    """Options of the HelpSteer (v1) and HelpSteer2 rating-row sources."""

    # Rank responses by sum(weight * attribute); attributes are 0-4 each.
    weights: dict[str, float] = field(default_factory=lambda: {"helpfulness": 1.0})


class HelpSteer(Source):
    """HelpSteer (v1): rating rows, grouped by prompt into best-vs-worst pairs."""

    name = "helpsteer"
    contract = raw.HELPSTEER
    options = HelpSteerOptions
    hub = HubOptions()
    rows_per_pair = 2
    whole_input = True  # a prompt's responses may be anywhere in the input

    def check_options(self, options: HelpSteerOptions) -> None:
        unknown = sorted(set(options.weights) - set(raw.HELPSTEER_ATTRIBUTES))
        if unknown or not any(options.weights.values()):
            raise ValueError(
                f"{self.name}: weights need at least one non-zero attribute of "
                f"{', '.join(raw.HELPSTEER_ATTRIBUTES)}; got {options.weights}"
            )

    def score_scale(self, options: HelpSteerOptions) -> str:
        terms = " + ".join(f"{w:g}*{a}" for a, w in options.weights.items())
        return f"{terms}, attributes 0-4; margin = difference"

    def rows(self, frame: pl.DataFrame, options: HelpSteerOptions) -> pl.DataFrame:
        score = pl.sum_horizontal(pl.col(a) * w for a, w in options.weights.items())
        return frame.select(
            *KEYS,
            pl.lit(None, dtype=pl.String).alias("split"),
            messages_from_markers(pl.col("prompt")).alias("prompt"),
            pl.col("prompt").alias("__prompt_text"),
            pl.col("response"),
            score.alias("__score"),
            attribute_list({a: pl.col(a) for a in raw.HELPSTEER_ATTRIBUTES}).alias("__attributes"),
            *first_reason(),
        )

    def pairs(
        self, rows: pl.DataFrame, options: HelpSteerOptions
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        group = ["split", "__prompt_text"]
        ranked = rows.with_columns(
            # Best first; equal scores keep input order.
            pl.int_range(pl.len())
            .over(group, order_by=[-pl.col("__score"), pl.col("__order")])
            .alias("__rank"),
            pl.len().over(group).alias("__n"),
        )
        side = ["__order", "response", "__score", "__attributes"]
        chosen = ranked.filter((pl.col("__rank") == 0) & (pl.col("__n") >= 2))
        rejected = ranked.filter((pl.col("__rank") == pl.col("__n") - 1) & (pl.col("__n") >= 2))
        joined = chosen.select(*group, "prompt", *side).join(
            rejected.select(*group, *side), on=group, suffix="_r", maintain_order="left"
        )
        pairs = joined.select(
            pl.min_horizontal("__order", "__order_r").alias("__order"),
            pl.concat_list("__order", "__order_r").alias("__rows"),
            "split",
            "prompt",
            pl.col("response").alias("chosen"),
            pl.col("response_r").alias("rejected"),
            pl.col("__score").alias("score_chosen"),
            pl.col("__score_r").alias("score_rejected"),
            (pl.col("__score") - pl.col("__score_r")).alias("margin"),
            pl.lit(None, dtype=pl.String).alias("domain"),
            pl.lit(None, dtype=pl.String).alias("language"),
            pl.col("__attributes").alias("chosen_attributes"),
            pl.col("__attributes_r").alias("rejected_attributes"),
            pl.lit(None, dtype=pl.String).alias("rationale"),
        )
        middle = (pl.col("__rank") > 0) & (pl.col("__rank") < pl.col("__n") - 1)
        reason = (
            pl.when(pl.col("__n") == 1)
            .then(pl.lit("single_response"))  # no other response to compare with
            .when(middle)
            .then(pl.lit("not_selected"))  # neither the best nor the worst of its prompt
        )
        dropped = ranked.select("__order", reason.alias("reason")).filter(
            pl.col("reason").is_not_null()
        )
        return pairs.select("__order", "__rows", *PAIR_COLUMNS), dropped.cast(DROPPED_SCHEMA)


class HelpSteer2(HelpSteer):
    """HelpSteer2: as v1 (two responses per prompt), multi-turn prompts inline."""

    name = "helpsteer2"


class HelpSteer2Preference(Source):
    """HelpSteer2 `preference`: response_1 vs response_2 with preference_strength."""

    name = "helpsteer2_preference"
    contract = raw.HELPSTEER2_PREFERENCE
    hub = HubOptions(data_dir="preference", split="train")

    def score_scale(self, options: SourceOptions) -> str:
        return "no per-response scores; margin = |preference_strength|, 0-3"

    def rows(self, frame: pl.DataFrame, options: SourceOptions) -> pl.DataFrame:
        strength = pl.col("preference_strength")
        second = strength > 0  # > 0: response_2 better; 0: tie, listed as response_1 first
        return frame.select(
            *KEYS,
            pl.col("split"),
            messages_from_markers(pl.col("prompt")).alias("prompt"),
            pl.when(second).then("response_2").otherwise("response_1").alias("chosen"),
            pl.when(second).then("response_1").otherwise("response_2").alias("rejected"),
            pl.lit(None, dtype=pl.Float64).alias("score_chosen"),
            pl.lit(None, dtype=pl.Float64).alias("score_rejected"),
            strength.abs().alias("margin"),
            pl.lit(None, dtype=pl.String).alias("domain"),
            pl.lit(None, dtype=pl.String).alias("language"),
            pl.lit(None).alias("chosen_attributes"),
            pl.lit(None).alias("rejected_attributes"),
            joined_text(pl.col("preference_statement"), pl.col("preference_elaboration")).alias(
                "rationale"
            ),
            *first_reason(),
        )


class HelpSteer3(Source):
    """HelpSteer3 `preference`: a context (messages, or a string) and two responses."""

    name = "helpsteer3"
    contract = raw.HELPSTEER3
    hub = HubOptions(config="preference")

    def score_scale(self, options: SourceOptions) -> str:
        return "no per-response scores; margin = |overall_preference|, 0-3"

    def convert(self, field: str, array: pa.Array, options: SourceOptions) -> pa.Array:
        # Some copies store the context as one string: the user's only turn.
        return strings_to_messages(array, lambda text: single_turn(text, "user"))

    def rows(self, frame: pl.DataFrame, options: SourceOptions) -> pl.DataFrame:
        preference = pl.col("overall_preference")
        first = preference <= 0  # < 0: response1 better; 0: tie, listed as response1 first
        reasoning = pl.col("individual_preference").list.eval(
            pl.element().struct.field("reasoning").drop_nulls()
        )
        return frame.select(
            *KEYS,
            pl.lit(None, dtype=pl.String).alias("split"),
            pl.col("context").alias("prompt"),
            pl.when(first).then("response1").otherwise("response2").alias("chosen"),
            pl.when(first).then("response2").otherwise("response1").alias("rejected"),
            pl.lit(None, dtype=pl.Float64).alias("score_chosen"),
            pl.lit(None, dtype=pl.Float64).alias("score_rejected"),
            preference.abs().alias("margin"),
            pl.col("domain"),
            pl.col("language"),
            pl.lit(None).alias("chosen_attributes"),
            pl.lit(None).alias("rejected_attributes"),
            pl.when(reasoning.list.len() > 0)
            .then(reasoning.list.join("\n\n"))
            .otherwise(None)
            .alias("rationale"),
            *first_reason(),
        )
