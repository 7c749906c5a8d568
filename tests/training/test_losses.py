"""Each loss against its closed form on hand-picked log-probs, and against TRL's own code
where TRL (the `bench` extra) is installed.

Common inputs: policy chosen -1, rejected -3; reference chosen -2, rejected -2. So the
chosen log-ratio is +1, the rejected one -1, and the margin h = 1 - (-1) = 2.
With beta = 0.5: beta*h = 1, rewards chosen = 0.5*1 = 0.5, rejected = 0.5*(-1) = -0.5.
log s(1) = -0.31326169, log s(-1) = -1.31326169 (s = sigmoid);
s(0.5) = 0.62245933, s(-0.5) = 0.37754067, s(1) = 0.73105858.

The reference-free losses read per-token log-probs: chosen -4 over 4 tokens (a_c = -1),
rejected -9 over 3 tokens (a_r = -3). Summed, the margin would be 5; per token it is 2.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from training.losses import (
    LOSSES,
    APODownLoss,
    APOZeroLoss,
    ChosenNLL,
    DPOLoss,
    HingeLoss,
    IPOLoss,
    ORPOLoss,
    PairLogps,
    RobustDPOLoss,
    SimPOLoss,
    build_loss,
)
from training.train_config import LOSS_NAMES, REFERENCE_FREE_LOSSES

LOG_SIG_1, LOG_SIG_M1 = -0.31326169, -1.31326169


def _inputs(requires_grad: bool = False) -> tuple[PairLogps, PairLogps]:
    policy = PairLogps(
        chosen=torch.tensor([-1.0], requires_grad=requires_grad),
        rejected=torch.tensor([-3.0], requires_grad=requires_grad),
    )
    return policy, PairLogps(chosen=torch.tensor([-2.0]), rejected=torch.tensor([-2.0]))


def _per_token_inputs(requires_grad: bool = False) -> PairLogps:
    """Chosen -4 over 4 tokens, rejected -9 over 3: per token a_c = -1, a_r = -3."""
    return PairLogps(
        chosen=torch.tensor([-4.0], requires_grad=requires_grad),
        rejected=torch.tensor([-9.0], requires_grad=requires_grad),
        chosen_tokens=torch.tensor([4]),
        rejected_tokens=torch.tensor([3]),
    )


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


def test_apo_zero() -> None:
    """(1 - s(beta r_c)) + s(beta r_r) = (1 - s(0.5)) + s(-0.5) = 0.37754067 + 0.37754067
    = 0.75508134; rewards +-0.5 as DPO's."""
    losses, chosen, rejected = APOZeroLoss(beta=0.5)(*_inputs())
    _close(losses, 0.75508134)
    _close(chosen, 0.5)
    _close(rejected, -0.5)


def test_apo_zero_anchors_each_response_on_its_own() -> None:
    """d loss / d pi_c = -beta s(beta r_c) (1 - s(beta r_c)) = -0.5 * 0.62245933 * 0.37754067
    = -0.11750186, whatever the rejected log-prob (DPO's gradient depends on both)."""
    for rejected in (-3.0, -30.0):
        policy = PairLogps(
            chosen=torch.tensor([-1.0], requires_grad=True), rejected=torch.tensor([rejected])
        )
        APOZeroLoss(beta=0.5)(policy, _inputs()[1])[0].sum().backward()
        _close(policy.chosen.grad, -0.11750186)


def test_apo_down() -> None:
    """s(beta r_c) + (1 - s(beta h)) = s(0.5) + (1 - s(1)) = 0.62245933 + 0.26894142
    = 0.89140075; rewards +-0.5 as DPO's."""
    losses, chosen, rejected = APODownLoss(beta=0.5)(*_inputs())
    _close(losses, 0.89140075)
    _close(chosen, 0.5)
    _close(rejected, -0.5)


def test_simpo() -> None:
    """-log s(beta (a_c - a_r) - gamma) = -log s(0.5 * 2 - 0.5) = -log s(0.5) = 0.47407698
    (on summed log-probs it would be -log s(0.5 * 5 - 0.5) = 0.12692801); with gamma 0,
    -log s(1) = 0.31326169. Rewards beta * a: -0.5 and -1.5, detached."""
    losses, chosen, rejected = SimPOLoss(beta=0.5, gamma=0.5)(_per_token_inputs())
    _close(losses, 0.47407698)
    _close(chosen, -0.5)
    _close(rejected, -1.5)
    _close(SimPOLoss(beta=0.5, gamma=0.0)(_per_token_inputs())[0], -LOG_SIG_1)


def test_simpo_gradient_is_per_token() -> None:
    """d loss / d pi_c = -(beta / |y_c|) s(-z) = -(0.5 / 4) * s(-0.5) = -0.125 * 0.37754067
    = -0.04719258; d loss / d pi_r = (0.5 / 3) * 0.37754067 = 0.06292345."""
    policy = _per_token_inputs(requires_grad=True)
    losses, chosen, _ = SimPOLoss(beta=0.5, gamma=0.5)(policy)
    losses.sum().backward()
    _close(policy.chosen.grad, -0.04719258)
    _close(policy.rejected.grad, 0.06292345)
    assert not chosen.requires_grad


