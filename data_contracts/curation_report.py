"""`curation_report`: the `report.json` of a curated directory.

A curated directory holds `pairs.parquet` (the kept training `preference_pair` rows, input
order), `eval_pairs.parquet` (the kept pairs held out for evaluation, same schema, input
order; empty without an eval split), `dropped.parquet` (every other input pair with its
`position` and `reason`) and this report. Like the other stage reports it is JSON
described field by field; `validate` checks presence, types, the drop reasons and the row
accounting:

    rows_in = rows_out + eval_pairs + sum(dropped)

`dropped` lists every rule that ran, in funnel order (`REASONS`, the order the rules run
in, each on what the ones before it kept), zeros included; a rule that is off is absent.
`eval_split` says how the eval pairs were chosen (null without a split, and then
`eval_pairs` is 0): by a share of the prompts' seeded hashes, a number of pairs in hash
order, or a source's own splits; a unit is a near-duplicate group or a prompt.

Version 2 added the eval split: `eval_pairs`, `eval_file`, `eval_split`, the sources'
`eval_pairs` and the `shares_eval_prompt` reason; length bias `out` and attribute
agreement are over the training pairs (`pairs.parquet`). Version 3 added `--max-pairs`: the
`over_max_pairs` reason and the config's `max_pairs`.

Length bias is measured in characters (tokens are not known at curation), per source, on
the pairs in and on the pairs out, so the effect of the rules shows: how many pairs have
the longer response chosen, the shorter, or both equal, and quantiles of the ratio
chosen characters / rejected characters (pairs with an empty rejected left out).
"""

from __future__ import annotations

from typing import Any

from data_contracts.contract import ContractError, JsonSpec, check_document, check_fields

VERSION = "3"

# The curation rules in the order they run; each name is the drop reason of its pairs.
REASONS = (
    "empty_response",
    "identical_responses",
    "tie",
    "duplicate",
    "language_not_included",
    "language_excluded",
    "domain_not_included",
    "domain_excluded",
    "prompt_too_long",
    "response_too_short",
    "response_too_long",
    "length_ratio_above_max",
    "margin_below_min",
    "margin_above_max",
    "score_below_min",
    "benchmark_prompt",
    "contaminated",
    "over_max_pairs",
    "near_duplicate",
    "over_prompt_cap",
    "over_chosen_longer_share",
    "shares_eval_prompt",
)

EVAL_MODES = ("share", "pairs", "splits")

RATIO_QUANTILES = {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}

_NULL = type(None)

LENGTH_BIAS_FIELDS: JsonSpec = {
    "unit": (str, 'what lengths count: always "characters"'),
    "in": (dict, "source -> SOURCE_BIAS_FIELDS over the pairs read"),
    "out": (dict, "source -> SOURCE_BIAS_FIELDS over the training pairs (their sources only)"),
}

SOURCE_BIAS_FIELDS: JsonSpec = {
    "pairs": (int, "pairs of the source = chosen_longer + rejected_longer + equal"),
    "chosen_longer": (int, "pairs whose chosen has more characters than rejected"),
    "rejected_longer": (int, "pairs whose rejected has more characters"),
    "equal": (int, "pairs whose responses have as many characters"),
    "chosen_longer_share": ((float, _NULL), "chosen_longer / pairs; null without pairs"),
    "ratio_quantiles": (dict, "p05, p25, p50, p75, p95 of chosen / rejected characters"),
}

NEAR_DUPLICATE_FIELDS: JsonSpec = {
    "threshold": (float, "Jaccard similarity of character n-grams that makes a near-duplicate"),
    "ngram": (int, "shingle size in characters"),
    "permutations": (int, "MinHash values per prompt"),
    "bands": (int, "LSH bands"),
    "rows": (int, "MinHash values per band"),
    "seed": (int, "seed of the MinHash permutations"),
    "prompts": (int, "distinct prompts compared (those that reached the rule)"),
    "candidate_pairs": (int, "prompt pairs that shared an LSH band"),
    "similar_pairs": (int, "candidate pairs with estimated Jaccard >= threshold"),
    "groups": (int, "groups of near-duplicate prompts (connected components, >= 2 prompts)"),
    "prompts_in_groups": (int, "distinct prompts that belong to a group"),
    "largest_group": (int, "prompts in the largest group (0 without groups)"),
    "examples": (list, "up to 5 largest groups, each up to 3 normalized prompts (cut short)"),
}

