"""Preference losses, one small module each (torchtune's `rlhf/loss/dpo.py` shape).

Every loss takes the policy's summed log-probs per pair (with the responses' lengths) and,
unless it `is_reference_free`, the reference's, and returns *unreduced* per-pair losses
plus detached rewards; the train loop reduces (by the number of pairs in the global step).
The rewards are TRL's: `beta * (log pi(y|x) - log pi_ref(y|x))` for a loss with a
reference, `beta * log pi(y|x) / |y|` (the policy's own per-token log-prob, as TRL's CPO
and ORPO trainers log it) for one without. With r_c = pi_c - ref_c and r_r = pi_r - ref_r
the log-ratios, h = r_c - r_r their margin, and a_c = pi_c / |y_c|, a_r = pi_r / |y_r| the
per-token log-probs:

| name       | per-pair loss                                                    | ref | paper |
| ---------- | ---------------------------------------------------------------- | --- | ----- |
| `sigmoid`  | -(1-e) log s(beta h) - e log s(-beta h)   (e = label smoothing)  | yes | DPO, cDPO |
| `robust`   | ((1-e)(-log s(beta h)) - e(-log s(-beta h))) / (1 - 2e)          | yes | rDPO |
| `ipo`      | (h - 1/(2 beta))^2                                               | yes | IPO |
| `hinge`    | max(0, 1 - beta h)                                               | yes | SLiC |
| `apo_zero` | (1 - s(beta r_c)) + s(beta r_r)                                  | yes | APO |
| `apo_down` | s(beta r_c) + (1 - s(beta h))                                    | yes | APO |
| `simpo`    | -log s(beta (a_c - a_r) - gamma)                                 | no  | SimPO |
| `orpo`     | -a_c - lambda log s(log odds_c - log odds_r), odds = e^a/(1-e^a) | no  | ORPO |

- DPO: Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290.
- cDPO (label smoothing): Mitchell 2023, "A note on DPO with noisy preferences".
- rDPO: Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409.
- IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", arXiv:2310.12036. Summed log-probs as in the paper (TRL averages per token).
- SLiC-HF: Zhao et al. 2023, arXiv:2305.10425.
- APO: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
  Revisions", arXiv:2408.06266, Eqs. 7 (zero) and 8 (down).
- SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
  Reward", arXiv:2405.14734.
- ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
  Model", arXiv:2403.07691 (the odds ratio from its Eqs. 4 and 7, as TRL derives it).
- SFT term: NLL of the chosen response per token, as in RPO (Pang et al. 2024,
  "Iterative Reasoning Preference Optimization", arXiv:2404.19733).
The formulas match TRL's (v1.16): `DPOTrainer` loss types of the same names (our IPO sums
log-probs), `CPOTrainer` with `loss_type="simpo"` (`cpo_loss`, cpo_alpha 0) and
`ORPOTrainer` (`odds_ratio_loss` plus its NLL; TRL calls lambda `beta`, and averages the
NLL over the batch's chosen tokens where we average per pair, as the paper does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class PairLogps:
    """Summed log-probs of each pair's two responses, with the responses' lengths.

    Attributes:
        chosen: (N,) float, log p(chosen | prompt) summed over the chosen tokens.
        rejected: (N,) float, the same for the rejected response.
        chosen_tokens: (N,) int64, the chosen responses' lengths in tokens, which the
            per-token losses (SimPO, ORPO, the SFT term) divide by; None for reference
            log-probs (no loss normalises those).
        rejected_tokens: (N,) int64, the same for the rejected responses.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None

    def per_token(self) -> tuple[Tensor, Tensor]:
        """The per-token log-probs log pi(y|x) / |y| of chosen and rejected.

        Raises:
            ValueError: log-probs without their lengths.
        """
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError("per-token log-probs need the responses' lengths")
        return self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens


LossOutput = tuple[Tensor, Tensor, Tensor]  # per-pair losses, chosen rewards, rejected rewards


class PreferenceLoss(nn.Module):
    """A loss of this module: `forward(policy, reference)` gives `LossOutput`. One that
    `is_reference_free` takes `reference=None`, so the trainer runs no reference pass and
    holds no reference model or log-probs (torchtune's property of the same name)."""

    @property
    def is_reference_free(self) -> bool:
        return False


