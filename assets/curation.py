"""`curated_pairs`: the selected sources' pairs through the curation funnel."""

import dagster as dg
import numpy as np
import pyarrow.compute as pc

from assets import checks
from assets.configs import CurationConfig, given_values
from assets.metadata import histogram, records_table
from assets.plots import funnel_plot, length_bias_plot
from assets.resources import StoreResource
from core.settings import config_from
from pipeline.curate import CurateConfig, curate, load_eval_prompts, read_pairs, write_curated
from pipeline.presets import curate_config, get_preset, with_preset

# 2: near-duplicates, length bias, the curation_report contract; 3: the best pairs of a
# group by margin standing within each source; 4: the eval split (eval_pairs.parquet);
# 5: no contamination check unless eval_prompts names a file (sample_job names the bundled one)
CODE_VERSION = "5"


@dg.asset(
    group_name="curation",
    code_version=CODE_VERSION,
    check_specs=checks.specs("curated_pairs", checks.SCHEMA, checks.ACCOUNTING),
    description="Pairs of the selected sources after dedup, ties, empty and length rules, "
    "length-ratio cap, margin/score bands, language/domain selection, benchmark questions, "
    "contamination, near-duplicate prompts, per-prompt caps and the chosen-longer share "
    "(optionally as a preset's recipe); every drop counted by reason, length bias reported "
    "per source. With an eval split (eval_share, eval_pairs or eval_splits), whole prompts "
    "(and near-duplicate groups) are held out in eval_pairs.parquet, never trained on.",
)
def curated_pairs(
    context: dg.AssetExecutionContext,
    config: CurationConfig,
    normalized_pairs: dict[str, str],
    store: StoreResource,
):
    missing = [s for s in config.sources if s not in normalized_pairs]
    if missing:
        raise ValueError(
            "normalized_pairs has no materialization for source(s) "
            + ", ".join(missing)
            + ": materialize those partitions first, or leave them out of config.sources"
        )
    preset = None if config.preset is None else get_preset(config.preset)
    given = given_values(config, fields_set(context, config))
    config_from(CurateConfig, given)  # the fields set, checked before any data is read
    dirs = [normalized_pairs[s] for s in config.sources]
    eval_prompts = None if config.eval_prompts is None else load_eval_prompts(config.eval_prompts)
    benchmark = None
    if config.benchmark_prompts is not None:
        benchmark = load_eval_prompts(config.benchmark_prompts)
    elif preset is not None and preset.benchmark_prompts:
        context.log.warning(
            f"no benchmark_prompts ({preset.benchmark_prompts}), so preset {preset.name} keeps "
            "prompts that ask one under other sources"
        )
    pairs = read_pairs(dirs)
    result = curate(pairs, curate_config(preset, given, pairs), eval_prompts, benchmark)
    out = write_curated(with_preset(result, preset), store.path("curated"))
    report = result.report
    kept = result.pairs
    yield dg.MaterializeResult(
        value=str(out),
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "rows_in": report["rows_in"],
            "rows_out": report["rows_out"],
            "dropped": sum(report["dropped"].values()),
            "dropped_path": dg.MetadataValue.path(str(out / report["dropped_file"])),
            "eval_pairs": report["eval_pairs"],
            "eval_split": _eval_split(report["eval_split"]),
            "eval_units": (report["eval_split"] or {}).get("units", 0),
            "eval_path": dg.MetadataValue.path(str(out / report["eval_file"])),
            "funnel": _funnel(report),
            "funnel_plot": funnel_plot(
                report["dropped"], kept=report["rows_out"], held_out=report["eval_pairs"]
            ),
            "by_source": records_table(
                [
                    {
                        "source": s,
                        "pairs in": counts["rows_in"],
                        "pairs out": counts["rows_out"],
                        "eval pairs": counts["eval_pairs"],
                    }
                    for s, counts in report["sources"].items()
                ]
            ),
            "attribute_agreement": _attribute_agreement(report["attribute_agreement"]),
            "eval_prompts": dg.MetadataValue.text(config.eval_prompts or "(off)"),
            "length_bias": records_table(_length_bias_rows(report["length_bias"])),
            "length_bias_plot": length_bias_plot(report["length_bias"]),
            "chosen_longer_share": _chosen_longer_share(report["length_bias"]["out"]),
            "near_duplicates": _near_duplicates(report["near_duplicates"]),
            "benchmark_prompts": dg.MetadataValue.text(config.benchmark_prompts or "(off)"),
            "preset": dg.MetadataValue.text(config.preset or "(none)"),
            "chosen_chars": histogram(_lengths(kept, "chosen"), unit="chosen chars"),
            "rejected_chars": histogram(_lengths(kept, "rejected"), unit="rejected chars"),
        },
    )
    yield checks.check_schema(out, with_quarantine=False)
    yield checks.check_curate_accounting(out, pairs_in=pairs.num_rows)


