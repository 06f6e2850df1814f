"""The measurements that compare rows and the evaluate stage both report, taken the same way
for both: test perplexity (sliding windows, or target tokens for seq2seq) with its interval,
perplexity of the out-of-domain texts, WikiText-2 perplexity by the papers' protocol, and zero-shot accuracy with every question's
correctness (a Parquet table, so two rows can be compared question by question)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gradprune.config import ParamError, Params
from gradprune.data import ood_documents, read_blocks
from gradprune.device import model_device
from gradprune.evaluation.perplexity import (
    paper_perplexity,
    read_test_text,
    sliding_window_perplexity,
)
from gradprune.evaluation.statistics import average_interval, compare_models, perplexity_interval
from gradprune.evaluation.zeroshot import evaluate_task
from gradprune.io import atomic_file, read_json
from gradprune.models.llama import bf16_enabled
from gradprune.models.seq2seq import Seq2SeqTransformer
from gradprune.training.loop import mean_loss
from tasks.stage import DATA

TEST = DATA / "prepare" / "test.parquet"
QUESTIONS = "questions.parquet"  # per-question correctness, beside a stage's other data


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
    bf16 = bf16_enabled(cfg.bf16, model_device(model))
    if isinstance(model, Seq2SeqTransformer):
        rows = test_examples(params, model.config.target_length)
        loss = mean_loss(model, rows, cfg.batch_size, bf16)
        targets = model.split(rows)[1]
        return {"perplexity": math.exp(loss), "loss": loss, "examples": len(rows),
                "tokens_scored": int((targets != model.config.pad_token_id).sum())}
    context, stride = perplexity_window(params)
    return with_interval(sliding_window_perplexity(model, test_tokens(params), context, stride,
                                                   cfg.batch_size, bf16), params.seed)


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
    bf16 = bf16_enabled(params.evaluate.bf16, model_device(model))
    return {name: sliding_window_perplexity(model, ids, context, stride,
                                            params.evaluate.batch_size, bf16)["perplexity"]
            for name, ids in streams.items()}


def wikitext_stream(tokenizer, params: Params, dense: Path) -> torch.Tensor | None:
    """evaluate.wikitext's text tokenized once, as the papers' code tokenizes it (None without
    one). Refuses, before anything is scored, a window longer than the dense model's
    positions."""
    cfg = params.evaluate
    if cfg.wikitext is None:
        return None
    positions = read_json(dense / "config.json").get("max_position_embeddings")
    if positions is not None and cfg.wikitext_context > positions:
        raise ParamError("evaluate.wikitext_context",
                         f"{cfg.wikitext_context} tokens exceed the model's {positions} "
                         "positions; use at most that (the papers use 2048 or 4096)")
    return torch.tensor(tokenizer(read_test_text(cfg.wikitext))["input_ids"])


def wikitext_perplexity(model, ids: torch.Tensor, params: Params) -> dict:
    """WikiText-2 perplexity by the papers' protocol (non-overlapping windows of
    evaluate.wikitext_context) with its 95% interval: perplexity, perplexity_ci_low,
    perplexity_ci_high."""
    bf16 = bf16_enabled(params.evaluate.bf16, model_device(model))
    scored = with_interval(paper_perplexity(model, ids, params.evaluate.wikitext_context,
                                            params.evaluate.batch_size, bf16), params.seed)
    return {k: scored[k] for k in ("perplexity", "perplexity_ci_low", "perplexity_ci_high")}


def with_interval(scored: dict, seed: int) -> dict:
    """A perplexity result with its 95% bootstrap interval over windows (perplexity_ci_low,
    perplexity_ci_high) in place of the per-window lists."""
    nll, tokens = scored.pop("window_nll"), scored.pop("window_tokens")
    scored["perplexity_ci_low"], scored["perplexity_ci_high"] = perplexity_interval(
        nll, tokens, seed=seed)
    return scored


def zero_shot(model, tokenizer, params: Params) -> tuple[dict, list[dict]]:
    """Every evaluate.tasks benchmark on `model` ({"tasks": {}} with no tasks) with the
    averages and the 95% interval of the average accuracy; and one record per scored question
    (task, index, acc, acc_norm, acc_bytes) for `write_questions`."""
    cfg = params.evaluate
    tasks, questions = {}, []
    for task in cfg.tasks:
        scored = evaluate_task(model, tokenizer, task, cfg.task_limits.get(task, cfg.limit),
                               cfg.batch_size, bf16_enabled(cfg.bf16, model_device(model)),
                               cfg.sample_seed)
        questions += [{"task": task, **q} for q in scored.pop("questions")]
        tasks[task] = scored
    if not tasks:
        return {"tasks": {}}, []
    average = statistics.mean(t["acc"] for t in tasks.values())
    half = average_interval([t["acc_stderr"] for t in tasks.values()])
    return {"tasks": tasks, "average_acc": average,
            "average_acc_ci_low": max(0.0, average - half),
            "average_acc_ci_high": min(1.0, average + half),
            "average_acc_norm": statistics.mean(t["acc_norm"] for t in tasks.values())
            }, questions


def write_questions(path: Path, models: dict[str, list[dict]]) -> None:
    """Per-question correctness of each model (name -> zero_shot's records) as one Parquet
    table: model, task, index, acc, acc_norm, acc_bytes."""
    records = [{"model": name, **q} for name, rows in models.items() for q in rows]
    schema = pa.schema([("model", pa.string()), ("task", pa.string()), ("index", pa.int64()),
                        ("acc", pa.float64()), ("acc_norm", pa.float64()),
                        ("acc_bytes", pa.float64())])
    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp)


def read_questions(path: Path) -> dict[str, list[dict]]:
    """`write_questions`'s table back: model name -> its records."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing; run the stage that scores zero-shot "
                                "questions (dvc repro)")
    models: dict[str, list[dict]] = {}
    for record in pq.read_table(path).to_pylist():
        models.setdefault(record.pop("model"), []).append(record)
    return models


def compare_records(a: list[dict], b: list[dict], seed: int, metric: str = "acc") -> dict:
    """Model b against model a (`compare_models`: per task and on the average) from their
    `zero_shot` records; both must have been scored on the same questions."""
    by_task = []
    for records in (a, b):
        tasks: dict[str, dict[int, float]] = {}
        for record in records:
            tasks.setdefault(record["task"], {})[record["index"]] = record[metric]
        by_task.append(tasks)
    questions = [{task: sorted(scored) for task, scored in tasks.items()} for tasks in by_task]
    if questions[0] != questions[1]:
        raise ValueError("the two models were scored on different questions; score both with "
                         "the same evaluate.tasks, limit, task_limits and sample_seed")
    return compare_models(*({task: [scored[i] for i in sorted(scored)]
                             for task, scored in tasks.items()} for tasks in by_task),
                          seed=seed)
