"""Raw rows of each public source, as their dataset cards describe them.

One contract per source family. A field is the Arrow type the adapter works on after
ingest; ingest casts what it reads to it (integers widen to float, struct fields are picked
by name, extra columns and keys are ignored). Nullable fields may also be absent as columns;
a file without a non-nullable column is refused with the file and the columns named.

Some sources exist in more than one shape. `SHAPES` names, per contract and field, the other
Arrow types a field may arrive in; the adapter converts them to the contract's type
(for example UltraFeedback's older copies hold each aspect as a list of one dict, HelpSteer3's
`context` is sometimes a plain string, generic files may use ShareGPT `from/value`).

Rules (True = valid) only check what the row itself must satisfy; their names are the
quarantine reasons. Mapping failures that depend on options live in the adapters.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from data_contracts.contract import Contract, described

VERSION = "1"

HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
HELPSTEER_RANGE = (0.0, 4.0)
PREFERENCE_RANGE = (-3.0, 3.0)  # HelpSteer2 preference_strength, HelpSteer3 overall_preference
ULTRAFEEDBACK_ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
ULTRAFEEDBACK_RATING_RANGE = (1.0, 5.0)  # aspect "Rating" strings, or "N/A"
ULTRAFEEDBACK_OVERALL_RANGE = (1.0, 10.0)  # critique overall_score; binarized scores too
NOT_APPLICABLE = "N/A"

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
SHAREGPT_MESSAGE = pa.struct([pa.field("from", pa.string()), pa.field("value", pa.string())])
MESSAGES = pa.list_(MESSAGE)
SHAREGPT_MESSAGES = pa.list_(SHAREGPT_MESSAGE)


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"contract": f"raw_{name}", "version": VERSION})


def _between(column: str, bounds: tuple[float, float]) -> pl.Expr:
    low, high = bounds
    return pl.col(column).is_null() | pl.col(column).is_between(low, high)


# ---------------------------------------------------------------------------------------
# HelpSteer (v1) and HelpSteer2: one row per response, five 0-4 attributes.

HELPSTEER_SCHEMA = _schema(
    "helpsteer",
    [
        described("prompt", pa.string(), "user prompt; HelpSteer2 inlines earlier turns"),
        described("response", pa.string(), "one assistant response to the prompt"),
        *(
            described(a, pa.float64(), f"{a} rating, 0-4 (integers in the source)")
            for a in HELPSTEER_ATTRIBUTES
        ),
    ],
)


def _helpsteer_attributes_in_range() -> pl.Expr:
    return pl.all_horizontal(_between(a, HELPSTEER_RANGE) for a in HELPSTEER_ATTRIBUTES)


HELPSTEER = Contract(
    name="raw_helpsteer",
    version=VERSION,
    schema=HELPSTEER_SCHEMA,
    rules={"score_out_of_range": _helpsteer_attributes_in_range},
)

# ---------------------------------------------------------------------------------------
# HelpSteer2 `preference` subset: two responses and a signed strength.

HELPSTEER2_PREFERENCE = Contract(
    name="raw_helpsteer2_preference",
    version=VERSION,
    schema=_schema(
        "helpsteer2_preference",
        [
            described("split", pa.string(), "train or validation", nullable=True),
            described("prompt", pa.string(), "user prompt; earlier turns inline"),
            described("response_1", pa.string(), "first response"),
            described("response_2", pa.string(), "second response"),
            described("preference_strength", pa.float64(), "-3..3; > 0: response_2 better, 0: tie"),
            described("preference_statement", pa.string(), "annotators' summary", True),
            described("preference_elaboration", pa.string(), "annotators' reasoning", True),
        ],
    ),
    rules={"score_out_of_range": lambda: _between("preference_strength", PREFERENCE_RANGE)},
)

# ---------------------------------------------------------------------------------------
# HelpSteer3 `preference`: a conversation context and two responses.

INDIVIDUAL_PREFERENCE = pa.list_(
    pa.struct([pa.field("score", pa.float64()), pa.field("reasoning", pa.string())])
)

HELPSTEER3 = Contract(
    name="raw_helpsteer3",
    version=VERSION,
    schema=_schema(
        "helpsteer3",
        [
            described("domain", pa.string(), "general, stem, code or multilingual", True),
            described("language", pa.string(), "natural or programming language", True),
            described("context", MESSAGES, "the conversation so far, ending with a user turn"),
            described("response1", pa.string(), "first response"),
            described("response2", pa.string(), "second response"),
            described("overall_preference", pa.float64(), "-3..3; < 0: response1 better, 0: tie"),
            described(
                "individual_preference",
                INDIVIDUAL_PREFERENCE,
                "per annotator: score and reasoning",
                nullable=True,
            ),
        ],
    ),
    rules={"score_out_of_range": lambda: _between("overall_preference", PREFERENCE_RANGE)},
)

# ---------------------------------------------------------------------------------------
# UltraFeedback (raw): an instruction and its rated completions.

ASPECT = pa.struct([pa.field("Rating", pa.string()), pa.field("Rationale", pa.string())])
LEGACY_ASPECT = pa.list_(ASPECT)  # older copies: each aspect is a list of one dict


def _completion(aspect: pa.DataType) -> pa.DataType:
    return pa.struct(
        [
            pa.field(
                "annotations", pa.struct([pa.field(a, aspect) for a in ULTRAFEEDBACK_ASPECTS])
            ),
            pa.field("response", pa.string()),
            pa.field("overall_score", pa.float64()),
            pa.field("critique", pa.string()),
        ]
    )


COMPLETIONS = pa.list_(_completion(ASPECT))
LEGACY_COMPLETIONS = pa.list_(_completion(LEGACY_ASPECT))


def _ratings() -> pl.Expr:
    """All aspect Rating strings of every completion of the row, as one list."""
    return pl.concat_list(
        pl.col("completions").list.eval(
            pl.element().struct.field("annotations").struct.field(a).struct.field("Rating")
        )
        for a in ULTRAFEEDBACK_ASPECTS
    )


def _ratings_are_numbers() -> pl.Expr:
    bad = _ratings().list.eval(
        (pl.element() != NOT_APPLICABLE) & pl.element().cast(pl.Float64, strict=False).is_null()
    )
    return bad.list.any().not_()


def _ratings_in_range() -> pl.Expr:
    low, high = ULTRAFEEDBACK_RATING_RANGE
    values = _ratings().list.eval(pl.element().cast(pl.Float64, strict=False))
    out_rating = values.list.eval(pl.element().is_not_null() & ~pl.element().is_between(low, high))
    low, high = ULTRAFEEDBACK_OVERALL_RANGE
    out_overall = pl.col("completions").list.eval(
        pl.element().struct.field("overall_score").is_not_null()
        & ~pl.element().struct.field("overall_score").is_between(low, high)
    )
    return ~(out_rating.list.any() | out_overall.list.any())


ULTRAFEEDBACK = Contract(
    name="raw_ultrafeedback",
    version=VERSION,
    schema=_schema(
        "ultrafeedback",
        [
            described("source", pa.string(), "origin of the instruction, e.g. evol_instruct", True),
            described("instruction", pa.string(), "the user instruction (single turn)"),
            described("completions", COMPLETIONS, "rated completions (4 in the source)"),
        ],
    ),
    rules={
        "invalid_rating": _ratings_are_numbers,
        "score_out_of_range": _ratings_in_range,
        "too_few_completions": lambda: pl.col("completions").list.len() >= 2,
    },
)

# ---------------------------------------------------------------------------------------
# UltraFeedback binarized (HuggingFaceH4): full conversations per side, with scores.

ULTRAFEEDBACK_BINARIZED = Contract(
    name="raw_ultrafeedback_binarized",
    version=VERSION,
    schema=_schema(
        "ultrafeedback_binarized",
        [
            described("prompt", pa.string(), "the user prompt"),
            described("prompt_id", pa.string(), "sha256 of the prompt", nullable=True),
            described("chosen", MESSAGES, "conversation ending with the chosen assistant turn"),
            described("rejected", MESSAGES, "conversation ending with the rejected turn"),
            described("score_chosen", pa.float64(), "chosen's score, 1-10"),
            described("score_rejected", pa.float64(), "rejected's score, 1-10"),
        ],
    ),
    rules={
        "score_out_of_range": lambda: (
            _between("score_chosen", ULTRAFEEDBACK_OVERALL_RANGE)
            & _between("score_rejected", ULTRAFEEDBACK_OVERALL_RANGE)
        ),
    },
)

# ---------------------------------------------------------------------------------------
# Generic: prompt/chosen/rejected as strings or message lists, optional scores.
# Strings and ShareGPT lists arrive through SHAPES and are converted to MESSAGES.

GENERIC = Contract(
    name="raw_generic",
    version=VERSION,
    schema=_schema(
        "generic",
        [
            described("prompt", MESSAGES, "prompt messages (or a string)", nullable=True),
            described("chosen", MESSAGES, "chosen response or conversation (or a string)"),
            described("rejected", MESSAGES, "rejected response or conversation (or a string)"),
            described("score_chosen", pa.float64(), "chosen's score, any scale", True),
            described("score_rejected", pa.float64(), "rejected's score, same scale", True),
            described("split", pa.string(), "split name", nullable=True),
            described("domain", pa.string(), "domain", nullable=True),
            described("language", pa.string(), "language", nullable=True),
        ],
    ),
    rules={
        "score_not_finite": lambda: pl.all_horizontal(
            pl.col(c).is_null() | pl.col(c).is_finite() for c in ("score_chosen", "score_rejected")
        ),
    },
)

# Other Arrow types a field may arrive in, per contract name: field -> accepted types.
SHAPES: dict[str, dict[str, tuple[pa.DataType, ...]]] = {
    HELPSTEER3.name: {"context": (pa.string(),)},
    ULTRAFEEDBACK.name: {"completions": (LEGACY_COMPLETIONS,)},
    GENERIC.name: {
        column: (pa.string(), SHAREGPT_MESSAGES) for column in ("prompt", "chosen", "rejected")
    },
}
