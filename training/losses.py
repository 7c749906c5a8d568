"""Preference losses, one small module each (torchtune's `rlhf/loss/dpo.py` shape).

Every loss takes the policy's and the reference's summed log-probs per pair and returns
*unreduced* per-pair losses plus the detached implicit rewards
`beta * (log pi(y|x) - log pi_ref(y|x))`; the train loop reduces (by the number of pairs in
the global step). With h = (pi_c - ref_c) - (pi_r - ref_r), the log-ratio margin:

| name      | per-pair loss                                                       | paper |
| --------- | ------------------------------------------------------------------- | ----- |
| `sigmoid` | -(1-e) log s(beta h) - e log s(-beta h)   (e = label smoothing)     | DPO, cDPO |
| `robust`  | ((1-e)(-log s(beta h)) - e(-log s(-beta h))) / (1 - 2e)             | rDPO |
| `ipo`     | (h - 1/(2 beta))^2                                                  | IPO |
| `hinge`   | max(0, 1 - beta h)                                                  | SLiC |

- DPO: Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290.
- cDPO (label smoothing): Mitchell 2023, "A note on DPO with noisy preferences".
- rDPO: Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409.
- IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", arXiv:2310.12036. Summed log-probs as in the paper (TRL averages per token).
- SLiC-HF: Zhao et al. 2023, arXiv:2305.10425.
- SFT term: NLL of the chosen response per token, as in RPO (Pang et al. 2024,
  "Iterative Reasoning Preference Optimization", arXiv:2404.19733).
The formulas match TRL's `DPOTrainer.dpo_loss` loss types of the same names
(`trl/trainer/dpo_trainer.py`), except that our IPO sums log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PairLogps:
    """Summed log-probs of each pair's two responses.

    Attributes:
        chosen: (N,) float, log p(chosen | prompt) summed over the chosen tokens.
        rejected: (N,) float, the same for the rejected response.
    """

    chosen: Tensor
    rejected: Tensor


LossOutput = tuple[Tensor, Tensor, Tensor]  # per-pair losses, chosen rewards, rejected rewards


def _rewards_and_margin(
    policy: PairLogps, reference: PairLogps, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Detached rewards beta*(pi - ref) for both responses, and the margin h (with grad)."""
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    return (
        beta * chosen_ratio.detach(),
        beta * rejected_ratio.detach(),
        chosen_ratio - rejected_ratio,
    )


class DPOLoss(nn.Module):
    """Sigmoid DPO; with `label_smoothing` e > 0 it is conservative DPO (cDPO), which treats
    each preference label as flipped with probability e.

    Args:
        beta: KL strength; larger keeps the policy closer to the reference. Default 0.1.
        label_smoothing: e in [0, 0.5). Default 0 (plain DPO).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing = beta, label_smoothing

    def forward(self, policy: PairLogps, reference: PairLogps) -> LossOutput:
        chosen_rewards, rejected_rewards, h = _rewards_and_margin(policy, reference, self.beta)
        e = self.label_smoothing
        losses = -(1 - e) * F.logsigmoid(self.beta * h) - e * F.logsigmoid(-self.beta * h)
        return losses, chosen_rewards, rejected_rewards


class RobustDPOLoss(nn.Module):
    """rDPO: an unbiased estimate of the clean DPO loss when labels flip with rate e.

    Args:
        beta: KL strength. Default 0.1.
        label_smoothing: the assumed flip rate e in [0, 0.5). Default 0 (plain DPO).
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing = beta, label_smoothing

    def forward(self, policy: PairLogps, reference: PairLogps) -> LossOutput:
        chosen_rewards, rejected_rewards, h = _rewards_and_margin(policy, reference, self.beta)
        e = self.label_smoothing
        losses = (-(1 - e) * F.logsigmoid(self.beta * h) + e * F.logsigmoid(-self.beta * h)) / (
            1 - 2 * e
        )
        return losses, chosen_rewards, rejected_rewards


class IPOLoss(nn.Module):
    """IPO: regress the log-ratio margin to 1/(2 beta) instead of pushing it to infinity.

    Args:
        beta: the regularisation tau of the paper. Default 0.1.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, policy: PairLogps, reference: PairLogps) -> LossOutput:
        chosen_rewards, rejected_rewards, h = _rewards_and_margin(policy, reference, self.beta)
        return (h - 1 / (2 * self.beta)) ** 2, chosen_rewards, rejected_rewards


class HingeLoss(nn.Module):
    """SLiC hinge on the scaled log-ratio margin.

    Args:
        beta: scales the margin; the hinge is at beta*h = 1. Default 0.1.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, policy: PairLogps, reference: PairLogps) -> LossOutput:
        chosen_rewards, rejected_rewards, h = _rewards_and_margin(policy, reference, self.beta)
        return F.relu(1 - self.beta * h), chosen_rewards, rejected_rewards


class ChosenNLL(nn.Module):
    """SFT term: weight * NLL of the chosen response averaged over its tokens, per pair."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, policy: PairLogps, chosen_tokens: Tensor) -> Tensor:
        return -self.weight * policy.chosen / chosen_tokens


LOSSES: dict[str, type[nn.Module]] = {
    "sigmoid": DPOLoss,
    "robust": RobustDPOLoss,
    "ipo": IPOLoss,
    "hinge": HingeLoss,
}


def build_loss(name: str, beta: float, label_smoothing: float = 0.0) -> nn.Module:
    """The loss registered as `name`.

    Raises:
        ValueError: unknown name, or label smoothing on a loss that has none.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    if name in ("sigmoid", "robust"):
        return LOSSES[name](beta=beta, label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError(f"loss {name!r} takes no label_smoothing (sigmoid and robust do)")
    return LOSSES[name](beta=beta)
