"""Print the results tables of a finished pipeline run as Markdown (docs/RESULTS.md holds one).

Every number is read from the run's stage records (reports/, the metrics files' numbers with the
settings that name them): reports/evaluate.json (the dense and the final model, and each compare
row's tests against the dense model), reports/compare/*.json (one row per criterion x pattern:
one-shot, after block reconstruction when masks.reconstruct was on, after fine-tuning when
compare.finetune was on; the perplexity of each evaluate.ood_texts text beside the test split's;
what each recovery cost; a structured row's prefill/decode speedup) and each stage's seconds
and peak memory. Run it in the
repository (or the experiment's workspace) that made them:

    python scripts/results_table.py [--preset presets/smollm2.yaml] > table.md

Only the rows of the run's params (compare.criteria x compare.patterns) are read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradprune.config import CRITERIA, load_params

TASKS = ["hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"]
SHORT = {"hellaswag": "HellaSwag", "piqa": "PIQA", "winogrande": "WinoGr.", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c", "boolq": "BoolQ", "openbookqa": "OBQA"}
STAGES = ["prepare", "train", "gradients", "masks", "finetune", "average", "evaluate"]


def star(vs: dict | None) -> str:
    """* when the accuracy differs from the dense model's at p < 0.05 (evaluate's tests)."""
    return "*" if vs and vs["significant"] else ""


def accuracy_cells(row: dict) -> list[str]:
    """Each task's acc (starred when it differs from dense), and the average with its 95%
    interval's half-width."""
    tasks, vs = row.get("tasks", {}), row.get("vs_dense", {})
    cells = [f"{tasks[t]['acc']:.3f}{star(vs.get('tasks', {}).get(t))}" if t in tasks else "-"
             for t in TASKS]
    if "average_acc" not in row:
        return cells + ["-"]
    half = (f" ± {row['average_acc_ci_high'] - row['average_acc']:.3f}"
            if "average_acc_ci_high" in row else "")
    return cells + [f"{row['average_acc']:.3f}{star(vs.get('average'))}{half}"]


def perplexity_cell(ppl: float, low: float | None, high: float | None) -> str:
    return f"{ppl:.2f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")


