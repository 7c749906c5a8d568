"""Reference log-probs computed once per (model, shards, precision) and reused by every run.

DPO needs log p_ref(chosen) and log p_ref(rejected) per pair; they depend only on the
reference weights, the tokens, the precision they were computed in and the code that
computed them, so a run can read them from a file instead of holding a second model in
memory and running a second forward pass each step. A file is keyed by all four
(`ReferenceKey`: the model fingerprint of `checkpoint.model_fingerprint`, the shard key,
fp32 / bf16, and `REFERENCE_VERSION`), stored in its schema metadata and checked on read:
a bf16 run given fp32 log-probs would start with a policy/reference ratio that is not 1
and a loss that is not log 2. `cached_reference_logps` computes a file when absent.

Format: the `reference_logps` contract, as Arrow IPC (`.arrow`) or Parquet (`.parquet`).
Lookups go through a sorted index of the pair ids built once per file, so a micro-batch
costs the same whatever the table's size (`benchmarks/reference_lookup.py`).
"""

from __future__ import annotations

import dataclasses
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
from torch.distributed.fsdp import FSDPModule

from core.atomic import atomic_file, is_hex_key, remove_leftovers
from core.progress import progress as show_progress
from data_contracts import reference_logps as contract
from data_contracts.packed_row import DEFAULT_BLOCK_SIZE, Layout, PackedRow
from training.attention import Backend
from training.batch import check_rows, collate, rows_table
from training.device import Precision, autocast, check_precision, resolve_backend, resolve_device
from training.logps import pair_logps
from training.losses import PairLogps
from training.parallel import is_sharded
from training.ranks import agree, from_rank0, is_distributed
from training.train_config import REFERENCE_VERSION


@dataclass(frozen=True)
class ReferenceKey:
    """What stored reference log-probs depend on; each field is a schema metadata key.

    Attributes:
        model_fingerprint: `checkpoint.model_fingerprint` of the reference weights.
        shard_key: the shards' cache key.
        precision: `fp32` or `bf16`, the precision of the forward pass (and the run's).
        reference_version: `REFERENCE_VERSION` of the code that computed them.
    """

    model_fingerprint: str
    shard_key: str
    precision: Precision
    reference_version: str = REFERENCE_VERSION

    def metadata(self) -> dict[bytes, bytes]:
        return {k.encode(): v.encode() for k, v in dataclasses.asdict(self).items()}

    def differences(self, expected: ReferenceKey) -> list[str]:
        """`field is stored, expected wanted` for each field that differs."""
        stored, want = dataclasses.asdict(self), dataclasses.asdict(expected)
        return [f"{k} is {stored[k]}, expected {want[k]}" for k in stored if stored[k] != want[k]]

    @classmethod
    def from_metadata(cls, meta: dict[bytes, bytes] | None, source: str) -> ReferenceKey:
        """The key stored in a file's schema metadata.

        Raises:
            ValueError: a key field is missing (a file of an older prefpack), all named.
        """
        text = {k.decode(): v.decode() for k, v in (meta or {}).items()}
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in text]
        if missing:
            raise ValueError(
                f"{source}: no {', '.join(missing)} in the file's metadata; recompute it "
                "with prefpack logps"
            )
        return cls(**{name: text[name] for name in names})


