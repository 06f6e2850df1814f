"""Out-of-domain perplexity: the packaged texts no stage trains or calibrates on, their
disjointness from the zero-shot questions, and the params that ask for them."""

from __future__ import annotations

import pytest

from gradprune.config import ParamError, params_from_dict
from gradprune.config.choices import BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT
from gradprune.data import ood_documents
from gradprune.evaluation.zeroshot import load_task
from gradprune.packaged import BENCHMARK_VALIDATION, read_packaged_arrow_stream
from tasks.report import report_table


def test_wikipedia_text_is_the_later_boolq_paragraphs_minus_any_an_earlier_question_shows():
    documents = ood_documents("wikipedia")
    table, _ = read_packaged_arrow_stream(BENCHMARK_VALIDATION["boolq"])
    passages = table.column("passage").to_pylist()
    early = set(passages[:BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT])
    assert len(documents) == 1987
    assert len(set(documents)) == len(documents)
    assert not early & set(documents)
    assert set(documents) == set(passages[BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT:]) - early
    # In the split's order: the first paragraph is that of the first later question not shown.
    first = next(p for p in passages[BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT:] if p not in early)
    assert documents[0] == first
    # The zero-shot task at its largest allowed limit shows none of them.
    shown = {q.context for q in load_task("boolq", limit=BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT)}
    assert not any(d in context for context in shown for d in documents)


def test_science_text_is_sciqs_distinct_nonempty_support_paragraphs():
    documents = ood_documents("science")
    assert len(documents) == 887
    assert all(d.strip() for d in documents)
    assert len(set(documents)) == len(documents)


def test_unknown_ood_text_names_the_key():
    with pytest.raises(ValueError, match="evaluate.ood_texts: got 'poetry'"):
        ood_documents("poetry")


@pytest.mark.parametrize("evaluate, key, message", [
    ({"ood_texts": ["poetry"]}, "evaluate.ood_texts[0]", "allowed: wikipedia, science"),
    ({"ood_texts": ["science", "science"]}, "evaluate.ood_texts[1]", "listed twice"),
    ({"ood_texts": ["wikipedia"], "limit": None}, "evaluate.task_limits.boolq",
     "score at most 1000 BoolQ questions (got all)"),
    ({"ood_texts": ["wikipedia"], "task_limits": {"boolq": 1001}}, "evaluate.task_limits.boolq",
     "got 1001"),
])
def test_bad_ood_params_name_the_key(evaluate, key, message):
    with pytest.raises(ParamError) as info:
        params_from_dict({"evaluate": evaluate})
    assert info.value.key == key
    assert message in str(info.value)


def test_wikipedia_with_boolq_at_the_limit_or_without_boolq_is_accepted():
    params_from_dict({"evaluate": {"ood_texts": ["wikipedia"], "limit": 1000}})
    params_from_dict({"evaluate": {"ood_texts": ["wikipedia", "science"], "limit": None,
                                   "tasks": ["piqa"]}})


def test_ood_streams_are_cut_to_max_tokens_and_scored_like_the_test_split():
    from gradprune.config import ModelParams
    from gradprune.evaluation.perplexity import sliding_window_perplexity
    from gradprune.models.llama import build_llama
    from tasks.measure import ood_perplexities, ood_streams

    class Characters:
        """A tokenizer of code points mod 64, enough to make a stream."""
        def __call__(self, text, add_special_tokens):
            assert add_special_tokens is False
            return {"input_ids": [ord(c) % 64 for c in text]}

    params = params_from_dict({"evaluate": {"ood_texts": ["science"], "max_tokens": 300,
                                            "context": 32, "stride": 16, "bf16": "off"},
                               "data": {"block_size": 32}})
    streams = ood_streams(Characters(), params)
    text = "\n\n".join(ood_documents("science"))
    assert streams["science"].tolist() == [ord(c) % 64 for c in text[:300]]
    model = build_llama(ModelParams(layers=1, hidden=16, heads=2, kv_heads=1, ffn=24),
                        vocab_size=64, context=32, eos_token_id=0, seed=0).eval()
    expected = sliding_window_perplexity(model, streams["science"], 32, 16, 8, False)
    assert ood_perplexities(model, streams, params) == {"science": expected["perplexity"]}


def test_report_table_has_a_column_per_ood_text_for_models_and_compare_rows():
    row = {"perplexity_test": 10.0, "perplexity_wikipedia": 20.0, "tasks": {}, "sparsity": 0.5,
           "parameters": 10, "nonzero": 5, "bytes": {"dense_export": 1e6, "sparse_export": 1e6}}
    compared = [{"criterion": "wanda", "pattern": "unstructured", "test_perplexity": 11.0,
                 "wikipedia_perplexity": 25.5, "sparsity": 0.5, "parameters": 10, "nonzero": 5}]
    header, body = report_table((), {"dense": row}, compared, {}, ("wikipedia",))
    assert header[:3] == ["model", "test ppl", "wikipedia ppl"]
    assert body[0][:3] == ["dense", "10.00", "20.00"]
    assert body[1][:3] == ["wanda unstructured (no fine-tuning)", "11.00", "25.50"]


def test_report_caption_states_the_ood_protocol_and_keeps_the_zero_shot_limit():
    from tasks.report import markdown_report

    params = params_from_dict({"evaluate": {"ood_texts": ["wikipedia"], "max_tokens": 4096}})
    text = markdown_report(params, 256, 128, (["model"], []), {})
    assert ("over the first 4096 test tokens and the first 4096 tokens of each out-of-domain "
            "text (wikipedia:") in text
    assert "Zero-shot: the first 200 questions per task" in text
    plain = markdown_report(params_from_dict({}), 256, 128, (["model"], []), {})
    assert "test tokens. Zero-shot: the first 200 questions" in plain