def _log_ratios(policy: PairLogps, reference: PairLogps) -> tuple[Tensor, Tensor]:
    """The log-ratios r_c = pi_c - ref_c and r_r = pi_r - ref_r (with grad)."""
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _rewards_and_margin(
    policy: PairLogps, reference: PairLogps, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Detached rewards beta*(pi - ref) for both responses, and the margin h (with grad)."""
    chosen_ratio, rejected_ratio = _log_ratios(policy, reference)
    return (
        beta * chosen_ratio.detach(),
        beta * rejected_ratio.detach(),
        chosen_ratio - rejected_ratio,
    )


class DPOLoss(PreferenceLoss):
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


class RobustDPOLoss(PreferenceLoss):
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


class IPOLoss(PreferenceLoss):
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


class HingeLoss(PreferenceLoss):
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


class APOZeroLoss(PreferenceLoss):
    """APO-zero: raise the chosen log-ratio and lower the rejected one, each through its
    own sigmoid, (1 - s(beta r_c)) + s(beta r_r). DPO only moves their difference, so both
    likelihoods may fall; this anchors the chosen one upwards: for chosen responses better
    than the model's own outputs.

    Args:
        beta: scales the log-ratios. Default 0.1.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, policy: PairLogps, reference: PairLogps) -> LossOutput:
        r_c, r_r = _log_ratios(policy, reference)
        losses = (1 - torch.sigmoid(self.beta * r_c)) + torch.sigmoid(self.beta * r_r)
        return losses, self.beta * r_c.detach(), self.beta * r_r.detach()


class APODownLoss(PreferenceLoss):
    """APO-down: lower the chosen log-ratio and the rejected one more,
    s(beta r_c) + (1 - s(beta h)): for chosen responses worse than the model's own
    outputs (still better than the rejected ones).

    Args:
        beta: scales the log-ratios. Default 0.1.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, policy: PairLogps, reference: PairLogps) -> LossOutput:
        r_c, r_r = _log_ratios(policy, reference)
        losses = torch.sigmoid(self.beta * r_c) + (1 - torch.sigmoid(self.beta * (r_c - r_r)))
        return losses, self.beta * r_c.detach(), self.beta * r_r.detach()


class SimPOLoss(PreferenceLoss):
    """SimPO: the reward is the policy's own per-token log-prob, beta/|y| log pi(y|x) (what
    generation ranks by; no reference model), and the chosen reward must beat the rejected
    one by a target margin gamma: -log s(beta (a_c - a_r) - gamma).

    Args:
        beta: scales the per-token log-probs; the paper's runs use 2 to 10. Default 0.1
            (TRL's CPOConfig).
        gamma: the target reward margin. Default 0.5 (TRL's `simpo_gamma`).
    """

    def __init__(self, beta: float = 0.1, gamma: float = 0.5) -> None:
        super().__init__()
        self.beta, self.gamma = beta, gamma

    @property
    def is_reference_free(self) -> bool:
        return True

    def forward(self, policy: PairLogps, reference: None = None) -> LossOutput:
        chosen, rejected = policy.per_token()
        losses = -F.logsigmoid(self.beta * (chosen - rejected) - self.gamma)
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


class ORPOLoss(PreferenceLoss):
    """ORPO: the chosen response's per-token NLL (SFT) plus lambda times the odds-ratio
    loss -log s(log odds_c - log odds_r), with odds(y) = P/(1 - P) and P = e^a the
    per-token probability. The NLL keeps the policy on the chosen responses, so no
    reference model is needed; the term is built in, at weight 1, as in the paper.

    Args:
        lam: the paper's lambda, the weight of the odds-ratio term (TRL's ORPOConfig
            `beta`). Default 0.1.
        beta: scales the reported rewards beta * a only; the loss does not use it.
            Default 0.1.
    """

    def __init__(self, lam: float = 0.1, beta: float = 0.1) -> None:
        super().__init__()
        self.lam, self.beta = lam, beta

    @property
    def is_reference_free(self) -> bool:
        return True

    def forward(self, policy: PairLogps, reference: None = None) -> LossOutput:
        chosen, rejected = policy.per_token()
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        losses = -chosen - self.lam * F.logsigmoid(log_odds)
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


class ChosenNLL(nn.Module):
    """SFT term: weight * NLL of the chosen response averaged over its tokens, per pair."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, policy: PairLogps) -> Tensor:
        return -self.weight * policy.chosen / policy.chosen_tokens


LOSSES: dict[str, type[PreferenceLoss]] = {
    "sigmoid": DPOLoss,
    "robust": RobustDPOLoss,
    "ipo": IPOLoss,
    "hinge": HingeLoss,
    "apo_zero": APOZeroLoss,
    "apo_down": APODownLoss,
    "simpo": SimPOLoss,
    "orpo": ORPOLoss,
}


def build_loss(
    name: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
) -> PreferenceLoss:
    """The loss registered as `name`, with the hyperparameters it takes (each of
    `simpo_gamma`, `orpo_lambda` only reaches its own loss).

    Raises:
        ValueError: unknown name, or label smoothing on a loss that has none.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    if name in ("sigmoid", "robust"):
        return LOSSES[name](beta=beta, label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError(f"loss {name!r} takes no label_smoothing (sigmoid and robust do)")
    if name == "simpo":
        return SimPOLoss(beta=beta, gamma=simpo_gamma)
    if name == "orpo":
        return ORPOLoss(lam=orpo_lambda, beta=beta)
    return LOSSES[name](beta=beta)
