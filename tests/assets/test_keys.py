"""Content keys of the training and difficulty assets, and the flags their commands take.

Fast: no graph, no subprocess. The assets run against Pipes clients that record the command
instead of running it.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

import prefpack
from assets import keys
from assets.configs import DifficultyScoresConfig, ReferenceConfig, TrainingConfig
from assets.difficulty import difficulty_scores, selected_model
from assets.keys import (
    content_key,
    device_class,
    difficulty_key,
    model_fingerprint,
    weights_fingerprint,
)
from assets.resources import ComputeResource, ModelResource, SourcesResource, StoreResource
from assets.training import config_flags, reference_logps, trained_model
from core.settings import config_from
from pipeline.io import REPORT_FILE
from training.difficulty_config import DifficultyConfig
from training.train_config import TrainConfig

SHARD_KEY = "0123456789abcdef0123"


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A Hugging Face folder as the fingerprint sees it: config.json and weights."""
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(bytes(range(64)))
    (folder / "tokenizer.json").write_text("{}")  # not weights: not fingerprinted
    return folder


def test_new_weights_at_the_same_path_change_the_fingerprint_and_keys(checkpoint) -> None:
    model = ModelResource(path=str(checkpoint))
    compute = ComputeResource()
    before = model_fingerprint(model), content_key(SHARD_KEY, model, compute)
    (checkpoint / "tokenizer.json").write_text('{"edited": true}')
    assert (model_fingerprint(model), content_key(SHARD_KEY, model, compute)) == before
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(bytes(reversed(range(64))))  # same path, same size
    after = model_fingerprint(model), content_key(SHARD_KEY, model, compute)
    assert after[0] != before[0] and after[1] != before[1]


def test_fingerprint_reads_an_untouched_folder_once(checkpoint, monkeypatch) -> None:
    opened: list[str] = []
    real_open = Path.open

    def counting_open(self: Path, *args, **kwargs):
        opened.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    first = weights_fingerprint(checkpoint)
    assert sorted(opened) == ["config.json", "model.safetensors"]
    assert weights_fingerprint(checkpoint) == first
    assert len(opened) == 2  # the second answer came from (size, mtime_ns), not the bytes


def test_a_named_config_is_keyed_by_name_and_seed() -> None:
    base = model_fingerprint(ModelResource(config="tiny", seed=0))
    assert model_fingerprint(ModelResource(config="tiny", seed=0)) == base
    assert model_fingerprint(ModelResource(config="tiny", seed=1)) != base
    assert model_fingerprint(ModelResource(config="small", seed=0)) != base


def test_keys_change_with_precision_device_class_and_trainer_version(monkeypatch) -> None:
    model = ModelResource()
    key = content_key(SHARD_KEY, model, ComputeResource(precision="fp32", device="cpu"))
    assert content_key(SHARD_KEY, model, ComputeResource(precision="bf16", device="cpu")) != key
    assert content_key(SHARD_KEY, model, ComputeResource(precision="fp32", device="cuda")) != key
    # The device's index is not its class: cuda:0 and cuda:1 compute the same numbers.
    assert content_key(SHARD_KEY, model, ComputeResource(device="cuda:1")) == content_key(
        SHARD_KEY, model, ComputeResource(device="cuda:0")
    )
    monkeypatch.setattr(keys, "TRAINER_CODE_VERSION", keys.TRAINER_CODE_VERSION + "+1")
    assert content_key(SHARD_KEY, model, ComputeResource(device="cpu")) != key


def test_auto_device_class_follows_the_visible_gpus(tmp_path, monkeypatch) -> None:
    gpus = tmp_path / "gpus"
    gpus.mkdir()
    monkeypatch.setattr(keys, "NVIDIA_GPUS", gpus)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_class("auto") == "cpu"  # a driver without GPUs
    (gpus / "0000:01:00.0").mkdir()
    assert device_class("auto") == "cuda"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device_class("auto") == "cpu"  # hidden from this process
    assert device_class("cpu") == "cpu" and device_class("cuda:3") == "cuda"


class RecordingPipes(dg.PipesSubprocessClient):
    """A Pipes client that records each command and reports an empty materialization."""

    def __init__(self) -> None:
        super().__init__()
        self.commands: list[list[str]] = []

    def run(self, *, context, command, **kwargs):
        self.commands.append(list(command))
        return self

    def get_materialize_result(self) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={})


