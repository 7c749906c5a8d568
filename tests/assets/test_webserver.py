"""The real UI: `prefpack ui` serves the asset graph over GraphQL and runs a
materialization of the packed shards launched through it; then it stops cleanly."""

from __future__ import annotations

import re
import time

import dagster as dg
import pytest
from dagster._core.definitions.data_version import extract_data_version_from_entry

from assets.cli import LOCATION
from assets.definitions import ASSETS, build_definitions, build_resources
from tests.assets.webserver import graphql, running_ui

pytestmark = pytest.mark.slow

LAUNCH = """
mutation($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}"""

RUN = """
query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""

GRAPH = "{ assetNodes { assetKey { path } dependencyKeys { path } } }"


def test_ui_serves_graph_and_runs_packing(tmp_path) -> None:
    home, store = tmp_path / "dagster_home", tmp_path / "store"
    home.mkdir()
    # Upstream of the packed shards, in process, on the same instance and store.
    defs = build_definitions(build_resources(store))
    instance = dg.DagsterInstance.local_temp(tempdir=str(home))
    for partition in ("generic", "helpsteer3"):
        defs.resolve_job_def("source_job").execute_in_process(
            partition_key=partition, instance=instance
        )
    config = {"ops": {"curated_pairs": {"config": {"sources": ["generic", "helpsteer3"]}}}}
    dg.materialize(
        ASSETS,
        selection=["curated_pairs", "tokenized_pairs"],
        instance=instance,
        resources=defs.resources,
        run_config=config,
    )

    with running_ui(home, store, tmp_path / "ui.log") as port:
        nodes = graphql(port, GRAPH)["assetNodes"]
        edges = {
            "/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]}
            for n in nodes
        }
        assert edges["packed_shards"] == {"tokenized_pairs"}
        assert edges["trained_model"] == {
            "base_model",
            "curated_pairs",
            "packed_shards",
            "reference_logps",
            "eval_shards",
            "eval_reference_logps",
        }

        params = {
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": "__repository__",
                "pipelineName": "__ASSET_JOB",
                "assetSelection": [{"path": ["packed_shards"]}],
            },
            "mode": "default",
        }
        launched = graphql(port, LAUNCH, {"params": params})["launchPipelineExecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        status, deadline = None, time.monotonic() + 240
        while status not in ("SUCCESS", "FAILURE", "CANCELED") and time.monotonic() < deadline:
            time.sleep(2)
            status = graphql(port, RUN, {"id": run_id})["runOrError"]["status"]
        assert status == "SUCCESS", (tmp_path / "ui.log").read_text()[-3000:]
    # `prefpack ui` runs `dg dev`: no warning of ours or Dagster's (`dagster dev` printed
    # "SupersessionWarning: ... Use 'dg dev' instead").
    log = (tmp_path / "ui.log").read_text().splitlines()
    assert [line for line in log if re.search(r"\w+Warning\b", line)] == []
    # The packed asset's materialization is recorded with its cache key as data version.
    record = instance.get_latest_data_version_record(dg.AssetKey("packed_shards"))
    assert record is not None
    assert len(extract_data_version_from_entry(record.event_log_entry).value) == 20
