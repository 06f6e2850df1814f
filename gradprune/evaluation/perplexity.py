"""Held-out perplexity over a sliding window, a unigram baseline, and the counts that say what
pruning removed."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from gradprune.device import bf16_autocast, model_device
from gradprune.progress import progress_bar


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

    Returns perplexity, mean loss (nats per token), tokens_scored, windows, context, stride,
    and per window its summed loss and scored tokens (window_nll, window_tokens: what a
    bootstrap interval resamples).
    """
    model.eval()
    device = model_device(model)
    token_ids = token_ids.reshape(-1).long().to(device)
    spans = window_spans(len(token_ids), context, stride)
    window_nll, window_tokens = [], []
    for start in progress_bar(range(0, len(spans), batch_size), desc="perplexity windows"):
        group = spans[start:start + batch_size]
        windows = torch.stack([token_ids[begin:end] for begin, end, _ in group])
        with bf16_autocast(device, bf16):
            logits = model(input_ids=windows).logits
        for row, (begin, end, first) in enumerate(group):
            # logits at window index j predict the token at index j + 1
            predicted = logits[row, first - begin - 1:end - begin - 1].float()
            window_nll.append(nn.functional.cross_entropy(
                predicted, windows[row, first - begin:], reduction="sum").item())
            window_tokens.append(end - first)
    count = sum(window_tokens)
    loss = sum(window_nll) / count
    return {"perplexity": math.exp(loss), "loss": loss, "tokens_scored": count,
            "windows": len(spans), "context": context, "stride": stride,
            "window_nll": window_nll, "window_tokens": window_tokens}


# How the Wanda and SparseGPT reference code scores WikiText-2, written beside the number.
PAPER_PROTOCOL = ("the Wanda/SparseGPT protocol: the test text (a datasets split's rows joined "
                  "with '\\n\\n') tokenized once, cut into non-overlapping windows of "
                  "{context} tokens (the remainder dropped), each scored on its own; exp of the "
                  "mean loss")


def paper_perplexity(model: nn.Module, token_ids: torch.Tensor, context: int,
                     batch_size: int, bf16: bool) -> dict:
    """Perplexity as the Wanda and SparseGPT reference code computes it on WikiText-2: the
    stream cut into floor(n / context) non-overlapping windows of `context` tokens, the
    remainder dropped, every token but a window's first predicted from that window alone;
    exp of the mean loss (each window scores context - 1 tokens, so the mean of the windows'
    mean losses that code takes is the mean over tokens). `sliding_window_perplexity`'s
    result, with `protocol` saying this."""
    token_ids = token_ids.reshape(-1)
    windows = len(token_ids) // context
    if windows == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of "
                         f"{context}; give a longer text or a shorter context")
    scored = sliding_window_perplexity(model, token_ids[:windows * context], context, context,
                                       batch_size, bf16)
    return {**scored, "protocol": PAPER_PROTOCOL.format(context=context)}


def read_test_text(path: str | Path) -> str:
    """The text a perplexity protocol scores: a .txt file as it is; the "text" column of a
    Parquet file, an Arrow file, or a Hugging Face datasets folder (`save_to_disk` output, a
    DatasetDict's folder whose test split is used, or a hub snapshot's test-*.parquet files)
    joined with blank lines, as the papers' code joins WikiText-2's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_file() and path.suffix == ".txt":
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        folder = path / "test" if (path / "test").is_dir() else path
        files = sorted(folder.glob("*.arrow")) or sorted(
            p for p in path.rglob("*.parquet") if "test" in p.name)
    elif path.suffix in (".parquet", ".arrow"):
        files = [path]
    else:
        files = []
    if not files:
        raise FileNotFoundError(
            f"{path}: no test text found; give a .txt file, a Parquet/Arrow file with a 'text' "
            "column, or a Hugging Face datasets folder (save_to_disk, or a snapshot with "
            "test-*.parquet)")
    rows: list[str] = []
    for file in files:
        if file.suffix == ".parquet":
            table = pq.read_table(file)
        else:
            with pa.memory_map(str(file)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
        if "text" not in table.column_names:
            raise ValueError(f"{file}: has no 'text' column (columns: {table.column_names})")
        rows += table.column("text").to_pylist()
    return "\n\n".join(rows)


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