EVAL_SPLIT_FIELDS: JsonSpec = {
    "mode": (str, "share | pairs | splits: how the eval pairs were chosen"),
    "setting": (
        (float, int, list),
        "--eval-share (a share of the units), --eval-pairs (pairs at least) or --eval-splits",
    ),
    "seed": (int, "salt of the units' content hash (share and pairs)"),
    "prompts": (int, "distinct prompts held out"),
    "units": (int, "units held out: near-duplicate groups, and prompts in none"),
}

FIELDS: JsonSpec = {
    "contract": (str, 'always "curation_report"'),
    "version": (str, "curation_report contract version"),
    "rows_in": (int, "pairs read = rows_out + eval_pairs + sum(dropped)"),
    "dropped": (dict, "reason -> pairs dropped, every rule that ran, in funnel order"),
    "rows_out": (int, "training pairs kept (rows of pairs.parquet)"),
    "eval_pairs": (int, "pairs held out for evaluation (rows of eval_file); 0 without a split"),
    "dropped_file": (str, "the file holding each dropped pair with its reason"),
    "eval_file": (str, "the file holding the eval pairs (written empty without a split)"),
    "config": (dict, "every curation setting (pipeline.curate.CurateConfig)"),
    "eval_split": ((dict, _NULL), "EVAL_SPLIT_FIELDS; null without an eval split"),
    "eval_prompts": ((int, _NULL), "eval prompts of the contamination check; null when off"),
    "score_scale": (dict, "source -> its score scale, from the pairs' metadata"),
    "sources": (dict, "source -> rows_in, rows_out, eval_pairs"),
    "attribute_agreement": (dict, "source -> attribute -> pairs, agree, conflict, tie, rate"),
    "length_bias": (dict, "LENGTH_BIAS_FIELDS"),
    "near_duplicates": ((dict, _NULL), "NEAR_DUPLICATE_FIELDS; null when the rule is off"),
}


def validate(report: Any, source: str = "report.json") -> dict:
    """Check fields, types, drop reasons and their order, and the row accounting.

    Raises:
        ContractError: naming `source` and the first missing or mistyped field, or the
            broken rule (`unknown_drop_reason`, `funnel_order`, `rows_add_up`,
            `sources_add_up`, `eval_split`, `length_bias_adds_up`).
    """
    check_document(report, FIELDS, "curation_report", source)
    reasons = list(report["dropped"])
    unknown = sorted(set(reasons) - set(REASONS))
    if unknown:
        raise ContractError(f"{source}: unknown_drop_reason: {unknown}")
    if reasons != sorted(reasons, key=REASONS.index):
        raise ContractError(f"{source}: funnel_order broken: {reasons}")
    accounted = report["rows_out"] + report["eval_pairs"] + sum(report["dropped"].values())
    if accounted != report["rows_in"]:
        raise ContractError(
            f"{source}: rows_add_up broken: rows_out + eval_pairs + dropped != rows_in"
        )
    for side in ("rows_in", "rows_out", "eval_pairs"):
        if sum(counts[side] for counts in report["sources"].values()) != report[side]:
            raise ContractError(f"{source}: sources_add_up broken: sources' {side} != {side}")
    _check_eval_split(report, source)
    check_fields(report["length_bias"], LENGTH_BIAS_FIELDS, "length_bias.", source)
    for stage in ("in", "out"):
        for name, bias in report["length_bias"][stage].items():
            where = f"length_bias.{stage}.{name}."
            check_fields(bias, SOURCE_BIAS_FIELDS, where, source)
            if bias["chosen_longer"] + bias["rejected_longer"] + bias["equal"] != bias["pairs"]:
                raise ContractError(f"{source}: length_bias_adds_up broken at {where[:-1]}")
    if report["near_duplicates"] is not None:
        check_fields(report["near_duplicates"], NEAR_DUPLICATE_FIELDS, "near_duplicates.", source)
    return report


def _check_eval_split(report: dict, source: str) -> None:
    """An eval split has its fields, a known mode, and units <= prompts <= eval pairs;
    without one there are no eval pairs."""
    split = report["eval_split"]
    if split is None:
        if report["eval_pairs"]:
            raise ContractError(f"{source}: eval_split broken: eval pairs without an eval split")
        return
    check_fields(split, EVAL_SPLIT_FIELDS, "eval_split.", source)
    if split["mode"] not in EVAL_MODES:
        raise ContractError(f"{source}: eval_split.mode {split['mode']!r} not in {EVAL_MODES}")
    if not split["units"] <= split["prompts"] <= report["eval_pairs"]:
        raise ContractError(
            f"{source}: eval_split broken: units <= prompts <= eval_pairs does not hold"
        )
