"""Test one evaluated model's zero-shot accuracy against another's on the same questions.

The evaluate stage keeps every scored question's correctness of every row in
data/evaluate/questions.parquet: the pipeline's models (dense, pruned, finetuned_last,
averaged) and the compare rows (<criterion>-<pattern>, and <criterion>-<pattern>/finetuned).
For each task this prints both accuracies, the difference B - A with its 95% paired bootstrap
interval, the questions only A and only B got right, and the exact McNemar p-value; then the
same for the average over tasks (paired bootstrap). * marks p < 0.05.

    python scripts/compare_rows.py A B [--questions data/evaluate/questions.parquet]
        [--metric acc|acc_norm|acc_bytes] [--seed 0]
    python scripts/compare_rows.py --list
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from gradprune.evaluation.zeroshot import METRICS  # noqa: E402
from tasks.measure import QUESTIONS, compare_records, read_questions  # noqa: E402
from tasks.stage import DATA  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", nargs="?", help="the reference row, e.g. dense")
    parser.add_argument("b", nargs="?", help="the row tested against it, e.g. wanda-2:4")
    parser.add_argument("--questions", type=Path, default=DATA / "evaluate" / QUESTIONS)
    parser.add_argument("--metric", choices=METRICS, default="acc")
    parser.add_argument("--seed", type=int, default=0, help="of the bootstrap")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    args = parser.parse_args()
    models = read_questions(args.questions)
    if args.list or not (args.a and args.b):
        print("\n".join(models))
        if not args.list:
            parser.error("give two rows, A and B (the rows are listed above)")
        return
    for name in (args.a, args.b):
        if name not in models:
            parser.error(f"{name!r} is not a row of {args.questions}; rows: {', '.join(models)}")
    result = compare_records(models[args.a], models[args.b], args.seed, args.metric)

    def accuracy(name: str, task: str) -> float:
        values = [r[args.metric] for r in models[name] if r["task"] == task]
        return sum(values) / len(values)

    print(f"{args.metric}: {args.b} (B) against {args.a} (A), the same questions")
    print(f"{'task':<14} {'n':>5} {'A':>6} {'B':>6} {'B - A':>7} {'95% interval':>17} "
          f"{'only A':>6} {'only B':>6} {'p':>8}")
    for task, test in result["tasks"].items():
        n = sum(1 for r in models[args.a] if r["task"] == task)
        print(f"{task:<14} {n:>5} {accuracy(args.a, task):>6.3f} {accuracy(args.b, task):>6.3f} "
              f"{test['difference']:>+7.3f} [{test['ci_low']:+.3f}, {test['ci_high']:+.3f}] "
              f"{test['only_a']:>6} {test['only_b']:>6} {test['p_value']:>8.4f}"
              f"{'*' if test['significant'] else ''}")
    average = result["average"]
    print(f"{'average':<14} {'':>5} {'':>6} {'':>6} {average['difference']:>+7.3f} "
          f"[{average['ci_low']:+.3f}, {average['ci_high']:+.3f}] {'':>6} {'':>6} "
          f"{average['p_value']:>8.4f}{'*' if average['significant'] else ''}")


if __name__ == "__main__":
    main()
