"""masks: prune by the configured criterion and pattern, from the collected statistics."""

from __future__ import annotations

from gradprune.config import Params
from gradprune.data import calibration_blocks, read_blocks
from gradprune.io import atomic_dir, write_json
from gradprune.models.llama import bf16_enabled, load_model
from gradprune.plan import check_stage_fits
from gradprune.pruning.prune import pruning_report, save_pruned
from gradprune.pruning.sequential import layer_by_layer, prune_calibrated, statistics_to_load
from gradprune.pruning.stats import load_stats, load_stats_info
from tasks.stage import DATA, Stage, stage_main

OUT = DATA / "masks"
STATS = DATA / "gradients" / "stats.safetensors"


def run(params: Params, stage: Stage) -> dict:
    cfg = params.masks
    check_stage_fits("masks", DATA / "train" / "model", params, stage.device)
    stats = load_stats(STATS, stage.device, statistics_to_load(cfg))
    # Layer by layer, the model stays in host memory and one decoder layer at a time computes
    # on the device.
    sequential = layer_by_layer(cfg)
    dense = load_model(DATA / "train" / "model", None if sequential else stage.device)
    modules = dict(dense.named_modules())
    missing = [name for name in stats if name not in modules]
    if missing:
        raise ValueError(f"{STATS}: statistics name modules the model lacks ({missing[0]}); "
                         "rerun the gradients stage")
    # Layer by layer, the calibration blocks the gradients stage used pass through the layers.
    blocks = calibration_blocks(read_blocks(DATA / "prepare" / "train.parquet"),
                                params.gradients.calibration_blocks, params.seed) \
        if sequential else None
    pruned = prune_calibrated(dense, stats, cfg, params.seed,
                              load_stats_info(STATS)["calibration_blocks"], blocks,
                              bf16=bf16_enabled(params.gradients.bf16, stage.device),
                              device=stage.device)

    report = pruning_report(pruned, dense)
    report.update(criterion=cfg.criterion, variant=cfg.variant, pattern=cfg.pattern,
                  calibration=cfg.calibration,
                  tau=cfg.tau, scope=cfg.scope, sparsity_asked=cfg.sparsity)
    with atomic_dir(OUT) as out:
        save_pruned(out, pruned)
        write_json(out / "masks.json", report)
    stage.log_artifact(OUT / "masks.json", "masks")
    metrics = {
        "criterion": cfg.criterion,
        "pattern": cfg.pattern,
        "sparsity_asked": cfg.sparsity,
        "sparsity_achieved": report["total"]["sparsity"],
        "kept": report["total"]["kept"],
        "prunable": report["total"]["numel"],
    }
    if pruned.smaller is not None:
        metrics["parameters_after"] = report["shape_after"]["parameters"]
    return metrics


if __name__ == "__main__":
    stage_main("masks", run)
