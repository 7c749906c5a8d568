"""UltraFeedback: the raw release (openbmb) and the binarized one (HuggingFaceH4).

Raw: each instruction has (four) completions, each rated 1-5 on four aspects (a Rating of
"N/A" means not rated) and given an overall critique score 1-10. A completion's score is the
mean of its rated aspects ("fine_grained", default, as the H4 and argilla recipes) or its
overall_score, which holds a known bug (critiques that gave 1 were stored as 10).
Completions without a response or a score are left out; a row needs two that remain. The
best becomes chosen; rejected is the worst of the others, a seeded random other (the H4
recipe), or a seeded random other with a strictly lower score (argilla's recipe; when all
tie, the worst other). Equal scores make a tie pair (margin 0), which curation drops by
default.

Binarized: chosen and rejected are conversations whose last message is the assistant's; the
messages before it are the prompt and must be the same on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl
import pyarrow as pa

from data_contracts import raw_sources as raw
from pipeline.ingest import HubOptions
from pipeline.sources.base import (
    KEYS,
    Source,
    SourceOptions,
    assistant_last,
    attribute_list,
    first_reason,
    history,
    joined_text,
    last_content,
    single_turn,
    uniform,
)


@dataclass(frozen=True)
class UltraFeedbackOptions(SourceOptions):
    """Options of the raw UltraFeedback source."""

    # A completion's score: mean of the rated aspects (1-5) or the critique's overall_score.
    score: Literal["fine_grained", "overall"] = "fine_grained"
    # Rejected: the lowest-scored other completion, a seeded random other (H4 recipe), or a
    # seeded random other scored strictly lower than chosen (argilla's recipe).
    rejected: Literal["worst", "random", "random_lower"] = "worst"
    seed: int = 0  # for the random choices; the same row draws the same completion


def _rating(aspect: str) -> pl.Expr:
    text = pl.col("annotations").struct.field(aspect).struct.field("Rating")
    return text.cast(pl.Float64, strict=False)  # "N/A" -> null


class UltraFeedback(Source):
    """openbmb/UltraFeedback: binarize each instruction's rated completions."""

    name = "ultrafeedback"
    contract = raw.ULTRAFEEDBACK
    options = UltraFeedbackOptions
    hub = HubOptions(split="train")

    def score_scale(self, options: UltraFeedbackOptions) -> str:
        if options.score == "overall":
            return "overall_score 1-10; margin = difference"
        return "mean of rated aspects 1-5 (N/A left out); margin = difference"

    def convert(self, field: str, array: pa.Array, options: SourceOptions) -> pa.Array:
        # Older copies hold each aspect as a list of one dict: take that dict.
        frame = pl.DataFrame({"c": pl.Series(array)})
        first = [pl.field(a).list.first() for a in raw.ULTRAFEEDBACK_ASPECTS]
        fixed = frame.select(
            pl.col("c").list.eval(
                pl.element().struct.with_fields(pl.field("annotations").struct.with_fields(first))
            )
        )
        return fixed.to_arrow().column("c").combine_chunks().cast(raw.COMPLETIONS)

    def rows(self, frame: pl.DataFrame, options: UltraFeedbackOptions) -> pl.DataFrame:
        ratings = {a: _rating(a) for a in raw.ULTRAFEEDBACK_ASPECTS}
        if options.score == "overall":
            score = pl.col("overall_score")
        else:
            score = pl.mean_horizontal(*ratings.values())
        completions = (
            frame.select("__order", "completions")
            .explode("completions")
            .with_columns(pl.int_range(pl.len()).over("__order").alias("__position"))
            .unnest("completions")
            .select(
                "__order",
                "__position",
                "response",
                "critique",
                score.alias("__score"),
                attribute_list(ratings).alias("__attributes"),
            )
            .filter(pl.col("response").is_not_null() & pl.col("__score").is_not_null())
            .with_columns(
                # Best first; equal scores keep the source's order.
                pl.int_range(pl.len())
                .over("__order", order_by=[-pl.col("__score"), pl.col("__position")])
                .alias("__rank"),
                pl.col("__score").max().over("__order").alias("__best"),
            )
        )
        chosen = completions.filter(pl.col("__rank") == 0)
        rejected = _rejected(completions.filter(pl.col("__rank") > 0), options)
        side = ["__order", "response", "critique", "__score", "__attributes"]
        joined = frame.select(*KEYS, "instruction", "source").join(
            chosen.select(side).join(rejected.select(side), on="__order", suffix="_r"),
            on="__order",
            how="left",
            maintain_order="left",
        )
        return joined.select(
            *KEYS,
            pl.lit(None, dtype=pl.String).alias("split"),
            single_turn(pl.col("instruction"), "user").alias("prompt"),
            pl.col("response").alias("chosen"),
            pl.col("response_r").alias("rejected"),
            pl.col("__score").alias("score_chosen"),
            pl.col("__score_r").alias("score_rejected"),
            (pl.col("__score") - pl.col("__score_r")).alias("margin"),
            pl.col("source").alias("domain"),
            pl.lit(None, dtype=pl.String).alias("language"),
            pl.col("__attributes").alias("chosen_attributes"),
            pl.col("__attributes_r").alias("rejected_attributes"),
            joined_text(
                ("chosen: " + pl.col("critique")), ("rejected: " + pl.col("critique_r"))
            ).alias("rationale"),
            *first_reason(
                (
                    pl.col("response_r").is_null(),
                    "too_few_completions",
                    "fewer than 2 completions with a response and a score (all N/A?)",
                )
            ),
        )


