"""masks: prune by the configured criterion and pattern, from the collected statistics."""

from __future__ import annotations

from gradprune.config import Params
from gradprune.data import calibration_blocks, read_blocks
from gradprune.io import atomic_dir, write_json
from gradprune.models.llama import load_model
from gradprune.pruning.prune import prune, pruning_report, reconstruct_pruned, save_pruned
from gradprune.pruning.stats import load_stats, load_stats_info
from tasks.stage import DATA, Stage, stage_main

OUT = DATA / "masks"
STATS = DATA / "gradients" / "stats.safetensors"


def run(params: Params, stage: Stage) -> dict:
    cfg = params.masks
    stats = load_stats(STATS)
    dense = load_model(DATA / "train" / "model")
    modules = dict(dense.named_modules())
    missing = [name for name in stats if name not in modules]
    if missing:
        raise ValueError(f"{STATS}: statistics name modules the model lacks ({missing[0]}); "
                         "rerun the gradients stage")
    pruned = prune(dense, stats, cfg, params.seed, load_stats_info(STATS)["calibration_blocks"])
    reconstruction = None
    if cfg.reconstruct.steps:
        # The gradients stage's calibration blocks: the same seeded sample.
        blocks = calibration_blocks(read_blocks(DATA / "prepare" / "train.parquet"),
                                    params.gradients.calibration_blocks, params.seed)
        reconstruction = reconstruct_pruned(dense, pruned, blocks, cfg, params.seed)

    report = pruning_report(pruned, dense)
    if reconstruction is not None:
        report["reconstruction"] = reconstruction
    report.update(criterion=cfg.criterion, variant=cfg.variant, pattern=cfg.pattern,
                  tau=cfg.tau, scope=cfg.scope, sparsity_asked=cfg.sparsity,
                  allocation=cfg.allocation)
    with atomic_dir(OUT) as out:
        save_pruned(out, pruned)
        write_json(out / "masks.json", report)
    stage.log_artifact(OUT / "masks.json", "masks")
    metrics = {
        "criterion": cfg.criterion,
        "pattern": cfg.pattern,
        "allocation": cfg.allocation,
        "sparsity_asked": cfg.sparsity,
        "sparsity_achieved": report["total"]["sparsity"],
        "kept": report["total"]["kept"],
        "prunable": report["total"]["numel"],
    }
    if pruned.smaller is not None:
        metrics["parameters_after"] = report["shape_after"]["parameters"]
    if reconstruction is not None:
        metrics["reconstruction"] = {k: v for k, v in reconstruction.items() if k != "layers"}
    return metrics


if __name__ == "__main__":
    stage_main("masks", run)