def _reference(tmp_path: Path, compute: ComputeResource) -> tuple[list[str], dg.MaterializeResult]:
    """Run the reference_logps asset with a recording client: (command, output)."""
    pipes = RecordingPipes()
    output = reference_logps(
        context=dg.build_asset_context(),
        config=ReferenceConfig(),
        packed_shards=str(tmp_path / "shards" / SHARD_KEY),
        model=ModelResource(),
        compute=compute,
        store=StoreResource(root=str(tmp_path / "store")),
        pipes_subprocess_client=pipes,
    )
    return pipes.commands[0], output


def test_reference_logps_runs_in_the_training_precision_under_its_own_path(tmp_path) -> None:
    fp32_command, fp32 = _reference(tmp_path, ComputeResource(precision="fp32", device="cpu"))
    bf16_command, bf16 = _reference(tmp_path, ComputeResource(precision="bf16", device="cuda"))
    flags = bf16_command[bf16_command.index("logps") :]
    assert flags[flags.index("--precision") + 1] == "bf16"
    assert flags[flags.index("--device") + 1] == "cuda"
    assert fp32_command[fp32_command.index("--precision") + 1] == "fp32"
    assert fp32.value != bf16.value and Path(bf16.value).name.endswith("-bf16.arrow")
    assert fp32.data_version != bf16.data_version
    assert bf16.metadata["precision"] == "bf16"
    assert bf16.metadata["device"] == "cuda"


def test_difficulty_keys_change_with_k_settings_reference_and_code(monkeypatch) -> None:
    model, compute = ModelResource(), ComputeResource(device="cpu")
    settings = DifficultyScoresConfig(folds=5).model_dump()
    key = difficulty_key(SHARD_KEY, model, compute, "ref.arrow", settings)
    assert difficulty_key(SHARD_KEY, model, compute, "ref.arrow", dict(settings)) == key
    changed = [
        difficulty_key(SHARD_KEY, model, compute, "ref.arrow", {**settings, "folds": 4}),
        difficulty_key(SHARD_KEY, model, compute, "ref.arrow", {**settings, "steps": 7}),
        difficulty_key(SHARD_KEY, model, compute, "ref.arrow", {**settings, "nproc_per_node": 2}),
        difficulty_key(SHARD_KEY, model, compute, "other.arrow", settings),
        difficulty_key("f" * 20, model, compute, "ref.arrow", settings),
        difficulty_key(SHARD_KEY, ModelResource(seed=1), compute, "ref.arrow", settings),
        difficulty_key(SHARD_KEY, model, ComputeResource(device="cuda"), "ref.arrow", settings),
    ]
    assert len({key, *changed}) == len(changed) + 1
    # Neither a trained model's key, nor the same after the scoring code's version moves.
    assert key != content_key(SHARD_KEY, model, compute, reference="ref.arrow", training=settings)
    monkeypatch.setattr(keys, "DIFFICULTY_CODE_VERSION", keys.DIFFICULTY_CODE_VERSION + "+1")
    assert difficulty_key(SHARD_KEY, model, compute, "ref.arrow", settings) != key


def test_difficulty_config_is_what_prefpack_difficulty_takes() -> None:
    """Every field of the asset's config but the process count is a flag of the command it
    launches, and lands in the same setting there."""
    config = DifficultyScoresConfig(folds=4, fold_seed=2, steps=7, lr=1e-3, adam_betas=[0.8, 0.9])
    values = config.model_dump()
    values.pop("nproc_per_node")
    argv = ["difficulty", "--shards", "s", "--config", "tiny", "--out", "o", *config_flags(values)]
    args = prefpack.build_parser().parse_args(argv)
    assert config_from(DifficultyConfig, args) == DifficultyConfig(folds=4, fold_seed=2)
    train = config_from(TrainConfig, args, out_dir=Path("o"))
    assert (train.steps, train.lr, train.adam_betas) == (7, 1e-3, (0.8, 0.9))


class Launched(Exception):
    """What `StopAtLaunch` raises once it has the command."""


class StopAtLaunch(dg.PipesSubprocessClient):
    """A Pipes client that records the command and stops the asset there."""

    def __init__(self) -> None:
        super().__init__()
        self.commands: list[list[str]] = []

    def run(self, *, context, command, **kwargs):
        self.commands.append(list(command))
        raise Launched