def test_orpo() -> None:
    """log odds(a) = a - log(1 - e^a): a_c = -1: -1 - log(0.63212056) = -1 + 0.45867515
    = -0.54132485; a_r = -3: -3 - log(0.95021293) = -3 + 0.05106918 = -2.94893082. The
    log odds ratio is 2.40760597, log s(2.40760597) = -0.08620574. With lambda 0.5:
    NLL -a_c = 1, plus 0.5 * 0.08620574: 1.04310287. Rewards beta * a with beta 0.25:
    -0.25 and -0.75."""
    losses, chosen, rejected = ORPOLoss(lam=0.5, beta=0.25)(_per_token_inputs())
    _close(losses, 1.04310287)
    _close(chosen, -0.25)
    _close(rejected, -0.75)


def test_orpo_odds_are_exact_on_both_sides_of_minus_log_2() -> None:
    """The odds ratio term against the paper's P/(1-P) in float64, from per-token
    log-probs near 0 (P near 1, where log(1 - e^a) cancels) to very negative ones (P near
    0, where it underflows), with finite gradients everywhere."""
    a = [-1e-4, -0.05, -0.6931, -0.6932, -2.0, -40.0]
    chosen = torch.tensor(a, requires_grad=True)
    rejected = torch.tensor(a[1:] + a[:1])
    lengths = torch.ones(len(a), dtype=torch.int64)
    policy = PairLogps(chosen, rejected, lengths, lengths)
    losses, _, _ = ORPOLoss(lam=1.0)(policy)
    losses.sum().backward()
    for i, (c, r) in enumerate(zip(a, a[1:] + a[:1], strict=True)):
        odds_c, odds_r = math.exp(c) / -math.expm1(c), math.exp(r) / -math.expm1(r)
        expected = -c + math.log1p(odds_r / odds_c)  # -log s(log(odds_c / odds_r))
        assert losses[i].item() == pytest.approx(expected, rel=1e-5), (c, r)
    assert torch.isfinite(chosen.grad).all()


def test_per_token_losses_need_the_lengths() -> None:
    policy, _ = _inputs()
    with pytest.raises(ValueError, match="need the responses' lengths"):
        SimPOLoss()(policy)


def test_chosen_nll_is_per_token() -> None:
    """weight 0.5, chosen log-prob -1 over 4 tokens: 0.5 * 1 / 4 = 0.125."""
    policy = PairLogps(
        chosen=torch.tensor([-1.0]),
        rejected=torch.tensor([-3.0]),
        chosen_tokens=torch.tensor([4]),
        rejected_tokens=torch.tensor([2]),
    )
    _close(ChosenNLL(0.5)(policy), 0.125)


def test_losses_are_unreduced() -> None:
    policy = PairLogps(chosen=torch.tensor([-1.0, -5.0]), rejected=torch.tensor([-3.0, -1.0]))
    reference = PairLogps(chosen=torch.full((2,), -2.0), rejected=torch.full((2,), -2.0))
    losses, chosen, rejected = DPOLoss(beta=0.5)(policy, reference)
    assert losses.shape == chosen.shape == rejected.shape == (2,)
    assert losses[1] > losses[0]  # the second pair prefers the rejected response


