"""An IO manager that stores what assets return, paths, as small JSON files.

Assets in prefpack hand each other directories and files in the store, never data. The
default IO manager would pickle those strings; this one writes `{"path": ...}` under
`<store>/.io/` (atomically), readable by any tool, and fans partitioned upstreams in as a dict.
An asset with nothing to hand on (`eval_shards` without an eval split) returns None, stored
as `{"path": null}` and loaded as None.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from core.atomic import atomic_file


class PathIOManager(dg.ConfigurableIOManager):
    """Persist each asset's returned path as JSON under `<root>/.io/<asset key>/`."""

    root: str

    def _file(self, key: dg.AssetKey, partition: str | None) -> Path:
        return Path(self.root, ".io", *key.path, f"{partition or '__all__'}.json")

    def handle_output(self, context: dg.OutputContext, obj: str | None) -> None:
        if obj is not None and not isinstance(obj, str):
            raise TypeError(
                f"{context.asset_key.to_user_string()} must return a path string or None"
            )
        partition = context.partition_key if context.has_partition_key else None
        with atomic_file(self._file(context.asset_key, partition)) as tmp:
            tmp.write_text(json.dumps({"path": obj}))

    def load_input(self, context: dg.InputContext) -> str | dict[str, str] | None:
        key = context.asset_key
        if context.has_asset_partitions and not context.has_partition_key:
            # Fan-in to an unpartitioned asset: every materialized upstream partition.
            found = {}
            for partition in context.asset_partition_keys:
                file = self._file(key, partition)
                if file.exists():
                    found[partition] = json.loads(file.read_text())["path"]
            return found
        partition = context.asset_partition_key if context.has_asset_partitions else None
        file = self._file(key, partition)
        if not file.exists():
            where = f" partition {partition!r}" if partition else ""
            raise FileNotFoundError(
                f"{key.to_user_string()}{where} has not been materialized in store {self.root!r}"
            )
        return json.loads(file.read_text())["path"]
