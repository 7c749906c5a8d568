"""Log-probs of the response tokens, without ever holding (tokens x vocab) logits.

`token_logps` runs the output projection, log-softmax and gather in chunks of `chunk`
response positions. Its backward recomputes each chunk's logits (activation checkpointing
of the head: one more (chunk x hidden) @ (hidden x vocab) matmul per chunk) and turns them
straight into the gradients of the hidden states and of the output weight, so the peak
memory of the step is one chunk's logits (chunk x vocab fp32) instead of several (M x vocab)
matrices. At vocab 128k and 16k response tokens that is 0.5 GB at the default 1024 instead
of more than 8 GB per copy. Log-softmax runs in fp32 whatever the matmul precision.

With d = dL/d logp_t, the gradient of logits_t is d * (onehot(label_t) - softmax_t): that is
all the backward needs, given the logsumexp of each row saved by the forward.

`pair_logps` sums the token log-probs per pair by the batch's targets (the rules of
docs/design.md): only the positions that predict a response token go through the head
(`logit_index`); the last prompt token's hidden state is gathered twice in the shared
layout (it predicts chosen token 0 and rejected token 0). `table_logps` gives the same `PairLogps` for log-probs
computed over whole rows (`training.reference.compute_reference_logps`: the eval set, a
fold's held-out pairs). Both carry the responses' lengths (`batch.response_lengths`), which
the per-token losses need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_contracts.packed_row import PackedRow
from training.batch import Batch, response_lengths
from training.losses import PairLogps

DEFAULT_LOGITS_CHUNK = 1024


class _ChunkedTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[label], chunk by chunk; see the module docstring."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        out = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for lo in range(0, len(labels), chunk):
            logits = F.linear(hidden[lo : lo + chunk], weight).float()  # (c, vocab)
            lse[lo : lo + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, labels[lo : lo + chunk, None])[:, 0]
            out[lo : lo + chunk] = picked - lse[lo : lo + chunk]
            del logits  # before the next chunk's logits exist: one (chunk, vocab) at a time
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        )
        for lo in range(0, len(labels), ctx.chunk):
            h, d = hidden[lo : lo + ctx.chunk], grad_out[lo : lo + ctx.chunk, None]
            # d * (onehot - softmax), in place in the recomputed logits' buffer.
            g = F.linear(h, weight).float().sub_(lse[lo : lo + ctx.chunk, None]).exp_()
            g = g.mul_(-d).scatter_add_(1, labels[lo : lo + ctx.chunk, None], d)
            if grad_hidden is not None:
                grad_hidden[lo : lo + ctx.chunk] = g.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.T, h.float())
            del g
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def token_logps(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
    """(M,) fp32 log p(label | hidden) under the output projection `weight`.

    Args:
        hidden: (M, hidden) final hidden states of the predicting positions.
        weight: (vocab, hidden) output projection.
        labels: (M,) int64 predicted token ids.
        chunk: positions per chunk; 0 computes the whole (M, vocab) logits at once with
            plain autograd (the unchunked reference, for tests and benchmarks).
    """
    if chunk == 0:
        logits = F.linear(hidden, weight).float()  # (M, vocab)
        return -F.cross_entropy(logits, labels, reduction="none")
    return _ChunkedTokenLogps.apply(hidden, weight, labels, chunk)


def pair_logps(model: nn.Module, batch: Batch) -> PairLogps:
    """Per-pair summed log-probs of the chosen and rejected responses.

    Args:
        model: a `CausalLM` (or its DDP / FSDP wrapper).
        batch: a collated batch.

    Returns:
        Chosen and rejected log-probs, (N,) fp32 each, in the batch's pair order, with
        the responses' lengths.
    """
    token = model(
        batch.input_ids, batch.position_ids, batch.attention, batch.logit_index, batch.labels
    )  # (M,)
    sums = token.new_zeros(batch.num_pairs, 2).index_put(
        (batch.pair_index, batch.is_rejected), token, accumulate=True
    )  # (N, 2): column 0 chosen, column 1 rejected
    return PairLogps(
        chosen=sums[:, 0],
        rejected=sums[:, 1],
        chosen_tokens=batch.chosen_tokens,
        rejected_tokens=batch.rejected_tokens,
    )


def table_logps(table: pa.Table, rows: Sequence[PackedRow]) -> PairLogps:
    """The log-probs of a `reference_logps` table computed over `rows` (pairs in row order,
    as `compute_reference_logps` gives them), with the lengths of the rows' responses.

    Raises:
        ValueError: the table's pairs are not the rows' pairs in row order.
    """
    if table["pair_id"].to_pylist() != [pid for row in rows for pid in row.pair_ids]:
        raise ValueError("the log-probs are not those of these rows' pairs, in row order")
    chosen_tokens, rejected_tokens = response_lengths(rows)
    return PairLogps(
        chosen=torch.tensor(table["chosen_logps"].to_numpy()),
        rejected=torch.tensor(table["rejected_logps"].to_numpy()),
        chosen_tokens=torch.from_numpy(chosen_tokens),
        rejected_tokens=torch.from_numpy(rejected_tokens),
    )
