"""Normalize one source into canonical preference pairs, with full row accounting.

    read (ingest) -> cast to the raw contract -> raw rules -> adapter rows -> prompt rules
    -> adapter pairs -> drop chosen == rejected -> pair ids -> preference_pair

Every row in ends in exactly one place: a pair (one row per pair, or two for HelpSteer's
rating rows), quarantine (with a reason code and the raw row), or a drop for rows that are
fine but form no pair (with its reason and the raw row, in `dropped.parquet`, as datatrove's
exclusion writer keeps what a filter removed). The report states the three and `normalize`
checks that they add up:

    rows_in = rows_paired + sum(quarantined) + sum(dropped),  rows_paired = pairs_out * rows_per_pair

"Rows in" are the records of the input: JSON lines (blank lines are not rows), array
elements, or table rows. For HelpSteer and HelpSteer2 a row is one rated response.

Memory: the input is read in pieces (`ingest.Input.pieces`): typed files (Parquet, Arrow,
hub) `BATCH_ROWS` rows at a time, JSON a block of `ingest.BLOCK_BYTES` at a time. A pair of
most sources is made from one row, so each piece is mapped on its own, and its pairs,
quarantined and dropped rows go to the output as they come (`normalize_to`): memory does
not grow with the input. HelpSteer's rating rows are paired across the whole input
(`Source.whole_input`): those sources, tens of thousands of rows, are read whole. The
output bytes do not depend on the piece size (`pipeline.io.ParquetRowGroups`).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from core.atomic import atomic_directory
from core.inputs import is_hub_id
from core.progress import progress
from data_contracts import preference_pair, quarantine
from data_contracts.contract import described
from data_contracts.raw_sources import SHAPES
from pipeline import ingest
from pipeline.io import (
    DROPPED_FILE,
    PAIRS_FILE,
    QUARANTINE_FILE,
    REPORT_FILE,
    ParquetRowGroups,
    write_json,
    write_row_groups,
)
from pipeline.presets import get_preset
from pipeline.sources import Source, get_source
from pipeline.sources.base import ATTRIBUTES_DTYPE, ORDER_SHIFT, PAIR_COLUMNS, first_reason

BATCH_ROWS = 32_768  # typed input rows mapped at once: bounds memory, not the output
_PAIR_RULES = preference_pair.CONTRACT.rules
# Rows that were read and mapped but form no pair; the reason names the rule.
DROPPED_SCHEMA = pa.schema(
    [
        described("source", pa.string(), "adapter name"),
        described("file", pa.string(), "input file (or hub id) the row came from"),
        described("row_index", pa.int64(), "0-based index of the row (line) in that file"),
        described("reason", pa.string(), "stable reason code, e.g. identical_responses"),
        described("raw", pa.string(), "the raw row as JSON (or the line as read)"),
    ],
    metadata={"contract": "normalize_dropped", "version": "1"},
)
_PROBLEMS = {
    "__file": pl.Int64,
    "__row_index": pl.Int64,
    "reason": pl.String,
    "__message": pl.String,
}


@dataclass(frozen=True)
class Normalized:
    """The output of `normalize`.

    Attributes:
        pairs: conforms to `preference_pair.SCHEMA`; metadata `score_scale` names the scale.
        quarantine: conforms to `quarantine.SCHEMA`, ordered by file and row.
        dropped: `DROPPED_SCHEMA`, ordered by file and row.
        report: rows in, pairs out, quarantined and dropped by reason (see module doc).
    """

    pairs: pa.Table
    quarantine: pa.Table
    dropped: pa.Table
    report: dict[str, Any]


def _has_text() -> pl.Expr:
    content = pl.element().struct.field("content").str.strip_chars()
    return pl.col("prompt").list.eval(content.str.len_chars() > 0).list.any()


PROMPT_CHECKS = (
    (pl.col("prompt").is_null(), "missing_field", "no prompt"),
    (
        ~_PAIR_RULES["unknown_role"](),
        "unknown_role",
        f"prompt roles must be {', '.join(preference_pair.ROLES)}",
    ),
    (~_PAIR_RULES["null_message_content"](), "null_message_content", "a message has no content"),
    (~_has_text(), "empty_prompt", "the prompt has no message with text"),
    (~_PAIR_RULES["no_user_turn"](), "no_user_turn", "the prompt does not end with a user turn"),
)


def normalize(
    source: str,
    input: str | Path,
    preset: str | None = None,
    *,
    batch_rows: int = BATCH_ROWS,
    **source_options: Any,
) -> Normalized:
    """Read `input` as `source` and map it to canonical pairs, in memory (`normalize_to`
    writes the same files piece by piece).

    Args:
        source: one of `pipeline.sources.SOURCES` (helpsteer, helpsteer2,
            helpsteer2_preference, helpsteer3, ultrafeedback, ultrafeedback_binarized,
            generic).
        input: a local file or directory, or a hub id (loaded through `datasets`).
        preset: a `pipeline.presets` name whose options for `source` apply under
            `source_options`.
        batch_rows: rows of a typed input mapped at once (JSON: a block of
            `ingest.BLOCK_BYTES`); memory only, the result is the same.
        **source_options: the source's options (`SOURCES[source].options`), e.g.
            `rejected="random"` for ultrafeedback or `chosen_column="better"` for generic.

    Returns:
        Pairs, quarantined rows and the report.

    Raises:
        ValueError: an unknown source, option or preset, or a preset that does not cover
            `source`.
        pipeline.ingest.IngestError: a missing, unreadable, empty or unloadable input, or a
            JSON file in which no row parses (naming the file).
        data_contracts.ContractError: a file without the source's required columns, or
            without a column an option names (naming the file, its columns, the option).
    """
    run = _Run(source, input, preset, source_options)
    pieces = list(run.pieces(batch_rows))
    tables = [
        pa.concat_tables([schema.empty_table(), *(p[k] for p in pieces)]).combine_chunks()
        for k, schema in enumerate((run.pairs_schema, quarantine.SCHEMA, DROPPED_SCHEMA))
    ]
    return Normalized(*tables, run.report())


def normalize_to(
    out_dir: str | Path,
    source: str,
    input: str | Path,
    preset: str | None = None,
    *,
    batch_rows: int = BATCH_ROWS,
    **source_options: Any,
) -> dict[str, Any]:
    """`normalize`, each piece written as it is mapped: `out_dir` gets the bytes
    `write_normalized(normalize(...))` writes, atomically, and memory stays bounded.

    Returns:
        The report (`report.json`).

    Raises:
        As `normalize`; `out_dir` is then left as it was.
    """
    run = _Run(source, input, preset, source_options)
    with atomic_directory(out_dir) as tmp:
        with (
            ParquetRowGroups(tmp / PAIRS_FILE, run.pairs_schema) as pairs,
            ParquetRowGroups(tmp / QUARANTINE_FILE, quarantine.SCHEMA) as quarantined,
            ParquetRowGroups(tmp / DROPPED_FILE, DROPPED_SCHEMA) as dropped,
        ):
            for piece in run.pieces(batch_rows):
                pairs.write(piece[0])
                quarantined.write(piece[1])
                dropped.write(piece[2])
        report = run.report()
        write_json(report, tmp / REPORT_FILE)
    return report


class _Run:
    """One normalize run: the source, its options and input, and the counts of the report.

    `pieces` maps the input piece by piece into (pairs, quarantine, dropped) tables, each in
    file and row order, so that their concatenation is the whole output; `report` checks
    the row accounting once they are all out.
    """

    def __init__(
        self, source: str, input: str | Path, preset: str | None, source_options: dict[str, Any]
    ) -> None:
        self.adapter = adapter = get_source(source)
        chosen = {} if preset is None else get_preset(preset).options_for(source)
        self.options = options = adapter.make_options(chosen | source_options)
        hub = ingest.HubOptions(
            config=options.hub_config or adapter.hub.config,
            data_dir=options.hub_data_dir or adapter.hub.data_dir,
            split=options.split or adapter.hub.split,
        )
        self.input, self.preset = input, preset
        self.inputs = ingest.open_input(input, hub)
        self.scale = scale = adapter.score_scale(options)
        metadata = {**preference_pair.SCHEMA.metadata, b"score_scale": json.dumps({source: scale})}
        self.pairs_schema = preference_pair.SCHEMA.with_metadata(metadata)
        self.rows = [0] * len(self.inputs)
        self.pairs_out = 0
        self.quarantined: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    def pieces(self, batch_rows: int) -> Iterator[tuple[pa.Table, pa.Table, pa.Table]]:
        """(pairs, quarantine, dropped) of each piece of the input, in input order.

        Raises:
            As `normalize`; an input without rows only once every file has been read.
        """
        adapter, options = self.adapter, self.options
        rows = None if adapter.whole_input else batch_rows
        held: list[tuple[pl.DataFrame, pl.DataFrame, int, ingest.RawFile]] = []
        name = adapter.name
        for number, file in enumerate(
            progress(self.inputs, total=len(self.inputs), desc=f"normalize {name}", unit="file")
        ):
            conformer = ingest.Conformer(
                adapter.contract,
                SHAPES.get(adapter.contract.name, {}),
                partial(adapter.convert, options=options),
                adapter.columns(options),
                adapter.column_options(),
            )
            for raw in file.pieces(rows):
                self.rows[number] += raw.rows
                valid, problems = _valid_rows(adapter, conformer, raw, number)
                if adapter.whole_input:
                    held.append((valid, problems, number, raw))
                else:
                    yield self._map(valid, [problems], {number: raw})
            conformer.finish()
        if held:
            frames, problems, numbers, raws = zip(*held, strict=True)
            yield self._map(
                pl.concat(frames), list(problems), dict(zip(numbers, raws, strict=True))
            )
        if not any(self.rows) and not is_hub_id(self.input):
            raise ingest.no_rows(self.input)

    def _map(
        self, valid: pl.DataFrame, problems: list[pl.DataFrame], files: dict[int, ingest.RawFile]
    ) -> tuple[pa.Table, pa.Table, pa.Table]:
        """Valid raw rows -> (pairs, quarantine, dropped) tables, counted for the report;
        `problems` are the rows already quarantined; `files` hold the raw rows by file."""
        adapter, options = self.adapter, self.options
        rows = adapter.rows(valid, options)
        split = pl.lit(options.split) if options.split else pl.coalesce("split", "__split")
        own_reason, own_message = first_reason(*PROMPT_CHECKS)
        rows = rows.with_columns(
            split.cast(pl.String).alias("split"),
            pl.coalesce("__reason", own_reason).alias("__reason"),
            pl.when(pl.col("__reason").is_null())
            .then(own_message)
            .otherwise(pl.col("__message"))
            .alias("__message"),
        )
        problems.append(
            rows.filter(pl.col("__reason").is_not_null()).select(
                "__file", "__row_index", pl.col("__reason").alias("reason"), pl.col("__message")
            )
        )
        pairs, dropped = adapter.pairs(rows.filter(pl.col("__reason").is_null()), options)
        pairs, broken = _pair_rule_problems(pairs)
        problems.append(broken)
        identical = (pl.col("chosen") == pl.col("rejected")).fill_null(False)
        same = pairs.filter(identical).select(
            pl.col("__rows").alias("__order"), pl.lit("identical_responses").alias("reason")
        )
        dropped = pl.concat([dropped, same.explode("__order")])
        pairs = pairs.filter(~identical).sort("__order")

        table = _pairs_table(adapter.name, pairs, self.pairs_schema)
        quarantined = _quarantine_table(adapter.name, files, pl.concat(problems))
        dropped_table = _dropped_table(adapter.name, files, dropped)
        self.pairs_out += table.num_rows
        self.quarantined.update(quarantined["reason"].to_pylist())
        self.dropped.update(dropped_table["reason"].to_pylist())
        return table, quarantined, dropped_table

    def report(self) -> dict[str, Any]:
        """Rows in, pairs out, quarantined and dropped by reason, once every piece is out.

        Raises:
            RuntimeError: the rows do not add up (a bug).
        """
        adapter = self.adapter
        rows_in = sum(self.rows)
        rows_paired = self.pairs_out * adapter.rows_per_pair
        by_reason, dropped = (
            dict(sorted(self.quarantined.items())),
            dict(sorted(self.dropped.items())),
        )
        accounted = rows_paired + sum(by_reason.values()) + sum(dropped.values())
        if accounted != rows_in:
            raise RuntimeError(
                f"{adapter.name}: row accounting broken: {rows_in} rows in, {rows_paired} "
                f"paired, {by_reason} quarantined, {dropped} dropped"
            )
        return {
            "source": adapter.name,
            "input": str(self.input),
            "preset": self.preset,
            "options": dataclasses.asdict(self.options),
            "score_scale": self.scale,
            "files": [
                {"file": f.label, "rows": n} for f, n in zip(self.inputs, self.rows, strict=True)
            ],
            "rows_in": rows_in,
            "rows_per_pair": adapter.rows_per_pair,
            "rows_paired": rows_paired,
            "pairs_out": self.pairs_out,
            "quarantined": by_reason,
            "dropped": dropped,
            "quarantine_file": QUARANTINE_FILE,
            "dropped_file": DROPPED_FILE,
        }


def _file_and_row() -> list[pl.Expr]:
    """`__file` and `__row_index` back from `__order` (`__file << ORDER_SHIFT | row`)."""
    order = pl.col("__order")
    return [
        (order // (1 << ORDER_SHIFT)).alias("__file"),
        (order % (1 << ORDER_SHIFT)).alias("__row_index"),
    ]


def _pair_rule_problems(pairs: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(pairs that keep every `preference_pair` rule, problems of the rows of the others).

    The adapters' checks should leave nothing here; this makes a gap in them cost the rows
    of one pair, not the file.
    """
    rules = [
        (pl.col(c).is_null(), "missing_field", f"no {c}") for c in ("prompt", "chosen", "rejected")
    ]
    rules += [
        (~rule().fill_null(False), name, f"the pair breaks preference_pair rule {name!r}")
        for name, rule in _PAIR_RULES.items()
    ]
    labelled = pairs.with_columns(first_reason(*rules))
    bad = labelled.filter(pl.col("__reason").is_not_null())
    problems = bad.select(pl.col("__rows").alias("__order"), "__reason", "__message").explode(
        "__order"
    )
    problems = problems.select(
        *_file_and_row(),
        pl.col("__reason").alias("reason"),
        "__message",
    )
    kept = labelled.filter(pl.col("__reason").is_null()).drop("__reason", "__message")
    return kept, problems.cast(_PROBLEMS)


