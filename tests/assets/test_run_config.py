"""`prefpack run --config FILE.yaml`: each mistake of the file or of what it points at is
one line naming the key, exit status 2, before anything launches; a resource's check is
one line in a run's failure too (the path of `dg launch -c` and the UI) and on the
console; the YAML of docs/real-data.md validates.

Nothing here runs past a source's first step (the graph tests run a valid file:
`tests/assets/test_graph.py`).
"""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import pytest
import yaml

import prefpack
from assets import run_config
from assets.definitions import build_definitions, build_resources
from assets.jobs import QUIET
from assets.run_config import OP_CONFIGS, config_problems, configured_resources, launch_problems
from core.inputs import is_hub_id
from tests.conftest import FIXTURES

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "real-data.md"
UNKNOWN_SOURCE = "sources.inputs.helpsteer_3: unknown source (did you mean helpsteer3?)"


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """`prefpack run --config run.yaml` (in `tmp_path`, on a store and instance there) on
    a file of the given text: (exit status, the lines on stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))

    def call(text: str) -> tuple[int, list[str]]:
        Path("run.yaml").write_text(text, encoding="utf-8")
        status = prefpack.main(["run", "--config", "run.yaml", "--store", "store"])
        return status, capsys.readouterr().err.splitlines()

    return call


def _ops(asset: str, **config: object) -> str:
    return yaml.safe_dump({"ops": {asset: {"config": config}}})


def _resource(name: str, **config: object) -> str:
    return yaml.safe_dump({"resources": {name: {"config": config}}})


@pytest.mark.parametrize(
    ("text", "line"),
    [
        pytest.param(
            _ops("trained_model", stepz=10),
            "ops.trained_model.config.stepz: unknown key (did you mean steps?)",
            id="unknown-key",
        ),
        pytest.param(
            _ops("trained_model", steps="ten"),
            "ops.trained_model.config.steps: expected an integer, got 'ten'",
            id="wrong-type",
        ),
        pytest.param(
            _ops("trained_model", steps=0),
            "ops.trained_model.config.steps: must be >= 1, got 0",
            id="out-of-range",
        ),
        pytest.param(
            _resource("sources", inputs={"helpsteer_3": str(FIXTURES / "helpsteer3.jsonl")}),
            "resources.sources.config.inputs.helpsteer_3: unknown source (did you mean "
            "helpsteer3?)",
            id="unknown-source",
        ),
        pytest.param(
            _resource("sources", inputs={"helpsteer3": "data/helpsteer3.jsonl"}),
            "resources.sources.config.inputs.helpsteer3: 'data/helpsteer3.jsonl' does not exist "
            "(neither a local file or directory nor a hub id)",
            id="missing-input",
        ),
        pytest.param(
            _resource("model", path="models/base"),
            "resources.model.config.path: 'models/base' does not exist (a local Hugging Face "
            "folder)",
            id="missing-model",
        ),
        pytest.param(
            _resource("tokenizer", path="tokenizers/chatml.json"),
            "resources.tokenizer.config.path: 'tokenizers/chatml.json' does not exist",
            id="missing-tokenizer",
        ),
    ],
)
def test_each_mistake_is_one_line_naming_its_key(run, text: str, line: str) -> None:
    status, err = run(text)
    assert (status, err) == (2, [f"prefpack run: error: run.yaml: {line}"])
    assert not Path("home").exists() and not Path("store").exists()  # nothing launched


def test_every_problem_of_a_file_is_a_line(run) -> None:
    """Keys and types first (Dagster's schema), the ranges of the sections those leave
    right; a missing key at the file's top level, and one the store has its flag for."""
    text = yaml.safe_dump(
        {
            "ops": {
                "trained_model": {"config": {"stepz": 10, "lr": "fast"}},
                "packed_shards": {"config": {"max_len": 1}},
                "curated_pairs": {"config": {"near_dup_threshold": 2.0}},
            },
            "resources": {"compute": {"config": {"precision": "fp16"}}},
        }
    )
    status, err = run(text)
    assert status == 2
    assert [line.removeprefix("prefpack run: error: run.yaml: ") for line in err] == [
        "ops.trained_model.config.stepz: unknown key (did you mean steps?)",
        "ops.trained_model.config.lr: expected a number, got 'fast'",
        "resources.compute.config.precision: expected one of fp32, bf16, got 'fp16'",
        "ops.curated_pairs.config.near_dup_threshold: must be <= 1.0, got 2.0",
        "ops.packed_shards.config.max_len: must be >= 3, got 1",
    ]
    status, err = run(yaml.safe_dump({"execution": {}, "resources": {"store": {}}}))
    assert err == [
        "prefpack run: error: run.yaml: execution: not read by prefpack run (it takes ops "
        "and resources)",
        "prefpack run: error: run.yaml: resources.store: set the store with --store or "
        "PREFPACK_STORE (it roots the IO manager too)",
    ]


def test_a_file_that_is_not_a_run_config_is_one_line(run) -> None:
    assert run("ops: [") == (
        2,
        [
            "prefpack run: error: run.yaml: not YAML (line 1): expected the node content, "
            "but found '<stream end>'"
        ],
    )
    assert run("- ops") == (
        2,
        ["prefpack run: error: run.yaml: a run config is a mapping of ops: and resources:"],
    )


def test_a_hub_id_is_no_missing_input(tmp_path: Path) -> None:
    defs = build_definitions(build_resources(tmp_path / "store"))
    given = yaml.safe_load(
        _resource("sources", inputs={"ultrafeedback_binarized": "HuggingFaceH4/ultrafeedback"})
    )
    assert config_problems(defs, given) == []
    assert launch_problems({**defs.resources, **configured_resources(defs, given)}, given) == []


def test_the_op_configs_are_those_of_sample_job(tmp_path: Path) -> None:
    """`OP_CONFIGS` (which range-checks each op) names every sample_job asset with a config."""
    job = build_definitions(build_resources(tmp_path)).resolve_job_def("sample_job")
    ops = dg.validate_run_config(job)["ops"]
    assert set(OP_CONFIGS) == {name for name, op in ops.items() if op["config"] is not None}


def test_a_resource_check_fails_the_run_with_one_line(tmp_path: Path, capsys) -> None:
    """What `dg launch -c` and the UI get, the run config naming the resources: the step
    fails with the resource's line as its Failure (the message the UI shows), and the
    console shows that line without a stack trace."""
    defs = build_definitions(build_resources(tmp_path / "store"))
    inputs = {"helpsteer_3": str(FIXTURES / "helpsteer3.jsonl")}
    config = {"resources": {"sources": {"config": {"inputs": inputs}}}, **QUIET}
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("source_job").execute_in_process(
            run_config=config, partition_key="helpsteer3", instance=instance, raise_on_error=False
        )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_failure_data.user_failure_data.description == UNKNOWN_SOURCE
    message = failure.step_failure_data.error.message.strip()
    assert message.endswith(f"Failure: {UNKNOWN_SOURCE}") and "\n" not in message
    run_failure = result.get_run_failure_event().event_specific_data.error
    assert run_failure.message.strip().endswith(UNKNOWN_SOURCE)
    console = capsys.readouterr().err
    assert f'Execution of step "raw_source" failed. {UNKNOWN_SOURCE}' in console
    assert "Stack Trace" not in console and "Traceback" not in console


def test_prefpack_run_prints_a_failing_step_as_one_line(run, monkeypatch) -> None:
    """A resource that breaks after the checks (here: the checks skipped) fails its step as
    the run starts, and `prefpack run` prints the Failure's line, no stack trace."""
    monkeypatch.setattr(run_config, "launch_problems", lambda resources, given: [])
    status, err = run(_resource("sources", inputs={"helpsteer_3": "/data/helpsteer3"}))
    assert status == 2 and err[-1] == f"prefpack run: error: {UNKNOWN_SOURCE}"
    assert not any("Stack Trace" in line or "Traceback" in line for line in err)


# ---------------------------------------------------------------------------------------
# docs/real-data.md


def _doc_config() -> dict:
    block = re.search(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert block, "no yaml block in docs/real-data.md"
    return yaml.safe_load(block.group(1))


def test_the_yaml_in_the_docs_validates(tmp_path: Path) -> None:
    """Its keys, types and ranges, its source names, presets and options are right; only
    its example paths are missing here (its hub id is none of them)."""
    config = _doc_config()
    defs = build_definitions(build_resources(tmp_path / "store"))
    assert config_problems(defs, config) == []
    resources = {**defs.resources, **configured_resources(defs, config)}
    assert resources["sources"].settings_problems() == []
    problems = launch_problems(resources, config)
    assert problems and all("does not exist" in p for p in problems)
    hub_ids = [name for name, given in resources["sources"].inputs.items() if is_hub_id(given)]
    assert hub_ids and not any(name in p for name in hub_ids for p in problems)


def test_the_yaml_in_the_docs_passes_every_check_with_its_paths_there(tmp_path: Path) -> None:
    """The same file, its local paths pointed at test-sized stand-ins: nothing to report."""
    config = _doc_config()
    sources = config["resources"]["sources"]["config"]["inputs"]
    for name, given in sources.items():
        if given.startswith("/"):
            folder = tmp_path / name
            folder.mkdir()
            sources[name] = str(folder)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config["resources"]["model"]["config"]["path"] = str(model)
    config["resources"]["tokenizer"]["config"]["path"] = str(FIXTURES / "chatml_tokenizer")
    evals = tmp_path / "evals.txt"
    evals.write_text("What is the capital of France?\n")
    config["ops"]["curated_pairs"]["config"]["eval_prompts"] = str(evals)
    defs = build_definitions(build_resources(tmp_path / "store"))
    assert config_problems(defs, config) == []
    assert launch_problems({**defs.resources, **configured_resources(defs, config)}, config) == []


def test_the_commands_in_the_docs_parse() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert "prefpack run --config real-data.yaml" in text
    assert "dg launch --job sample_job -c real-data.yaml" in text
    args = prefpack.build_parser().parse_args(["run", "--config", "real-data.yaml"])
    assert args.config == Path("real-data.yaml")
