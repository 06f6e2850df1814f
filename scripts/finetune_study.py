"""Fine-tuning study on the default pipeline: test perplexity of the last fine-tuning checkpoint
and of the merged model for every averaging method, without and with distillation.

One DVC experiment per point (`dvc exp run -S ...`), so every point is reproducible on its own
and DVC reuses what did not change: the gradient pass and masks always, fine-tuning across the
averaging methods. Evaluation is cut to perplexity (no zero-shot tasks, no speed runs). Writes
docs/finetune_study.json and prints a Markdown table.

    python scripts/finetune_study.py            # after `dvc repro` of the default pipeline
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

METHODS = ("uniform", "val_weighted", "greedy", "ema", "swa")
DISTILL_WEIGHTS = (0.0, 0.5)
OUT = Path("docs/finetune_study.json")


def run_point(method: str, distill: float) -> dict:
    subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-n", f"ft-{method}-kd{distill}",
                    "-S", "evaluate.tasks=[]", "-S", "evaluate.speed.enabled=false",
                    "-S", f"finetune.distill_weight={distill}", "-S", f"average.method={method}"],
                   check=True)
    evaluate = json.loads(Path("metrics/evaluate.json").read_text())["models"]
    average = json.loads(Path("metrics/average.json").read_text())
    return {"method": method, "distill_weight": distill,
            "pruned_ppl": evaluate["pruned"]["perplexity_test"],
            "last_checkpoint_ppl": evaluate["finetuned_last"]["perplexity_test"],
            "merged_ppl": evaluate["averaged"]["perplexity_test"],
            "merged_val_loss": average["merged_val_loss"],
            "best_checkpoint_val_loss": average["best_checkpoint_val_loss"],
            "checkpoints_used": average["checkpoints"]}


def main() -> None:
    rows = [run_point(m, d) for d in DISTILL_WEIGHTS for m in METHODS]
    OUT.write_text(json.dumps(rows, indent=2) + "\n")
    print("| distill weight | method | pruned ppl | last checkpoint ppl | merged ppl | "
          "merged val loss | best checkpoint val loss | checkpoints used |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['distill_weight']} | {r['method']} | {r['pruned_ppl']:.2f} | "
              f"{r['last_checkpoint_ppl']:.2f} | {r['merged_ppl']:.2f} | "
              f"{r['merged_val_loss']:.4f} | {r['best_checkpoint_val_loss']:.4f} | "
              f"{r['checkpoints_used']} |")


if __name__ == "__main__":
    main()
