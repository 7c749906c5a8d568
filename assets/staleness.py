"""What `prefpack run` has to materialize: what is missing or stale on the instance, and
everything downstream of it; nothing when all is up to date.

An asset needs a run when one of these differs from its last materialization:
- its code version, or the data version of an input (Dagster's own staleness,
  `CachingStaleStatusResolver`, what the UI shows as stale);
- for `raw_source`, the fingerprint of the files it reads now (the same `fingerprint` the
  asset stores as its data version), so an edited input file counts as a change;
- for the training assets, the model's content: `base_model` is observed first (recorded
  only when its fingerprint changed), so new weights at the same path make them stale;
- its settings: its op config in the run config, the config of the resources it uses and
  the content of the files they name (eval and benchmark prompts, tokenizer, chat
  template: an edit in place counts like naming another file) and what the presets they
  name set (a recipe changed by a new prefpack version), hashed into a tag of the
  run that materialized it (a run without the tag, e.g. one launched from the UI, counts
  as other settings: rerunning it reuses its result by key).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.definitions.data_version import (
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    CachingStaleStatusResolver,
    StaleStatus,
    extract_data_version_from_entry,
)
from dagster._core.event_api import EventLogRecord
from dagster._core.loader import LoadingContextForTest

from assets.configs import CurationConfig, TokenizationConfig
from assets.jobs import SOURCE_ASSETS, STAGE_ASSETS
from assets.keys import model_fingerprint
from assets.partitions import source_partitions
from assets.resources import SourcesResource
from assets.sources import fingerprint
from pipeline import ingest
from pipeline.presets import PRESETS, Preset, get_preset
from pipeline.sample_data import eval_prompts_path
from pipeline.shards import sha256_file
from pipeline.templates import BUILTIN_TEMPLATES
from pipeline.tokenize import tokenizer_files

BASE_MODEL = dg.AssetKey("base_model")
RAW_SOURCE = dg.AssetKey("raw_source")
SETTINGS_TAG = "prefpack/settings.{asset}"


def resolver(defs: dg.Definitions, instance: dg.DagsterInstance) -> CachingStaleStatusResolver:
    """Dagster's stale-status resolver over the instance as it is now (it caches: make a
    new one after a run). Its loading context is the minimal one Dagster ships, named for
    tests, which serves any one-shot request like this."""
    return CachingStaleStatusResolver(
        instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
    )


def observe_model(defs: dg.Definitions, instance: dg.DagsterInstance) -> bool:
    """Record `base_model`'s content fingerprint as its data version, only when it differs
    from the last one recorded (a runless observation: no run is launched).

    Returns:
        Whether a new fingerprint was recorded.
    """
    current = model_fingerprint(defs.resources["model"])
    record = instance.get_latest_data_version_record(BASE_MODEL, is_source=True)
    stored = extract_data_version_from_entry(record.event_log_entry) if record else None
    if stored is not None and stored.value == current:
        return False
    tags = {DATA_VERSION_TAG: current, DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}
    instance.report_runless_asset_event(dg.AssetObservation(BASE_MODEL, tags=tags))
    return True


def settings_version(
    defs: dg.Definitions,
    key: dg.AssetKey,
    run_config: Mapping[str, Any],
    partition: str | None = None,
) -> str:
    """A hash of what `key` (one `partition` of it) is configured with besides its inputs:
    its op config in `run_config`, the config of every resource it uses (of the sources
    resource, only what it says of `partition`), and the content of every file and preset
    those name (None for a file that is not there: the asset then names it)."""
    required = defs.resolve_assets_def(key).required_resource_keys
    resources = {
        name: _resource_config(defs.resources[name], partition) for name in sorted(required)
    }
    op_config = run_config.get("ops", {}).get(key.path[-1], {})
    files = {
        str(path): sha256_file(path) if path.is_file() else None
        for path in named_files(defs, key, op_config.get("config", {}))
    }
    presets = named_presets(defs, key, op_config.get("config", {}), partition)
    recipes = {
        name: {"options": preset.options, "curate": preset.curate, "thresholds": preset.thresholds}
        for name, preset in presets.items()
    }
    payload = json.dumps([op_config, resources, files, recipes], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def named_presets(
    defs: dg.Definitions,
    key: dg.AssetKey,
    op_config: Mapping[str, Any],
    partition: str | None = None,
) -> dict[str, Preset]:
    """The presets `key`'s settings name (for one source `partition`), by name: what a
    preset sets is part of the settings, so a recipe changed in a new version of prefpack
    reruns what used it."""
    if key.path[-1] == "curated_pairs":
        names = {CurationConfig(**op_config).preset}
    elif key.path[-1] in SOURCE_ASSETS:
        presets = defs.resources["sources"].presets
        names = set(presets.values()) if partition is None else {presets.get(partition)}
    else:
        names = set()
    return {name: get_preset(name) for name in sorted(names - {None}) if name in PRESETS}


def named_files(defs: dg.Definitions, key: dg.AssetKey, op_config: Mapping[str, Any]) -> list[Path]:
    """The files `key` reads that its settings name rather than its inputs: curation's
    eval and benchmark prompts, tokenization's tokenizer files and chat template. (Source
    files and model weights have their own fingerprints: `_input_changed`, `base_model`.)"""
    name = key.path[-1]
    if name == "curated_pairs":
        config = CurationConfig(**op_config)
        files = [config.benchmark_prompts]
        if config.use_eval_prompts:
            files.append(config.eval_prompts or eval_prompts_path())
        return [Path(f) for f in files if f is not None]
    if name == "tokenized_pairs":
        template = TokenizationConfig(**op_config).template
        tokenizer = defs.resources["tokenizer"].path
        files = [] if tokenizer is None else tokenizer_files(tokenizer)
        if template is not None and template not in BUILTIN_TEMPLATES:
            files.append(Path(template))
        return files
    return []


def _resource_config(resource: object, partition: str | None = None) -> object:
    """A resource's config (of the sources resource, what it says of `partition` alone
    when one is given: another source's settings do not change this one); the class name
    of a resource without config (the Pipes client)."""
    if isinstance(resource, SourcesResource) and partition is not None:
        fields = ("inputs", "options", "presets")
        return {name: getattr(resource, name).get(partition) for name in fields}
    if isinstance(resource, dg.Config):
        return resource.model_dump()
    return type(resource).__name__


def settings_tags(
    defs: dg.Definitions,
    keys: list[dg.AssetKey],
    run_config: Mapping[str, Any],
    partition: str | None = None,
) -> dict[str, str]:
    """The run tags that record the settings of each asset the run materializes (of
    `partition`, for a run of one source)."""
    return {
        SETTINGS_TAG.format(asset=key.path[-1]): settings_version(defs, key, run_config, partition)
        for key in keys
    }


def latest_materialization(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None
) -> EventLogRecord | None:
    """The last materialization of `key` (of one partition), or None."""
    records_filter = dg.AssetRecordsFilter(
        asset_key=key, asset_partitions=[partition] if partition else None
    )
    records = instance.fetch_materializations(records_filter, limit=1).records
    return records[0] if records else None


def _same_settings(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    key: dg.AssetKey,
    partition: str | None,
    run_config: Mapping[str, Any],
) -> bool:
    """Whether `key`'s last materialization ran with the settings it would run with now."""
    record = latest_materialization(instance, key, partition)
    run = instance.get_run_by_id(record.run_id) if record else None
    tag = SETTINGS_TAG.format(asset=key.path[-1])
    return run is not None and run.tags.get(tag) == settings_version(
        defs, key, run_config, partition
    )


