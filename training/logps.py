"""Summed chosen/rejected log-probs per pair, gathered by the rules of DESIGN.md.

Only the positions that predict a response token go through the output projection (the
batch's `logit_index`); the last prompt token's logits are gathered twice in the shared
layout (they predict chosen token 0 and rejected token 0). Log-softmax runs in fp32, as
`cross_entropy`: its fused kernels take about half the time of gather - logsumexp on a
(tokens, vocab) matrix, forward and backward, which matters since every layout pays it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from training.batch import Batch
from training.losses import PairLogps


def pair_logps(model: nn.Module, batch: Batch) -> PairLogps:
    """Per-pair summed log-probs of the chosen and rejected responses.

    Args:
        model: a `CausalLM` (or its DDP wrapper).
        batch: a collated batch.

    Returns:
        Chosen and rejected log-probs, (N,) fp32 each, in the batch's pair order.
    """
    logits = model(batch.input_ids, batch.position_ids, batch.attention, batch.logit_index)
    logits = logits.float()  # (M, vocab)
    token_logps = -F.cross_entropy(logits, batch.labels, reduction="none")  # (M,)
    sums = token_logps.new_zeros(batch.num_pairs, 2).index_put(
        (batch.pair_index, batch.is_rejected), token_logps, accumulate=True
    )  # (N, 2): column 0 chosen, column 1 rejected
    return PairLogps(chosen=sums[:, 0], rejected=sums[:, 1])
