"""Reference log-probs: computed once, stored with their key, reused instead of a model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pytest
import torch

from core import atomic as io
from data_contracts.contract import ContractError
from tests.training.dist_worker import (
    REFERENCE_BATCH_ROWS,
    REFERENCE_ROWS,
    seeded_model,
    torchrun_workers,
)
from tests.training.pairs import separate_logps, varied_rows
from training.batch import PackedRows
from training.checkpoint import model_fingerprint
from training.configs import tiny
from training.model import CausalLM
from training.reference import (
    REFERENCE_VERSION,
    ReferenceCache,
    ReferenceKey,
    ReferenceLogps,
    cached_reference_logps,
    compute_reference_logps,
    read_reference_logps,
    write_reference_logps,
)
from training.train import TrainConfig, train


def _model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(tiny())


def _cache(
    directory: Path, model: CausalLM, shard_key: str, precision: str = "fp32"
) -> ReferenceCache:
    return ReferenceCache(directory, ReferenceKey(model_fingerprint(model), shard_key, precision))


KEY = ReferenceKey("fp-1", "shard-1", "fp32")


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
    path = write_reference_logps(table, tmp_path / f"ref{suffix}", KEY)
    again = write_reference_logps(table, tmp_path / f"again{suffix}", KEY)
    assert path.read_bytes() == again.read_bytes()  # same input, same bytes
    stored = read_reference_logps(path, KEY)
    assert stored.key == KEY and KEY.reference_version == REFERENCE_VERSION
    got = stored.lookup(["pair-7", "pair-2"])
    index = {pid: i for i, pid in enumerate(table["pair_id"].to_pylist())}
    want = table["chosen_logps"].to_numpy()[[index["pair-7"], index["pair-2"]]]
    np.testing.assert_array_equal(got.chosen.numpy(), want)
    for change, message in (
        ({"model_fingerprint": "fp-2"}, "model_fingerprint is fp-1, expected fp-2"),
        ({"shard_key": "other"}, "shard_key is shard-1, expected other"),
        ({"precision": "bf16"}, "precision is fp32, expected bf16"),
        ({"reference_version": "0"}, f"reference_version is {REFERENCE_VERSION}, expected 0"),
    ):
        with pytest.raises(ValueError, match=f"ref{suffix}: reference log-probs of another run: "):
            read_reference_logps(path, dataclasses.replace(KEY, **change))
        with pytest.raises(ValueError, match=message):
            read_reference_logps(path, dataclasses.replace(KEY, **change))
    with pytest.raises(KeyError, match=r"1 pair\(s\) have no reference log-probs"):
        stored.lookup(["pair-1", "nope"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"again{suffix}", f"ref{suffix}"]


def test_a_bf16_file_is_refused_for_fp32_and_an_fp32_file_for_bf16(tmp_path: Path) -> None:
    """bf16 forward passes run on CUDA only, so the bf16 file is written through the
    library with its key: the key, not the numbers, is what the reader checks."""
    table = compute_reference_logps(_model(), varied_rows(0, "shared"), "shared", progress=False)
    bf16 = write_reference_logps(table, tmp_path / "bf16.arrow", replace_precision(KEY, "bf16"))
    fp32 = write_reference_logps(table, tmp_path / "fp32.arrow", KEY)
    with pytest.raises(ValueError, match="precision is bf16, expected fp32"):
        read_reference_logps(bf16, KEY)
    with pytest.raises(ValueError, match="precision is fp32, expected bf16"):
        read_reference_logps(fp32, replace_precision(KEY, "bf16"))
    assert read_reference_logps(bf16, replace_precision(KEY, "bf16")).key.precision == "bf16"


def replace_precision(key: ReferenceKey, precision: str) -> ReferenceKey:
    return dataclasses.replace(key, precision=precision)


def test_a_file_without_the_whole_key_is_refused(tmp_path: Path) -> None:
    """A file of an older prefpack: fingerprint and shard key, no precision or version."""
    table = compute_reference_logps(_model(), varied_rows(0, "shared"), "shared", progress=False)
    old = table.replace_schema_metadata({b"model_fingerprint": b"fp-1", b"shard_key": b"shard-1"})
    feather.write_feather(old, tmp_path / "old.arrow", compression="uncompressed")
    with pytest.raises(ValueError, match="no precision, reference_version in the file's metadata"):
        read_reference_logps(tmp_path / "old.arrow", KEY)


def _index_in_lookup(table: pa.Table, pair_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The lookup before the index: a hash of the whole table on every call."""
    i = pc.index_in(pa.array(pair_ids, pa.string()), value_set=table["pair_id"]).to_numpy(
        zero_copy_only=False
    )
    return table["chosen_logps"].to_numpy()[i], table["rejected_logps"].to_numpy()[i]


