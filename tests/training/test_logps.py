"""The project's central correctness test: packed log-probs equal separate sequences.

With random weights in fp32, each pair's summed chosen and rejected log-probs from a
packed row (several pairs per row, multi-turn prompts) equal those of `prompt+chosen` and
`prompt+rejected` run alone; so do the gradients of the DPO loss; and the `unshared` and
`padded` layouts give the same numbers as `shared`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.training.pairs import pack, random_pairs, separate_logps
from tests.training.varlen_emulation import emulated_varlen
from training.batch import collate
from training.configs import tiny, tiny_gemma3, tiny_qwen2
from training.logps import pair_logps, table_logps, token_logps
from training.losses import DPOLoss, PairLogps
from training.model import CausalLM
from training.reference import compute_reference_logps

VOCAB = 512
TOL = {"rtol": 1e-5, "atol": 2e-5}


@pytest.fixture
def model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(tiny())


@pytest.fixture
def pairs() -> list:
    return random_pairs(np.random.default_rng(3), 10, VOCAB)


def _packed_logps(model: CausalLM, pairs: list, layout: str, backend: str) -> PairLogps:
    rows = pack(pairs, layout, pairs_per_row=4)  # rows of 4, 4 and 2 pairs
    batch = collate(rows, layout, backend, block_size=16)
    if backend == "varlen":  # its kernel is CUDA-only: the CPU emulation in its place
        attention = dataclasses.replace(batch.attention, kernel=emulated_varlen)
        batch = dataclasses.replace(batch, attention=attention)
    return pair_logps(model, batch)


@pytest.mark.parametrize("backend", ["dense", "segments", "varlen"])
def test_shared_row_logps_equal_separate_sequences(model, pairs, backend: str) -> None:
    chosen, rejected = separate_logps(model, pairs)
    got = _packed_logps(model, pairs, "shared", backend)
    torch.testing.assert_close(got.chosen, chosen, **TOL)
    torch.testing.assert_close(got.rejected, rejected, **TOL)
    assert (chosen - rejected).abs().min() > 1e-3  # pairs differ: no accidental symmetry


def test_qwen2_shape_shared_logps_equal_separate_sequences(pairs) -> None:
    """Biases and tied embeddings change nothing in the gather."""
    torch.manual_seed(1)
    model = CausalLM(tiny_qwen2())
    chosen, rejected = separate_logps(model, pairs)
    got = _packed_logps(model, pairs, "shared", "segments")
    torch.testing.assert_close(got.chosen, chosen, **TOL)
    torch.testing.assert_close(got.rejected, rejected, **TOL)


@pytest.mark.parametrize("backend", ["dense", "segments", "varlen"])
def test_dpo_gradients_from_shared_rows_equal_separate_sequences(
    model, pairs, backend: str
) -> None:
    """The DPO loss summed over pairs, against fixed reference log-probs: its gradient with
    respect to every weight is the same from packed rows as from separate sequences."""
    _check_dpo_gradients(model, pairs, backend)


@pytest.mark.parametrize("backend", ["dense", "segments", "varlen"])
def test_sliding_window_model_logps_and_gradients_equal_separate_sequences(
    pairs, backend: str
) -> None:
    """Gemma 3's shape: an 8-position window on layer 0 (shorter than every pair) with its
    own RoPE base, a full layer 1, sandwich norms, q/k norms and its own score scale. The
    separate sequences run with plain causal attention and the same window
    (`CausalAttention`); `test_families` checks them against transformers."""
    torch.manual_seed(1)
    model = CausalLM(tiny_gemma3())
    chosen, rejected = separate_logps(model, pairs)
    got = _packed_logps(model, pairs, "shared", backend)
    torch.testing.assert_close(got.chosen, chosen, **TOL)
    torch.testing.assert_close(got.rejected, rejected, **TOL)
    _check_dpo_gradients(model, pairs, backend)


def _check_dpo_gradients(model: CausalLM, pairs: list, backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    reference = PairLogps(
        chosen=-30 * torch.rand(len(pairs), generator=g),
        rejected=-30 * torch.rand(len(pairs), generator=g),
    )
    loss_fn = DPOLoss(beta=0.5)
    grads = []
    for packed in (True, False):
        model.zero_grad()
        if packed:
            policy = _packed_logps(model, pairs, "shared", backend)
        else:
            policy = PairLogps(*separate_logps(model, pairs))
        loss_fn(policy, reference)[0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    packed_grads, separate_grads = grads
    for name, grad in separate_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("layout", "backend"), [("unshared", "segments"), ("unshared", "dense"), ("padded", "dense")]
)
def test_baseline_layouts_give_the_shared_logps(model, pairs, layout: str, backend: str) -> None:
    shared = _packed_logps(model, pairs, "shared", "segments")
    other = _packed_logps(model, pairs, layout, backend)
    torch.testing.assert_close(other.chosen, shared.chosen, **TOL)
    torch.testing.assert_close(other.rejected, shared.rejected, **TOL)


def test_batch_keeps_pair_order_and_counts(pairs) -> None:
    for layout in ("shared", "unshared", "padded"):
        batch = collate(pack(pairs, layout, pairs_per_row=4), layout, "segments", 16)
        assert batch.pair_ids == tuple(f"pair-{i}" for i in range(len(pairs)))
        lens = [(len(p), len(c), len(r)) for p, c, r in pairs]
        assert batch.num_tokens == sum(
            p + c + r if layout == "shared" else 2 * p + c + r for p, c, r in lens
        )
        assert batch.chosen_tokens.tolist() == [c for _, c, _ in lens]
        assert batch.rejected_tokens.tolist() == [r for _, _, r in lens]
        assert len(batch.labels) == sum(c + r for _, c, r in lens)
    padded = collate(pack(pairs, "padded", 1), "padded", "segments", 16)
    assert padded.input_ids.shape == (
        2 * len(pairs),
        max(len(p) + max(len(c), len(r)) for p, c, r in pairs),
    )


@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 10_000])
def test_chunked_logps_equal_unchunked_values_and_gradients(chunk: int) -> None:
    """23 positions, vocabulary 50: chunks of 1, of sizes that do and do not divide 23, of
    exactly 23 and of more than 23 give the log-probs and the gradients (hidden states and
    output weight, under per-token upstream gradients as DPO produces them) of the plain
    (M, vocab) computation."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (23,), generator=g)
    upstream = torch.randn(23, generator=g)
    results = []
    for c in (0, chunk):
        out = token_logps(hidden, weight, labels, c)
        results.append((out, *torch.autograd.grad((out * upstream).sum(), (hidden, weight))))
    (want, *want_grads), (got, *grads) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for grad, wanted in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, wanted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5])
