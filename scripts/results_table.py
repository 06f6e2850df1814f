"""Print the results tables of a finished pipeline run as Markdown (docs/RESULTS.md holds one).

Every number is read from the run's stage records (reports/, the metrics files' numbers with the
settings that name them): reports/evaluate.json (the dense and the final model),
reports/compare/*.json (one row per criterion x pattern, before and after fine-tuning when
compare.finetune was on) and each stage's seconds and peak memory. Run it in the
repository (or the experiment's workspace) that made them:

    python scripts/results_table.py [--preset presets/smollm2.yaml] > table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradprune.config import CRITERIA

TASKS = ["hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"]
SHORT = {"hellaswag": "HellaSwag", "piqa": "PIQA", "winogrande": "WinoGr.", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c", "boolq": "BoolQ", "openbookqa": "OBQA"}
STAGES = ["prepare", "train", "gradients", "masks", "finetune", "average", "evaluate"]


def accuracy_cells(row: dict) -> list[str]:
    tasks = row.get("tasks", {})
    cells = [f"{tasks[t]['acc']:.3f}" if t in tasks else "-" for t in TASKS]
    return cells + [f"{row['average_acc']:.3f}" if "average_acc" in row else "-"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", default="reports", help="the run's stage records")
    parser.add_argument("--preset", help="the preset the run used, named in the commands")
    args = parser.parse_args()
    metrics = Path(args.reports)
    evaluate = json.loads((metrics / "evaluate.json").read_text())
    rows = sorted((json.loads(p.read_text()) for p in (metrics / "compare").glob("*.json")),
                  key=lambda r: (r["pattern"] != "unstructured", r["pattern"],
                                 CRITERIA.index(r["criterion"])))
    exp = "gradprune exp" + (f" --preset {args.preset}" if args.preset else "")

    header = ["model", "sparsity", "test ppl", *[SHORT[t] for t in TASKS], "avg", "command"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def line(name: str, row: dict, ppl: float, command: str) -> None:
        lines.append("| " + " | ".join([name, f"{row['sparsity']:.3f}", f"{ppl:.2f}",
                                         *accuracy_cells(row), f"`{command}`"]) + " |")

    dense = evaluate["models"]["dense"]
    line("dense", dense, dense["perplexity_test"], f"{exp} evaluate")
    for r in rows:
        # SparseGPT chooses within rows whatever masks.scope says; N:M within groups of M.
        scoped = r["pattern"] == "unstructured" and r["criterion"] != "sparsegpt"
        name = f"{r['criterion']} ({r['scope']})" if scoped else r["criterion"]
        command = f"{exp} compare@{r['criterion']}-{r['pattern']}"
        line(f"{name}, {r['pattern']}", r, r["test_perplexity"], command)
        if "finetuned" in r:
            f = r["finetuned"]
            line(f"{name}, {r['pattern']}, fine-tuned + {f['average']}", f,
                 f["test_perplexity"], command)
    final = evaluate["models"]["averaged"]
    masks = json.loads((metrics / "masks.json").read_text())
    line(f"final model ({masks['criterion']} {masks['pattern']}, the main path)", final,
         final["perplexity_test"], f"{exp}")
    print("\n".join(lines))

    print("\n| stage | seconds | peak RSS (GB) |\n| --- | ---: | ---: |")
    total = 0.0
    for stage in STAGES:
        m = json.loads((metrics / f"{stage}.json").read_text())
        total += m["seconds"]
        print(f"| {stage} | {m['seconds']:.0f} | {m['peak_rss_mb'] / 1024:.1f} |")
    for r in rows:
        total += r["seconds"]
        print(f"| compare@{r['criterion']}-{r['pattern']} | {r['seconds']:.0f} | "
              f"{r['peak_rss_mb'] / 1024:.1f} |")
    print(f"| **all stages** | **{total:.0f}** ({total / 60:.1f} min) | |")


if __name__ == "__main__":
    main()
