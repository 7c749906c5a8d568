"""Fixtures of the Dagster tests: resources rooted in a temporary store, sources reading
`tests/fixtures` (each source's real schema), and a throwaway instance.

Both are shared by the tests of one module (a graph build takes about 40 s): a module's
tests run in file order on one instance and store, each leaving it in a state the next
ones expect.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from assets.definitions import build_resources
from assets.resources import SourcesResource
from pipeline.sample_data import eval_prompts_path
from tests.conftest import FIXTURES

FIXTURE_INPUTS = {
    "helpsteer": "helpsteer.jsonl",
    "helpsteer2": "helpsteer2.jsonl",
    "helpsteer2_preference": "helpsteer2_preference.jsonl",
    "helpsteer3": "helpsteer3.jsonl",
    "ultrafeedback": "ultrafeedback_list.jsonl",
    "ultrafeedback_binarized": "ultrafeedback_binarized.jsonl",
    "generic": "generic.jsonl",
}

# Small enough for a test, large enough that every stage does real work: a few pairs held
# out, so eval_shards packs some, and the rest more than one 512-token row, so a run of two
# processes splits its global batch; the contamination check on, as in the sample job.
TEST_CONFIG = {
    "ops": {
        "curated_pairs": {"config": {"eval_pairs": 2, "eval_prompts": str(eval_prompts_path())}},
        "tokenized_pairs": {"config": {"bpe_vocab_size": 400}},
        "packed_shards": {"config": {"max_len": 512, "min_fill_ratio": 0.0}},
        "reference_logps": {"config": {"batch_rows": 4}},
        "trained_model": {"config": {"steps": 2, "lr": 1e-3, "warmup_steps": 1, "batch_rows": 2}},
    }
}


@pytest.fixture(scope="module")
def module_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("graph")


@pytest.fixture(scope="module")
def instance(module_root: Path) -> Iterator[dg.DagsterInstance]:
    home = module_root / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        yield instance


@pytest.fixture(scope="module")
def resources(module_root: Path) -> dict[str, object]:
    inputs = {source: str(FIXTURES / name) for source, name in FIXTURE_INPUTS.items()}
    return build_resources(module_root / "store", sources=SourcesResource(inputs=inputs))
