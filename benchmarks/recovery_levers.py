"""What the one-shot recovery levers buy, measured on a workspace the pipeline prepared.

For each criterion, with the layer allocation uniform and OWL: prune once (masks.* of the
workspace's params.yaml, sparsity and scope as given here), score the test split and the
out-of-domain texts, then reconstruct block by block (masks.reconstruct) and score again.
All in this process, from the workspace's dense model, statistics and calibration sample; no
fine-tuning. Prints a markdown table (perplexity and ratio to dense per domain, seconds) and
writes it as JSON beside it.

    cd <workspace with data/prepare, data/train, data/gradients and its params.yaml>
    python <repo>/benchmarks/recovery_levers.py --criteria sparsegpt wanda \\
        --reconstruct-steps 16 --out recovery_levers.json
    python <repo>/benchmarks/recovery_levers.py --criteria gblm fisher --allocations uniform \\
        --scopes global per_layer per_row --reconstruct-steps 0     # the best scope, one-shot
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from gradprune.config import load_params  # noqa: E402
from gradprune.data import calibration_blocks, load_tokenizer, read_blocks  # noqa: E402
from gradprune.models.llama import load_model  # noqa: E402
from gradprune.pruning.prune import apply_pruning, prune, reconstruct, with_overrides  # noqa: E402
from gradprune.pruning.stats import load_stats, load_stats_info  # noqa: E402
from tasks.measure import ood_perplexities, ood_streams, test_perplexity  # noqa: E402

DATA = Path("data")
DENSE = DATA / "train" / "model"
STATS = DATA / "gradients" / "stats.safetensors"
SCOPES = {"wanda": "per_row", "gblm": "per_row", "magnitude": "per_layer"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--criteria", nargs="+", default=["sparsegpt", "wanda"])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "owl"])
    parser.add_argument("--scopes", nargs="+",
                        help="score each criterion at each of these scopes (default: its "
                             "published one); owl skips global")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--reconstruct-steps", type=int, default=16)
    parser.add_argument("--reconstruct-lr", type=float, default=1e-4)
    parser.add_argument("--out", default="recovery_levers.json")
    args = parser.parse_args()

    params = load_params("params.yaml")
    stats = load_stats(STATS)
    n_blocks = load_stats_info(STATS)["calibration_blocks"]
    tokenizer = load_tokenizer(DENSE)
    streams = ood_streams(tokenizer, params)
    blocks = calibration_blocks(read_blocks(DATA / "prepare" / "train.parquet"),
                                params.gradients.calibration_blocks, params.seed)

    def scores(model) -> dict:
        return {"test": test_perplexity(model, params)["perplexity"],
                **ood_perplexities(model, streams, params)}

    dense = load_model(DENSE)
    rows = [{"recipe": "dense", **scores(dense), "seconds": 0.0}]
    print(rows[0], flush=True)
    recipes = [(criterion, allocation, scope) for criterion in args.criteria
               for allocation in args.allocations
               for scope in (args.scopes or [SCOPES.get(criterion, "per_layer")])
               if not (allocation == "owl" and scope == "global" and criterion != "sparsegpt")]
    for criterion, allocation, scope in recipes:
        cfg = with_overrides(
            params.masks, criterion=criterion, sparsity=args.sparsity, tau=None,
            pattern="unstructured", overrides={}, allocation=allocation,
            scope=scope, variant="mean",
            reconstruct=dataclasses.replace(params.masks.reconstruct,
                                            steps=args.reconstruct_steps,
                                            lr=args.reconstruct_lr))
        started = time.perf_counter()
        pruned = prune(dense, stats, cfg, params.seed, n_blocks)
        model = apply_pruning(copy.deepcopy(dense), pruned)
        seconds = time.perf_counter() - started
        name = f"{criterion} ({scope}) {args.sparsity:.0%} {allocation}"
        rows.append({"recipe": f"{name}, one-shot", **scores(model), "seconds": seconds})
        print(rows[-1], flush=True)
        if not args.reconstruct_steps:
            continue
        done = reconstruct(dense, model, pruned.masks, blocks, cfg, params.seed)
        rows.append({"recipe": f"{name} + reconstruction ({args.reconstruct_steps} steps "
                               f"x {cfg.reconstruct.batch_size} blocks per layer)",
                     **scores(model), "seconds": seconds + done["seconds"],
                     "error_before": done["mean_error_before"],
                     "error_after": done["mean_error_after"]})
        print(rows[-1], flush=True)

    domains = ["test", *streams]
    print(f"\ncalibration {len(blocks)} x {blocks.shape[1]} tokens; perplexity over "
          f"{params.evaluate.max_tokens} tokens per domain, windows "
          f"{params.evaluate.context or params.data.block_size}")
    print("| recipe | " + " | ".join(f"{d} ppl (x dense)" for d in domains) + " | seconds |")
    print("| --- |" + " --- |" * (len(domains) + 1))
    for row in rows:
        cells = [f"{row[d]:.2f} ({row[d] / rows[0][d]:.2f}x)" for d in domains]
        print(f"| {row['recipe']} | " + " | ".join(cells) + f" | {row['seconds']:.0f} |")
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
