"""Uncertainty of the evaluation's numbers: intervals for an accuracy and a perplexity, and
paired tests between two models scored on the same questions.

Accuracies are means of 0/1 correctness per question. Their standard error is the harness's
(sample standard deviation / sqrt(n)); their 95% interval is Wilson's score interval, which
keeps its coverage near 0 and 1 and at small n, where mean +- 1.96 SE does not. Two models on
the same questions are compared on the questions where they disagree (exact McNemar test) and
by a seeded paired bootstrap of the difference. A perplexity's interval bootstraps its scored
windows. Everything is seeded: the same inputs give the same numbers.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Mapping, Sequence

import torch

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
ALPHA = 0.05             # significance level of the paired tests


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion successes / n."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1; got {successes}, {n}")
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 or n successes the bound on that side is exactly 0 or 1; rounding would miss it.
    return (0.0 if successes == 0 else center - half), (1.0 if successes == n else center + half)


def accuracy_interval(correct: Sequence[float]) -> dict[str, float]:
    """Mean of 0/1 correctness, its standard error (sample standard deviation / sqrt(n),
    NaN for one question) and its 95% Wilson interval (ci_low, ci_high)."""
    n = len(correct)
    successes = int(round(sum(correct)))
    mean = successes / n
    stderr = math.sqrt(mean * (1 - mean) / (n - 1)) if n > 1 else math.nan
    low, high = wilson_interval(successes, n)
    return {"mean": mean, "stderr": stderr, "ci_low": low, "ci_high": high}


def _check_paired(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs two equally long, non-empty correctness "
                         f"vectors (the same questions); got {len(a)} and {len(b)}")


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact McNemar test of two models' 0/1 correctness on the same questions.

    Only discordant questions count: `only_a` right for a alone, `only_b` for b alone. Under
    the null hypothesis (equal accuracy) each discordant question is a fair coin, so the
    two-sided p-value is 2 * P(Binomial(only_a + only_b, 1/2) <= min(only_a, only_b)),
    capped at 1 (1 when they never disagree).
    """
    _check_paired(a, b)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    tail = Fraction(sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)), 2 ** n)
    return {"only_a": only_a, "only_b": only_b, "p_value": float(min(Fraction(1), 2 * tail))}


def _resampled_means(values: torch.Tensor, resamples: int, generator: torch.Generator,
                     chunk: int = 1000) -> torch.Tensor:
    """Means of `resamples` bootstrap resamples (with replacement) of `values`."""
    n, means = len(values), []
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        means.append(values[torch.randint(n, (rows, n), generator=generator)].mean(1))
    return torch.cat(means)


def _bootstrap_summary(observed: float, resampled: torch.Tensor) -> dict[str, float]:
    """Percentile 95% interval of a difference, and the two-sided bootstrap p-value of
    'no difference': twice the share of resamples on the far side of zero, capped at 1."""
    low, high = torch.quantile(resampled, torch.tensor([ALPHA / 2, 1 - ALPHA / 2],
                                                       dtype=resampled.dtype)).tolist()
    below = (resampled <= 0).double().mean().item()
    above = (resampled >= 0).double().mean().item()
    return {"difference": observed, "ci_low": low, "ci_high": high,
            "p_value": min(1.0, 2 * min(below, above))}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10000,
                     seed: int = 0) -> dict[str, float]:
    """Difference of means b - a on the same questions, with its paired bootstrap interval
    (questions resampled with replacement, both models' answers kept together)."""
    _check_paired(a, b)
    differences = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    return _bootstrap_summary(differences.mean().item(),
                              _resampled_means(differences, resamples, generator))


def paired_average_bootstrap(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
                             resamples: int = 10000, seed: int = 0) -> dict[str, float]:
    """Difference b - a of the unweighted average over tasks of per-task accuracy, with a
    paired bootstrap interval: each task's questions are resampled on their own, as each task
    is a separate sample."""
    if set(a) != set(b) or not a:
        raise ValueError(f"paired average needs the same tasks on both sides; got {sorted(a)} "
                         f"and {sorted(b)}")
    generator = torch.Generator().manual_seed(seed)
    observed, resampled = 0.0, torch.zeros(resamples, dtype=torch.float64)
    for task in sorted(a):
        _check_paired(a[task], b[task])
        differences = (torch.tensor(b[task], dtype=torch.float64)
                       - torch.tensor(a[task], dtype=torch.float64))
        observed += differences.mean().item() / len(a)
        resampled += _resampled_means(differences, resamples, generator) / len(a)
    return _bootstrap_summary(observed, resampled)


def compare_correctness(a: Sequence[float], b: Sequence[float], resamples: int = 10000,
                        seed: int = 0) -> dict:
    """Model b against model a on the same questions: b - a with its paired bootstrap interval,
    the exact McNemar p-value, and whether the difference is significant at ALPHA (McNemar)."""
    test = mcnemar_exact(a, b)
    interval = paired_bootstrap(a, b, resamples, seed)
    return {"difference": interval["difference"], "ci_low": interval["ci_low"],
            "ci_high": interval["ci_high"], "only_a": test["only_a"], "only_b": test["only_b"],
            "p_value": test["p_value"], "significant": test["p_value"] < ALPHA}


def perplexity_interval(window_nll: Sequence[float], window_tokens: Sequence[int],
                        resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of perplexity = exp(sum nll / sum tokens), resampling
    the scored windows (each window's summed negative log-likelihood and token count together).
    Windows of one text are not independent, so this interval is, if anything, too narrow."""
    if len(window_nll) != len(window_tokens) or not window_nll:
        raise ValueError("perplexity interval needs one token count per window, and a window")
    nll = torch.tensor(window_nll, dtype=torch.float64)
    tokens = torch.tensor(window_tokens, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(nll), (resamples, len(nll)), generator=generator)
    perplexities = (nll[picks].sum(1) / tokens[picks].sum(1)).exp()
    low, high = torch.quantile(perplexities, torch.tensor([ALPHA / 2, 1 - ALPHA / 2],
                                                          dtype=torch.float64)).tolist()
    return low, high


def average_interval(stderrs: Sequence[float], z: float = Z95) -> float:
    """Half-width of the 95% interval of an unweighted average of independent task
    accuracies: z * sqrt(sum of squared standard errors) / number of tasks."""
    return z * math.sqrt(sum(se * se for se in stderrs)) / len(stderrs)


def compare_models(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
                   resamples: int = 10000, seed: int = 0) -> dict:
    """Model b against model a, both scored on the same questions of the same tasks (0/1
    correctness per question, in the same order): `compare_correctness` per task, and under
    "average" the paired bootstrap of the tasks' average, significant when its p-value is
    below ALPHA."""
    if set(a) != set(b):
        raise ValueError(f"models scored on different tasks: {sorted(a)} and {sorted(b)}")
    tasks = {task: compare_correctness(a[task], b[task], resamples, seed) for task in a}
    average = paired_average_bootstrap(a, b, resamples, seed)
    return {"tasks": tasks, "average": {**average, "significant": average["p_value"] < ALPHA}}
