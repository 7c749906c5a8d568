"""`preference_pair`: the canonical pair every source adapter produces.

One row = one prompt (a message list ending with a user turn) with one preferred and one
dispreferred assistant response. Scores stay on the source's own scale; the scale of each
source is named in the table's metadata under `score_scale` (JSON: source -> scale).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import polars as pl
import pyarrow as pa

from data_contracts.contract import Contract, described

VERSION = "1"

ROLES = ("system", "user", "assistant")
MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
ATTRIBUTES = pa.map_(pa.string(), pa.float64())

SCHEMA = pa.schema(
    [
        described("pair_id", pa.string(), "sha256 (32 hex) of source, prompt, chosen, rejected"),
        described("source", pa.string(), "adapter name, e.g. ultrafeedback_binarized"),
        described("split", pa.string(), "the source's split, e.g. train_prefs"),
        described("prompt", pa.list_(MESSAGE), "messages {role, content}; last is a user turn"),
        described("chosen", pa.string(), "the preferred assistant response"),
        described("rejected", pa.string(), "the dispreferred assistant response"),
        described("score_chosen", pa.float64(), "chosen's score, source scale", nullable=True),
        described("score_rejected", pa.float64(), "rejected's score, source scale", nullable=True),
        described("margin", pa.float64(), "preference strength, >= 0, source scale", nullable=True),
        described("domain", pa.string(), "topic or task domain, when the source has one", True),
        described("language", pa.string(), "natural language, when the source has one", True),
        described("chosen_attributes", ATTRIBUTES, "attribute -> score (HelpSteer's five)", True),
        described("rejected_attributes", ATTRIBUTES, "attribute -> score", True),
        described("rationale", pa.string(), "annotator critique or reasoning", nullable=True),
    ],
    metadata={"contract": "preference_pair", "version": VERSION},
)


def _prompt_has_messages() -> pl.Expr:
    return pl.col("prompt").list.len() > 0


def _prompt_ends_with_user() -> pl.Expr:
    return pl.col("prompt").list.last().struct.field("role") == "user"


def _prompt_roles_known() -> pl.Expr:
    roles = pl.col("prompt").list.eval(pl.element().struct.field("role").is_in(ROLES))
    return roles.list.all()


def _prompt_contents_present() -> pl.Expr:
    present = pl.col("prompt").list.eval(pl.element().struct.field("content").is_not_null())
    return present.list.all()


def _margin_not_negative() -> pl.Expr:
    return pl.col("margin").is_null() | (pl.col("margin") >= 0)


def _scores_finite() -> pl.Expr:
    return pl.all_horizontal(
        pl.col(c).is_null() | pl.col(c).is_finite() for c in ("score_chosen", "score_rejected")
    )


CONTRACT = Contract(
    name="preference_pair",
    version=VERSION,
    schema=SCHEMA,
    rules={
        "empty_prompt": _prompt_has_messages,
        "no_user_turn": _prompt_ends_with_user,
        "unknown_role": _prompt_roles_known,
        "null_message_content": _prompt_contents_present,
        "negative_margin": _margin_not_negative,
        "score_not_finite": _scores_finite,
    },
)


def make_pair_id(source: str, prompt: Sequence[dict], chosen: str, rejected: str) -> str:
    """The stable content hash of one pair: same content, same id, on every machine."""
    messages = [[m["role"], m["content"]] for m in prompt]
    payload = json.dumps([source, messages, chosen, rejected], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]
