"""masks: scores from the configured criterion, thresholded by tau or solved for a sparsity."""

from __future__ import annotations

from gradprune.config import Params
from gradprune.criteria import scores_for
from gradprune.io import atomic_dir, write_json
from gradprune.masks import masks_for_sparsity, masks_for_threshold, save_masks, sparsity_report
from gradprune.model import load_model
from gradprune.stats import load_stats
from tasks.common import DATA, Stage, stage_main

OUT = DATA / "masks"


def run(params: Params, stage: Stage) -> dict:
    cfg = params.masks
    stats = load_stats(DATA / "gradients" / "stats.safetensors")
    modules = dict(load_model(DATA / "train" / "model").named_modules())
    missing = [name for name in stats if name not in modules]
    if missing:
        raise ValueError(f"{DATA / 'gradients'}: statistics name modules the model lacks "
                         f"({missing[0]}); rerun the gradients stage")
    weights = {name: modules[name].weight.detach() for name in stats}
    scores = scores_for(cfg.criterion, weights, stats)
    if cfg.tau is not None:
        masks = masks_for_threshold(scores, cfg.tau)
    else:
        masks = masks_for_sparsity(scores, cfg.sparsity, cfg.scope)

    report = sparsity_report(masks)
    report.update(criterion=cfg.criterion, tau=cfg.tau, scope=cfg.scope,
                  sparsity_asked=cfg.sparsity)
    with atomic_dir(OUT) as out:
        save_masks(out / "masks.safetensors", masks)
        write_json(out / "masks.json", report)
    stage.log_artifact(OUT / "masks.json", "masks")
    return {
        "criterion": cfg.criterion,
        "sparsity_asked": cfg.sparsity,
        "sparsity_achieved": report["total"]["sparsity"],
        "kept": report["total"]["kept"],
        "prunable": report["total"]["numel"],
    }


if __name__ == "__main__":
    stage_main("masks", run)