def speedup(speed: dict | None) -> str:
    """A structured row's prefill and decode speedup over dense at batch size 1 (or the
    smallest timed)."""
    if not speed:
        return "-"
    timed = speed[f"batch_{min(speed['settings']['batch_sizes'])}"]
    return f"{timed['prefill_speedup']:.2f}x / {timed['decode_speedup']:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", default="reports", help="the run's stage records")
    parser.add_argument("--params", default="params.yaml",
                        help="the run's params (its compare rows are the ones listed)")
    parser.add_argument("--preset", help="the preset the run used, named in the commands")
    args = parser.parse_args()
    metrics = Path(args.reports)
    evaluate = json.loads((metrics / "evaluate.json").read_text())
    # This configuration's rows only: an earlier one's records may still lie beside them.
    compared = {row: json.loads((metrics / "compare" / f"{row}.json").read_text())
                for row in load_params(args.params).compare.rows()}
    # evaluate holds each compare row's tests against the dense model (its questions are there)
    for key, tests in evaluate.get("compare_vs_dense", {}).items():
        for name, vs in tests.items():
            row = compared[key] if name == "pruned" else compared[key]["finetuned"]
            row["vs_dense"] = vs
    # A row the matrix holds but that has nothing to measure (sparsegpt x structured) is left out.
    rows = sorted((r for r in compared.values() if "not_applicable" not in r),
                  key=lambda r: (r["pattern"] != "unstructured", r["pattern"],
                                 CRITERIA.index(r["criterion"])))
    exp = "gradprune exp" + (f" --preset {args.preset}" if args.preset else "")
    ood = list(evaluate.get("ood_tokens_scored", {}))
    dense = evaluate["models"]["dense"]
    wikitext = "perplexity_wikitext" in dense  # evaluate.wikitext, by the papers' protocol

    header = ["model", "sparsity", "test ppl (x dense)",
              *(["WikiText-2 ppl (x dense)"] if wikitext else []),
              *[f"{o} ppl (x dense)" for o in ood],
              *[SHORT[t] for t in TASKS], "avg", "recovery cost", "prefill/decode x",
              "command"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def line(name: str, row: dict, perplexities: list[tuple], command: str, cost: str = "-",
             speed: dict | None = None) -> None:
        """perplexities: (value, interval low, interval high) per column, test split first."""
        cells = [perplexity_cell(p, low, high) + f" ({p / d[0]:.2f}x)"
                 for (p, low, high), d in zip(perplexities, dense_perplexities)]
        lines.append("| " + " | ".join([name, f"{row['sparsity']:.3f}", *cells,
                                         *accuracy_cells(row), cost, speedup(speed),
                                         f"`{command}`"]) + " |")

    def model_perplexities(row: dict) -> list[tuple]:
        return [(row["perplexity_test"], row.get("perplexity_test_ci_low"),
                 row.get("perplexity_test_ci_high")),
                *([(row["perplexity_wikitext"], row["perplexity_wikitext_ci_low"],
                    row["perplexity_wikitext_ci_high"])] if wikitext else []),
                *[(row[f"perplexity_{o}"], None, None) for o in ood]]

    def row_perplexities(row: dict) -> list[tuple]:
        return [(row["test_perplexity"], row.get("perplexity_ci_low"),
                 row.get("perplexity_ci_high")),
                *([(row["wikitext_perplexity"], row["wikitext_perplexity_ci_low"],
                    row["wikitext_perplexity_ci_high"])] if wikitext else []),
                *[(row[f"{o}_perplexity"], None, None) for o in ood]]

    dense_perplexities = model_perplexities(dense)
    line("dense", dense, dense_perplexities, f"{exp} evaluate")
    for r in rows:
        # SparseGPT chooses within rows whatever masks.scope says; N:M within groups of M.
        scoped = r["pattern"] == "unstructured" and r["criterion"] != "sparsegpt"
        name = f"{r['criterion']} ({r['scope']})" if scoped else r["criterion"]
        if r.get("allocation", "uniform") != "uniform":
            name += f", {r['allocation']}"
        command = f"{exp} compare@{r['criterion']}-{r['pattern']}"
        speed = r.get("speed")
        line(f"{name}, {r['pattern']}", r, row_perplexities(r), command,
             f"{r['prune_seconds']:.0f} s pruning" if "prune_seconds" in r else "-", speed)
        if "reconstructed" in r:
            b = r["reconstructed"]
            line(f"{name}, {r['pattern']}, block reconstruction", b, row_perplexities(b),
                 command, f"{b['seconds']:.0f} s, {b['steps_per_layer']} steps x "
                 f"{b['batch_size']} blocks a layer", speed)
        if "finetuned" in r:
            f = r["finetuned"]
            cost = f"{f['tokens']:,} tokens, {f['seconds']:.0f} s" if "tokens" in f else "-"
            line(f"{name}, {r['pattern']}, "
                 f"{'reconstruction + ' if 'reconstructed' in r else ''}fine-tuned + "
                 f"{f['average']}", f, row_perplexities(f), command, cost, speed)
    final = evaluate["models"]["averaged"]
    masks = json.loads((metrics / "masks.json").read_text())
    line(f"final model ({masks['criterion']} {masks['pattern']}, the main path)", final,
         model_perplexities(final), f"{exp}")
    print("\n".join(lines))
    print("\nTest ppl: [95% bootstrap interval over the scored windows]. Accuracy: * differs "
          "from the dense model's on the same questions at p < 0.05 (exact McNemar test; for "
          "the average a paired bootstrap over each task's questions); avg ± the half-width of "
          "its 95% interval.")

    # The levers in turn, one line a row: what each bought, as multiples of dense perplexity.
    if any("reconstructed" in r or "finetuned" in r for r in rows):
        domains = " / ".join(["test", *(["WikiText-2"] if wikitext else []), *ood])

        def multiples(scored: dict | None) -> str:
            if scored is None:
                return "-"
            return " / ".join(f"{p / d[0]:.2f}x" for (p, _, _), d
                              in zip(row_perplexities(scored), dense_perplexities))

        def average(scored: dict | None) -> str:
            return f"{scored['average_acc']:.3f}" if scored and "average_acc" in scored else "-"

        print(f"\nPerplexity as a multiple of dense ({domains}) after each lever in turn; "
              f"dense: {' / '.join(f'{d[0]:.2f}' for d in dense_perplexities)}, zero-shot "
              f"average {average(dense)}.\n")
        print("| row | one-shot | + block reconstruction | + fine-tuning | avg acc (one-shot, "
              "last) | reconstruction cost | fine-tuning cost | prefill/decode x |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            built, tuned = r.get("reconstructed"), r.get("finetuned")
            print(f"| {r['criterion']}, {r['pattern']} | {multiples(r)} | {multiples(built)} | "
                  f"{multiples(tuned)} | {average(r)}, {average(tuned or built or r)} | "
                  + (f"{built['seconds']:.0f} s" if built else "-") + " | "
                  + (f"{tuned['tokens']:,} tokens, {tuned['seconds']:.0f} s" if tuned else "-")
                  + f" | {speedup(r.get('speed'))} |")

    print("\n| stage | seconds | peak RSS (GB) |\n| --- | ---: | ---: |")
    total = 0.0
    for stage in STAGES:
        m = json.loads((metrics / f"{stage}.json").read_text())
        total += m["seconds"]
        print(f"| {stage} | {m['seconds']:.0f} | {m['peak_rss_mb'] / 1024:.1f} |")
    for r in sorted(compared.values(), key=lambda r: (r["criterion"], r["pattern"])):
        total += r["seconds"]
        print(f"| compare@{r['criterion']}-{r['pattern']} | {r['seconds']:.0f} | "
              f"{r['peak_rss_mb'] / 1024:.1f} |")
    print(f"| **all stages** | **{total:.0f}** ({total / 60:.1f} min) | |")


if __name__ == "__main__":
    main()
