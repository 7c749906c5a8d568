"""The recipes behind `prefpack train`, `logps` and `difficulty`: from the paths a user
names to finished results, the same by hand, under torchrun and under Dagster Pipes.

    recipe = TrainRecipe(config, inputs)  # every setting checked; nothing read yet
    recipe.setup()      # shards (rank 0 verifies), model, tokenizer check, references
    recipe.train()      # the loop of `training.train`, evaluating every --eval-every steps
    recipe.evaluate()   # the eval metrics now
    recipe.export()     # final/: weights, the base model's tokenizer files, a model card
    recipe.cleanup()

`run_train`, `run_logps` and `run_difficulty` are what the commands run
(`training/cli.py` only parses flags into a config and `Inputs`). Each opens the Pipes
context first when Dagster launched it (rank 0), so Dagster hears of a run that fails its
checks too, then joins torchrun's process group for the whole command
(`training.parallel.process_group`). Under torchrun every process runs the recipe; what
rank 0 alone decides (the shards' sha256, which checkpoint to resume, whether a cached
file exists) reaches the others through `training.parallel.from_rank0`, and only rank 0
prints, writes the metrics and reports.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic import keyed_directory
from core.inputs import is_hub_id
from pipeline.shards import ShardError, ShardReader, open_shards, read_report, write_scores
from training.checkpoint import load_pretrained, model_fingerprint
from training.configs import named_config
from training.device import check_precision, resolve_backend, resolve_device
from training.difficulty import (
    Difficulty,
    folds_directory,
    identity_of,
    score_difficulty,
    staged_directory,
)
from training.difficulty_config import DifficultyConfig
from training.export_files import ExportTokenizer
from training.lora import LoraSettings, lora_settings
from training.model import CausalLM
from training.model_card import CardFacts, ShardFacts, render_card
from training.parallel import load_sharded, prepare
from training.ranks import agree, from_rank0, process_group, world_and_rank
from training.reference import (
    ReferenceCache,
    ReferenceKey,
    ReferenceLogps,
    cached_reference_logps,
    compute_reference_logps,
    read_reference_logps,
    write_reference_logps,
)
from training.report import (
    METRICS,
    PipesReporter,
    format_summary,
    pipes_context,
    pipes_reporter,
    reference_metadata,
    summarize,
)
from training.tokenizer_match import tokenizer_mismatch
from training.trackers import Trackers, check_trackers, open_trackers
from training.train import Run, check_config, evaluate, export, fit, release, setup
from training.train_config import REFERENCE_FREE_LOSSES, TrainConfig

# At or below this peak learning rate a run only fine-tunes: a random init learns nothing.
FINE_TUNING_LR = 1e-5


@dataclass(frozen=True)
class Inputs:
    """What a command reads, as the user named it.

    Attributes:
        shards: the packed shard directory.
        model: a Hugging Face folder; None for `config`.
        config: a named size from `training/configs.py`, randomly initialised with the
            shards' vocabulary.
        init_seed: the torch seed of that random init.
        verify: hash every shard file when opening (rank 0 does, once per job).
        reference: stored reference log-probs of the shards (`prefpack logps`).
        reference_cache: a directory where reference log-probs not given are computed
            once, keyed, and reused by later runs.
        eval_shards: shards to evaluate on, packed like the training shards.
        eval_reference: stored reference log-probs of the eval shards.
        allow_tokenizer_mismatch: use the model although its folder's tokenizer is not
            the shards' (by content).
        card_sources: the pairs' sources for the model card, each `NAME` or
            `NAME=HUB_ID` (hub ids become the card's `datasets`).
    """

    shards: Path
    model: Path | None = None
    config: str | None = None
    init_seed: int = 0
    verify: bool = True
    reference: Path | None = None
    reference_cache: Path | None = None
    eval_shards: Path | None = None
    eval_reference: Path | None = None
    allow_tokenizer_mismatch: bool = False
    card_sources: tuple[str, ...] = ()

    @property
    def random_init_seed(self) -> int | None:
        """The seed a checkpoint records: that of a random init, None for a loaded model."""
        return self.init_seed if self.config is not None else None

    @property
    def described(self) -> str:
        return str(self.model or f"config {self.config}")


def _rank() -> int:
    return world_and_rank()[1]


def _say(command: str, line: str, pipes: Any | None = None) -> None:
    """On rank 0: `line` to Dagster's log under Pipes, else to stderr, as the command's."""
    if _rank() != 0:
        return
    if pipes is not None:
        pipes.log.info(line)
    else:
        print(f"prefpack {command}: {line}", file=sys.stderr)


def _hint_fine_tuning_lr(command: str, inputs: Inputs, lr: float, pipes: Any | None) -> None:
    """On rank 0, a hint when a randomly initialised `--config` model is to train at a
    fine-tuning rate (it would barely move): to Dagster's log under Pipes, else stderr."""
    if _rank() != 0 or inputs.config is None or lr > FINE_TUNING_LR:
        return
    line = (
        f"hint: --lr {lr:g} is a fine-tuning rate; a randomly initialised "
        f"--config {inputs.config} model barely moves at it (try --lr 1e-3)"
    )
    if pipes is not None:
        pipes.log.warning(line)
    else:
        print(f"prefpack {command}: {line}", file=sys.stderr)


# -----------------------------------------------------------------------------
# Inputs: shards, model, reference


def open_shards_once(directory: Path, verify: bool) -> ShardReader:
    """Open the shards; under torchrun rank 0 alone checks their sha256 (every byte read
    once per job, not once per process) while the others wait for its verdict, which
    every rank then raises alike.

    Raises:
        ShardError: a missing or corrupt shard directory, on every rank.
    """
    reader = None

    def verified() -> str | None:
        nonlocal reader
        try:
            reader = open_shards(directory, verify=verify)
        except (ValueError, OSError) as err:
            return str(err)
        return None

    if not verify:
        return open_shards(directory, verify=False)
    problem = from_rank0(verified)
    if problem is not None:
        raise ShardError(problem)
    return reader or open_shards(directory, verify=False)


def loads_sharded(inputs: Inputs, parallel: str, compile: bool = False) -> bool:
    """Whether the model is loaded already sharded (`training.parallel.load_sharded`):
    a checkpoint folder under FSDP with several processes, so that no process holds the
    whole model (in `train`, a live reference is then loaded sharded too). Not with
    --compile: blocks are compiled before they are sharded (FSDP's hooks stay outside the
    compiled code), so that run loads the model whole first."""
    sharded = inputs.model is not None and parallel == "fsdp" and world_and_rank()[0] > 1
    return sharded and not compile


def load_model(
    inputs: Inputs,
    data: ShardReader,
    device: torch.device,
    precision: str,
    sharded: bool = False,
    trainable: bool = True,
    lora: LoraSettings | None = None,
) -> CausalLM:
    """The fp32 model of `inputs` for these shards: a Hugging Face folder (whose own
    tokenizer, when it has one, must be the shards', checked before any weight is read),
    sharded over the process group on `device` when `sharded` (with the `lora` adapters
    added before sharding; a whole model gets them in `training.train.setup`), or a named
    config initialised with `init_seed`.

    Raises:
        ValueError: unknown config name; a model folder whose tokenizer is not the shards'
            (unless `allow_tokenizer_mismatch`); a model whose vocabulary is smaller than
            the shards' tokenizer.
        FileNotFoundError: a folder without config.json.
    """
    vocab = int(data.manifest["tokenizer"]["vocab_size"])
    if inputs.model is not None:
        if not (inputs.model / "config.json").is_file():
            raise FileNotFoundError(f"{inputs.model}: no config.json; not a Hugging Face folder")
        if not inputs.allow_tokenizer_mismatch:  # rank 0 reads both, every rank stops alike
            agree(lambda: tokenizer_mismatch(data.directory, inputs.model))
        if sharded:
            model = load_sharded(inputs.model, device, precision, trainable, lora)
        else:
            model = load_pretrained(inputs.model)
    else:
        config = dataclasses.replace(named_config(inputs.config), vocab_size=vocab)
        torch.manual_seed(inputs.init_seed)
        model = CausalLM(config)
    if model.config.vocab_size < vocab:
        raise ValueError(
            f"the shards' tokenizer has {vocab} tokens but the model only "
            f"{model.config.vocab_size}; pack with the model's tokenizer"
        )
    return model


def reference_key(data: ShardReader, model: CausalLM, precision: str) -> ReferenceKey:
    """The key of this model's log-probs over these shards in this precision."""
    return ReferenceKey(model_fingerprint(model), data.key, precision)


def stored_reference(
    command: str,
    file: Path | None,
    cache: Path | None,
    data: ShardReader,
    model: CausalLM,
    precision: str,
) -> ReferenceLogps | ReferenceCache | None:
    """The reference log-probs of `data` that are stored: `file` (refused unless its key is
    this model's, these shards' and this precision's), else a cache in `cache` that the
    run fills first if it is empty, else None (the run computes them).

    Raises:
        FileNotFoundError: `file` does not exist.
        ValueError: `file` holds the log-probs of another key, each difference named.
    """
    if file is None and cache is None:
        return None
    key = reference_key(data, model, precision)
    if file is not None:
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file; write it with prefpack logps")
        return read_reference_logps(file, key)
    stored = ReferenceCache(cache, key)
    found = "reusing" if stored.path.exists() else "computing"
    _say(command, f"reference log-probs: {found} {stored.path}")
    return stored


def _refuse_reference(config: TrainConfig, inputs: Inputs) -> None:
    """Raises: ValueError naming the reference flags given with a reference-free loss,
    which would read none of them (a user mistake, before anything is read)."""
    if config.loss not in REFERENCE_FREE_LOSSES:
        return
    given = [
        flag
        for flag, value in (
            ("--reference", inputs.reference),
            ("--reference-cache", inputs.reference_cache),
            ("--eval-reference", inputs.eval_reference),
        )
        if value is not None
    ]
    if given:
        raise ValueError(
            f"{' and '.join(given)}: --loss {config.loss} is reference-free and reads no "
            f"reference log-probs; leave {'it' if len(given) == 1 else 'them'} out"
        )


def _same_tokenizer(data: ShardReader, eval_data: ShardReader) -> None:
    """Raises: ValueError when the eval shards were tokenized otherwise than the training
    shards, by content (tokenizer fingerprint, chat template), wherever the tokenizer was
    read from: their pairs would be scored in another vocabulary or format."""
    ours, theirs = data.manifest, eval_data.manifest
    differ = [
        what
        for what, entry, field in (
            ("tokenizer", "tokenizer", "fingerprint"),
            ("chat template", "template", "sha256"),
        )
        if ours[entry][field] != theirs[entry][field]
    ]
    if differ:
        raise ValueError(
            f"--eval-shards {eval_data.directory} were tokenized with another "
            f"{' and '.join(differ)} ({theirs['tokenizer']['name']}, "
            f"{theirs['template']['name']}) than the training shards "
            f"({ours['tokenizer']['name']}, {ours['template']['name']}); pack the eval pairs "
            "like the training pairs (prefpack pack --eval)"
        )


# -----------------------------------------------------------------------------
# prefpack train


class TrainRecipe:
    """One DPO run from paths: `setup`, `train`, `evaluate`, `export`, `cleanup`.

    Args:
        config: the run's settings; checked here, before anything is read.
        inputs: the shards, model, references and eval set.
        reporter: the Pipes reporter when Dagster launched the run (rank 0), else None.

    Raises:
        ValueError: settings that cannot train on this device, --eval-every or
            --eval-reference without --eval-shards, a reference flag with a reference-free
            loss, --no-lora-merge with a --config model; every problem named.
    """

    command = "train"

    def __init__(
        self, config: TrainConfig, inputs: Inputs, reporter: PipesReporter | None = None
    ) -> None:
        self.config, self.inputs, self.reporter = config, inputs, reporter
        self.device = resolve_device(config.device)
        check_config(config, self.device)
        _refuse_reference(config, inputs)
        if inputs.eval_shards is None:
            given = [
                flag
                for flag, value in (
                    ("--eval-every", config.eval_every),
                    ("--eval-reference", inputs.eval_reference),
                )
                if value
            ]
            if given:
                verb = "needs" if len(given) == 1 else "need"
                raise ValueError(f"{' and '.join(given)} {verb} --eval-shards")
        if config.lora_rank and not config.lora_merge and inputs.model is None:
            raise ValueError(
                f"--no-lora-merge with --config {inputs.config}: the adapter's base is a "
                "random init saved nowhere; export merged (the default) or train from --model"
            )
        check_trackers([config.report_to])  # every rank: a missing package stops them all
        _hint_fine_tuning_lr(self.command, inputs, config.lr, reporter and reporter.context)
        self.run: Run | None = None
        self.trackers = Trackers()

    def setup(self) -> None:
        """Open the shards and the eval shards, load the model, find the references (none
        for a reference-free loss), and set up the run (`training.train.setup`: data
        checks, preparation, resume)."""
        config, inputs = self.config, self.inputs
        self.data = open_shards_once(inputs.shards, inputs.verify)
        eval_data = None
        if inputs.eval_shards is not None:
            eval_data = open_shards_once(inputs.eval_shards, inputs.verify)
            _same_tokenizer(self.data, eval_data)
        sharded = loads_sharded(inputs, config.parallel, config.compile)
        lora = lora_settings(config)
        model = load_model(inputs, self.data, self.device, config.precision, sharded, lora=lora)
        reference = eval_reference = None
        if config.loss not in REFERENCE_FREE_LOSSES:  # a reference-free loss reads none
            reference = stored_reference(
                self.command, inputs.reference, inputs.reference_cache, self.data, model,
                config.precision,
            )  # fmt: skip
            # The live reference, loaded as the policy was (LoRA: the policy, adapters off).
            if reference is None and sharded and lora is None:
                reference = load_sharded(inputs.model, self.device, config.precision, False)
            if eval_data is not None:
                eval_reference = stored_reference(
                    self.command, inputs.eval_reference, inputs.reference_cache, eval_data,
                    model, config.precision,
                )  # fmt: skip
        if _rank() == 0:
            print(f"prefpack train: metrics: {config.out_dir / 'metrics.jsonl'}", file=sys.stderr)
        base = None if inputs.model is None else str(inputs.model.resolve())
        self.run = setup(
            config, self.data, model, reference, inputs.random_init_seed, eval_data,
            eval_reference, base,
        )  # fmt: skip
        agree(self._open_trackers)  # rank 0 opens them; a failure stops every rank alike

    def _open_trackers(self) -> str | None:
        """Open the --report-to tracker (rank 0 only); what went wrong, if anything."""
        config = self.config
        try:
            self.trackers = open_trackers(
                [config.report_to], config.out_dir, config.out_dir.name,
                dataclasses.asdict(config),
            )  # fmt: skip
        except Exception as err:  # any tracker's own error: raised on every rank by `agree`
            return f"--report-to {config.report_to}: {err}"
        return None

    def train(self) -> None:
        """Train to the last step, evaluating as configured; each step's metrics to the
        reporter and the trackers (rank 0)."""
        fit(self.run, self._on_step)

    def _on_step(self, metrics: dict[str, float]) -> None:
        if self.reporter is not None:
            self.reporter(metrics)
        self.trackers.log(metrics, int(metrics["step"]))

    def evaluate(self) -> dict[str, float]:
        """The eval metrics of the policy now (a collective under torchrun)."""
        return evaluate(self.run)

    def export(self) -> Path:
        """Write `out/final` (a collective under FSDP): the weights, the base model's
        tokenizer files and generation config (eos: the end of turn the responses end
        with), and a model card; a LoRA run's adapter (PEFT's layout) in `final/adapter/`
        with its own card, or alone in `final/` with --no-lora-merge."""
        card = adapter_card = None
        if _rank() == 0:
            facts = self._card_facts()
            if self.config.lora_rank:  # the adapter's card, and the merged model's
                adapter = dataclasses.replace(facts, adapter="adapter")
                if self.config.lora_merge:
                    adapter_card = render_card(adapter)
                    facts = dataclasses.replace(facts, adapter="merged")
                else:
                    facts = adapter
            card = render_card(facts)
        tokenizer = ExportTokenizer(self.data.directory, self.inputs.model)
        return export(self.run, tokenizer, card, adapter_card)

    def _card_facts(self) -> CardFacts:
        """What the model card states, from the run's metrics, shards and settings."""
        config, inputs, run = self.config, self.inputs, self.run
        summary = summarize(config.out_dir)
        named = run.model.hf_config.get("_name_or_path")  # a hub id, or a path: not guessed
        hub_id = named if isinstance(named, str) and is_hub_id(named) else None
        if inputs.model is not None:
            start = f"`{inputs.model}`" + (f" ({hub_id})" if hub_id else "")
        else:
            start = f"a random init of config {inputs.config} (seed {inputs.init_seed})"
        sources = [source.partition("=") for source in inputs.card_sources]
        device = self.device
        return CardFacts(
            title=config.out_dir.name,
            start=start,
            shards=ShardFacts.from_manifest(self.data.manifest),
            settings={
                name: value
                for name, value in dataclasses.asdict(config).items()
                if name not in ("out_dir", "progress")  # where and how it printed
                and (config.lora_rank or not name.startswith("lora_"))  # LoRA's, if on
            },
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            processes=run.world,
            train_seconds=summary.seconds + summary.eval_seconds,
            steps=summary.steps,
            metrics={name: summary.final[name] for name in METRICS} | summary.evaluation,
            eval_shards=None
            if run.eval_data is None
            else ShardFacts.from_manifest(run.eval_data.manifest),
            base_model=hub_id,
            sources=tuple(name for name, _, _ in sources),
            datasets=tuple(hub for _, _, hub in sources if hub),
        )

    def cleanup(self, failed: bool = False) -> None:
        """Let go of the run's process-group resources (before the group goes) and close
        the trackers (a run that `failed` is marked so where the tracker can)."""
        if self.run is not None:
            release(self.run)
        self.trackers.close(failed)

    def report(self) -> None:
        """On rank 0: the run's summary, printed, or to Dagster (one summary)."""
        if _rank() != 0:
            return
        summary = summarize(self.config.out_dir)
        if self.reporter is None:
            print(format_summary(summary))
            return
        config = self.config
        backend = resolve_backend(config.backend, self.device, config.precision)
        self.reporter.materialize(
            summary,
            extra={
                "backend": backend,
                "layout": self.data.layout,
                "shard_key": self.data.key,
                "model": self.inputs.described,
                **({"eval_shard_key": self.run.eval_data.key} if self.run.eval_data else {}),
            },
        )


def run_train(config: TrainConfig, inputs: Inputs) -> None:
    """`prefpack train`: the whole run, under Pipes and torchrun when launched so."""
    with pipes_reporter(config.steps) as reporter, process_group(resolve_device(config.device)):
        recipe = TrainRecipe(config, inputs, reporter)
        try:
            recipe.setup()
            recipe.train()
            recipe.export()
        except BaseException:
            recipe.cleanup(failed=True)
            raise
        recipe.cleanup()
        recipe.report()


# -----------------------------------------------------------------------------
# prefpack logps


def run_logps(config: TrainConfig, inputs: Inputs, out: Path, batch_rows: int) -> None:
    """`prefpack logps`: the reference log-probs of every pair of the shards into `out`
    (keyed; reused when `out` holds them for this key), every rank computing its share.

    Args:
        config: the forward pass's settings (backend, precision, device, parallel,
            logits_chunk, progress; the others are unused).
        inputs: the shards and the model.
        out: an `.arrow` or `.parquet` file.
        batch_rows: rows per forward pass.

    Raises:
        ValueError: another suffix, a bad precision, or a problem of the inputs.
    """
    if out.suffix not in (".arrow", ".parquet"):
        raise ValueError(f"--out {out}: write .arrow or .parquet")
    device = resolve_device(config.device)
    check_precision(config.precision, device)
    rank = _rank()
    with pipes_context() as pipes, process_group(device):
        data = open_shards_once(inputs.shards, inputs.verify)
        sharded = loads_sharded(inputs, config.parallel)
        model = load_model(inputs, data, device, config.precision, sharded, trainable=False)
        key = reference_key(data, model, config.precision)
        table = None
        if from_rank0(out.exists):  # one decision: compute together or reuse together
            try:
                table = read_reference_logps(out, key).table
                if rank == 0:
                    print(
                        f"reused {table.num_rows} pairs' log-probs (same model, shards and "
                        "precision)",
                        file=sys.stderr,
                    )
            except ValueError as err:
                if rank == 0:
                    print(f"replacing {out}: {err}", file=sys.stderr)
        reused = table is not None
        if not reused:  # every rank computes its share of the rows
            model.logits_chunk = config.logits_chunk
            prepare(model, config.parallel, device, config.precision, trainable=False)
            table = compute_reference_logps(
                model,
                data,
                data.layout,
                block_size=data.block_size,
                backend=config.backend,
                batch_rows=batch_rows,
                device=device,
                precision=config.precision,
                progress=config.progress,
                max_len=data.max_len,
            )
            if rank == 0:
                write_reference_logps(table, out, key)
                print(
                    f"prefpack logps: computed {table.num_rows} pairs' log-probs", file=sys.stderr
                )
        if pipes is not None:
            pipes.report_asset_materialization(metadata=reference_metadata(out, table, key, reused))
    if rank == 0 and pipes is None:  # under Pipes, the materialization names the file
        print(out)


# -----------------------------------------------------------------------------
# prefpack difficulty


def run_difficulty(
    config: DifficultyConfig, fold_config: TrainConfig, inputs: Inputs, out: Path
) -> None:
    """`prefpack difficulty`: score every pair of the shards by the held-out loss of k
    fold models into `out` (`training.difficulty`), or reuse `out` when it holds the
    scores of the same inputs, settings and code.

    Args:
        config: folds, fold seed and scoring batch.
        fold_config: how each fold model trains (its out_dir is set per fold).
        inputs: the shards, the model (also the reference) and the reference log-probs
            (none for a reference-free loss: the folds train and score without).
        out: the scores directory.

    Raises:
        ValueError: a bad setting, or a reference flag with a reference-free loss.
    """
    device = resolve_device(fold_config.device)
    rank = _rank()
    with pipes_context() as pipes, process_group(device):
        _hint_fine_tuning_lr("difficulty", inputs, fold_config.lr, pipes)
        check_config(fold_config, device)
        _refuse_reference(fold_config, inputs)
        needs_reference = fold_config.loss not in REFERENCE_FREE_LOSSES
        data = open_shards_once(inputs.shards, inputs.verify)
        sharded = loads_sharded(inputs, fold_config.parallel, fold_config.compile)
        model = load_model(inputs, data, device, fold_config.precision, sharded)
        key = reference_key(data, model, fold_config.precision)
        identity = identity_of(
            data, inputs.random_init_seed, key.model_fingerprint,
            key if needs_reference else None, fold_config, config,
        )  # fmt: skip

        def log(line: str) -> None:  # under Pipes, Dagster shows it (once)
            if pipes is not None:
                pipes.log.info(line)
            else:
                print(line, file=sys.stderr)

        def verify(scores: Path) -> None:  # on every rank: they build together or not at all
            report = read_report(scores)  # ShardError: missing or edited
            if changed := [part for part in identity if report[part] != identity[part]]:
                raise ValueError(f"its {' and '.join(changed)} differ")

        def build(tmp: Path) -> None:  # every rank, in rank 0's temporary directory
            reference = None
            if needs_reference:
                reference = _scoring_reference(inputs, data, model, fold_config, config)
            lora = lora_settings(fold_config)
            initial = _initial_models(inputs, model, sharded, device, fold_config.precision, lora)
            result = score_difficulty(
                dataclasses.replace(fold_config, out_dir=folds_directory(out, identity)),
                config,
                data,
                initial,
                reference,
                init_seed=inputs.random_init_seed,
                on_fold=lambda entry: log(_fold_line(entry, config.folds)),
            )
            if rank == 0:
                write_scores(tmp, result.scores, result.folds, identity)
                log(_scores_line(result))

        def replacing(problem: Exception) -> None:
            if rank == 0:
                log(f"replacing {out}: {problem}")

        _, reused = keyed_directory(
            out, verify, build, stage=staged_directory, rebuilding=replacing
        )
        if rank == 0:
            if reused:
                log(f"reused {out}: the same shards, model, reference and settings")
            # the scores are in place: the fold runs (a crash's too) are done with
            shutil.rmtree(folds_directory(out, identity), ignore_errors=True)
    if rank == 0 and pipes is None:  # under Pipes, the asset names the directory
        print(out)


def _initial_models(
    inputs: Inputs,
    model: CausalLM,
    sharded: bool,
    device: torch.device,
    precision: str,
    lora: LoraSettings | None,
) -> Callable[[], CausalLM]:
    """A fresh initial policy per fold: a copy of `model`, or one loaded sharded again
    (a sharded model is not copied) with the `lora` adapters added before sharding."""
    if not sharded:
        return lambda: copy.deepcopy(model)
    return lambda: load_sharded(inputs.model, device, precision, lora=lora)


def _scoring_reference(
    inputs: Inputs,
    data: ShardReader,
    model: CausalLM,
    train_config: TrainConfig,
    config: DifficultyConfig,
) -> ReferenceLogps:
    """The reference log-probs every fold trains and is scored against: --reference,
    --reference-cache (computed there first if absent), or computed here in memory."""
    precision = train_config.precision
    stored = stored_reference(
        "difficulty", inputs.reference, inputs.reference_cache, data, model, precision
    )
    if isinstance(stored, ReferenceLogps):
        return stored
    model.logits_chunk = train_config.logits_chunk
    kwargs = {
        "block_size": data.block_size,
        "backend": train_config.backend,
        "batch_rows": config.score_batch_rows,
        "device": resolve_device(train_config.device),
        "progress": train_config.progress,
        "max_len": data.max_len,
    }
    if stored is not None:  # a cache directory
        return cached_reference_logps(model, data, data.layout, stored, **kwargs)
    table = compute_reference_logps(model, data, data.layout, precision=precision, **kwargs)
    return ReferenceLogps(table, reference_key(data, model, precision))


def _fold_line(entry: dict, folds: int) -> str:
    return (
        f"fold {entry['fold'] + 1}/{folds}: trained on {entry['train_pairs']} pairs "
        f"({entry['steps']} steps, final loss {entry['train_loss']:.4f}), scored "
        f"{entry['held_out_pairs']} held-out pairs: loss {entry['held_out_loss']:.4f}, "
        f"accuracy {entry['held_out_accuracy']:.3f}"
    )


def _scores_line(result: Difficulty) -> str:
    loss = result.scores.column("loss").to_numpy()
    return (
        f"scored {result.scores.num_rows} pairs in {len(result.folds)} folds: held-out loss "
        f"mean {loss.mean():.4f}, median {float(np.median(loss)):.4f}, max {loss.max():.4f}"
    )