def test_build_loss_fails_fast() -> None:
    assert isinstance(build_loss("ipo", beta=0.1), IPOLoss)
    simpo = build_loss("simpo", beta=2.0, simpo_gamma=1.0, orpo_lambda=0.3)
    assert isinstance(simpo, SimPOLoss) and (simpo.beta, simpo.gamma) == (2.0, 1.0)
    orpo = build_loss("orpo", beta=0.2, simpo_gamma=1.0, orpo_lambda=0.3)
    assert isinstance(orpo, ORPOLoss) and (orpo.lam, orpo.beta) == (0.3, 0.2)
    with pytest.raises(ValueError, match="'simpo' takes no label_smoothing"):
        build_loss("simpo", beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        build_loss("kto", beta=0.1)
    with pytest.raises(ValueError, match="'hinge' takes no label_smoothing"):
        build_loss("hinge", beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        build_loss("robust", beta=0.1, label_smoothing=0.5)


def test_the_config_names_every_loss() -> None:
    """`TrainConfig.loss` choices (torch-free, for the CLI) are exactly the registered losses."""
    assert set(LOSS_NAMES) == set(LOSSES)


def test_the_config_knows_the_reference_free_losses() -> None:
    """`REFERENCE_FREE_LOSSES` (torch-free: the recipe's flag checks, the Dagster assets) are
    exactly the losses whose `is_reference_free` the trainer reads."""
    free = {name for name, loss in LOSSES.items() if loss().is_reference_free}
    assert free == set(REFERENCE_FREE_LOSSES) == {"simpo", "orpo"}


# -----------------------------------------------------------------------------
# Against TRL (v1.16, pinned in constraints.txt): its loss code run on the same numbers.

# Three pairs with other lengths and log-probs than the hand-picked ones.
_POLICY = PairLogps(
    chosen=torch.tensor([-1.0, -5.0, -12.5]),
    rejected=torch.tensor([-3.0, -1.0, -20.0]),
    chosen_tokens=torch.tensor([4, 2, 25]),
    rejected_tokens=torch.tensor([3, 1, 10]),
)
_REFERENCE = PairLogps(
    chosen=torch.tensor([-2.0, -4.0, -13.0]), rejected=torch.tensor([-2.0, -1.5, -18.0])
)


@pytest.fixture(scope="module")
def trl() -> SimpleNamespace:
    """TRL's DPO, CPO and ORPO trainer classes (their loss methods are called unbound)."""
    pytest.importorskip(
        "trl", reason="TRL (the `bench` extra) is not installed; the formula tests stand alone"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns that its API may change
        from trl import DPOTrainer
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
    return SimpleNamespace(dpo=DPOTrainer, cpo=CPOTrainer, orpo=ORPOTrainer)


def _accelerator() -> SimpleNamespace:
    """One process: gathering returns the tensor itself."""
    return SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)


def _trl_dpo(trainer: type, loss_type: str, beta: float) -> tuple[float, dict]:
    """TRL's `DPOTrainer._compute_loss` on `_POLICY` and `_REFERENCE`: its batch-mean loss and
    the metrics it logs. A stand-in model puts each sequence's summed log-prob on its one
    completion token; the reference log-probs come precomputed."""
    n = len(_POLICY.chosen)
    per_token = torch.cat([_POLICY.chosen, _POLICY.rejected])[
        :, None
    ]  # (2N, 1): [chosen; rejected]
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(2 * n, 1),
        mean_logits=torch.zeros(2 * n, 1),
        is_top1=torch.zeros(2 * n, 1, dtype=torch.bool),
    )
    metrics: dict = defaultdict(lambda: defaultdict(list))
    state = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
    )
    ones = torch.ones(2 * n, 2, dtype=torch.int64)  # prompt token + one completion token
    inputs = {
        "input_ids": torch.zeros_like(ones),
        "attention_mask": ones,
        "completion_mask": ones,
        "ref_chosen_logps": _REFERENCE.chosen,
        "ref_rejected_logps": _REFERENCE.rejected,
    }
    loss = trainer._compute_loss(state, lambda **kwargs: outputs, inputs, return_outputs=False)
    return float(loss), {k: v[0] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("name", ["apo_zero", "apo_down"])
def test_apo_equals_trl(trl: SimpleNamespace, name: str) -> None:
    """The batch mean of our per-pair losses and rewards equals TRL's DPOTrainer with
    `loss_type` of the same name."""
    loss, metrics = _trl_dpo(trl.dpo, name, beta=0.3)
    losses, chosen, rejected = LOSSES[name](beta=0.3)(_POLICY, _REFERENCE)
    assert losses.mean().item() == pytest.approx(loss, rel=1e-6)
    assert chosen.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-6)
    assert rejected.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-6)


def test_simpo_equals_trl_cpo(trl: SimpleNamespace) -> None:
    """Per pair, TRL's `CPOTrainer.cpo_loss` with `loss_type="simpo"` (on per-token
    log-probs, as its `average_log_prob` gives them for simpo; no AlphaPO, no label
    smoothing): losses and rewards beta * a."""
    state = SimpleNamespace(
        alpha=0.0,
        accelerator=_accelerator(),
        loss_type="simpo",
        simpo_gamma=0.7,
        beta=2.0,
        label_smoothing=0.0,
    )
    expected = trl.cpo.cpo_loss(state, *_POLICY.per_token())
    for ours, theirs in zip(SimPOLoss(beta=2.0, gamma=0.7)(_POLICY), expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_orpo_equals_trl(trl: SimpleNamespace) -> None:
    """Per pair, TRL's `ORPOTrainer.odds_ratio_loss` (its `beta` is lambda) gives
    lambda * log s(log odds ratio), which TRL subtracts from its NLL: our loss minus our
    NLL term (-a_c) is its negative, and the rewards lambda * a are the same. (TRL's NLL is
    the mean over the batch's chosen tokens, ours the mean of each pair's per-token NLL,
    the paper's; they agree when the chosen lengths do.)"""
    state = SimpleNamespace(beta=0.3, accelerator=_accelerator())
    odds, chosen, rejected, _, _ = trl.orpo.odds_ratio_loss(state, *_POLICY.per_token())
    ours = ORPOLoss(lam=0.3, beta=0.3)(_POLICY)
    torch.testing.assert_close(ours[0] + _POLICY.per_token()[0], -odds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], chosen, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[2], rejected, rtol=1e-6, atol=1e-6)
