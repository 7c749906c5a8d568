"""Host memory of loading a checkpoint for FSDP: whole on every rank, or sharded.

    python -m benchmarks.fsdp_load [--layers 24] [--hidden 1024] [--ranks 2]

Saves a seeded Llama-shaped model (fp32 safetensors) to a temporary folder, then, for each
arm, starts `--ranks` gloo processes under torchrun that load it and shard it with FSDP2:
- `whole`: `training.checkpoint.load_pretrained` on every rank, then `prepare` (what every
  FSDP run did before, and `prefpack difficulty` still does);
- `sharded`: `training.parallel.load_sharded` (meta device, one tensor at a time).
Each rank reports its peak resident memory above what the process held before loading
(`ru_maxrss`), and the fingerprint of what it loaded. Writes
benchmarks/results/fsdp_load.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "fsdp_load.json"
REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(arm: str, folder: Path, out: Path) -> None:
    """One rank: load `folder` as `arm` says and write this rank's numbers to `out`."""
    import torch
    import torch.distributed as dist

    from training.checkpoint import load_pretrained, model_fingerprint
    from training.parallel import load_sharded, prepare

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    before = _peak_rss()
    start = time.perf_counter()
    device = torch.device("cpu")
    if arm == "whole":
        model = load_pretrained(folder)
        digest = model_fingerprint(model)
        prepare(model, "fsdp", device, "fp32")
    else:
        model = load_sharded(folder, device, "fp32")
        digest = model_fingerprint(model)
    seconds = time.perf_counter() - start
    rank = dist.get_rank()
    numbers = {"peak_rss_above_start_mib": (_peak_rss() - before) / MIB, "seconds": seconds}
    (out / f"{arm}-rank{rank}.json").write_text(json.dumps({**numbers, "fingerprint": digest}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()

    import torch

    from training.checkpoint import save_pretrained
    from training.configs import small
    from training.model import CausalLM

    config = dataclasses.replace(
        small(),
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_heads=args.hidden // 64,
        num_kv_heads=args.hidden // 128,
        vocab_size=32000,
        tie_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = CausalLM(config)
        params = sum(p.numel() for p in model.parameters())
        folder = save_pretrained(model, Path(tmp) / "model")
        del model
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        torchrun += ["--nproc_per_node", str(args.ranks), "-m", "benchmarks.fsdp_load"]
        for arm in ("whole", "sharded"):
            subprocess.run(
                [*torchrun, "--worker", arm, str(folder), tmp], check=True, cwd=REPO, env=env
            )
        ranks = {
            arm: [
                json.loads(Path(tmp, f"{arm}-rank{r}.json").read_text()) for r in range(args.ranks)
            ]
            for arm in ("whole", "sharded")
        }
    prints = {r["fingerprint"] for arm in ranks.values() for r in arm}
    result = {
        "parameters": params,
        "fp32_model_mib": params * 4 / MIB,
        "ranks": args.ranks,
        "same_fingerprint": len(prints) == 1,
        **{
            arm: {
                "peak_rss_above_start_mib": max(r["peak_rss_above_start_mib"] for r in rows),
                "seconds": max(r["seconds"] for r in rows),
            }
            for arm, rows in ranks.items()
        },
    }
    result["sharded_over_whole_rss"] = (
        result["sharded"]["peak_rss_above_start_mib"] / result["whole"]["peak_rss_above_start_mib"]
    )
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