def _share(num_rows: int, world: int, rank: int) -> range:
    """This rank's contiguous block of rows (blocks differ by at most one row)."""
    return range(num_rows * rank // world, num_rows * (rank + 1) // world)


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
        max_len: the shards' max_len: every row is checked against it, and `flex` pads
            every batch to it (one compiled shape).

    Returns:
        A `reference_logps` table, pairs in row order.

    Raises:
        ValueError: a bad row (`batch.check_rows`), on every rank, before the first pass.
    """
    dev = resolve_device(str(device))
    check_precision(precision, dev)
    backend = resolve_backend(backend, dev, precision)
    if not is_sharded(model):
        model.to(dev)
    model.eval()
    # No autograd state; inference mode only for a model that is not sharded: FSDP2 keeps
    # the gathered-parameter buffers of these passes for the policy's training passes,
    # which cannot write into inference tensors.
    no_autograd = torch.no_grad() if is_sharded(model) else torch.inference_mode()
    config = model.config
    check_rows(rows, max_len, config.vocab_size)  # before any pass
    world, rank = (dist.get_world_size(), dist.get_rank()) if is_distributed() else (1, 0)
    share = _share(len(rows), world, rank)
    # Every rank runs as many passes as the largest share needs (a short share repeats its
    # last batch and drops the result), so sharded forwards stay in step.
    largest_share = -(-len(rows) // world)
    passes = -(-largest_share // batch_rows)
    ids: list[str] = []
    chosen, rejected = [], []
    bar = show_progress(
        range(passes),
        total=passes,
        desc="reference log-probs",
        unit="batch",
        enabled=progress and rank == 0,
    )
    for i in bar:
        lo = share.start + i * batch_rows
        row_ids = range(lo, min(lo + batch_rows, share.stop))
        if not row_ids:
            row_ids = range(max(share.start, share.stop - 1), share.stop) or range(1)
        chunk = [rows[j] for j in row_ids]
        batch = collate(chunk, layout, backend, block_size, dev, pad_to=max_len)
        with no_autograd, autocast(dev, precision):
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
    if is_sharded(model):  # the root keeps its parameters gathered after a forward
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
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


def write_reference_logps(table: pa.Table, path: str | Path, key: ReferenceKey) -> Path:
    """Write `table` with its key in the schema metadata, atomically (`atomic_file`).

    Args:
        table: a `reference_logps` table.
        path: `.arrow` (uncompressed Arrow IPC) or `.parquet`.
        key: the model, shards, precision and code version that produced it.

    Returns:
        The path.

    Raises:
        ValueError: another suffix.
    """
    path = Path(path)
    if path.suffix not in (".arrow", ".parquet"):
        raise ValueError(f"{path}: reference log-probs are written as .arrow or .parquet")
    table = contract.CONTRACT.validate(table, source=str(path))
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **key.metadata()})
    with atomic_file(path) as tmp:
        if path.suffix == ".arrow":
            feather.write_feather(table, tmp, compression="uncompressed")
        else:
            pq.write_table(table, tmp)
    return path


def _id_array(pair_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Pair ids as a numpy bytes array (UTF-8), which sorts and searches vectorised."""
    return pc.cast(pair_ids, pa.binary()).to_numpy(zero_copy_only=False).astype(np.bytes_)


class ReferenceLogps:
    """Stored reference log-probs, looked up by pair id.

    The ids are sorted once here (about 0.6 s per million pairs); a lookup is then a
    binary search of its own ids only, whatever the size of the table.

    Attributes:
        table: the `reference_logps` table.
        key: what the numbers depend on.
    """

    def __init__(self, table: pa.Table, key: ReferenceKey) -> None:
        self.table = table
        self.key = key
        ids = _id_array(table["pair_id"])
        order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[order]
        self._sorted_strings = table["pair_id"].combine_chunks().take(order)
        self._chosen = table.column("chosen_logps").to_numpy()[order]
        self._rejected = table.column("rejected_logps").to_numpy()[order]

    def _find(self, pair_ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """(position in the sorted ids, found) per pair id. The bytes array finds the
        position; the strings there are then compared exactly (numpy's bytes drop
        trailing NULs, so `a\\0` would otherwise match `a`)."""
        n = len(self._sorted_ids)
        if not n:
            return np.zeros(len(pair_ids), np.int64), np.zeros(len(pair_ids), bool)
        pos = np.minimum(np.searchsorted(self._sorted_ids, _id_array(pair_ids)), n - 1)
        same = pc.equal(self._sorted_strings.take(pa.array(pos)), pair_ids)
        return pos, np.asarray(same.to_numpy(zero_copy_only=False), bool)

    def contains(self, pair_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Whether each of `pair_ids` has stored log-probs (bool per id)."""
        return self._find(pair_ids)[1]

    def lookup(self, pair_ids: Sequence[str], device: torch.device | str = "cpu") -> PairLogps:
        """The stored log-probs of `pair_ids`, in that order.

        Raises:
            KeyError: naming the first pair ids that have no stored log-probs (training
                checks every pair once before step 1: `check_covers`).
        """
        pos, found = self._find(pa.array(pair_ids, pa.string()))
        if not found.all():
            missing = [pid for pid, ok in zip(pair_ids, found, strict=True) if not ok]
            raise KeyError(
                f"{len(missing)} pair(s) have no reference log-probs (for example "
                f"{missing[:3]}); were they computed for these shards?"
            )
        return PairLogps(
            chosen=torch.from_numpy(self._chosen[pos]).to(device),
            rejected=torch.from_numpy(self._rejected[pos]).to(device),
        )

    def check_covers(self, rows: Sequence[PackedRow]) -> None:
        """Fail before any work, on every rank alike, unless every pair of `rows` has
        stored log-probs; rank 0 checks all pairs at once (`training.ranks.agree`).

        Raises:
            ValueError: naming the first row and pair without log-probs, and how many.
        """

        def problem() -> str | None:
            pair_ids = rows_table(rows)["pair_ids"]
            flat = pc.list_flatten(pair_ids)
            missing = np.flatnonzero(~self.contains(flat))
            if not len(missing):
                return None
            ends = np.cumsum(pc.list_value_length(pair_ids).to_numpy())
            row = int(np.searchsorted(ends, missing[0], side="right"))
            return (
                f"row {row}: pair {flat[int(missing[0])].as_py()} has no reference log-probs "
                f"({len(missing)} of {len(flat)} pairs missing); were they computed for "
                "these shards?"
            )

        agree(problem)


def read_reference_logps(path: str | Path, expected: ReferenceKey | None = None) -> ReferenceLogps:
    """Read a file written by `write_reference_logps` and check its key.

    Args:
        path: the `.arrow` or `.parquet` file.
        expected: when given, the key the file must have (every field).

    Raises:
        ValueError: the file has no key, or a key other than `expected`, every differing
            field named with both values.
        ContractError: the table breaks the `reference_logps` contract.
    """
    path = Path(path)
    table = pq.read_table(path) if path.suffix == ".parquet" else feather.read_table(path)
    key = ReferenceKey.from_metadata(table.schema.metadata, str(path))
    differences = [] if expected is None else key.differences(expected)
    if differences:
        raise ValueError(f"{path}: reference log-probs of another run: " + "; ".join(differences))
    table = contract.CONTRACT.validate(table, source=str(path))
    return ReferenceLogps(table, key)


@dataclass(frozen=True)
class ReferenceCache:
    """Where the log-probs of a key are kept: computed on first use, then reused.

    The file is `directory/reference_logps-<shard key>-<fingerprint[:16]>-<precision>-
    v<REFERENCE_VERSION>.arrow`, and its metadata holds the whole key (checked on read).

    Attributes:
        directory: the folder of the cache files (e.g. beside the shards).
        key: the model, shards, precision and code version.

    Raises:
        ValueError: on construction, a fingerprint or shard key that is not hex: they
            become a file name, which `../x` would escape.
    """

    directory: Path
    key: ReferenceKey

    def __post_init__(self) -> None:
        for what, key in (
            ("model fingerprint", self.key.model_fingerprint),
            ("shard key", self.key.shard_key),
        ):
            if not is_hex_key(key):
                raise ValueError(
                    f"{self.directory}: reference cache {what} {key!r} is not a hex key"
                )

    @property
    def path(self) -> Path:
        k = self.key
        name = f"{k.shard_key}-{k.model_fingerprint[:16]}-{k.precision}-v{k.reference_version}"
        return Path(self.directory) / f"reference_logps-{name}.arrow"


def cached_reference_logps(
    model: nn.Module,
    rows: Sequence[PackedRow],
    layout: Layout,
    cache: ReferenceCache,
    **compute_kwargs: object,
) -> ReferenceLogps:
    """Read the log-probs of `cache`, computing and writing them first when they are not
    there yet. Under torch.distributed every rank computes its share of the rows, rank 0
    writes the file, and every rank reads it.

    Args:
        model: the reference model, whose fingerprint `cache` names (plain or sharded).
        rows, layout: the packed rows and their layout.
        cache: where the file lives and its key (its precision is the one computed in).
        **compute_kwargs: passed to `compute_reference_logps`.
    """
    path = cache.path

    def absent() -> bool:  # rank 0's look; dead runs' leftovers of the file go either way
        remove_leftovers(path)
        return not path.exists()

    # One decision for all ranks: they compute together or not at all.
    if from_rank0(absent):
        table = compute_reference_logps(
            model, rows, layout, precision=cache.key.precision, **compute_kwargs
        )
        if not is_distributed() or dist.get_rank() == 0:
            write_reference_logps(table, path, cache.key)
        if is_distributed():
            dist.barrier()
    return read_reference_logps(path, cache.key)
