"""What names a source input: a local file of a known format, or a hub id.

The ingest stage reads both (`pipeline.ingest`); the trainer, the Dagster resources and
the staleness checks only ask which one a name is, so the question lives here, below them.
"""

from __future__ import annotations

import re
from pathlib import Path

JSON_LINES = (".jsonl", ".ndjson")
SUFFIXES = (*JSON_LINES, ".json", ".parquet", ".arrow")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(input: str | Path) -> bool:
    """True when `input` is no local path but looks like `owner/name` without a file suffix."""
    text = str(input)
    return (
        not Path(text).exists()
        and _HUB_ID.match(text) is not None
        and not text.lower().endswith((*SUFFIXES, ".gz"))
    )
