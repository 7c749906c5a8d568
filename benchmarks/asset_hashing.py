"""Bytes hashed by one `packed_shards` materialization, the first (packing) and the second
(reusing the shards).

    python -m benchmarks.asset_hashing --label after     # about 20 s on 2 cores

The bundled samples are normalized, curated and tokenized once into a temporary store;
then the `packed_shards` asset runs twice with `pipeline.shards.sha256_file` (the one
hashing function of the store; `pipeline.tokenized` imports it by name) wrapped to count
the bytes and the calls per file. Each file's bytes need hashing once per
materialization: when written (packing) or when proving a reused directory. The numbers
go to `benchmarks/results/asset_hashing.json` under LABEL (e.g. "before", "after").
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import dagster as dg

import pipeline.shards
import pipeline.tokenized
from assets import packing
from assets.configs import PackingConfig
from assets.resources import StoreResource
from pipeline.curate import CurateConfig, curate, read_pairs, write_curated
from pipeline.normalize import normalize, write_normalized
from pipeline.sample_data import sample_path
from pipeline.sources import SOURCES
from pipeline.tokenized import TokenizeConfig, build_tokenized

RESULTS = Path(__file__).parent / "results" / "asset_hashing.json"
MAX_LEN = 1024  # the sample job's


def tokenized_samples(store: Path) -> Path:
    """Every bundled sample normalized, curated together and tokenized (a trained BPE)."""
    dirs = [
        write_normalized(normalize(source, sample_path(source)), store / "normalized" / source)
        for source in SOURCES
    ]
    curated = write_curated(curate(read_pairs(dirs), CurateConfig()), store / "curated")
    return build_tokenized(curated, None, TokenizeConfig(), store).directory


def counting(calls: Counter, sizes: dict[str, int]) -> Callable[[Path], str]:
    """`sha256_file`, counting each call by file (`<stage dir>/<file>`) and its bytes."""
    real = pipeline.shards.sha256_file

    def sha256_file(path: Path) -> str:
        path = Path(path)
        # A temp directory sits beside the final one: name files by stage and file name.
        name = f"{path.parent.parent.name}/{path.name}"
        calls[name] += 1
        sizes[name] = path.stat().st_size
        return real(path)

    return sha256_file


def materialize_counted(tokenized: Path, store: Path) -> dict:
    """One `packed_shards` materialization (its checks included), with what it hashed."""
    calls: Counter = Counter()
    sizes: dict[str, int] = {}
    wrapped = counting(calls, sizes)
    real = pipeline.shards.sha256_file
    pipeline.shards.sha256_file = pipeline.tokenized.sha256_file = wrapped
    try:
        events = list(
            packing.packed_shards(
                context=dg.build_asset_context(),
                config=PackingConfig(max_len=MAX_LEN),
                tokenized_pairs=str(tokenized),
                store=StoreResource(root=str(store)),
            )
        )
    finally:
        pipeline.shards.sha256_file = pipeline.tokenized.sha256_file = real
    reused = next(e for e in events if isinstance(e, dg.Output)).metadata["reused"].value
    hashed = sum(sizes[name] * n for name, n in calls.items())
    return {
        "reused": reused,
        "bytes_hashed": hashed,
        "bytes_of_files_hashed": sum(sizes.values()),
        "times_hashed": dict(sorted(calls.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="key in the results file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        tokenized = tokenized_samples(store)
        result = {
            "first": materialize_counted(tokenized, store),
            "second": materialize_counted(tokenized, store),
        }
    for run, r in result.items():
        print(
            f"{args.label} {run:6s} ({'reused' if r['reused'] else 'packed'}): "
            f"{r['bytes_hashed']:,} bytes hashed for {r['bytes_of_files_hashed']:,} bytes of "
            f"files ({r['bytes_hashed'] / r['bytes_of_files_hashed']:.2f}x)"
        )
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({**old, args.label: result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
