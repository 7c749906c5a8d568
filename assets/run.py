"""`prefpack run`: every source partition, then every stage, in process, on the project's
instance; and the short summary printed at the end."""

from collections.abc import Mapping
from typing import Any

import dagster as dg

from assets.jobs import SAMPLE_CONFIG
from assets.partitions import source_partitions

# The console shows what a user reads: INFO and up, not every step event.
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def materialize_all(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    run_config: Mapping[str, Any] | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """Run `source_job` once per source partition, then `sample_job`.

    Args:
        defs: the Definitions (`assets.definitions.defs`, or one built for a test).
        instance: the Dagster instance runs are recorded in.
        run_config: overrides `sample_job`'s sample-sized config when given.

    Returns:
        The results of every run, in order (each raises on failure).
    """
    sources = defs.resolve_job_def("source_job")
    results = [
        sources.execute_in_process(partition_key=partition, instance=instance, run_config=QUIET)
        for partition in source_partitions.get_partition_keys()
    ]
    stages = defs.resolve_job_def("sample_job")
    config = {**(run_config or SAMPLE_CONFIG), **QUIET}
    results.append(stages.execute_in_process(instance=instance, run_config=config))
    return results


def materialized_metadata(results: list[dg.ExecuteInProcessResult]) -> dict[str, list[dict]]:
    """Asset name -> the metadata of each of its materializations, as plain values."""
    found: dict[str, list[dict]] = {}
    for result in results:
        for event in result.get_asset_materialization_events():
            materialization = event.materialization
            values = {k: v.value for k, v in materialization.metadata.items()}
            found.setdefault(materialization.asset_key.to_user_string(), []).append(values)
    return found


def summary(results: list[dg.ExecuteInProcessResult], seconds: float) -> str:
    """Pairs per stage, fill ratio, tokens saved, final training loss and reward accuracy."""
    md = materialized_metadata(results)
    normalized = md["normalized_pairs"]
    curated = md["curated_pairs"][-1]
    tokenized = md["tokenized_pairs"][-1]
    packed = md["packed_shards"][-1]
    trained = md["trained_model"][-1]
    lines = [
        f"prefpack run finished in {seconds:.1f} s",
        f"  sources      {len(normalized)} sources, {sum(m['rows_in'] for m in normalized):,} rows in, "
        f"{sum(m['pairs_out'] for m in normalized):,} pairs, "
        f"{sum(m['quarantined'] for m in normalized):,} quarantined",
        f"  curated      {curated['rows_out']:,} pairs ({curated['dropped']:,} dropped by rule)",
        f"  tokenized    {tokenized['pairs_out']:,} pairs, boundary agreement "
        f"{tokenized['boundary_agreement']:.1%}",
        f"  packed       {packed['pairs']:,} pairs in {packed['rows']:,} rows of <= "
        f"{packed['max_len']} tokens, fill ratio {packed['fill_ratio']:.3f}, "
        f"{packed['tokens_saved_by_prefix_sharing']:,} tokens saved by prefix sharing "
        f"({packed['prefix_sharing_saving']:.1%}), {'reused' if packed['reused'] else 'written'}",
        f"  trained      {trained['steps']} steps, loss {trained['loss']:.4f}, reward accuracy "
        f"{trained['rewards/accuracies']:.3f}, margin {trained['rewards/margins']:.4f}, "
        f"{trained['pairs/s']:.1f} pairs/s ({'reused' if trained['reused'] else 'trained now'})",
        f"  shards       {packed['path']}",
        f"  model        {trained['output']}",
    ]
    return "\n".join(lines)
