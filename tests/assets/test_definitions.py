"""The Definitions load, and the asset graph matches its reviewed snapshot.

The snapshot (keys, deps, groups, partitions, code versions, checks) makes every change to
the graph visible in review. After an intended change, regenerate it with
`PREFPACK_UPDATE_SNAPSHOTS=1 pytest tests/assets/test_definitions.py` and commit the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from assets.definitions import defs

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def _graph(definitions: dg.Definitions) -> dict:
    graph = definitions.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "partitioned": node.partitions_def is not None,
            "code_version": node.code_version,
            "checks": sorted(
                f"{spec.name}{' (blocking)' if spec.blocking else ''}"
                for spec in map(graph.get_check_spec, node.check_keys)
            ),
        }
    return {"assets": assets, "jobs": sorted(j.name for j in definitions.resolve_all_job_defs())}


def test_definitions_load() -> None:
    dg.Definitions.validate_loadable(defs)
    assert {"raw_source", "packed_shards", "trained_model"} <= {
        k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()
    }


def test_asset_graph_matches_snapshot() -> None:
    current = _graph(defs)
    if os.environ.get("PREFPACK_UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(current, indent=2) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())
