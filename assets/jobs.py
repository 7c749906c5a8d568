"""Jobs: `source_job` (one run per source partition), `sample_job` (everything after), and
`difficulty_job` (difficulty scores, the selection and a model trained on it), with the
sample-sized run configs that `prefpack run` and the UI's launchpad both use.

Two jobs because an asset job holds assets of one partitioning: the sources are
partitioned by source family, the stages after them are not.
"""

import dagster as dg

from pipeline.sample_data import eval_prompts_path

SOURCE_ASSETS = ["raw_source", "normalized_pairs"]
STAGE_ASSETS = [
    "curated_pairs",
    "tokenized_pairs",
    "packed_shards",
    "eval_shards",
    "reference_logps",
    "eval_reference_logps",
    "trained_model",
]

# Sized for the bundled samples on 2 CPU cores: a tenth of the prompts held out for eval
# shards (some tens of pairs), evaluated every 10 steps; the contamination check against
# the eval prompts bundled with the samples (they overlap them on purpose: the funnel shows
# the rule at work); the tiny model from scratch, so a learning rate far above DPO's
# fine-tuning default (5e-7) to see the rewards separate in a minute.
SAMPLE_CONFIG = {
    "ops": {
        "curated_pairs": {"config": {"eval_share": 0.1, "eval_prompts": str(eval_prompts_path())}},
        "packed_shards": {"config": {"max_len": 1024}},
        "trained_model": {
            "config": {
                "steps": 60,
                "lr": 1e-3,
                "warmup_steps": 5,
                "batch_rows": 4,
                "eval_every": 10,
            }
        },
    }
}

# The console at INFO, through `assets.console` (an error as one line). Dagster uses a
# job's own console logger only for a run config that names it: `prefpack run` passes this
# with every run, and sample_job's and difficulty_job's default configs hold it, which
# Dagster keeps under a launch's config (`dg launch -c`) that has no `loggers:` of its own.
# (A partitioned job's default config is per partition, and `dg launch --partition` does
# not read it: source_job runs launched so log as Dagster's default console does.)
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

DIFFICULTY_ASSETS = ["difficulty_scores", "selected_shards", "selected_model"]

# Five fold models of the tiny model, each about two epochs of its 4/5 of the sample's pairs;
# the model on the selected shards is trained as `trained_model` is.
DIFFICULTY_CONFIG = {
    "ops": {
        "difficulty_scores": {
            "config": {"folds": 5, "steps": 20, "lr": 1e-3, "warmup_steps": 5, "batch_rows": 4}
        },
        "selected_shards": {"config": {"drop_hardest": 0.1}},
        "selected_model": SAMPLE_CONFIG["ops"]["trained_model"],
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
    config={**SAMPLE_CONFIG, **QUIET},
    description="Curate (holding out eval pairs), tokenize, pack (training and eval shards), "
    "reference log-probs of both, train and evaluate, sized for the samples.",
)

difficulty_job = dg.define_asset_job(
    "difficulty_job",
    selection=DIFFICULTY_ASSETS,
    config={**DIFFICULTY_CONFIG, **QUIET},
    description="Score every packed pair by k fold models (Selective DPO), drop the hardest "
    "share, pack the rest and train on it; sized for the samples (run sample_job first).",
)
