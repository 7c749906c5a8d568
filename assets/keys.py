"""Content keys of the training assets: what a trained model and a reference file depend on.

A key hashes everything that changes the numbers: the shard key (data, tokenizer, template,
pack settings), the model's *content* fingerprint (its weight bytes, not its path), the
trainer's code version, the precision and the device class (CPU and CUDA kernels round
differently), and the run settings. So new weights at the same path, a changed trainer or
bf16 instead of fp32 make a new key, and an unchanged one reuses the finished result.

Nothing here imports torch: the Dagster process fingerprints the files, not the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from assets.resources import ComputeResource, ModelResource
from training.difficulty_config import DIFFICULTY_VERSION
from training.train_config import REFERENCE_VERSION, TRAINER_VERSION

# The trainer's and the reference code's versions (training/train_config.py): a bump gives
# every trained model and reference file a new key and the training assets a new code
# version.
TRAINER_CODE_VERSION = f"train{TRAINER_VERSION}-ref{REFERENCE_VERSION}"
# Difficulty scores come from fold models the trainer trains: its version and the scoring
# code's (training/difficulty_config.py).
DIFFICULTY_CODE_VERSION = f"{TRAINER_CODE_VERSION}-difficulty{DIFFICULTY_VERSION}"

WEIGHT_PATTERNS = ("config.json", "*.safetensors")  # what a checkpoint's numbers are read from
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the driver sees

# (folder, (file, size, mtime_ns) per weight file) -> sha256: a file not touched since it
# was hashed is not read again in this process.
_weights_cache: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The files of a Hugging Face folder that hold its numbers, sorted by name.

    Raises:
        FileNotFoundError: the folder has no config.json (not a Hugging Face folder).
    """
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model {folder}: no config.json; not a Hugging Face folder")
    return sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)})


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 over the names and bytes of a checkpoint's weight files (config.json and
    every *.safetensors), cached by each file's (size, mtime_ns) so that asking again for
    an untouched folder costs a few stat calls."""
    folder = Path(folder).resolve()
    files = weight_files(folder)
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    cache_key = (str(folder), stamp)
    if cache_key not in _weights_cache:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        _weights_cache[cache_key] = digest.hexdigest()
    return _weights_cache[cache_key]


def model_fingerprint(model: ModelResource) -> str:
    """The content fingerprint of the configured model: its weight files' sha256, or for
    a named config the name and init seed (the init is seeded, so that is its content)."""
    if model.path:
        return "weights:" + weights_fingerprint(model.path)
    return "config:" + _digest([model.config, model.seed])


def device_class(device: str) -> str:
    """`cpu` or `cuda`: the kind of device a `--device` value runs on.

    `auto` is resolved as `training.device.resolve_device` does (CUDA when present), from
    the driver's GPU list and CUDA_VISIBLE_DEVICES instead of importing torch.
    """
    if device != "auto":
        return device.split(":")[0]
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    gpus = NVIDIA_GPUS.is_dir() and any(NVIDIA_GPUS.iterdir())
    return "cuda" if gpus and not hidden else "cpu"


def compute_identity(compute: ComputeResource) -> dict[str, str]:
    """What of the compute settings changes the numbers: precision and device class."""
    return {"precision": compute.precision, "device": device_class(compute.device)}


def content_key(
    shard_key: str, model: ModelResource, compute: ComputeResource, **settings: object
) -> str:
    """The key (16 hex digits) of a result computed by the trainer from these shards and
    this model: a reference file, or a training run (whose `settings` name the reference
    file it reads and its run config)."""
    payload = {
        "shards": shard_key,
        "model": model_fingerprint(model),
        "trainer": TRAINER_CODE_VERSION,
        **compute_identity(compute),
        "settings": settings,
    }
    return _digest(payload)[:16]


def difficulty_key(
    shard_key: str,
    model: ModelResource,
    compute: ComputeResource,
    reference: str,
    settings: dict[str, object],
) -> str:
    """The key (16 hex digits) of difficulty scores: a training key (shards, model content,
    trainer version, precision, device class) plus the scoring code's version, the reference
    file the fold models train and are scored against, and every setting (k, fold seed,
    the fold models' training, the process count)."""
    return content_key(
        shard_key,
        model,
        compute,
        code=DIFFICULTY_CODE_VERSION,
        reference=reference,
        difficulty=settings,
    )
