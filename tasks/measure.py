"""The measurements that compare rows and the evaluate stage both report, taken the same way
for both: test perplexity (sliding windows, or target tokens for seq2seq), perplexity of the
out-of-domain texts and zero-shot accuracy."""

from __future__ import annotations

import math
import statistics

import torch

from gradprune.config import Params
from gradprune.data import ood_documents, read_blocks
from gradprune.evaluation.perplexity import sliding_window_perplexity
from gradprune.evaluation.zeroshot import evaluate_task
from gradprune.models.llama import bf16_enabled
from gradprune.models.seq2seq import Seq2SeqTransformer
from gradprune.training.loop import mean_loss
from tasks.stage import DATA

TEST = DATA / "prepare" / "test.parquet"


def test_tokens(params: Params):
    """The test split as one token stream, cut to evaluate.max_tokens."""
    tokens = read_blocks(TEST).reshape(-1)
    return tokens if params.evaluate.max_tokens is None else tokens[: params.evaluate.max_tokens]


def test_examples(params: Params, target_length: int, limit: int | None = None):
    """The first seq2seq test examples (packed rows): at most `limit`, and no more than hold
    evaluate.max_tokens target tokens."""
    rows = read_blocks(TEST)
    if params.evaluate.max_tokens is not None:
        rows = rows[: math.ceil(params.evaluate.max_tokens / target_length)]
    return rows if limit is None else rows[:limit]


def perplexity_window(params: Params) -> tuple[int, int]:
    """(context, stride) of sliding-window perplexity: the evaluate params or their defaults."""
    context = params.evaluate.context or params.data.block_size
    return context, params.evaluate.stride or max(1, context // 2)


def test_perplexity(model, params: Params) -> dict:
    """Test perplexity as compare and evaluate report it: sliding windows over the test token
    stream for a decoder LM; for the seq2seq model, target-token perplexity of the test
    examples (teacher forcing, pad tokens not scored)."""
    cfg = params.evaluate
    bf16 = bf16_enabled(cfg.bf16)
    if isinstance(model, Seq2SeqTransformer):
        rows = test_examples(params, model.config.target_length)
        loss = mean_loss(model, rows, cfg.batch_size, bf16)
        targets = model.split(rows)[1]
        return {"perplexity": math.exp(loss), "loss": loss, "examples": len(rows),
                "tokens_scored": int((targets != model.config.pad_token_id).sum())}
    context, stride = perplexity_window(params)
    return sliding_window_perplexity(model, test_tokens(params), context, stride,
                                     cfg.batch_size, bf16)


def ood_streams(tokenizer, params: Params) -> dict[str, torch.Tensor]:
    """Each evaluate.ood_texts text as one token stream: its paragraphs joined by blank lines,
    tokenized without special tokens, cut to evaluate.max_tokens like the test split."""
    limit = params.evaluate.max_tokens
    streams = {}
    for name in params.evaluate.ood_texts:
        ids = tokenizer("\n\n".join(ood_documents(name)), add_special_tokens=False)["input_ids"]
        streams[name] = torch.tensor(ids if limit is None else ids[:limit])
    return streams


def ood_perplexities(model, streams: dict[str, torch.Tensor], params: Params) -> dict:
    """Perplexity of each out-of-domain stream, in the test split's sliding windows."""
    context, stride = perplexity_window(params)
    bf16 = bf16_enabled(params.evaluate.bf16)
    return {name: sliding_window_perplexity(model, ids, context, stride,
                                            params.evaluate.batch_size, bf16)["perplexity"]
            for name, ids in streams.items()}


def zero_shot(model, tokenizer, params: Params) -> dict:
    """Every evaluate.tasks benchmark on `model` ({} with no tasks), and the averages."""
    cfg = params.evaluate
    tasks = {task: evaluate_task(model, tokenizer, task, cfg.task_limits.get(task, cfg.limit),
                                 cfg.batch_size, bf16_enabled(cfg.bf16)) for task in cfg.tasks}
    if not tasks:
        return {"tasks": {}}
    return {"tasks": tasks,
            "average_acc": statistics.mean(t["acc"] for t in tasks.values()),
            "average_acc_norm": statistics.mean(t["acc_norm"] for t in tasks.values())}