def _valid_rows(
    adapter: Source, conformer: ingest.Conformer, raw: ingest.RawFile, number: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A piece of file `number` cast to the raw contract: (rows that pass its rules,
    problems of the rest)."""
    contract = adapter.contract
    conformed = conformer.piece(raw)
    frame = pl.from_arrow(conformed.table)
    assert isinstance(frame, pl.DataFrame)
    index = pl.Series("__row_index", conformed.row_index, pl.Int64)
    frame = frame.with_columns(
        pl.lit(number, dtype=pl.Int64).alias("__file"),
        index,
        ((pl.lit(number, dtype=pl.Int64) * (1 << ORDER_SHIFT)) + index).alias("__order"),
        pl.lit(raw.split or adapter.default_split, dtype=pl.String).alias("__split"),
        contract.label(conformed.table)["rule"].alias("__rule"),
    )
    read_problems = pl.DataFrame(
        conformed.problems,
        schema={k: v for k, v in _PROBLEMS.items() if k != "__file"},
        orient="row",
    ).unique("__row_index", keep="first", maintain_order=True)
    frame = frame.join(read_problems.select("__row_index"), on="__row_index", how="anti")
    rule = pl.col("__rule")
    missing = rule.str.starts_with("null_")
    field_name = rule.str.strip_prefix("null_")
    broken = frame.filter(rule.is_not_null()).select(
        "__row_index",
        pl.when(missing).then(pl.lit("missing_field")).otherwise(rule).alias("reason"),
        pl.when(missing)
        .then(pl.format("field '{}' is missing or null", field_name))
        .otherwise(pl.format(f"breaks rule '{{}}' of {contract.name} v{contract.version}", rule))
        .alias("__message"),
    )
    file_problems = pl.concat([read_problems, broken]).with_columns(
        pl.lit(number, dtype=pl.Int64).alias("__file")
    )
    valid = frame.filter(rule.is_null()).drop("__rule")
    return valid, file_problems.select("__file", "__row_index", "reason", "__message")


def _pairs_table(source: str, pairs: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """Canonical pairs with ids, cast to `schema` (`preference_pair.SCHEMA`, the scale in
    its metadata)."""
    rows = pairs.select("prompt", "chosen", "rejected").iter_rows()
    ids = [
        # The contract's hash is the id; one call per pair is its batch boundary.
        preference_pair.make_pair_id(source, prompt, chosen, rejected)
        for prompt, chosen, rejected in rows
    ]
    frame = pairs.select(
        pl.Series("pair_id", ids, pl.String),
        pl.lit(source).alias("source"),
        *(pl.col(c) for c in PAIR_COLUMNS if not c.endswith("_attributes")),
        *(
            pl.col(c).cast(ATTRIBUTES_DTYPE).cast(pl.Map(pl.String, pl.Float64))
            for c in ("chosen_attributes", "rejected_attributes")
        ),
    )
    table = preference_pair.CONTRACT.conform(frame.to_arrow(), source=f"{source} pairs")
    preference_pair.CONTRACT.validate(table, source=f"{source} pairs")  # a bug if it fails
    return table.replace_schema_metadata(schema.metadata)


def _raw_rows(files: dict[int, ingest.RawFile], rows: pl.DataFrame) -> tuple[list[str], list[str]]:
    """(file label, raw row text) of each (`__file`, `__row_index`) row, in its order."""
    labels, raws = [], []
    for number, part in rows.group_by("__file", maintain_order=True):
        raw = files[int(number[0])]
        indices = part["__row_index"].to_list()
        labels += [raw.label] * len(indices)
        raws += raw.raw(indices)
    return labels, raws


def _dropped_table(
    source: str, files: dict[int, ingest.RawFile], dropped: pl.DataFrame
) -> pa.Table:
    """Dropped rows in file and row order, each with its reason and raw row."""
    rows = dropped.select(*_file_and_row(), "reason")
    return _row_table(source, files, rows, DROPPED_SCHEMA)


def _quarantine_table(
    source: str, files: dict[int, ingest.RawFile], problems: pl.DataFrame
) -> pa.Table:
    """Quarantine rows in file and row order, each with its message and raw row."""
    table = _row_table(source, files, problems, quarantine.SCHEMA)
    return quarantine.CONTRACT.validate(table, source=f"{source} quarantine")


def _row_table(
    source: str, files: dict[int, ingest.RawFile], rows: pl.DataFrame, schema: pa.Schema
) -> pa.Table:
    """`rows` (`__file`, `__row_index`, `reason`, and `__message` when `schema` has a
    message) sorted by file and row, with the file's label and the raw row, as `schema`."""
    rows = rows.sort("__file", "__row_index")
    labels, raws = _raw_rows(files, rows)
    columns = {
        "source": pa.array([source] * rows.height, pa.string()),
        "file": pa.array(labels, pa.string()),
        "row_index": rows["__row_index"].to_arrow().cast(pa.int64()),
        "reason": rows["reason"].to_arrow().cast(pa.string()),
    }
    if "message" in schema.names:
        columns["message"] = rows["__message"].to_arrow().cast(pa.string())
    columns["raw"] = pa.array(raws, pa.string())
    return pa.table(columns).cast(schema)


def write_normalized(result: Normalized, out_dir: str | Path) -> Path:
    """Write `pairs.parquet`, `quarantine.parquet`, `dropped.parquet` and `report.json`
    atomically.

    Returns:
        `out_dir`, complete; the same result always gives the same bytes.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_row_groups(result.pairs, tmp / PAIRS_FILE)
        write_row_groups(result.quarantine, tmp / QUARANTINE_FILE)
        write_row_groups(result.dropped, tmp / DROPPED_FILE)
        write_json(result.report, tmp / REPORT_FILE)
    return out_dir
