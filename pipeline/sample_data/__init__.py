"""Small sample files of every source, written by us in each source's real schema.

They feed `prefpack run` and the Dagster job on a fresh machine; regenerate them with
`python -m pipeline.sample_data.generate` (seeded, byte-identical).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent

# Source name -> file name (the format each source ships in on the hub).
SAMPLES = {
    "helpsteer": "helpsteer.jsonl",
    "helpsteer2": "helpsteer2.jsonl.gz",
    "helpsteer2_preference": "helpsteer2_preference.jsonl",
    "helpsteer3": "helpsteer3.jsonl",
    "ultrafeedback": "ultrafeedback.jsonl",
    "ultrafeedback_binarized": "ultrafeedback_binarized.parquet",
    "generic": "generic.jsonl",
}
EVAL_PROMPTS = "eval_prompts.txt"


def sample_path(source: str) -> Path:
    """The bundled sample file of `source`.

    Raises:
        ValueError: naming an unknown source and the known ones.
    """
    if source not in SAMPLES:
        raise ValueError(f"no sample for {source!r}; samples: {', '.join(SAMPLES)}")
    return HERE / SAMPLES[source]


def eval_prompts_path() -> Path:
    """A few eval prompts that overlap the samples, for the contamination check."""
    return HERE / EVAL_PROMPTS
