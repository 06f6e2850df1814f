"""Held-out perplexity over a sliding window, a unigram baseline, and the counts that say what
pruning removed."""

from __future__ import annotations

import math
import sys
from typing import Iterable, TypeVar

import torch
from torch import nn

from gradprune.device import bf16_autocast, model_device


def window_spans(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window of the sliding-window evaluation.

    Windows hold `context` tokens (fewer only if the text is shorter) and end `stride` tokens
    apart; each scores the positions in [first_scored, end) that no earlier window scored.
    With stride < context every token after the first is scored exactly once, with at least
    context - stride tokens of history; stride == context gives non-overlapping blocks, where
    each block's first token has no history and is not scored.
    """
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 2 and 1 <= stride <= context; got context={context}, "
                         f"stride={stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score; got {n_tokens}")
    spans, scored_to, end = [], 0, min(context, n_tokens)
    while True:
        begin = max(0, end - context)
        spans.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n_tokens:
            return spans
        end = min(end + stride, n_tokens)


@torch.no_grad()
def sliding_window_perplexity(model: nn.Module, token_ids: torch.Tensor, context: int,
                              stride: int, batch_size: int, bf16: bool) -> dict:
    """Perplexity of one token stream, scored in windows of `context` tokens that advance by
    `stride` (the "perplexity of fixed-length models" method; see `window_spans`).

    Returns perplexity, mean loss (nats per token), tokens_scored, windows, context, stride.
    """
    model.eval()
    device = model_device(model)
    token_ids = token_ids.reshape(-1).long().to(device)
    spans = window_spans(len(token_ids), context, stride)
    total, count = 0.0, 0
    for start in progress_bar(range(0, len(spans), batch_size), desc="perplexity windows"):
        group = spans[start:start + batch_size]
        windows = torch.stack([token_ids[begin:end] for begin, end, _ in group])
        with bf16_autocast(device, bf16):
            logits = model(input_ids=windows).logits
        for row, (begin, end, first) in enumerate(group):
            # logits at window index j predict the token at index j + 1
            predicted = logits[row, first - begin - 1:end - begin - 1].float()
            total += nn.functional.cross_entropy(predicted, windows[row, first - begin:],
                                                 reduction="sum").item()
            count += end - first
    loss = total / count
    return {"perplexity": math.exp(loss), "loss": loss, "tokens_scored": count,
            "windows": len(spans), "context": context, "stride": stride}


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


Item = TypeVar("Item")


def progress_bar(items: Iterable[Item], desc: str, total: int | None = None) -> Iterable[Item]:
    """`items` with a tqdm progress bar on stderr when stderr is a terminal, else unchanged."""
    if not sys.stderr.isatty():
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, total=total, leave=False)
