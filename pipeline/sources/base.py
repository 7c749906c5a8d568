"""What every source adapter provides, and the Polars expressions they share.

An adapter maps the rows of one source's raw contract to canonical pairs in two steps:
- `rows`: per raw row, the prompt as a message list and what the pairing needs, plus a
  reason (`__reason`, `__message`) when the row cannot be mapped. Such rows go to
  quarantine; so do rows whose prompt breaks a `preference_pair` prompt rule.
- `pairs`: the good rows become pairs. Sources with one pair per row map them one to one;
  HelpSteer's rating rows are grouped by prompt. Each pair lists the rows it consumed
  (`__rows`, their `__order`), and rows that form no pair are returned with a reason, so
  every row in is findable.

Frames carry bookkeeping columns: `__file` (file number), `__row_index` (row in that
file), `__order` (`__file << 40 | __row_index`, unique and in input order) and `__split`
(the split the file or hub names).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pyarrow as pa

from data_contracts.contract import Contract
from data_contracts.raw_sources import MESSAGES
from pipeline.ingest import HubOptions

KEYS = ("__file", "__row_index", "__order", "__split")
ORDER_SHIFT = 40
# HelpSteer2 inlines earlier turns: "...\n<extra_id_1>Assistant\n...\n<extra_id_1>User\n...".
TURN_MARKER = "\n<extra_id_1>"
# Canonical pair columns an adapter fills (pair_id and source are added by normalize).
PAIR_COLUMNS = (
    "split",
    "prompt",
    "chosen",
    "rejected",
    "score_chosen",
    "score_rejected",
    "margin",
    "domain",
    "language",
    "chosen_attributes",
    "rejected_attributes",
    "rationale",
)
DROPPED_SCHEMA = {"__order": pl.Int64, "reason": pl.String}  # rows that form no pair
MESSAGE_DTYPE = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
ATTRIBUTES_DTYPE = pl.List(pl.Struct({"key": pl.String, "value": pl.Float64}))


@dataclass(frozen=True)
class SourceOptions:
    """Options every source takes (all optional)."""

    split: str | None = None  # name every pair's split (for a hub id: load only this split)
    hub_config: str | None = None  # hub dataset configuration, overriding the source's default
    hub_data_dir: str | None = None  # hub repository subfolder, overriding the default


class Source:
    """One source family: its raw contract, options, scale and mapping."""

    name: ClassVar[str]
    contract: ClassVar[Contract]
    options: ClassVar[type[SourceOptions]] = SourceOptions
    hub: ClassVar[HubOptions] = HubOptions()  # defaults for loading the canonical hub id
    default_split: ClassVar[str] = "train"  # when neither row, file name nor hub names one
    rows_per_pair: ClassVar[int] = 1  # raw rows consumed by one pair
    # `pairs` pairs rows from anywhere in the input (HelpSteer's rating rows, by prompt), so
    # normalize maps the input whole; otherwise a pair is one row, mapped piece by piece.
    whole_input: ClassVar[bool] = False

    def make_options(self, values: Mapping[str, Any]) -> SourceOptions:
        """Build this source's options, refusing names it does not know."""
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        for name, annotation in option_types(self.options).items():
            allowed = typing.get_args(annotation)
            is_choice = typing.get_origin(annotation) is typing.Literal
            if is_choice and name in values and values[name] not in allowed:
                raise ValueError(
                    f"{self.name}: option {name}={values[name]!r} is not one of "
                    + ", ".join(map(repr, allowed))
                )
        options = self.options(**values)
        self.check_options(options)
        return options

    def check_options(self, options: SourceOptions) -> None:
        """Raise ValueError on option values this source cannot use."""

    def score_scale(self, options: SourceOptions) -> str:
        """The scale of score_chosen, score_rejected and margin, in words."""
        raise NotImplementedError

    def columns(self, options: SourceOptions) -> dict[str, str]:
        """Contract field -> the input column the user chose (dotted for a struct field),
        where it differs from the default; such a column must exist."""
        return {}

    def column_options(self) -> dict[str, str]:
        """Contract field -> the option that names its input column (for messages)."""
        return {}

    def convert(self, field: str, array: pa.Array, options: SourceOptions) -> pa.Array:
        """Convert a field that arrived in another accepted shape to the contract's type."""
        raise NotImplementedError(f"{self.name}: no other shape for {field!r}")

    def rows(self, frame: pl.DataFrame, options: SourceOptions) -> pl.DataFrame:
        """Map valid raw rows; keep KEYS, add `split` (nullable), `prompt`, `__reason`,
        `__message` and what `pairs` needs."""
        raise NotImplementedError

    def pairs(
        self, rows: pl.DataFrame, options: SourceOptions
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Good rows -> (pairs with `__order`, `__rows` and PAIR_COLUMNS, rows left unpaired
        as `DROPPED_SCHEMA`).

        `__rows` lists the `__order` of every row a pair consumed. The default maps one row
        to one pair.
        """
        pairs = rows.select("__order", pl.concat_list("__order").alias("__rows"), *PAIR_COLUMNS)
        return pairs, pl.DataFrame(schema=DROPPED_SCHEMA)


def option_types(options: type[SourceOptions]) -> dict[str, Any]:
    """Field name -> resolved type annotation of an options dataclass (for the CLI)."""
    hints = typing.get_type_hints(options)
    return {f.name: hints[f.name] for f in dataclasses.fields(options)}


def parse_option(annotation: Any, text: str) -> Any:
    """Parse a CLI `key=value` value by the option's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return None if text.lower() in ("", "none") else parse_option(args[0], text)
    if origin is typing.Literal:
        if text not in args:
            raise ValueError(f"{text!r} is not one of {', '.join(map(str, args))}")
        return text
    if origin is dict:
        pairs = (item.split(":", 1) for item in text.split(",") if item)
        return {k.strip(): float(v) for k, v in pairs}
    if annotation is bool:
        return text.lower() in ("1", "true", "yes", "on")
    return annotation(text)


# ---------------------------------------------------------------------------------------
# Shared expressions


def messages_from_markers(text: pl.Expr) -> pl.Expr:
    """A prompt string with HelpSteer2's inline turn markers as a message list.

    The first segment is the user's first turn; every later segment starts with its
    speaker (`Assistant` or `User`). A string without markers is one user turn. An unknown
    speaker keeps its name as role, so the `unknown_role` rule quarantines it.
    """
    first = pl.int_range(pl.len()) == 0
    speaker = pl.element().str.extract(r"^(\w+)\n", 1)
    return text.str.split(TURN_MARKER).list.eval(
        pl.struct(
            role=pl.when(first).then(pl.lit("user")).otherwise(speaker.str.to_lowercase()),
            content=pl.when(first)
            .then(pl.element())
            .otherwise(pl.element().str.replace(r"^\w+\n", "")),
        )
    )


def single_turn(text: pl.Expr, role: str) -> pl.Expr:
    """A string as a one-message list with `role` (null stays null)."""
    return (
        pl.when(text.is_not_null())
        .then(pl.concat_list(pl.struct(role=pl.lit(role), content=text)))
        .otherwise(None)
    )


def history(messages: pl.Expr) -> pl.Expr:
    """All messages but the last."""
    return messages.list.head(messages.list.len() - 1)


def last_role(messages: pl.Expr) -> pl.Expr:
    return messages.list.last().struct.field("role")


def last_content(messages: pl.Expr) -> pl.Expr:
    return messages.list.last().struct.field("content")


def assistant_last(chosen: pl.Expr, rejected: pl.Expr) -> tuple[pl.Expr, str, str]:
    """The `first_reason` check of two conversations: each ends with the assistant's turn."""
    return (
        last_role(chosen).ne_missing("assistant") | last_role(rejected).ne_missing("assistant"),
        "no_assistant_turn",
        "chosen and rejected must end with an assistant message",
    )


def attribute_list(columns: Mapping[str, pl.Expr]) -> pl.Expr:
    """name -> score expressions as a list of {key, value}, leaving out null scores."""
    entries = pl.concat_list(pl.struct(key=pl.lit(k), value=v) for k, v in columns.items())
    return entries.list.eval(pl.element().filter(pl.element().struct.field("value").is_not_null()))


def joined_text(*parts: pl.Expr, separator: str = "\n\n") -> pl.Expr:
    """Non-null parts joined; null when every part is null."""
    present = pl.any_horizontal(p.is_not_null() for p in parts)
    return pl.when(present).then(pl.concat_str(parts, separator=separator, ignore_nulls=True))


def first_reason(*checks: tuple[pl.Expr, str, pl.Expr | str]) -> list[pl.Expr]:
    """`__reason` and `__message` from (broken condition, reason, message) checks, in order."""
    reason: pl.Expr = pl.lit(None, dtype=pl.String)
    message: pl.Expr = pl.lit(None, dtype=pl.String)
    for broken, name, text in reversed(checks):
        text_expr = pl.lit(text) if isinstance(text, str) else text
        hit = broken.fill_null(False)
        reason = pl.when(hit).then(pl.lit(name)).otherwise(reason)
        message = pl.when(hit).then(text_expr).otherwise(message)
    return [reason.alias("__reason"), message.alias("__message")]


def uniform(order: np.ndarray, seed: int) -> np.ndarray:
    """A seeded uniform [0, 1) per row key (SplitMix64): the same row, the same draw,
    whatever else is in the input and on any machine."""
    with np.errstate(over="ignore"):
        z = order.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def strings_to_messages(array: pa.Array, to_messages) -> pa.Array:
    """Apply a Polars string -> messages expression to an Arrow string array."""
    frame = pl.DataFrame({"text": pl.Series(array)})
    out = frame.select(to_messages(pl.col("text")).cast(MESSAGE_DTYPE).alias("m"))
    return out.to_arrow().column("m").combine_chunks().cast(MESSAGES)
