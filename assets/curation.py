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
from pipeline.flags import config_from
from pipeline.sample_data import eval_prompts_path

CODE_VERSION = "1"


@dg.asset(
    group_name="curation",
    code_version=CODE_VERSION,
    check_specs=checks.specs("curated_pairs", checks.SCHEMA, checks.ACCOUNTING),
    description="Pairs of the selected sources after dedup, ties, empty and length rules, "
    "margin/score bands, language/domain selection, contamination and per-prompt caps; "
    "every drop counted by reason.",
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
    dirs = [normalized_pairs[s] for s in config.sources]
    pairs = read_pairs(dirs)
    eval_file = config.eval_prompts or str(eval_prompts_path())
    eval_prompts = load_eval_prompts(eval_file) if config.use_eval_prompts else None
    result = curate(pairs, config_from(CurateConfig, config), eval_prompts)
    out = write_curated(result, store.path("curated"))
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
            "chosen_chars": histogram(_lengths(kept, "chosen"), unit="chosen chars"),
            "rejected_chars": histogram(_lengths(kept, "rejected"), unit="rejected chars"),
        },
    )
    yield checks.check_schema(out, with_quarantine=False)
    yield checks.check_curate_accounting(out, pairs_in=pairs.num_rows)


def _lengths(table, column: str) -> np.ndarray:
    return pc.utf8_length(table[column]).to_numpy(zero_copy_only=False)
