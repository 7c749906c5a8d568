"""`curated_pairs`: the selected sources' pairs through the curation funnel."""

import dagster as dg
import numpy as np
import pyarrow.compute as pc

from assets import checks
from assets.configs import CurationConfig
from assets.metadata import count_table, histogram, records_table
from assets.plots import funnel_plot
from assets.resources import StoreResource
from pipeline.curate import CurateConfig, curate, load_eval_prompts, read_pairs, write_curated
from pipeline.flags import config_from, given_values
from pipeline.presets import curate_config, get_preset, with_preset
from pipeline.sample_data import eval_prompts_path

CODE_VERSION = "1"


@dg.asset(
    group_name="curation",
    code_version=CODE_VERSION,
    check_specs=checks.specs("curated_pairs", checks.SCHEMA, checks.ACCOUNTING),
    description="Pairs of the selected sources after dedup, ties, empty and length rules, "
    "margin/score bands, language/domain selection, benchmark questions, contamination and "
    "per-prompt caps (optionally as a preset's recipe); every drop counted by reason.",
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
    eval_file = config.eval_prompts or str(eval_prompts_path())
    eval_prompts = load_eval_prompts(eval_file) if config.use_eval_prompts else None
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
    agreement = [
        {"source": source, "attribute": name, **stats}
        for source, attributes in report["attribute_agreement"].items()
        for name, stats in attributes.items()
    ]
    yield dg.Output(
        str(out),
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "rows_in": report["rows_in"],
            "rows_out": report["rows_out"],
            "dropped": sum(report["dropped"].values()),
            "dropped_path": dg.MetadataValue.path(str(out / report["dropped_file"])),
            "funnel": count_table(
                {**report["dropped"], "kept": report["rows_out"]}, total=report["rows_in"]
            ),
            "funnel_plot": funnel_plot(report["dropped"], kept=report["rows_out"]),
            "by_source": records_table(
                [{"source": s, **counts} for s, counts in report["sources"].items()]
            ),
            "attribute_agreement": records_table(agreement),
            "eval_prompts": eval_file if eval_prompts is not None else "(off)",
            "benchmark_prompts": config.benchmark_prompts or "(off)",
            "preset": config.preset or "(none)",
            "chosen_chars": histogram(_lengths(kept, "chosen"), unit="chosen chars"),
            "rejected_chars": histogram(_lengths(kept, "rejected"), unit="rejected chars"),
        },
    )
    yield checks.check_schema(out, with_quarantine=False)
    yield checks.check_curate_accounting(out, pairs_in=pairs.num_rows)


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
