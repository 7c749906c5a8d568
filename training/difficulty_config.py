"""`DifficultyConfig`: how the pairs are split into folds and scored, without torch.

The fold models train with an ordinary `TrainConfig`; these are the settings around them.
Kept apart from `difficulty.py` (as `train_config.py` is from `train.py`) so that the CLI
flags and the Dagster config and keys are built without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import check_settings, setting

# Bumped when `prefpack difficulty` would score other numbers from the same inputs (the
# split, the scoring pass, what a score is); with the trainer's and the reference code's
# versions it keys stored scores.
DIFFICULTY_VERSION = "1"
# The TrainConfig fields fold models do not take: they are not kept, evaluated or reported
# (no export dtype or LoRA merge, eval or trackers). Checkpoints are: a fold a crash
# interrupted resumes from its latest one. LoRA's other settings are the folds' too: a
# difficulty score is the held-out loss of the model the run would train.
FOLD_UNUSED_FIELDS = ("export_dtype", "lora_merge", "eval_every", "report_to")


@dataclass(frozen=True)
class DifficultyConfig:
    """The k-fold split and the scoring pass (the fold models' training is a TrainConfig)."""

    folds: int = setting(
        5, "k: one model per fold, trained on the other k-1 folds' pairs, scores the fold", ge=2
    )
    fold_seed: int = setting(0, "salts the pair-id hash that deals pairs into folds", ge=0)
    score_batch_rows: int = setting(
        8, "packed rows per forward pass when scoring the held-out pairs", ge=1
    )

    def __post_init__(self) -> None:
        check_settings(self)
