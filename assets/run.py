"""`prefpack run`: what is missing or stale, in process, on the project's instance (the
source partitions first, then the stages); and the short summary printed at the end.

With nothing changed it launches no run and adds no history to any asset: it prints
"everything up to date" with the numbers of the current materializations.
"""

from collections import Counter
from collections.abc import Mapping
from typing import Any

import dagster as dg

from assets import staleness
from assets.jobs import QUIET, SAMPLE_CONFIG, SOURCE_ASSETS, STAGE_ASSETS
from assets.partitions import source_partitions

UP_TO_DATE = "everything up to date"


def materialize_all(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    run_config: Mapping[str, Any] | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """Run `source_job` for each source partition that needs it, then `sample_job` on the
    stages that need it (`assets.staleness`); nothing when everything is up to date.

    Args:
        defs: the Definitions (`assets.definitions.defs`, or one built for a test).
        instance: the Dagster instance runs are recorded in.
        run_config: the op configs (`ops:`), replacing `sample_job`'s sample-sized config
            (SAMPLE_CONFIG) when given: an op it leaves out runs at its defaults.

    Returns:
        The results of the runs launched, in order (each raises on failure).
    """
    config = run_config or SAMPLE_CONFIG
    staleness.observe_model(defs, instance)
    sources = defs.resolve_job_def("source_job")
    source_keys = [dg.AssetKey(name) for name in SOURCE_ASSETS]
    results = [
        sources.execute_in_process(
            partition_key=partition,
            instance=instance,
            run_config=QUIET,
            tags=staleness.settings_tags(defs, source_keys, config, partition),
        )
        for partition in staleness.stale_partitions(defs, instance, config)
    ]
    # New source data reaches every stage; otherwise only what is stale and its downstream.
    stages = (
        [dg.AssetKey(name) for name in STAGE_ASSETS]
        if results
        else staleness.stale_stages(defs, instance, config)
    )
    if stages:
        # Every op named: one the config leaves out runs at its asset's defaults, where
        # Dagster would give it sample_job's own config (SAMPLE_CONFIG's).
        given = config.get("ops", {})
        ops = {key.path[-1]: given.get(key.path[-1], {"config": {}}) for key in stages}
        results.append(
            defs.resolve_job_def("sample_job").execute_in_process(
                instance=instance,
                asset_selection=stages,
                run_config={"ops": ops, **QUIET},
                tags=staleness.settings_tags(defs, stages, config),
            )
        )
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


def current_metadata(instance: dg.DagsterInstance) -> dict[str, list[dict]]:
    """Asset name -> the metadata of its latest materialization (one per source
    partition), as plain values: what the UI shows now."""
    found: dict[str, list[dict]] = {}
    for name in (*SOURCE_ASSETS, *STAGE_ASSETS):
        key = dg.AssetKey(name)
        partitions = source_partitions.get_partition_keys() if name in SOURCE_ASSETS else [None]
        for partition in partitions:
            record = staleness.latest_materialization(instance, key, partition)
            if record is not None:
                metadata = record.asset_materialization.metadata
                found.setdefault(name, []).append({k: v.value for k, v in metadata.items()})
    return found


def summary(
    instance: dg.DagsterInstance, results: list[dg.ExecuteInProcessResult], seconds: float
) -> str:
    """What ran (or "everything up to date"), then pairs per stage (the eval pairs held out
    and their shards included), fill ratio, tokens saved, final training loss and reward
    accuracy and the eval set's of the current materializations (and, for those this call
    materialized, whether shards and model were made or reused)."""
    ran = Counter(key.to_user_string() for r in results for key in _materialized(r))
    if results:
        names = [f"{n} x{ran[n]}" if ran[n] > 1 else n for n in (*SOURCE_ASSETS, *STAGE_ASSETS)]
        head = (
            f"prefpack run finished in {seconds:.1f} s, {len(results)} runs: "
            f"{', '.join(name for name in names if name.split()[0] in ran)}"
        )
    else:
        head = f"prefpack run: {UP_TO_DATE}, no run launched ({seconds:.1f} s)"
    md = current_metadata(instance)
    normalized = md["normalized_pairs"]
    curated = md["curated_pairs"][-1]
    tokenized = md["tokenized_pairs"][-1]
    packed = md["packed_shards"][-1]
    held = md["eval_shards"][-1]
    trained = md["trained_model"][-1]
    lines = [
        head,
        f"  sources      {len(normalized)} sources, {sum(m['rows_in'] for m in normalized):,} rows in, "
        f"{sum(m['pairs_out'] for m in normalized):,} pairs, "
        f"{sum(m['quarantined'] for m in normalized):,} quarantined",
        f"  curated      {curated['rows_out']:,} pairs ({curated['dropped']:,} dropped by rule, "
        f"{curated['eval_pairs']:,} held out for eval)",
        f"  tokenized    {tokenized['pairs_out']:,} pairs, boundary agreement "
        f"{tokenized['boundary_agreement']:.1%}",
        f"  packed       {packed['pairs']:,} pairs in {packed['rows']:,} rows of <= "
        f"{packed['max_len']} tokens, fill ratio {packed['fill_ratio']:.3f}, "
        f"{packed['tokens_saved_by_prefix_sharing']:,} tokens saved by prefix sharing "
        f"({packed['prefix_sharing_saving']:.1%})"
        + (f", {'reused' if packed['reused'] else 'written'}" if "packed_shards" in ran else ""),
        _eval_line(held, ran="eval_shards" in ran),
        f"  trained      {trained['steps']} steps, loss {trained['loss']:.4f}, reward accuracy "
        f"{trained['rewards/accuracies']:.3f}, margin {trained['rewards/margins']:.4f}, "
        f"{trained['pairs/s']:.1f} pairs/s"
        + (f" ({'reused' if trained['reused'] else 'trained'})" if "trained_model" in ran else ""),
        *(
            [
                f"  evaluated    loss {trained['eval/loss']:.4f}, reward accuracy "
                f"{trained['eval/rewards/accuracies']:.3f}, margin "
                f"{trained['eval/rewards/margins']:.4f} on the {trained['eval/pairs']:,} "
                "held-out pairs"
            ]
            if "eval/loss" in trained
            else []
        ),
        f"  shards       {packed['path']}",
        *([f"  eval shards  {held['path']}"] if held["pairs"] else []),
        f"  model        {trained['output']}",
    ]
    return "\n".join(lines)


def _eval_line(held: Mapping[str, Any], ran: bool) -> str:
    """The eval shards' line: pairs and rows (made or reused, when this call ran), or why
    there are none."""
    if not held["pairs"]:
        return f"  eval         none ({held['status']})"
    made = f", {'reused' if held['reused'] else 'written'}" if ran else ""
    return (
        f"  eval         {held['pairs']:,} pairs in {held['rows']:,} rows, packed as the "
        f"training shards{made}"
    )


def _materialized(result: dg.ExecuteInProcessResult) -> list[dg.AssetKey]:
    return [event.asset_key for event in result.get_asset_materialization_events()]
