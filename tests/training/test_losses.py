"""Each loss against its closed form on hand-picked log-probs.

Common inputs: policy chosen -1, rejected -3; reference chosen -2, rejected -2. So the
chosen log-ratio is +1, the rejected one -1, and the margin h = 1 - (-1) = 2.
With beta = 0.5: beta*h = 1, rewards chosen = 0.5*1 = 0.5, rejected = 0.5*(-1) = -0.5.
log s(1) = -0.31326169, log s(-1) = -1.31326169 (s = sigmoid).
"""

from __future__ import annotations

import pytest
import torch

from training.losses import (
    LOSSES,
    ChosenNLL,
    DPOLoss,
    HingeLoss,
    IPOLoss,
    PairLogps,
    RobustDPOLoss,
    build_loss,
)
from training.train_config import LOSS_NAMES

LOG_SIG_1, LOG_SIG_M1 = -0.31326169, -1.31326169


def _inputs(requires_grad: bool = False) -> tuple[PairLogps, PairLogps]:
    policy = PairLogps(
        chosen=torch.tensor([-1.0], requires_grad=requires_grad),
        rejected=torch.tensor([-3.0], requires_grad=requires_grad),
    )
    return policy, PairLogps(chosen=torch.tensor([-2.0]), rejected=torch.tensor([-2.0]))


def _close(actual: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor([expected]), rtol=1e-6, atol=1e-6)


def test_sigmoid_dpo() -> None:
    """-log s(beta h) = -log s(1) = 0.31326169; rewards +-0.5, detached."""
    losses, chosen, rejected = DPOLoss(beta=0.5)(*_inputs())
    _close(losses, -LOG_SIG_1)
    _close(chosen, 0.5)
    _close(rejected, -0.5)


def test_sigmoid_dpo_gradient() -> None:
    """d loss / d pi_c = -beta * s(-beta h) = -0.5 * 0.26894142 = -0.13447071, and
    d loss / d pi_r is its negative."""
    policy, reference = _inputs(requires_grad=True)
    losses, chosen, _ = DPOLoss(beta=0.5)(policy, reference)
    losses.sum().backward()
    _close(policy.chosen.grad, -0.13447071)
    _close(policy.rejected.grad, 0.13447071)
    assert not chosen.requires_grad


def test_label_smoothing_is_cdpo() -> None:
    """e = 0.1: 0.9 * 0.31326169 + 0.1 * 1.31326169 = 0.28193552 + 0.13132617 = 0.41326169."""
    losses, _, _ = DPOLoss(beta=0.5, label_smoothing=0.1)(*_inputs())
    _close(losses, 0.41326169)


def test_robust_dpo() -> None:
    """e = 0.1: (0.9 * 0.31326169 - 0.1 * 1.31326169) / (1 - 0.2)
    = (0.28193552 - 0.13132617) / 0.8 = 0.15060935 / 0.8 = 0.18826169."""
    losses, _, _ = RobustDPOLoss(beta=0.5, label_smoothing=0.1)(*_inputs())
    _close(losses, 0.18826169)


def test_robust_without_noise_is_dpo() -> None:
    _close(RobustDPOLoss(beta=0.5)(*_inputs())[0], -LOG_SIG_1)


def test_ipo() -> None:
    """(h - 1/(2 beta))^2: beta 0.5 -> (2 - 1)^2 = 1; beta 0.25 -> (2 - 2)^2 = 0."""
    _close(IPOLoss(beta=0.5)(*_inputs())[0], 1.0)
    _close(IPOLoss(beta=0.25)(*_inputs())[0], 0.0)


def test_hinge() -> None:
    """max(0, 1 - beta h): beta 0.5 -> max(0, 0) = 0; beta 0.25 -> 1 - 0.5 = 0.5."""
    _close(HingeLoss(beta=0.5)(*_inputs())[0], 0.0)
    _close(HingeLoss(beta=0.25)(*_inputs())[0], 0.5)


def test_chosen_nll_is_per_token() -> None:
    """weight 0.5, chosen log-prob -1 over 4 tokens: 0.5 * 1 / 4 = 0.125."""
    policy, _ = _inputs()
    _close(ChosenNLL(0.5)(policy, torch.tensor([4])), 0.125)


def test_losses_are_unreduced() -> None:
    policy = PairLogps(chosen=torch.tensor([-1.0, -5.0]), rejected=torch.tensor([-3.0, -1.0]))
    reference = PairLogps(chosen=torch.full((2,), -2.0), rejected=torch.full((2,), -2.0))
    losses, chosen, rejected = DPOLoss(beta=0.5)(policy, reference)
    assert losses.shape == chosen.shape == rejected.shape == (2,)
    assert losses[1] > losses[0]  # the second pair prefers the rejected response


def test_build_loss_fails_fast() -> None:
    assert isinstance(build_loss("ipo", beta=0.1), IPOLoss)
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        build_loss("kto", beta=0.1)
    with pytest.raises(ValueError, match="'hinge' takes no label_smoothing"):
        build_loss("hinge", beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        build_loss("robust", beta=0.1, label_smoothing=0.5)


def test_the_config_names_every_loss() -> None:
    """`TrainConfig.loss` choices (torch-free, for the CLI) are exactly the registered losses."""
    assert set(LOSS_NAMES) == set(LOSSES)
