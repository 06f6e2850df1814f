"""masks: prune by the configured criterion and pattern, from the collected statistics."""

from __future__ import annotations

from gradprune.config import Params
from gradprune.io import atomic_dir, write_json
from gradprune.plan import check_stage_fits
from gradprune.pruning.prune import pruning_report, reconstruct_pruned, save_pruned
from tasks.pruning import DENSE, prune_trained
from tasks.stage import DATA, Stage, stage_main

OUT = DATA / "masks"


def run(params: Params, stage: Stage) -> dict:
    cfg = params.masks
    check_stage_fits("masks", DENSE, params, stage.device)
    trained = prune_trained(params, cfg, stage.device)
    dense, pruned, blocks = trained.dense, trained.pruned, trained.blocks
    reconstruction = None
    if cfg.reconstruct.steps:
        reconstruction = reconstruct_pruned(dense, pruned, blocks, cfg, params.seed)

    report = pruning_report(pruned, dense)
    if reconstruction is not None:
        report["reconstruction"] = reconstruction
    report.update(criterion=cfg.criterion, variant=cfg.variant, pattern=cfg.pattern,
                  calibration=trained.calibration, allocation=cfg.allocation,
                  tau=cfg.tau, scope=cfg.scope, sparsity_asked=cfg.sparsity)
    with atomic_dir(OUT) as out:
        save_pruned(out, pruned)
        write_json(out / "masks.json", report)
    stage.log_artifact(OUT / "masks.json", "masks")
    metrics = {
        "criterion": cfg.criterion,
        "pattern": cfg.pattern,
        "allocation": cfg.allocation,
        "calibration": trained.calibration,
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