def test_model_dpo_gradients_do_not_depend_on_the_logits_chunk(model, pairs, chunk) -> None:
    """Through the whole model (tied output weight included): chunked and unchunked heads
    give the same DPO gradient for every weight."""
    reference = PairLogps(chosen=torch.full((len(pairs),), -20.0), rejected=torch.zeros(10) - 25)
    grads = []
    for c in (0, chunk):
        model.zero_grad()
        model.logits_chunk = c
        policy = _packed_logps(model, pairs, "shared", "segments")
        DPOLoss(beta=0.5)(policy, reference)[0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_table_logps_are_the_batch_logps_with_the_rows_lengths(model, pairs) -> None:
    """Log-probs computed over whole rows (the eval set, a fold's held-out pairs) come back
    as `pair_logps` gives them per batch, lengths included; a table of other rows' pairs
    is refused rather than paired with the wrong lengths."""
    rows = pack(pairs, "shared", pairs_per_row=4)
    batch = collate(rows, "shared", "segments", 16)
    with torch.no_grad():
        expected = pair_logps(model, batch)
    table = compute_reference_logps(model, rows, "shared", backend="segments", progress=False)
    logps = table_logps(table, rows)
    torch.testing.assert_close(logps.chosen, expected.chosen, **TOL)
    torch.testing.assert_close(logps.rejected, expected.rejected, **TOL)
    assert logps.chosen_tokens.tolist() == batch.chosen_tokens.tolist()
    assert logps.rejected_tokens.tolist() == batch.rejected_tokens.tolist()
    with pytest.raises(ValueError, match="not those of these rows' pairs"):
        table_logps(table, rows[::-1])
