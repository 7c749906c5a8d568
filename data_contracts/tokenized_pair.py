"""`tokenized_pair`: one preference pair after the chat template and the tokenizer.

The prompt is tokenized once, rendered with the generation prompt; each response is the
text the template renders after that prompt (so it ends with the template's end of turn)
and is tokenized on its own. In a packed row the pair is `prompt_ids | chosen_ids |
rejected_ids`, and both responses continue exactly the same prompt tokens.

A pair whose response renders to no tokens cannot be trained on; the rule names below are
its drop reasons.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from data_contracts.contract import Contract, described

VERSION = "1"

_ids = pa.list_(pa.int32())
SCHEMA = pa.schema(
    [
        described("pair_id", pa.string(), "preference_pair.pair_id"),
        described("prompt_ids", _ids, "prompt rendered with the generation prompt, tokenized"),
        described("chosen_ids", _ids, "chosen turn after the prompt, incl. end of turn"),
        described("rejected_ids", _ids, "rejected turn after the prompt, incl. end of turn"),
    ],
    metadata={"contract": "tokenized_pair", "version": VERSION},
)


def _not_empty(column: str):
    return lambda: pl.col(column).list.len() > 0


CONTRACT = Contract(
    name="tokenized_pair",
    version=VERSION,
    schema=SCHEMA,
    rules={
        "empty_prompt_ids": _not_empty("prompt_ids"),
        "empty_chosen_ids": _not_empty("chosen_ids"),
        "empty_rejected_ids": _not_empty("rejected_ids"),
    },
)
