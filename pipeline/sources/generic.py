"""Any file of prompt/chosen/rejected: strings or message lists, optional scores.

Message lists may use `role/content` or ShareGPT `from/value` (human -> user,
gpt -> assistant). When chosen is a conversation, its last message must be the assistant's
and the messages before it are the prompt (rejected's, if it has any, must match); otherwise
the prompt column is the prompt. A prompt string with HelpSteer2's inline turn markers
(`\\n<extra_id_1>Assistant\\n`, `\\n<extra_id_1>User\\n`) becomes a message list, unless
`turn_markers` is off. Column names are options, so any such file maps without edits.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from data_contracts import raw_sources as raw
from pipeline.sources.base import (
    KEYS,
    MESSAGE_DTYPE,
    Source,
    SourceOptions,
    assistant_last,
    first_reason,
    history,
    last_content,
    messages_from_markers,
    single_turn,
    strings_to_messages,
)

COLUMN_FIELDS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class GenericOptions(SourceOptions):
    """Column names and prompt parsing of the generic source."""

    # Input columns; a dotted name (metadata.score) reads a field of a struct column.
    prompt_column: str = "prompt"  # string or messages; optional when chosen is a conversation
    chosen_column: str = "chosen"  # string, or messages ending with the assistant's
    rejected_column: str = "rejected"
    score_chosen_column: str = "score_chosen"  # optional numeric columns, any scale
    score_rejected_column: str = "score_rejected"
    turn_markers: bool = True  # split prompt strings at HelpSteer2's inline turn markers


def _sharegpt(array: pa.Array) -> pa.Array:
    frame = pl.DataFrame({"m": pl.Series(array)})
    role = pl.element().struct.field("from")
    fixed = frame.select(
        pl.col("m").list.eval(
            pl.struct(
                role=role.replace(SHAREGPT_ROLES),
                content=pl.element().struct.field("value"),
            )
        )
    )
    return fixed.to_arrow().column("m").combine_chunks().cast(raw.MESSAGES)


class Generic(Source):
    """Prompt/chosen/rejected files (DPO-style), in any common message shape."""

    name = "generic"
    contract = raw.GENERIC
    options = GenericOptions

    def score_scale(self, options: GenericOptions) -> str:
        return (
            f"as in the input's {options.score_chosen_column}/{options.score_rejected_column} "
            "columns (null when absent); margin = difference"
        )

    def columns(self, options: GenericOptions) -> dict[str, str]:
        default = GenericOptions()
        return {
            field: getattr(options, option)
            for field, option in self.column_options().items()
            if getattr(options, option) != getattr(default, option)
        }

    def column_options(self) -> dict[str, str]:
        return {f: f"{f}_column" for f in COLUMN_FIELDS}

    def convert(self, field: str, array: pa.Array, options: GenericOptions) -> pa.Array:
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            return _sharegpt(array)
        if field != "prompt":
            return strings_to_messages(array, lambda text: single_turn(text, "assistant"))
        if options.turn_markers:
            return strings_to_messages(array, messages_from_markers)
        return strings_to_messages(array, lambda text: single_turn(text, "user"))

    def rows(self, frame: pl.DataFrame, options: GenericOptions) -> pl.DataFrame:
        chosen, rejected = pl.col("chosen"), pl.col("rejected")
        prompt = (
            pl.when(history(chosen).list.len() > 0)
            .then(history(chosen))
            .when(history(rejected).list.len() > 0)
            .then(history(rejected))
            .otherwise(pl.col("prompt").cast(MESSAGE_DTYPE))
        )
        both_histories = (history(chosen).list.len() > 0) & (history(rejected).list.len() > 0)
        margin = pl.col("score_chosen") - pl.col("score_rejected")
        return frame.select(
            *KEYS,
            pl.col("split"),
            prompt.alias("prompt"),
            last_content(chosen).alias("chosen"),
            last_content(rejected).alias("rejected"),
            pl.col("score_chosen"),
            pl.col("score_rejected"),
            margin.alias("margin"),
            pl.col("domain"),
            pl.col("language"),
            pl.lit(None).alias("chosen_attributes"),
            pl.lit(None).alias("rejected_attributes"),
            pl.lit(None, dtype=pl.String).alias("rationale"),
            *first_reason(
                (
                    prompt.is_null(),
                    "missing_field",
                    f"no prompt: column {options.prompt_column!r} is null or absent and "
                    "chosen holds no conversation",
                ),
                assistant_last(chosen, rejected),
                (
                    last_content(chosen).is_null() | last_content(rejected).is_null(),
                    "null_message_content",
                    "the chosen or rejected message has no content",
                ),
                (
                    both_histories & (history(chosen) != history(rejected)),
                    "prompt_mismatch",
                    "chosen and rejected hold different conversations before the response",
                ),
                (margin < 0, "chosen_scored_lower", "score_chosen < score_rejected"),
            ),
        )
