"""Held-out perplexity, a unigram baseline, and the counts that say what pruning removed."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradprune.training import mean_loss


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int, bf16: bool) -> float:
    """exp(mean next-token loss) over non-overlapping blocks; context = block length."""
    return math.exp(mean_loss(model, blocks, batch_size, bf16))


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor,
                       vocab_size: int) -> float:
    """Perplexity of add-one-smoothed token frequencies from train, on the tokens a model
    would be scored on (every position of each block but the first)."""
    counts = torch.bincount(train_blocks.reshape(-1), minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    targets = eval_blocks[:, 1:].reshape(-1)
    return math.exp(-log_probs[targets].mean().item())


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Unique parameters (tied weights counted once) and how many of them are non-zero."""
    seen, total, nonzero = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return {"parameters": total, "nonzero": nonzero}
