"""Intervals and paired tests: known p-values on hand-made correctness vectors, coverage at
the stated rate on seeded simulations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradprune.evaluation.statistics import (
    accuracy_interval,
    compare_correctness,
    mcnemar_exact,
    paired_average_bootstrap,
    paired_bootstrap,
    perplexity_interval,
    wilson_interval,
)


def test_mcnemar_exact_p_values_by_hand():
    # 10 questions: a alone right on 5 (indices 0-4), b alone right on 1 (index 5), both
    # right on 2, both wrong on 2. Discordant n = 6, min = 1:
    # p = 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64 = 0.21875
    a = [1, 1, 1, 1, 1, 0, 1, 1, 0, 0]
    b = [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    test = mcnemar_exact(a, b)
    assert test == {"only_a": 5, "only_b": 1, "p_value": 0.21875}
    assert mcnemar_exact(b, a)["p_value"] == 0.21875
    # 8 discordant, all one way: p = 2 / 2^8 = 0.0078125
    assert mcnemar_exact([1] * 8 + [0, 1], [0] * 8 + [0, 1])["p_value"] == 0.0078125
    # balanced discordance: 2 * P(X <= 2 | n = 4) = 2 * 11/16 > 1, capped
    assert mcnemar_exact([1, 1, 0, 0], [0, 0, 1, 1])["p_value"] == 1.0
    # never disagreeing: nothing to test
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == {"only_a": 0, "only_b": 0, "p_value": 1.0}
    # 20 discordant, 15 to 5: 2 * sum_{k<=5} C(20,k) / 2^20 = 2 * 21700 / 1048576
    a = [1] * 15 + [0] * 5 + [1] * 30
    b = [0] * 15 + [1] * 5 + [1] * 30
    assert mcnemar_exact(a, b)["p_value"] == pytest.approx(2 * 21700 / 2 ** 20, rel=1e-12)


def test_compare_correctness_marks_significance_at_five_percent():
    a = [1] * 8 + [0, 1]
    b = [0] * 8 + [0, 1]
    result = compare_correctness(a, b, resamples=2000, seed=0)
    assert result["difference"] == pytest.approx(-0.8)
    assert result["p_value"] == 0.0078125 and result["significant"]
    assert result["ci_low"] <= -0.8 <= result["ci_high"] < 0
    assert not compare_correctness([1, 1, 0, 0], [0, 0, 1, 1], 500)["significant"]
    with pytest.raises(ValueError, match="same questions"):
        compare_correctness([1, 0], [1])


def test_paired_bootstrap_is_seeded():
    a = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1] * 3
    b = [1, 1, 1, 0, 0, 1, 1, 0, 1, 1] * 3
    first, again = paired_bootstrap(a, b, 1000, seed=3), paired_bootstrap(a, b, 1000, seed=3)
    assert first == again
    assert first["difference"] == pytest.approx(0.1)
    assert paired_bootstrap(a, b, 1000, seed=4) != first


def test_wilson_interval_by_hand_and_accuracy_summary():
    # 8 of 10, z = 1.96: center (0.8 + 0.19208) / 1.38416, half 1.96/1.38416 * sqrt(0.016 + 0.009604)
    z = 1.959963984540054
    n, p = 10, 0.8
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(8, 10) == pytest.approx((center - half, center + half))
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    summary = accuracy_interval([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    assert summary["mean"] == 0.8
    assert summary["stderr"] == pytest.approx(math.sqrt(0.8 * 0.2 / 9))  # the harness's
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


@given(st.integers(1, 400), st.data())
def test_wilson_interval_holds_the_estimate_inside_the_unit_interval(n, data):
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_intervals_cover_the_true_accuracy_at_the_stated_rate():
    generator = torch.Generator().manual_seed(0)
    trials = 4000
    for accuracy, n in [(0.25, 40), (0.5, 200), (0.7, 100), (0.9, 300)]:
        successes = torch.binomial(torch.full((trials,), float(n)),
                                   torch.full((trials,), accuracy), generator=generator)
        covered = sum(low <= accuracy <= high for low, high in
                      (wilson_interval(int(k), n) for k in successes.tolist()))
        # 95% stated; 4000 trials put the sample rate within +-0.012 of the true one (3 SE)
        assert 0.93 <= covered / trials <= 0.97, (accuracy, n, covered / trials)


def _paired_correctness(n, accuracy_a, accuracy_b, agreement, generator):
    """Correlated 0/1 vectors: b copies a with probability `agreement`, else draws anew."""
    a = (torch.rand(n, generator=generator) < accuracy_a).double()
    fresh = (torch.rand(n, generator=generator) < accuracy_b).double()
    copy = torch.rand(n, generator=generator) < agreement
    return a, torch.where(copy, a, fresh)


def test_paired_bootstrap_intervals_cover_the_true_difference_at_the_stated_rate():
    generator = torch.Generator().manual_seed(1)
    # b = a with prob 0.6 else Bernoulli(0.5): E[b] = 0.6 * 0.6 + 0.4 * 0.5 = 0.56
    truth = 0.56 - 0.6
    trials, covered = 300, 0
    for trial in range(trials):
        a, b = _paired_correctness(300, 0.6, 0.5, 0.6, generator)
        result = paired_bootstrap(a.tolist(), b.tolist(), resamples=1000, seed=trial)
        covered += result["ci_low"] <= truth <= result["ci_high"]
    # 95% stated; with 300 trials the sample rate is within +-0.04 of it (3 SE)
    assert 0.91 <= covered / trials <= 0.99, covered / trials


def test_mcnemar_rejects_equal_models_at_most_at_the_stated_rate():
    generator = torch.Generator().manual_seed(2)
    trials, rejected = 1000, 0
    for _ in range(trials):
        # equal accuracy (0.6 both), correlated answers
        a, b = _paired_correctness(200, 0.6, 0.6, 0.5, generator)
        rejected += mcnemar_exact(a.tolist(), b.tolist())["p_value"] < 0.05
    # the exact test is conservative: at most 5% (+3 SE of 1000 trials)
    assert rejected / trials <= 0.05 + 0.021, rejected / trials


def test_paired_average_bootstrap_averages_tasks_and_resamples_each():
    a = {"x": [1, 0, 1, 0], "y": [1, 1, 1, 1, 0, 0]}
    b = {"x": [1, 1, 1, 0], "y": [1, 1, 0, 1, 0, 0]}
    result = paired_average_bootstrap(a, b, resamples=500, seed=0)
    assert result["difference"] == pytest.approx((0.25 + -1 / 6) / 2)
    assert result == paired_average_bootstrap(a, b, resamples=500, seed=0)
    with pytest.raises(ValueError, match="same tasks"):
        paired_average_bootstrap(a, {"x": b["x"]})


def test_perplexity_interval_holds_the_pooled_perplexity():
    nll = [2.0 * 100, 2.5 * 100, 1.5 * 50, 3.0 * 100]
    tokens = [100, 100, 50, 100]
    low, high = perplexity_interval(nll, tokens, resamples=500, seed=0)
    pooled = math.exp(sum(nll) / sum(tokens))
    assert low < pooled < high
    assert math.exp(1.5) <= low and high <= math.exp(3.0)
    assert (low, high) == perplexity_interval(nll, tokens, resamples=500, seed=0)


# --- wired into the evaluate stage -------------------------------------------------------

def _records(task_values: dict[str, list[float]], start: int = 0) -> list[dict]:
    return [{"task": task, "index": start + i, "acc": v, "acc_norm": v, "acc_bytes": v}
            for task, values in task_values.items() for i, v in enumerate(values)]


def test_questions_round_trip_through_parquet_and_pair_by_index(tmp_path):
    from tasks.measure import compare_records, read_questions, write_questions

    dense = _records({"piqa": [1, 1, 1, 1, 1, 0, 1, 1, 0, 0]})
    pruned = _records({"piqa": [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]})
    write_questions(tmp_path / "q.parquet", {"dense": dense, "pruned": list(reversed(pruned))})
    back = read_questions(tmp_path / "q.parquet")
    assert back["dense"] == dense and sorted(back["pruned"], key=lambda r: r["index"]) == pruned
    # reversed order on disk: pairs still go by question index
    result = compare_records(back["dense"], back["pruned"], seed=0)
    assert result["tasks"]["piqa"]["p_value"] == 0.21875  # the hand-computed McNemar case
    assert result["tasks"]["piqa"]["difference"] == pytest.approx(-0.4)
    with pytest.raises(ValueError, match="different questions"):
        compare_records(dense, _records({"piqa": [1] * 10}, start=5), seed=0)


def test_mark_against_dense_and_the_report_show_intervals_and_stars(tmp_path, monkeypatch):
    from tasks import evaluate
    from tasks.measure import QUESTIONS, write_questions
    from tasks.report import report_table

    monkeypatch.setattr(evaluate, "DATA", tmp_path)
    strong, weak = [1] * 8 + [0, 1], [0] * 8 + [0, 1]  # McNemar p = 0.0078 between them

    def row(values):
        mean = sum(values) / len(values)
        task = {"acc": mean, "acc_norm": mean, **{k: v for k, v in zip(
            ("acc_ci_low", "acc_ci_high"), wilson_interval(int(sum(values)), len(values)))}}
        return {"perplexity_test": 10.0, "perplexity_test_ci_low": 9.5,
                "perplexity_test_ci_high": 10.5, "tasks": {"piqa": task}, "average_acc": mean,
                "average_acc_ci_low": mean - 0.1, "average_acc_ci_high": mean + 0.1,
                "sparsity": 0.5, "parameters": 10, "nonzero": 5,
                "bytes": {"dense_export": 1e6, "sparse_export": 1e6}}

    rows = {"dense": row(strong), "pruned": row(weak), "averaged": row(strong)}
    questions = {name: _records({"piqa": v}) for name, v in
                 [("dense", strong), ("pruned", weak), ("averaged", strong)]}
    compared = [{"criterion": "wanda", "pattern": "2:4", "test_perplexity": 11.0,
                 "perplexity_ci_low": 10.0, "perplexity_ci_high": 12.0, "sparsity": 0.5,
                 "parameters": 10, "nonzero": 5, "tasks": {"piqa": row(weak)["tasks"]["piqa"]},
                 "average_acc": 0.1}]
    (tmp_path / "compare" / "wanda-2:4").mkdir(parents=True)
    write_questions(tmp_path / "compare" / "wanda-2:4" / QUESTIONS,
                    {"pruned": _records({"piqa": weak})})
    evaluate.mark_against_dense(rows, compared, questions, seed=0)
    assert "vs_dense" not in rows["dense"]
    assert rows["pruned"]["vs_dense"]["tasks"]["piqa"]["significant"]
    assert not rows["averaged"]["vs_dense"]["tasks"]["piqa"]["significant"]
    assert compared[0]["vs_dense"]["tasks"]["piqa"]["p_value"] == 0.0078125
    assert "wanda-2:4" in questions

    header, body = report_table(("piqa",), rows, compared, {})
    cells = {line[0]: dict(zip(header, line)) for line in body}
    assert cells["dense"]["piqa acc/acc_n"] == "0.900 [0.60, 0.98]/0.900"
    assert cells["pruned"]["piqa acc/acc_n"].startswith("0.100* [")
    assert cells["averaged"]["piqa acc/acc_n"].startswith("0.900 [")
    assert cells["wanda 2:4 (no fine-tuning)"]["piqa acc/acc_n"].startswith("0.100* [")
    assert cells["dense"]["test ppl"] == "10.00 [9.50, 10.50]"
    assert cells["pruned"]["avg acc"].startswith("0.100")
