"""The prune that the masks stage and every compare row run the same way: the trained model and
the gradients stage's statistics in, a masks.* configuration applied; layer by layer on the
gradients stage's own calibration blocks where masks.calibration asks, and those blocks kept
for block reconstruction where masks.reconstruct asks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradprune.config import MaskParams, Params
from gradprune.data import calibration_blocks, read_blocks
from gradprune.models.llama import bf16_enabled, load_model
from gradprune.pruning.prune import Pruned
from gradprune.pruning.sequential import prune_calibrated, statistics_to_load
from gradprune.pruning.stats import load_stats, load_stats_info
from tasks.stage import DATA

DENSE = DATA / "train" / "model"
STATS = DATA / "gradients" / "stats.safetensors"


@dataclass
class PrunedTrained:
    dense: nn.Module  # the trained model; layer by layer it ends pruned (see prune_calibrated)
    pruned: Pruned
    calibration: str  # as masks.calibration resolved for this config: one_pass or sequential
    blocks: torch.Tensor | None  # the calibration blocks, where a layer pass or reconstruction needs them
    shapes: dict[str, torch.Size]  # weight shape of every Linear the statistics cover


def prune_trained(params: Params, cfg: MaskParams, device: torch.device) -> PrunedTrained:
    # Layer by layer, the model stays in host memory and one decoder layer at a time computes
    # on the device.
    arch = params.model.arch
    sequential = cfg.layer_by_layer(arch)
    dense = load_model(DENSE, None if sequential else device)
    stats = load_stats(STATS, device, statistics_to_load(cfg, arch))
    modules = dict(dense.named_modules())
    missing = [name for name in stats if name not in modules]
    if missing:
        raise ValueError(f"{STATS}: statistics name modules the model lacks ({missing[0]}); "
                         "rerun the gradients stage")
    # The same seeded sample the gradients stage took its statistics from.
    blocks = calibration_blocks(read_blocks(DATA / "prepare" / "train.parquet"),
                                params.gradients.calibration_blocks, params.seed) \
        if sequential or cfg.reconstruct.steps else None
    pruned = prune_calibrated(dense, stats, cfg, params.seed,
                              load_stats_info(STATS)["calibration_blocks"], blocks, arch=arch,
                              bf16=bf16_enabled(params.gradients.bf16, device), device=device)
    return PrunedTrained(dense, pruned, "sequential" if sequential else "one_pass", blocks,
                         {name: modules[name].weight.shape for name in stats})
