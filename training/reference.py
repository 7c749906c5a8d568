"""Reference log-probs computed once per (model, shards) and reused by every run.

DPO needs log p_ref(chosen) and log p_ref(rejected) per pair; they depend only on the
reference weights and the tokens, so a run can read them from a file instead of holding a
second model in memory and running a second forward pass each step. A file is keyed by the
model fingerprint (`checkpoint.model_fingerprint`) and the shard key, both stored in its
schema metadata and checked on read; `cached_reference_logps` computes it when absent.

Format: the `reference_logps` contract, as Arrow IPC (`.arrow`) or Parquet (`.parquet`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from data_contracts import reference_logps as contract
from data_contracts.packed_row import DEFAULT_BLOCK_SIZE, Layout, PackedRow
from pipeline.io import atomic_file, is_hex_key
from training.attention import Backend
from training.batch import check_rows, collate
from training.device import Precision, autocast, check_precision, resolve_backend, resolve_device
from training.logps import pair_logps
from training.losses import PairLogps
from training.parallel import is_distributed, is_sharded


def _share(num_rows: int, world: int, rank: int) -> range:
    """This rank's contiguous block of rows (blocks differ by at most one row)."""
    return range(num_rows * rank // world, num_rows * (rank + 1) // world)


@torch.inference_mode()
def compute_reference_logps(
    model: nn.Module,
    rows: Sequence[PackedRow],
    layout: Layout,
    block_size: int = DEFAULT_BLOCK_SIZE,
    backend: Backend = "auto",
    batch_rows: int = 8,
    device: str | torch.device = "auto",
    precision: Precision = "fp32",
    progress: bool = True,
    max_len: int | None = None,
) -> pa.Table:
    """Summed chosen/rejected log-probs of every pair in `rows` under `model`.

    Under torch.distributed every rank computes its own contiguous share of the rows (the
    same number of forward passes on every rank, as FSDP's collectives need) and every
    rank returns the whole table.

    Args:
        model: the reference model: a `CausalLM` (moved to `device`) or one that
            `training.parallel.prepare` sharded; left in eval mode.
        rows: packed rows (a shard reader or any sequence).
        layout: the rows' layout.
        block_size: the shards' mask block size (for `flex`).
        backend: attention backend (`auto`: the device's default).
        batch_rows: rows per forward pass.
        device: `auto`, `cpu`, `cuda`, ...
        precision: `fp32`, or `bf16` autocast on CUDA (use what training uses).
        progress: show a progress bar (rank 0).
        max_len: the shards' max_len: `flex` pads every batch to it (one compiled shape).

    Returns:
        A `reference_logps` table, pairs in row order.
    """
    dev = resolve_device(str(device))
    check_precision(precision, dev)
    backend = resolve_backend(backend, dev, precision)
    if not is_sharded(model):
        model.to(dev)
    model.eval()
    world, rank = (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)
    share = _share(len(rows), world, rank)
    # Every rank runs as many passes as the largest share needs (a short share repeats its
    # last batch and drops the result), so sharded forwards stay in step.
    largest_share = -(-len(rows) // world)
    passes = -(-largest_share // batch_rows)
    config = model.config
    ids: list[str] = []
    chosen, rejected = [], []
    for i in tqdm(range(passes), desc="reference log-probs", disable=not progress or rank != 0):
        lo = share.start + i * batch_rows
        row_ids = range(lo, min(lo + batch_rows, share.stop))
        if not row_ids:
            row_ids = range(max(share.start, share.stop - 1), share.stop) or range(1)
        chunk = [rows[j] for j in row_ids]
        check_rows(chunk, row_ids, None, config.vocab_size, config.sliding_window)
        batch = collate(chunk, layout, backend, block_size, dev, pad_to=max_len)
        with autocast(dev, precision):
            logps = pair_logps(model, batch)
        if lo < share.stop:
            ids.extend(batch.pair_ids)
            chosen.append(logps.chosen.float().cpu())
            rejected.append(logps.rejected.float().cpu())
    part = (
        ids,
        torch.cat(chosen).numpy() if chosen else np.zeros(0, np.float32),
        torch.cat(rejected).numpy() if rejected else np.zeros(0, np.float32),
    )
    parts = [part]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, part)
    table = pa.table(
        {
            "pair_id": pa.array([pid for p in parts for pid in p[0]], pa.string()),
            "chosen_logps": pa.array(np.concatenate([p[1] for p in parts]), pa.float32()),
            "rejected_logps": pa.array(np.concatenate([p[2] for p in parts]), pa.float32()),
        }
    )
    return contract.CONTRACT.validate(table, source="reference log-probs")


def write_reference_logps(
    table: pa.Table, path: str | Path, model_fingerprint: str, shard_key: str
) -> Path:
    """Write `table` with its key in the schema metadata, atomically (`atomic_file`).

    Args:
        table: a `reference_logps` table.
        path: `.arrow` (uncompressed Arrow IPC) or `.parquet`.
        model_fingerprint: of the model that produced it.
        shard_key: of the shards it covers.

    Returns:
        The path.

    Raises:
        ValueError: another suffix.
    """
    path = Path(path)
    if path.suffix not in (".arrow", ".parquet"):
        raise ValueError(f"{path}: reference log-probs are written as .arrow or .parquet")
    table = contract.CONTRACT.validate(table, source=str(path))
    meta = {
        **(table.schema.metadata or {}),
        contract.MODEL_FINGERPRINT.encode(): model_fingerprint.encode(),
        contract.SHARD_KEY.encode(): shard_key.encode(),
    }
    table = table.replace_schema_metadata(meta)
    with atomic_file(path) as tmp:
        if path.suffix == ".arrow":
            feather.write_feather(table, tmp, compression="uncompressed")
        else:
            pq.write_table(table, tmp)
    return path


class ReferenceLogps:
    """Stored reference log-probs, looked up by pair id.

    Attributes:
        table: the `reference_logps` table.
        model_fingerprint: the key's model part.
        shard_key: the key's shard part.
    """

    def __init__(self, table: pa.Table, model_fingerprint: str, shard_key: str) -> None:
        self.table = table
        self.model_fingerprint = model_fingerprint
        self.shard_key = shard_key
        self._chosen = table.column("chosen_logps").to_numpy()
        self._rejected = table.column("rejected_logps").to_numpy()

    def lookup(self, pair_ids: Sequence[str], device: torch.device | str = "cpu") -> PairLogps:
        """The stored log-probs of `pair_ids`, in that order.

        Raises:
            KeyError: naming the first pair ids that have no stored log-probs.
        """
        index = pc.index_in(pa.array(pair_ids, pa.string()), value_set=self.table["pair_id"])
        found = index.is_valid().to_numpy(zero_copy_only=False)
        if not found.all():
            missing = [pid for pid, ok in zip(pair_ids, found, strict=True) if not ok]
            raise KeyError(
                f"{len(missing)} pair(s) have no reference log-probs (for example "
                f"{missing[:3]}); were they computed for these shards?"
            )
        i = index.to_numpy(zero_copy_only=False).astype(np.int64)
        return PairLogps(
            chosen=torch.from_numpy(self._chosen[i]).to(device),
            rejected=torch.from_numpy(self._rejected[i]).to(device),
        )


def read_reference_logps(
    path: str | Path, model_fingerprint: str | None = None, shard_key: str | None = None
) -> ReferenceLogps:
    """Read a file written by `write_reference_logps` and check its key.

    Args:
        path: the `.arrow` or `.parquet` file.
        model_fingerprint: when given, must equal the stored one.
        shard_key: when given, must equal the stored one.

    Raises:
        ValueError: the file has no key, or a key other than the one expected.
        ContractError: the table breaks the `reference_logps` contract.
    """
    path = Path(path)
    table = pq.read_table(path) if path.suffix == ".parquet" else feather.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    stored = {key: meta.get(key) for key in (contract.MODEL_FINGERPRINT, contract.SHARD_KEY)}
    if None in stored.values():
        raise ValueError(f"{path}: no model fingerprint / shard key in the file's metadata")
    expected = {contract.MODEL_FINGERPRINT: model_fingerprint, contract.SHARD_KEY: shard_key}
    for key, want in expected.items():
        if want is not None and stored[key] != want:
            raise ValueError(f"{path}: {key} is {stored[key]}, expected {want}")
    table = contract.CONTRACT.validate(table, source=str(path))
    return ReferenceLogps(table, stored[contract.MODEL_FINGERPRINT], stored[contract.SHARD_KEY])


def reference_logps_path(directory: str | Path, model_fingerprint: str, shard_key: str) -> Path:
    """Where the log-probs of (model, shards) live under `directory` by default.

    Raises:
        ValueError: a key is not hex (`_check_keys`).
    """
    _check_keys(directory, model_fingerprint, shard_key)
    return Path(directory) / f"reference_logps-{shard_key}-{model_fingerprint[:16]}.arrow"


def _check_keys(directory: str | Path, model_fingerprint: str, shard_key: str) -> None:
    """Refuse keys that are not hex: they become a file name, which `../x` would escape."""
    for what, key in (("model fingerprint", model_fingerprint), ("shard key", shard_key)):
        if not is_hex_key(key):
            raise ValueError(f"{directory}: reference cache {what} {key!r} is not a hex key")


@dataclass(frozen=True)
class ReferenceCache:
    """Where the log-probs of (model, shards) are kept: computed on first use, then reused.

    Attributes:
        directory: the folder of the cache files (e.g. beside the shards).
        shard_key: the shards' cache key.
        model_fingerprint: `checkpoint.model_fingerprint` of the reference weights.

    Raises:
        ValueError: on construction, a key that is not hex.
    """

    directory: Path
    shard_key: str
    model_fingerprint: str

    def __post_init__(self) -> None:
        _check_keys(self.directory, self.model_fingerprint, self.shard_key)

    @property
    def path(self) -> Path:
        return reference_logps_path(self.directory, self.model_fingerprint, self.shard_key)


def cached_reference_logps(
    model: nn.Module,
    rows: Sequence[PackedRow],
    layout: Layout,
    cache: ReferenceCache,
    **compute_kwargs: object,
) -> ReferenceLogps:
    """Read the (model, shards) log-probs of `cache`, computing and writing them first when
    they are not there yet. Under torch.distributed every rank computes its share of the
    rows, rank 0 writes the file, and every rank reads it.

    Args:
        model: the reference model, whose fingerprint `cache` names (plain or sharded).
        rows, layout: the packed rows and their layout.
        cache: where the file lives and its key.
        **compute_kwargs: passed to `compute_reference_logps`.
    """
    path = cache.path
    missing = [not path.exists()]
    if is_distributed():  # one decision for all ranks: they compute together or not at all
        dist.broadcast_object_list(missing, src=0)
    if missing[0]:
        table = compute_reference_logps(model, rows, layout, **compute_kwargs)
        if not is_distributed() or dist.get_rank() == 0:
            write_reference_logps(table, path, cache.model_fingerprint, cache.shard_key)
        if is_distributed():
            dist.barrier()
    return read_reference_logps(path, cache.model_fingerprint, cache.shard_key)