def _funnel(report: dict) -> dg.MetadataValue:
    """The rules in the order they ran, each with the pairs it dropped and those left,
    then the pairs held out for eval (when a split is configured): what is left is the
    training set."""
    left = report["rows_in"]
    rows = [{"rule": "(pairs in)", "dropped": 0, "left": left, "share left": "100.0%"}]
    steps = list(report["dropped"].items())
    if report["eval_split"] is not None:
        steps.append(("(held out for eval)", report["eval_pairs"]))
    for rule, dropped in steps:
        left -= dropped
        rows.append(
            {
                "rule": rule,
                "dropped": dropped,
                "left": left,
                "share left": f"{left / (report['rows_in'] or 1):.1%}",
            }
        )
    return records_table(rows)


def _eval_split(split: dict | None) -> dg.MetadataValue:
    """How the eval pairs were chosen, in words."""
    if split is None:
        return dg.MetadataValue.text("(off: set eval_share, eval_pairs or eval_splits)")
    return dg.MetadataValue.text(
        f"{split['mode']} {split['setting']} (seed {split['seed']}): {split['prompts']:,} "
        f"prompts in {split['units']:,} units (prompts or near-duplicate groups)"
    )


def _attribute_agreement(agreement: dict) -> dg.MetadataValue:
    """How often each attribute rates chosen above rejected (agree), below (conflict) or
    equal (tie), as shares of the pairs rated on it: a row naming each source, then one
    per attribute, so the table stays narrow (the UI cuts a wide one at its edge)."""
    lines = [
        "| attribute | pairs | agree | conflict | tie |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for source, attributes in agreement.items():
        lines.append(f"| **{source}** | | | | |")
        for name, stats in attributes.items():
            shares = [stats[k] / (stats["pairs"] or 1) for k in ("agree", "conflict", "tie")]
            cells = " | ".join(f"{share:.0%}" for share in shares)
            lines.append(f"| {name} | {stats['pairs']:,} | {cells} |")
    return dg.MetadataValue.md("\n".join(lines) if agreement else "(no rated attributes)")


def _length_bias_rows(bias: dict) -> list[dict]:
    rows = []
    for source in sorted(bias["in"]):
        for stage in ("in", "out"):
            stats = bias[stage].get(source)
            if stats is None:
                continue
            q = stats["ratio_quantiles"]
            rows.append(
                {
                    "source": source,
                    "stage": stage,
                    "pairs": stats["pairs"],
                    "chosen longer": f"{stats['chosen_longer_share']:.1%}",
                    "ratio p05": q["p05"],
                    "p25": q["p25"],
                    "p50": q["p50"],
                    "p75": q["p75"],
                    "p95": q["p95"],
                }
            )
    return rows


def _chosen_longer_share(out: dict) -> dg.MetadataValue:
    """Over every kept pair: a number, so the UI plots it across materializations."""
    pairs = sum(stats["pairs"] for stats in out.values())
    longer = sum(stats["chosen_longer"] for stats in out.values())
    return dg.MetadataValue.float(round(longer / pairs, 4) if pairs else float("nan"))


def _near_duplicates(summary: dict | None) -> dg.MetadataValue:
    """The near-duplicate groups found, and a few of them to judge the threshold by."""
    if summary is None:
        return dg.MetadataValue.md("(off: set near_dup_threshold)")
    counts = {k: v for k, v in summary.items() if k != "examples"}
    lines = [records_table([counts]).md_str, "", "Largest groups (normalized prompts):"]
    for i, group in enumerate(summary["examples"], 1):
        lines += [f"{i}. " + " / ".join(f"`` {text} ``" for text in group)]
    return dg.MetadataValue.md("\n".join(lines))


def fields_set(context: dg.AssetExecutionContext, config: dg.Config) -> set[str]:
    """The config fields the user set, even at their default: the keys of this asset's config
    in the run config (Dagster builds `config` with only the values that differ from the
    default); invoked directly, without a run, the fields `config` was built with."""
    try:
        run_config = context.run.run_config
    except dg.DagsterError:  # invoked directly: the context has no run
        return set(config.model_fields_set)
    return set(run_config.get("ops", {}).get(context.op_def.name, {}).get("config", {}))


def _lengths(table, column: str) -> np.ndarray:
    return pc.utf8_length(table[column]).to_numpy(zero_copy_only=False)
