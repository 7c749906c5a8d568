"""Prepared GPU check: the gpu-marked tests, then a short flex-backend training benchmark.

Run on a CUDA machine (a few minutes): `python -m benchmarks.flex_gpu`. It writes
`benchmarks/results/flex_gpu.json`, and when `$OUT` is set also `$OUT/flex_gpu.json` and
`$OUT/pytest_gpu.txt`. Without CUDA it stops at once with exit code 2 and says why.

1. `pytest -m gpu tests/training`: FlexAttention's gradients against the dense backend.
2. The `small` model (bf16 autocast, fp32 weights) trained on the UltraFeedback-like pairs
   of `benchmarks.train` (same drawing, cutting, packing, batching and timing: rounds,
   warm-up and first step of each call left out): `shared` rows with the flex, segments
   and dense backends, `unshared` rows with flex, and the `padded` baseline (causal
   SDPA, FlashAttention on CUDA). The first flex call compiles FlexAttention (untimed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.train import BLOCK_SIZE, DATASETS, make_rounds, timed_train
from training.configs import small
from training.model import CausalLM

RESULTS = Path(__file__).parent / "results" / "flex_gpu.json"
REPO = Path(__file__).resolve().parents[1]
# (layout, backend) pairs timed; the first is the one the ratios are taken against.
RUNS = (
    ("shared", "flex"),
    ("shared", "segments"),
    ("shared", "dense"),
    ("unshared", "flex"),
    ("padded", "segments"),  # any backend name runs plain causal SDPA on padded rows
)


def gpu_tests(out: Path | None) -> dict:
    """Run the gpu-marked tests; their summary line and exit code."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-rA", "-q", "tests/training"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if out is not None:
        (out / "pytest_gpu.txt").write_text(run.stdout + run.stderr)
    lines = run.stdout.strip().splitlines()
    return {"returncode": run.returncode, "summary": lines[-1] if lines else run.stderr[-500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=192, help="UltraFeedback-like pairs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "flex_gpu: CUDA is not available here; this check needs an NVIDIA GPU "
            "(FlexAttention trains on CUDA only). Nothing was run.",
            file=sys.stderr,
        )
        sys.exit(2)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"{results['device']}, torch {results['torch']}")

    results["tests"] = gpu_tests(out)
    print(f"gpu tests: {results['tests']['summary']}")

    name, max_len = DATASETS["UltraFeedback-like"]
    torch.manual_seed(args.seed)
    model = CausalLM(small())
    rounds, stats = make_rounds(
        name, args.pairs, args.rounds, max_len, model.config.vocab_size, args.seed, BLOCK_SIZE
    )
    results["stats"] = stats
    settings = {"device": "cuda", "precision": "bf16"}
    start = time.perf_counter()
    per_round: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for layout, backend in RUNS:  # warm-up (and FlexAttention compilation), untimed
            timed_train(
                model, rounds[0].rows[layout], layout, max_len, root, 2, backend=backend, **settings
            )
        for round_ in rounds:
            per_round.append(
                {
                    f"{layout}/{backend}": timed_train(
                        model,
                        round_.rows[layout],
                        layout,
                        max_len,
                        root,
                        backend=backend,
                        **settings,
                    )
                    for layout, backend in RUNS
                }
            )
    base = "/".join(RUNS[0])
    results["median"] = {
        key: {
            "pairs/s": statistics.median(r[key]["pairs/s"] for r in per_round),
            "tokens/s": statistics.median(r[key]["tokens/s"] for r in per_round),
            f"{base} speed-up": statistics.median(
                r[base]["pairs/s"] / r[key]["pairs/s"] for r in per_round
            ),
        }
        for key in per_round[0]
    }
    results["rounds"] = per_round
    results["seconds"] = time.perf_counter() - start
    print(f"ideal token ratio unshared/shared {stats['ideal_token_ratio']:.3f}")
    print(f"{'layout/backend':20} {'pairs/s':>9} {'tokens/s':>10} {base + ' speed-up':>22}")
    for key, m in results["median"].items():
        print(
            f"{key:20} {m['pairs/s']:>9.1f} {m['tokens/s']:>10.0f} {m[f'{base} speed-up']:>22.2f}"
        )

    text = json.dumps(results, indent=2) + "\n"
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    if out is not None:
        (out / "flex_gpu.json").write_text(text)
    print(f"wrote {RESULTS}" + (f" and {out / 'flex_gpu.json'}" if out else ""))
    sys.exit(results["tests"]["returncode"])


if __name__ == "__main__":
    main()
