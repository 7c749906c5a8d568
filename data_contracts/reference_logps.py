"""`reference_logps`: a reference model's summed log-probs per pair, computed once.

Written beside the shards by `training/reference.py` and read back by the trainer instead
of holding a reference model. A file belongs to one (model, shards) combination: the
schema metadata carries the model fingerprint and the shard key, and a reader checks both.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from data_contracts.contract import Contract, described

VERSION = "1"

SCHEMA = pa.schema(
    [
        described("pair_id", pa.string(), "preference_pair.pair_id"),
        described(
            "chosen_logps",
            pa.float32(),
            "log p_ref(chosen | prompt), summed over the chosen tokens",
        ),
        described(
            "rejected_logps",
            pa.float32(),
            "log p_ref(rejected | prompt), summed over the rejected tokens",
        ),
    ],
    metadata={"contract": "reference_logps", "version": VERSION},
)

CONTRACT = Contract(
    name="reference_logps",
    version=VERSION,
    schema=SCHEMA,
    rules={
        # A log-prob is <= 0 (NaN compares greater than everything in Polars).
        "logps_positive_or_nan": lambda: (
            (pl.col("chosen_logps") <= 0) & (pl.col("rejected_logps") <= 0)
        ),
        "duplicate_pair_id": lambda: pl.col("pair_id").is_unique(),
    },
)

# Schema metadata keys of a written file.
MODEL_FINGERPRINT = "model_fingerprint"
SHARD_KEY = "shard_key"
