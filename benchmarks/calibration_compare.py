"""Test perplexity of one-pass against layer-by-layer (sequential) calibration, from the same
calibration blocks, for wanda (per row) and sparsegpt on the packaged SmolLM2-135M. N:M patterns
run at 50% only; the JSON is rewritten after every row (`complete` says whether all ran).

Needs a prepare stage's output made with SmolLM2's tokenizer (e.g. the folder
`scripts/gpu_check.sh` leaves: GPU_CHECK_DIR/data/prepare). One-pass takes ||X_j|| and X^T X
from the dense model (gradprune.pruning.stats); sequential recomputes them through the pruned
layers (gradprune.pruning.sequential). Perplexity: sliding windows of 512 tokens, stride 256.

    python benchmarks/calibration_compare.py --prepared DIR [--calibration-blocks 8]
        [--test-tokens 4096] [--patterns unstructured 2:4] [--sparsities 0.5 0.6 0.7]
        [--out benchmarks/results/calibration_compare.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from gradprune.config import MaskParams
from gradprune.data import calibration_blocks, read_blocks
from gradprune.evaluation.perplexity import sliding_window_perplexity
from gradprune.io import write_json
from gradprune.models.llama import bf16_enabled, prunable_linears
from gradprune.models.sources import load_source_model
from gradprune.pruning.prune import apply_pruning, prune
from gradprune.pruning.sequential import prune_layer_by_layer
from gradprune.pruning.stats import collect_gradient_stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--calibration-blocks", type=int, default=8)
    parser.add_argument("--test-tokens", type=int, default=4096)
    parser.add_argument("--patterns", nargs="+", default=["unstructured"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="benchmarks/results/calibration_compare.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    dense = load_source_model("smollm2")[0]
    bf16 = bf16_enabled("auto", torch.device("cpu"))
    blocks = calibration_blocks(
        read_blocks(args.prepared / "train.parquet"), args.calibration_blocks, args.seed
    )
    test = read_blocks(args.prepared / "test.parquet").reshape(-1)[: args.test_tokens]
    linears = prunable_linears(dense, ("model.layers.*",))
    one_pass, _ = collect_gradient_stats(dense, linears, blocks, bf16, ["act_norm", "hessian"])

    def perplexity(model) -> float:
        return sliding_window_perplexity(model, test, 512, 256, 4, bf16)["perplexity"]

    def save(complete: bool) -> None:  # after every row, so a long run's finished rows survive
        write_json(
            args.out,
            {
                "benchmark": "calibration_compare",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "calibration_blocks": len(blocks),
                "block_size": blocks.shape[1],
                "test_tokens": len(test),
                "bf16": bf16,
                "complete": complete,
                "rows": rows,
                "seconds": round(time.perf_counter() - started, 1),
            },
        )

    rows = [{"criterion": "dense", "perplexity": perplexity(dense)}]
    print(f"dense: {rows[0]['perplexity']:.2f}", flush=True)
    for pattern in args.patterns:
        for sparsity in [0.5] if ":" in pattern else args.sparsities:
            for criterion, scope in (("wanda", "per_row"), ("sparsegpt", "global")):
                row = {"criterion": criterion, "pattern": pattern, "sparsity": sparsity}
                for calibration in ("one_pass", "sequential"):
                    cfg = MaskParams(
                        criterion=criterion,
                        sparsity=sparsity,
                        scope=scope,
                        pattern=pattern,
                        calibration=calibration,
                    )
                    model = copy.deepcopy(dense)
                    if calibration == "one_pass":
                        apply_pruning(model, prune(model, one_pass, cfg, args.seed, len(blocks)))
                    else:
                        prune_layer_by_layer(
                            model,
                            blocks,
                            {n: {} for n in one_pass},
                            cfg,
                            args.seed,
                            len(blocks),
                            bf16=bf16,
                        )
                    row[calibration] = perplexity(model)
                    del model
                rows.append(row)
                print(
                    f"{criterion:<9} {pattern:<12} {sparsity:.2f}  one-pass "
                    f"{row['one_pass']:8.2f}  sequential {row['sequential']:8.2f}",
                    flush=True,
                )
                save(complete=False)
    save(complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
