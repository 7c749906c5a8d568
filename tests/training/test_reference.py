"""Reference log-probs: computed once, stored with their key, reused instead of a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_contracts.contract import ContractError
from tests.training.dist_worker import (
    REFERENCE_BATCH_ROWS,
    REFERENCE_ROWS,
    seeded_model,
    torchrun_workers,
)
from tests.training.pairs import separate_logps, varied_rows
from training.checkpoint import model_fingerprint
from training.configs import tiny
from training.model import CausalLM
from training.reference import (
    ReferenceCache,
    cached_reference_logps,
    compute_reference_logps,
    read_reference_logps,
    reference_logps_path,
    write_reference_logps,
)
from training.train import TrainConfig, train


def _model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(tiny())


def _cache(directory: Path, model: CausalLM, shard_key: str) -> ReferenceCache:
    return ReferenceCache(directory, shard_key, model_fingerprint(model))


def test_computed_logps_equal_separate_sequences() -> None:
    """Same oracle as the trainer's: the stored numbers are the two-sequence log-probs."""
    model = _model()
    rows = varied_rows(0, "shared", pairs_per_row=(3, 1, 2))
    table = compute_reference_logps(model, rows, "shared", batch_rows=2, progress=False)
    assert table.column("pair_id").to_pylist() == [f"pair-{i}" for i in range(6)]
    pairs_again = [  # rebuild the pairs from the rows: prompt | chosen | rejected
        (
            row.input_ids[s : s + p],
            row.input_ids[s + p : s + p + c],
            row.input_ids[s + p + c : s + p + c + r],
        )
        for row in rows
        for s, p, c, r in zip(
            row.pair_start, row.prompt_len, row.chosen_len, row.rejected_len, strict=True
        )
    ]
    with torch.no_grad():
        chosen, rejected = separate_logps(model, pairs_again)
    np.testing.assert_allclose(table["chosen_logps"].to_numpy(), chosen.numpy(), rtol=1e-5)
    np.testing.assert_allclose(table["rejected_logps"].to_numpy(), rejected.numpy(), rtol=1e-5)


@pytest.mark.parametrize("suffix", [".arrow", ".parquet"])
def test_write_read_round_trip_checks_the_key(tmp_path: Path, suffix: str) -> None:
    table = compute_reference_logps(_model(), varied_rows(0, "shared"), "shared", progress=False)
    path = write_reference_logps(table, tmp_path / f"ref{suffix}", "fp-1", "shard-1")
    again = write_reference_logps(table, tmp_path / f"again{suffix}", "fp-1", "shard-1")
    assert path.read_bytes() == again.read_bytes()  # same input, same bytes
    stored = read_reference_logps(path, model_fingerprint="fp-1", shard_key="shard-1")
    assert (stored.model_fingerprint, stored.shard_key) == ("fp-1", "shard-1")
    got = stored.lookup(["pair-7", "pair-2"])
    index = {pid: i for i, pid in enumerate(table["pair_id"].to_pylist())}
    want = table["chosen_logps"].to_numpy()[[index["pair-7"], index["pair-2"]]]
    np.testing.assert_array_equal(got.chosen.numpy(), want)
    with pytest.raises(ValueError, match="model_fingerprint is fp-1, expected fp-2"):
        read_reference_logps(path, model_fingerprint="fp-2")
    with pytest.raises(ValueError, match="shard_key is shard-1, expected other"):
        read_reference_logps(path, shard_key="other")
    with pytest.raises(KeyError, match=r"1 pair\(s\) have no reference log-probs"):
        stored.lookup(["pair-1", "nope"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"again{suffix}", f"ref{suffix}"]


def test_contract_refuses_impossible_logps(tmp_path: Path) -> None:
    table = pa.table(
        {
            "pair_id": ["a", "b"],
            "chosen_logps": pa.array([-1.0, 0.5], pa.float32()),
            "rejected_logps": pa.array([-1.0, -1.0], pa.float32()),
        }
    )
    with pytest.raises(ContractError, match="logps_positive_or_nan: 1 row"):
        write_reference_logps(table, tmp_path / "bad.arrow", "fp", "key")
    with pytest.raises(ValueError, match=r"written as \.arrow or \.parquet"):
        write_reference_logps(table, tmp_path / "bad.csv", "fp", "key")
    assert not list(tmp_path.iterdir())


def test_cache_computes_once_per_model_and_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = varied_rows(0, "shared")
    model = _model()
    cache = _cache(tmp_path, model, "5a1d")
    first = cached_reference_logps(model, rows, "shared", cache, progress=False)
    path = reference_logps_path(tmp_path, model_fingerprint(model), "5a1d")
    assert cache.path == path and path.exists()
    assert first.model_fingerprint == model_fingerprint(model)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed although the file exists")

    monkeypatch.setattr("training.reference.compute_reference_logps", refuse)
    again = cached_reference_logps(model, rows, "shared", cache)
    assert again.table.equals(first.table)
    other = _model(seed=1)
    with pytest.raises(AssertionError, match="recomputed"):  # another model: another key
        cached_reference_logps(other, rows, "shared", _cache(tmp_path, other, "5a1d"))


def test_training_with_stored_logps_equals_training_with_a_reference_model(
    tmp_path: Path,
) -> None:
    rows = varied_rows(0, "shared")
    model = _model()
    stored = cached_reference_logps(
        model, rows, "shared", _cache(tmp_path, model, "ab"), progress=False
    )
    for name, reference in (("model", None), ("stored", stored)):
        config = TrainConfig(
            out_dir=tmp_path / name, steps=3, lr=1e-3, warmup_steps=0, progress=False
        )
        train(config, rows, "shared", 16, 512, _model(), reference=reference)
    losses = {
        name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").open()]
        for name in ("model", "stored")
    }
    np.testing.assert_allclose(losses["stored"], losses["model"], rtol=1e-5)
    assert losses["model"][-1] != losses["model"][0]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_compute_the_reference_of_one(tmp_path: Path, parallel: str) -> None:
    """Each rank computes its share (5 and 6 rows, so one rank runs a padding pass that
    FSDP's collectives need); the gathered table equals one process's, pair for pair."""
    torchrun_workers("reference", str(tmp_path / "ref.arrow"), parallel)
    two = read_reference_logps(tmp_path / "ref.arrow").table
    rows = varied_rows(0, "shared")[:REFERENCE_ROWS]
    one = compute_reference_logps(
        seeded_model(), rows, "shared", batch_rows=REFERENCE_BATCH_ROWS, progress=False
    )
    assert two.column("pair_id").to_pylist() == one.column("pair_id").to_pylist()
    for column in ("chosen_logps", "rejected_logps"):
        np.testing.assert_allclose(two[column].to_numpy(), one[column].to_numpy(), rtol=1e-6)