def _input_changed(defs: dg.Definitions, instance: dg.DagsterInstance, partition: str) -> bool:
    """Whether the files `raw_source` reads for `partition` differ from the last
    materialization's fingerprint (or are gone: the asset then names the missing input)."""
    location = defs.resources["sources"].input_for(partition)
    record = latest_materialization(instance, RAW_SOURCE, partition)
    if record is None or not (ingest.is_hub_id(location) or Path(location).exists()):
        return True
    stored = extract_data_version_from_entry(record.event_log_entry)
    return stored is None or stored.value != fingerprint(location)[0]


def stale_partitions(
    defs: dg.Definitions, instance: dg.DagsterInstance, run_config: Mapping[str, Any]
) -> list[str]:
    """The source partitions whose ingest + normalize must run, in partition order."""
    statuses = resolver(defs, instance)
    keys = [dg.AssetKey(name) for name in SOURCE_ASSETS]
    return [
        partition
        for partition in source_partitions.get_partition_keys()
        if _input_changed(defs, instance, partition)
        or any(statuses.get_status(key, partition) != StaleStatus.FRESH for key in keys)
        or not all(_same_settings(defs, instance, key, partition, run_config) for key in keys)
    ]


def stale_stages(
    defs: dg.Definitions, instance: dg.DagsterInstance, run_config: Mapping[str, Any]
) -> list[dg.AssetKey]:
    """The stage assets that are missing, stale or set up differently, plus everything
    downstream of them, in graph order (call after the source partitions ran)."""
    statuses = resolver(defs, instance)
    keys = [dg.AssetKey(name) for name in STAGE_ASSETS]
    changed = [
        key
        for key in keys
        if statuses.get_status(key) != StaleStatus.FRESH
        or not _same_settings(defs, instance, key, None, run_config)
    ]
    if not changed:
        return []
    downstream = dg.AssetSelection.assets(*changed).downstream()
    selected = downstream.resolve(defs.resolve_asset_graph())
    return [key for key in keys if key in selected]
