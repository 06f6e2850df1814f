"""masks: prune by the configured criterion and pattern, from the collected statistics."""

from __future__ import annotations

from gradprune.config import Params
from gradprune.data import calibration_blocks, read_blocks
from gradprune.io import atomic_dir, write_json
from gradprune.models.llama import bf16_enabled, load_model
from gradprune.plan import check_stage_fits
from gradprune.pruning.prune import pruning_report, reconstruct_pruned, save_pruned
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
    # The gradients stage's calibration blocks (the same seeded sample): layer by layer they
    # pass through the layers; block reconstruction tunes each layer on them.
    blocks = calibration_blocks(read_blocks(DATA / "prepare" / "train.parquet"),
                                params.gradients.calibration_blocks, params.seed) \
        if sequential or cfg.reconstruct.steps else None
    pruned = prune_calibrated(dense, stats, cfg, params.seed,
                              load_stats_info(STATS)["calibration_blocks"], blocks,
                              bf16=bf16_enabled(params.gradients.bf16, stage.device),
                              device=stage.device)
    reconstruction = None
    if cfg.reconstruct.steps:
        reconstruction = reconstruct_pruned(dense, pruned, blocks, cfg, params.seed)

    report = pruning_report(pruned, dense)
    if reconstruction is not None:
        report["reconstruction"] = reconstruction
    report.update(criterion=cfg.criterion, variant=cfg.variant, pattern=cfg.pattern,
                  calibration=cfg.calibration, allocation=cfg.allocation,
                  tau=cfg.tau, scope=cfg.scope, sparsity_asked=cfg.sparsity)
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
