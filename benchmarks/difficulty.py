"""Time of the difficulty assets on the bundled samples with the tiny model.

    python -m benchmarks.difficulty      # about a minute on 2 cores

Into a temporary store and Dagster instance: `prefpack run`'s graph on the bundled samples
(normalize to reference log-probs and training, not timed here), then `difficulty_job` with
its sample config (`assets.jobs.DIFFICULTY_CONFIG`: 5 folds of the tiny model, 20 steps of 4
rows each, drop the hardest 10%, train on the rest as `trained_model` does), timed per
asset from Dagster's step stats, then the same job again, which reuses every result by key;
and `selected_model` against `trained_model` on the same eval pairs (the sample's eval
split). Prints the numbers and writes `benchmarks/results/difficulty.json`.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import dagster as dg

from assets.definitions import build_definitions, build_resources
from assets.jobs import DIFFICULTY_CONFIG
from assets.run import QUIET, materialize_all, materialized_metadata

RESULTS = Path(__file__).parent / "results" / "difficulty.json"
EVAL_METRICS = ("eval/pairs", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")


def run_job(defs: dg.Definitions, instance: dg.DagsterInstance) -> dict:
    """One `difficulty_job` run: wall seconds, seconds per asset, the assets' metadata."""
    started = time.perf_counter()
    result = defs.resolve_job_def("difficulty_job").execute_in_process(
        instance=instance, run_config={**DIFFICULTY_CONFIG, **QUIET}
    )
    seconds = time.perf_counter() - started
    steps = {
        s.step_key: s.end_time - s.start_time for s in instance.get_run_step_stats(result.run_id)
    }
    metadata = {name: values[0] for name, values in materialized_metadata([result]).items()}
    return {"seconds": seconds, "asset_seconds": steps, "metadata": metadata}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        defs = build_definitions(build_resources(Path(tmp) / "store"))
        with dg.instance_for_test(temp_dir=tmp) as instance:
            started = time.perf_counter()
            materialize_all(defs, instance)
            graph_seconds = time.perf_counter() - started
            first, second = run_job(defs, instance), run_job(defs, instance)
            record = instance.get_latest_materialization_event(dg.AssetKey("trained_model"))
            trained = {k: v.value for k, v in record.asset_materialization.metadata.items()}
    scores = first["metadata"]["difficulty_scores"]
    selected = first["metadata"]["selected_shards"]
    model = first["metadata"]["selected_model"]
    settings = DIFFICULTY_CONFIG["ops"]["difficulty_scores"]["config"]
    result = {
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "load_average_1min_at_end": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "sample": {"pairs": scores["pairs"], "folds": scores["folds"], **settings},
        "graph_before_seconds": graph_seconds,
        "first": {"seconds": first["seconds"], "asset_seconds": first["asset_seconds"]},
        "second_reused": {"seconds": second["seconds"], "asset_seconds": second["asset_seconds"]},
        "scores": {
            k: scores[k]
            for k in (
                "held_out_loss_mean",
                "held_out_loss_p50",
                "held_out_loss_p90",
                "held_out_loss_max",
                "held_out_accuracy",
            )
        },
        "selection": {
            k: selected[k] for k in ("pairs_in", "pairs_out", "dropped", "loss_threshold")
        },
        "selected_model": {k: model[k] for k in ("steps", "loss", "rewards/accuracies")},
        # Both evaluated on the same held-out pairs (the sample's eval split).
        "eval": {
            name: {k: run[k] for k in EVAL_METRICS}
            for name, run in (("trained_model", trained), ("selected_model", model))
        },
        "reused_on_second_run": {name: md["reused"] for name, md in second["metadata"].items()},
    }
    a = first["asset_seconds"]
    print(
        f"difficulty on the samples ({scores['pairs']} pairs, {scores['folds']} folds x "
        f"{settings['steps']} steps of the tiny model, {result['machine']['cpus']} CPUs):"
    )
    print(
        f"  difficulty_scores {a['difficulty_scores']:.1f} s, selected_shards "
        f"{a['selected_shards']:.1f} s, selected_model {a['selected_model']:.1f} s; "
        f"job {first['seconds']:.1f} s"
    )
    print(f"  again, all reused: job {second['seconds']:.1f} s")
    for name, run in result["eval"].items():
        print(
            f"  {name:15s} on the {run['eval/pairs']} held-out pairs: eval loss "
            f"{run['eval/loss']:.4f}, reward accuracy {run['eval/rewards/accuracies']:.3f}, "
            f"margin {run['eval/rewards/margins']:.4f}"
        )
    print(
        f"  held-out loss mean {scores['held_out_loss_mean']:.4f}, accuracy "
        f"{scores['held_out_accuracy']:.3f}; dropped {selected['dropped']} of "
        f"{selected['pairs_in']} at loss >= {selected['loss_threshold']:.4f}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
