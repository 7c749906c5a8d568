"""A contract: a versioned Arrow schema plus named row rules, in two modes.

Modelled on dataframely: a schema you can read field by field, rules that are named
boolean Polars expressions (True = the row is valid), and two ways to apply them:
`validate` raises with counts per failed rule, `split` returns the valid rows and the
invalid ones labelled with the first rule they broke. Rule names are stable strings that
double as quarantine and drop reasons, so row accounting uses one vocabulary.

Every non-nullable field gets an implicit rule `null_<field>`.

JSON documents (a shard manifest, a stage report) are described field by field as a
`JsonSpec` and checked with `check_fields`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

Rule = Callable[[], pl.Expr]
ROW_INDEX = "__row_index"


class ContractError(ValueError):
    """Data does not satisfy a contract; the message names the columns or rules."""


@dataclass(frozen=True)
class Contract:
    """A named, versioned schema with row rules.

    Attributes:
        name: the contract's name, e.g. "preference_pair".
        version: bumped whenever the bytes a stage writes would change.
        schema: the Arrow schema; field metadata carries a "description".
        rules: rule name -> zero-argument function building a Polars expression that is
            True for valid rows. Evaluated in order; a row is labelled with the first rule
            it breaks.
    """

    name: str
    version: str
    schema: pa.Schema
    rules: Mapping[str, Rule] = field(default_factory=dict)

    def missing_columns(self, columns: list[str]) -> list[str]:
        """Names of schema fields absent from `columns`, in schema order."""
        present = set(columns)
        return [f.name for f in self.schema if f.name not in present]

    def conform(
        self, table: pa.Table, source: str = "table", columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Select the schema's columns (or those of them in `columns`, for a reader that
        needs only some) in schema order and cast them to the schema's types.

        Raises:
            ContractError: naming `source` and every missing column, or the column whose
                type cannot be cast.
        """
        fields = [f for f in self.schema if columns is None or f.name in columns]
        missing = [
            name
            for name in self.missing_columns(table.column_names)
            if columns is None or name in columns
        ]
        if missing:
            raise ContractError(
                f"{source}: missing column(s) for {self.name} v{self.version}: "
                + ", ".join(missing)
            )
        arrays = []
        for f in fields:
            try:
                arrays.append(table.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ContractError(
                    f"{source}: column {f.name!r} has type {table.schema.field(f.name).type}, "
                    f"{self.name} needs {f.type}: {err}"
                ) from err
        schema = self.schema if columns is None else pa.schema(fields, self.schema.metadata)
        return pa.Table.from_arrays(arrays, schema=schema)

    def _all_rules(self) -> dict[str, Rule]:
        rules: dict[str, Rule] = {}
        for f in self.schema:
            if not f.nullable:
                rules[f"null_{f.name}"] = lambda name=f.name: pl.col(name).is_not_null()
        rules.update(self.rules)
        return rules

    def rule_names(self) -> list[str]:
        """Every rule's name, the implicit `null_<field>` ones first: the drop reasons."""
        return list(self._all_rules())

    def label(self, table: pa.Table) -> pl.DataFrame:
        """Each row's first broken rule (null when valid), with its row index.

        Returns:
            A frame with columns `__row_index` (u32) and `rule` (str or null).
        """
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        first_broken: pl.Expr = pl.lit(None, dtype=pl.String)
        for name, rule in reversed(list(self._all_rules().items())):
            first_broken = (
                pl.when(rule().fill_null(False).not_()).then(pl.lit(name)).otherwise(first_broken)
            )
        return frame.with_row_index(ROW_INDEX).select(ROW_INDEX, first_broken.alias("rule"))

    def problems(self, table: pa.Table) -> dict[str, int]:
        """Count of rows per broken rule (empty when every row is valid)."""
        labels = self.label(table).filter(pl.col("rule").is_not_null())
        counts = labels.group_by("rule").len().sort("rule")
        return dict(zip(counts["rule"].to_list(), counts["len"].to_list(), strict=True))

    def validate(self, table: pa.Table, source: str = "table") -> pa.Table:
        """Conform `table` and raise if any row breaks a rule.

        Raises:
            ContractError: with the count of rows per broken rule and the first row index
                of each.
        """
        table = self.conform(table, source)
        self.check_labels(self.label(table), source)
        return table

    def check_labels(self, labels: pl.DataFrame, source: str = "table") -> None:
        """Raise if `labels` (of `label`, maybe gathered batch by batch with `__row_index`
        made the table's) holds a broken rule.

        Raises:
            ContractError: with the count of rows per broken rule and the first row index
                of each.
        """
        broken = labels.filter(pl.col("rule").is_not_null())
        if broken.height:
            first = broken.group_by("rule").agg(
                pl.len().alias("rows"), pl.col(ROW_INDEX).min().alias("first_row")
            )
            detail = "; ".join(
                f"{r['rule']}: {r['rows']} row(s), first at row {r['first_row']}"
                for r in first.sort("rule").iter_rows(named=True)
            )
            raise ContractError(f"{source}: {self.name} v{self.version} rules broken: {detail}")

    def split(self, table: pa.Table, source: str = "table") -> tuple[pa.Table, pa.Table]:
        """Conform `table` and separate valid from invalid rows.

        Returns:
            (valid rows, invalid rows with two extra columns: `__row_index`, the row's
            index in `table`, and `rule`, the first rule it broke). Row order is kept.
        """
        table = self.conform(table, source)
        labels = self.label(table)
        valid_mask = labels["rule"].is_null().to_arrow()
        invalid = table.filter(pc.invert(valid_mask))
        bad_labels = labels.filter(pl.col("rule").is_not_null())
        invalid = invalid.append_column(
            ROW_INDEX, bad_labels[ROW_INDEX].to_arrow().cast(pa.int64())
        ).append_column("rule", bad_labels["rule"].to_arrow().cast(pa.string()))
        return table.filter(valid_mask), invalid


def described(
    name: str, type_: pa.DataType, description: str, nullable: bool = False, **meta: str
) -> pa.Field:
    """An Arrow field with a description (and any extra facts) in its metadata."""
    return pa.field(name, type_, nullable=nullable, metadata={"description": description, **meta})


# field -> (JSON type, description). A float field also accepts an int.
JsonSpec = dict[str, tuple[Any, str]]


def check_fields(obj: dict, spec: JsonSpec, where: str, source: str) -> None:
    """Check that `obj` has every field of `spec` with its JSON type.

    Raises:
        ContractError: naming `source` and the first missing or mistyped field
            (`where` prefixes nested names, e.g. "stats.").
    """
    missing = [name for name in spec if name not in obj]
    if missing:
        raise ContractError(f"{source}: {where} lacks " + ", ".join(missing))
    for name, (type_, _) in spec.items():
        value = obj[name]
        ok = isinstance(value, (int, float)) if type_ is float else isinstance(value, type_)
        if not ok or (type_ is int and isinstance(value, bool)):
            raise ContractError(f"{source}: {where}{name} is {type(value).__name__}, not {type_}")


def check_document(document: Any, spec: JsonSpec, contract: str, source: str) -> dict:
    """Check that a JSON document (a report) is an object with every field of `spec` and
    that its `contract` field is `contract`; the start of every report's `validate`.

    Raises:
        ContractError: naming `source` and what is not so.
    """
    if not isinstance(document, dict):
        raise ContractError(f"{source}: not a JSON object")
    check_fields(document, spec, "", source)
    if document["contract"] != contract:
        raise ContractError(f"{source}: contract is {document['contract']!r}, not {contract!r}")
    return document
