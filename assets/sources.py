"""Source assets, one partition per source family: ingest, then normalize.

`raw_source` resolves where a source reads from (bundled sample, local path or hub id) and
fingerprints it; its data version is that fingerprint, so an unchanged input leaves
everything downstream in sync. `normalized_pairs` maps it to canonical pairs plus
quarantine and dropped rows (each findable by file and row index), with the counts by reason
and the paths of both tables on the asset.
"""

import hashlib
from pathlib import Path

import dagster as dg

from assets import checks
from assets.metadata import count_table
from assets.partitions import source_partitions
from assets.resources import SourcesResource, StoreResource
from core.inputs import is_hub_id
from pipeline.normalize import normalize, write_normalized

CODE_VERSION = "1"


def fingerprint(location: str) -> tuple[str, int, int]:
    """(sha256 over the input's files, files, bytes); a hub id is fingerprinted by name."""
    if is_hub_id(location) and not Path(location).exists():
        return "hub:" + location, 0, 0
    path = Path(location)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest, size = hashlib.sha256(), 0
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    return digest.hexdigest()[:32], len(files), size


@dg.asset(
    partitions_def=source_partitions,
    group_name="sources",
    code_version=CODE_VERSION,
    description="Where one source reads from (bundled sample, local file/dir or hub id), "
    "fingerprinted so unchanged inputs keep downstream in sync.",
)
def raw_source(
    context: dg.AssetExecutionContext, sources: SourcesResource
) -> dg.MaterializeResult[str]:
    source = context.partition_key
    sources.check(source)
    location = sources.input_for(source)
    digest, files, size = fingerprint(location)
    return dg.MaterializeResult(
        value=location,
        data_version=dg.DataVersion(digest),
        metadata={
            "input": location,
            "kind": "hub" if digest.startswith("hub:") else "local",
            "files": files,
            "bytes": size,
            "fingerprint": digest,
        },
    )


@dg.asset(
    partitions_def=source_partitions,
    group_name="sources",
    code_version=CODE_VERSION,
    check_specs=checks.specs("normalized_pairs", checks.SCHEMA, checks.ACCOUNTING),
    description="One source mapped to canonical preference pairs; rows that cannot be mapped "
    "go to quarantine with a reason code, rows that form no pair to dropped.parquet.",
)
def normalized_pairs(
    context: dg.AssetExecutionContext,
    raw_source: str,
    sources: SourcesResource,
    store: StoreResource,
):
    source = context.partition_key
    sources.check(source)
    result = normalize(
        source, raw_source, sources.preset_for(source), **sources.options_for(source)
    )
    out = write_normalized(result, store.path("normalized", source))
    report = result.report
    yield dg.MaterializeResult(
        value=str(out),
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "rows_in": report["rows_in"],
            "pairs_out": report["pairs_out"],
            "quarantined": sum(report["quarantined"].values()),
            "dropped": sum(report["dropped"].values()),
            "quarantine_by_reason": count_table(report["quarantined"], total=report["rows_in"]),
            "dropped_by_reason": count_table(report["dropped"], total=report["rows_in"]),
            "quarantine_path": dg.MetadataValue.path(str(out / report["quarantine_file"])),
            "dropped_path": dg.MetadataValue.path(str(out / report["dropped_file"])),
            "score_scale": report["score_scale"],
            "preset": dg.MetadataValue.text(report["preset"] or "(none)"),
        },
    )
    yield checks.check_schema(out, with_quarantine=True)
    yield checks.check_normalize_accounting(out)
