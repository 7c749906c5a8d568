"""`quarantine`: rows a stage could not use, each with a reason code and the raw row.

The reason codes are the rule names of the contracts plus the adapters' own mapping
failures (for example `invalid_json`, `invalid_utf8`, `invalid_unicode`, `too_deep`,
`duplicate_key`, `number_out_of_range`, `not_an_object`, `missing_field`, `wrong_type`,
`score_out_of_range`). Nothing is dropped without a row here or, for rows a source's own
rules leave out, a row in normalize's `dropped.parquet` with its reason.
"""

from __future__ import annotations

import pyarrow as pa

from data_contracts.contract import Contract, described

VERSION = "1"

SCHEMA = pa.schema(
    [
        described("source", pa.string(), "adapter name"),
        described("file", pa.string(), "input file (or hub id) the row came from"),
        described("row_index", pa.int64(), "0-based index of the row (line) in that file"),
        described("reason", pa.string(), "stable reason code"),
        described("message", pa.string(), "human-readable detail: field, value, expectation"),
        described("raw", pa.string(), "the raw row as JSON (or the undecodable line, escaped)"),
    ],
    metadata={"contract": "quarantine", "version": VERSION},
)

CONTRACT = Contract(name="quarantine", version=VERSION, schema=SCHEMA)
