"""What `prefpack run` has to materialize: what is missing or stale on the instance, and
everything downstream of it; nothing when all is up to date.

An asset needs a run when one of these differs from its last materialization:
- its code version, or the data version of an input (what the UI shows as stale), read from
  the provenance Dagster records on every materialization (`dagster.DataProvenance`: the
  code version and the data versions of the inputs it read) against the inputs' latest
  data versions, with public API only;
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

from assets.configs import CurationConfig, TokenizationConfig
from assets.jobs import SOURCE_ASSETS, STAGE_ASSETS
from assets.keys import model_fingerprint
from assets.partitions import source_partitions
from assets.resources import SourcesResource
from assets.sources import fingerprint
from core.inputs import is_hub_id
from pipeline.presets import PRESETS, Preset, get_preset
from pipeline.shards import sha256_file
from pipeline.templates import BUILTIN_TEMPLATES
from pipeline.tokenize import tokenizer_files

BASE_MODEL = dg.AssetKey("base_model")
RAW_SOURCE = dg.AssetKey("raw_source")
SETTINGS_TAG = "prefpack/settings.{asset}"
# Where Dagster keeps an event's data version (its documented tags; no public constant).
DATA_VERSION_TAG = "dagster/data_version"
USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"


def observe_model(defs: dg.Definitions, instance: dg.DagsterInstance) -> bool:
    """Record `base_model`'s content fingerprint as its data version, only when it differs
    from the last one recorded (a runless observation: no run is launched).

    Returns:
        Whether a new fingerprint was recorded.
    """
    current = model_fingerprint(defs.resources["model"])
    if _model_version(instance) == current:
        return False
    tags = {DATA_VERSION_TAG: current, USER_PROVIDED_TAG: "true"}
    instance.report_runless_asset_event(dg.AssetObservation(BASE_MODEL, tags=tags))
    return True


def _model_version(instance: dg.DagsterInstance) -> str | None:
    """The data version `base_model` was last observed with."""
    records = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=BASE_MODEL), limit=1)
    return records.records[0].asset_observation.data_version if records.records else None


def _data_version(record: dg.EventLogRecord | None) -> str | None:
    return None if record is None else record.asset_materialization.tags.get(DATA_VERSION_TAG)


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
        return [Path(f) for f in (config.eval_prompts, config.benchmark_prompts) if f is not None]
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
    instance: dg.DagsterInstance,
    key: dg.AssetKey,
    partition: str | None = None,
    before: int | None = None,
) -> dg.EventLogRecord | None:
    """The last materialization of `key` (of one partition; with a storage id below
    `before` when given), or None."""
    records_filter = dg.AssetRecordsFilter(
        asset_key=key, asset_partitions=[partition] if partition else None, before_storage_id=before
    )
    records = instance.fetch_materializations(records_filter, limit=1).records
    return records[0] if records else None


def needs_run(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    key: dg.AssetKey,
    partition: str | None = None,
) -> bool:
    """Whether `key` (one `partition` of it) is missing or stale: its last materialization
    ran another code version, or read an input whose data version is not its latest.

    What a materialization read is in its provenance (`dagster.DataProvenance`): the data
    version of each input and the storage id of the input's latest event then. A
    partitioned input (raw_source into a normalized partition, every normalized partition
    into curation) is compared partition by partition: the data version each had at that
    event against its latest.
    """
    record = latest_materialization(instance, key, partition)
    provenance = record and dg.DataProvenance.from_tags(record.asset_materialization.tags)
    assets_def = defs.resolve_assets_def(key)
    if not provenance or provenance.code_version != assets_def.code_versions_by_key[key]:
        return True
    for upstream in assets_def.asset_deps[key]:
        if upstream == BASE_MODEL:
            read = provenance.input_data_versions.get(upstream)
            if read is None or read.value != _model_version(instance):
                return True
            continue
        partitions = defs.resolve_assets_def(upstream).partitions_def
        if partitions is None:
            read = provenance.input_data_versions.get(upstream)
            now = _data_version(latest_materialization(instance, upstream))
            if read is None or read.value != now:
                return True
            continue
        pointer = provenance.input_storage_ids.get(upstream)
        names = [partition] if partition else partitions.get_partition_keys()
        if pointer is None or any(_changed(instance, upstream, p, pointer) for p in names):
            return True
    return False


def _changed(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str, read: int) -> bool:
    """Whether `partition` of `key` has another data version now than at the event `read`
    (missing then or now counts as changed)."""
    then = latest_materialization(instance, key, partition, before=read + 1)
    now = latest_materialization(instance, key, partition)
    return then is None or now is None or _data_version(then) != _data_version(now)


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
    if record is None or not (is_hub_id(location) or Path(location).exists()):
        return True
    return _data_version(record) != fingerprint(location)[0]


def stale_partitions(
    defs: dg.Definitions, instance: dg.DagsterInstance, run_config: Mapping[str, Any]
) -> list[str]:
    """The source partitions whose ingest + normalize must run, in partition order."""
    keys = [dg.AssetKey(name) for name in SOURCE_ASSETS]
    return [
        partition
        for partition in source_partitions.get_partition_keys()
        if _input_changed(defs, instance, partition)
        or any(needs_run(defs, instance, key, partition) for key in keys)
        or not all(_same_settings(defs, instance, key, partition, run_config) for key in keys)
    ]


def stale_stages(
    defs: dg.Definitions, instance: dg.DagsterInstance, run_config: Mapping[str, Any]
) -> list[dg.AssetKey]:
    """The stage assets that are missing, stale or set up differently, plus everything
    downstream of them, in graph order (call after the source partitions ran)."""
    keys = [dg.AssetKey(name) for name in STAGE_ASSETS]
    changed = [
        key
        for key in keys
        if needs_run(defs, instance, key)
        or not _same_settings(defs, instance, key, None, run_config)
    ]
    if not changed:
        return []
    downstream = dg.AssetSelection.assets(*changed).downstream()
    selected = downstream.resolve(defs.resolve_asset_graph())
    return [key for key in keys if key in selected]