def test_indexed_lookup_equals_the_old_lookup_on_random_ids() -> None:
    """Random ids of random lengths (non-ASCII and prefixes of each other included), in
    random order, looked up with repeats: the sorted index must give what index_in gave."""
    rng = np.random.default_rng(0)
    alphabet = list("abcdef0123456789éß漢")
    ids = sorted({"".join(rng.choice(alphabet, rng.integers(1, 12))) for _ in range(3000)})
    ids = [ids[i] for i in rng.permutation(len(ids))]
    ids += [ids[0] + "x", ids[1][:-1] or "z"]  # near misses of stored ids
    ids = list(dict.fromkeys(ids))
    table = pa.table(
        {
            "pair_id": pa.array(ids, pa.string()),
            "chosen_logps": pa.array(-rng.random(len(ids)), pa.float32()),
            "rejected_logps": pa.array(-rng.random(len(ids)), pa.float32()),
        }
    )
    reference = ReferenceLogps(table, KEY)
    for _ in range(20):
        query = [ids[i] for i in rng.integers(0, len(ids), 64)]
        got = reference.lookup(query)
        chosen, rejected = _index_in_lookup(table, query)
        np.testing.assert_array_equal(got.chosen.numpy(), chosen)
        np.testing.assert_array_equal(got.rejected.numpy(), rejected)
    absent = [ids[0] + "?", "", ids[2] + "\u0000"]  # numpy bytes would drop the NUL
    assert not reference.contains(pa.array(absent)).any()
    assert reference.contains(pa.array(ids)).all()
    with pytest.raises(KeyError, match=r"1 pair\(s\)"):
        reference.lookup([ids[0], absent[0]])


def test_contract_refuses_impossible_logps(tmp_path: Path) -> None:
    table = pa.table(
        {
            "pair_id": ["a", "b"],
            "chosen_logps": pa.array([-1.0, 0.5], pa.float32()),
            "rejected_logps": pa.array([-1.0, -1.0], pa.float32()),
        }
    )
    with pytest.raises(ContractError, match="logps_positive_or_nan: 1 row"):
        write_reference_logps(table, tmp_path / "bad.arrow", KEY)
    with pytest.raises(ValueError, match=r"written as \.arrow or \.parquet"):
        write_reference_logps(table, tmp_path / "bad.csv", KEY)
    assert not list(tmp_path.iterdir())


def test_cache_computes_once_per_model_and_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = varied_rows(0, "shared")
    model = _model()
    cache = _cache(tmp_path, model, "5a1d")
    first = cached_reference_logps(model, rows, "shared", cache, progress=False)
    fingerprint = model_fingerprint(model)
    name = f"reference_logps-5a1d-{fingerprint[:16]}-fp32-v{REFERENCE_VERSION}.arrow"
    assert cache.path == tmp_path / name and cache.path.exists()
    assert first.key == ReferenceKey(fingerprint, "5a1d", "fp32")
    assert _cache(tmp_path, model, "5a1d", "bf16").path != cache.path  # precision: another file

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed although the file exists")

    monkeypatch.setattr("training.reference.compute_reference_logps", refuse)
    again = cached_reference_logps(model, rows, "shared", cache)
    assert again.table.equals(first.table)
    other = _model(seed=1)
    with pytest.raises(AssertionError, match="recomputed"):  # another model: another key
        cached_reference_logps(other, rows, "shared", _cache(tmp_path, other, "5a1d"))


def test_a_reuse_removes_a_killed_runs_temp_file_of_the_key(tmp_path: Path) -> None:
    rows = varied_rows(0, "shared")
    model = _model()
    cache = _cache(tmp_path, model, "5a1d")
    cached_reference_logps(model, rows, "shared", cache, progress=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = tmp_path / f".{cache.path.name}.tmp-{io._HOST}-{dead.pid}-0123abcd"
    leftover.write_bytes(b"x" * 100)  # a run of the same key, killed inside its write
    cached_reference_logps(model, rows, "shared", cache, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.path.name]


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
        train(config, PackedRows(rows, "shared", 16, 512), _model(), reference=reference)
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
    layouts = [json.loads((tmp_path / f"layout-rank{r}.json").read_text()) for r in (0, 1)]
    total = sum(p.numel() for p in seeded_model().parameters())
    assert all(layout["total"] == total for layout in layouts)
    if parallel == "fsdp":  # each rank holds its half (dim 0 split, the last chunk shorter)
        assert all(layout["mesh"] == ["cpu"] for layout in layouts)
        assert sum(layout["local"] for layout in layouts) == total
        assert all(layout["local"] < 0.6 * total for layout in layouts)
    else:  # replicated
        assert all(layout["mesh"] == [] and layout["local"] == total for layout in layouts)


def test_the_reference_cache_refuses_keys_that_are_not_hex(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shard key '\.\./\.\./x' is not a hex key"):
        ReferenceCache(tmp_path, ReferenceKey("ab" * 32, "../../x", "fp32"))
    with pytest.raises(ValueError, match="model fingerprint '/etc' is not a hex key"):
        ReferenceCache(tmp_path, ReferenceKey("/etc", "abc123", "fp32"))
    path = ReferenceCache(tmp_path, ReferenceKey("ab" * 32, "abc123", "fp32")).path
    assert path.parent == tmp_path
    assert path.name == f"reference_logps-abc123-{'ab' * 8}-fp32-v1.arrow"