def _rejected(others: pl.DataFrame, options: UltraFeedbackOptions) -> pl.DataFrame:
    """One of each instruction's other completions (all but the chosen), as
    `options.rejected` says."""
    worst = others.filter(
        pl.int_range(pl.len()).over("__order", order_by=[pl.col("__score"), pl.col("__position")])
        == 0
    )
    if options.rejected == "worst":
        return worst
    pool = others
    if options.rejected == "random_lower":
        pool = others.filter(pl.col("__score") < pl.col("__best"))
    draw = pl.Series("__draw", uniform(pool["__order"].to_numpy(), options.seed), pl.Float64)
    index = (pl.col("__draw") * pl.len().over("__order")).floor().cast(pl.Int64)
    by_position = pl.int_range(pl.len()).over("__order", order_by="__position")
    drawn = pool.with_columns(draw).filter(by_position == index).drop("__draw")
    # random_lower: where every other ties with chosen, the worst: a tie (margin 0) that
    # curation drops and counts.
    all_tied = worst.join(drawn.select("__order"), on="__order", how="anti")
    return pl.concat([drawn, all_tied])


class UltraFeedbackBinarized(Source):
    """HuggingFaceH4/ultrafeedback_binarized: conversations with a final assistant turn."""

    name = "ultrafeedback_binarized"
    contract = raw.ULTRAFEEDBACK_BINARIZED
    hub = HubOptions(split="train_prefs")
    default_split = "train_prefs"

    def score_scale(self, options: SourceOptions) -> str:
        return "UltraFeedback score 1-10 as published; margin = difference"

    def rows(self, frame: pl.DataFrame, options: SourceOptions) -> pl.DataFrame:
        chosen, rejected = pl.col("chosen"), pl.col("rejected")
        prompt = (
            pl.when(history(chosen).list.len() > 0)
            .then(history(chosen))
            .otherwise(single_turn(pl.col("prompt"), "user"))
        )
        margin = pl.col("score_chosen") - pl.col("score_rejected")
        return frame.select(
            *KEYS,
            pl.lit(None, dtype=pl.String).alias("split"),
            prompt.alias("prompt"),
            last_content(chosen).alias("chosen"),
            last_content(rejected).alias("rejected"),
            pl.col("score_chosen"),
            pl.col("score_rejected"),
            margin.alias("margin"),
            pl.lit(None, dtype=pl.String).alias("domain"),
            pl.lit(None, dtype=pl.String).alias("language"),
            pl.lit(None).alias("chosen_attributes"),
            pl.lit(None).alias("rejected_attributes"),
            pl.lit(None, dtype=pl.String).alias("rationale"),
            *first_reason(
                assistant_last(chosen, rejected),
                (
                    last_content(chosen).is_null() | last_content(rejected).is_null(),
                    "null_message_content",
                    "the last chosen or rejected message has no content",
                ),
                (
                    (history(chosen) != history(rejected)) & (history(rejected).list.len() > 0),
                    "prompt_mismatch",
                    "chosen and rejected hold different conversations before the response",
                ),
                (margin < 0, "chosen_scored_lower", "score_chosen < score_rejected"),
            ),
        )