@pytest.mark.parametrize("loss", ["sigmoid", "apo_zero", "simpo", "orpo"])
def test_a_reference_free_loss_is_launched_without_reference_files(tmp_path, loss) -> None:
    """trained_model, selected_model and difficulty_scores pass the reference assets'
    files to a loss that has a reference, and none to a reference-free one (whose command
    would refuse them), which also leaves them out of the key."""
    curated = tmp_path / "curated"
    curated.mkdir()
    (curated / REPORT_FILE).write_text('{"sources": {}}')
    shards, eval_shards = str(tmp_path / "shards" / SHARD_KEY), str(tmp_path / "eval")
    common = {
        "model": ModelResource(),
        "compute": ComputeResource(device="cpu"),
        "store": StoreResource(root=str(tmp_path / "store")),
    }
    pipes = StopAtLaunch()
    runs = {
        "trained_model": lambda: trained_model(
            context=dg.build_asset_context(),
            config=TrainingConfig(loss=loss),
            curated_pairs=str(curated),
            packed_shards=shards,
            reference_logps="ref.arrow",
            eval_shards=eval_shards,
            eval_reference_logps="eval_ref.arrow",
            sources=SourcesResource(),
            pipes_subprocess_client=pipes,
            **common,
        ),
        "selected_model": lambda: selected_model(
            context=dg.build_asset_context(),
            config=TrainingConfig(loss=loss),
            curated_pairs=str(curated),
            selected_shards=shards,
            eval_shards=eval_shards,
            eval_reference_logps="eval_ref.arrow",
            trained_model=str(tmp_path / "trained"),
            sources=SourcesResource(),
            pipes_subprocess_client=pipes,
            **common,
        ),
        "difficulty_scores": lambda: list(
            difficulty_scores(
                context=dg.build_asset_context(),
                config=DifficultyScoresConfig(loss=loss),
                packed_shards=shards,
                reference_logps="ref.arrow",
                pipes_subprocess_client=pipes,
                **common,
            )
        ),
    }
    for run in runs.values():
        with pytest.raises(Launched):
            run()
    reads = loss not in ("simpo", "orpo")
    trained, selected, scored = pipes.commands
    assert ("ref.arrow" in trained, "eval_ref.arrow" in trained) == (reads, reads)
    assert ("--reference-cache" in selected, "eval_ref.arrow" in selected) == (reads, reads)
    assert ("--reference" in scored) == reads
    assert all("--eval-shards" in command for command in (trained, selected))


def test_a_model_path_with_another_tokenizer_fails_before_anything_launches(tmp_path) -> None:
    """The tokenizer check of `prefpack train` runs in the asset too: a model folder whose
    own tokenizer is not the shards' fails the asset with one line naming both, and no
    command launches; `allow_tokenizer_mismatch` launches it with the override flag."""
    from tests.training.base_folders import chatml_shards, tiny_model
    from training.checkpoint import save_pretrained

    (tmp_path / "chatml").mkdir()
    shards = chatml_shards(tmp_path / "chatml")
    model_dir = save_pretrained(tiny_model(), tmp_path / "model")
    fixture = Path(__file__).parents[1] / "fixtures" / "gpt2_small_tokenizer.json"
    (model_dir / "tokenizer.json").write_bytes(fixture.read_bytes())
    pipes = StopAtLaunch()

    def run(model: ModelResource) -> None:
        reference_logps(
            context=dg.build_asset_context(),
            config=ReferenceConfig(),
            packed_shards=str(shards),
            model=model,
            compute=ComputeResource(device="cpu"),
            store=StoreResource(root=str(tmp_path / "store")),
            pipes_subprocess_client=pipes,
        )

    with pytest.raises(dg.Failure) as failed:
        run(ModelResource(path=str(model_dir)))
    assert "the shards' tokenizer" in failed.value.description
    assert f"{model_dir}/tokenizer.json" in failed.value.description
    assert "\n" not in failed.value.description and pipes.commands == []
    with pytest.raises(Launched):
        run(ModelResource(path=str(model_dir), allow_tokenizer_mismatch=True))
    assert "--allow-tokenizer-mismatch" in pipes.commands[0]
