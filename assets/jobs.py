"""Jobs: `source_job` (one run per source partition) and `sample_job` (everything after),
with the sample-sized run config that `prefpack run` and the UI's launchpad both use.

Two jobs because an asset job holds assets of one partitioning: the sources are
partitioned by source family, the stages after them are not.
"""

import dagster as dg

SOURCE_ASSETS = ["raw_source", "normalized_pairs"]
STAGE_ASSETS = [
    "curated_pairs",
    "tokenized_pairs",
    "packed_shards",
    "reference_logps",
    "trained_model",
]

# Sized for the bundled samples on 2 CPU cores: the tiny model from scratch, so a learning
# rate far above DPO's fine-tuning default (5e-7) to see the rewards separate in a minute.
SAMPLE_CONFIG = {
    "ops": {
        "packed_shards": {"config": {"max_len": 1024}},
        "trained_model": {"config": {"steps": 60, "lr": 1e-3, "warmup_steps": 5, "batch_rows": 4}},
    }
}

source_job = dg.define_asset_job(
    "source_job",
    selection=SOURCE_ASSETS,
    description="Ingest and normalize one source (run one per partition, or a backfill).",
)

sample_job = dg.define_asset_job(
    "sample_job",
    selection=STAGE_ASSETS,
    config=SAMPLE_CONFIG,
    description="Curate, tokenize, pack, reference log-probs and train, sized for the samples.",
)
