"""gradients: the calibration statistics the requested criteria read (E[g], E|g|, E[g^2] per
prunable weight, input-channel activation norms, X^T X), in one lean gradient pass.

Which statistics: gradients.statistics auto collects what masks.criterion (with masks.variant)
and every compare.criteria row read, so a magnitude/wanda/sparsegpt-only run does no backward
at all and a run without sparsegpt stores no Hessians; all collects every one.

Data-parallel under `torchrun --standalone --nproc_per_node=N -m tasks.gradients`: each process
takes its share of the calibration blocks, the sums are added across processes, rank 0 writes.
"""

from __future__ import annotations

import time

from gradprune.config import Params
from gradprune.data import calibration_blocks, read_blocks
from gradprune.io import atomic_dir
from gradprune.models.llama import bf16_enabled, load_model, prunable_linears
from gradprune.plan import check_stage_fits
from gradprune.pruning.stats import collect_gradient_stats, requested_statistics, save_stats
from gradprune.training.parallel import is_main_process
from tasks.stage import DATA, Stage, stage_main

OUT = DATA / "gradients"


def run(params: Params, stage: Stage) -> dict:
    cfg = params.gradients
    bf16 = bf16_enabled(cfg.bf16, stage.device)
    check_stage_fits("gradients", DATA / "train" / "model", params, stage.device, bf16)
    model = load_model(DATA / "train" / "model", stage.device)
    linears = prunable_linears(model, cfg.include, cfg.exclude)
    blocks = calibration_blocks(read_blocks(DATA / "prepare" / "train.parquet"),
                                cfg.calibration_blocks, params.seed)
    statistics = requested_statistics(params)

    started = time.perf_counter()
    stats, loss = collect_gradient_stats(model, linears, blocks, bf16, statistics,
                                         checkpointing=cfg.checkpointing, offload=cfg.offload)
    seconds = time.perf_counter() - started
    if not is_main_process():
        return {}

    with atomic_dir(OUT) as out:
        save_stats(out / "stats.safetensors", stats,
                   {"calibration_blocks": len(blocks), "block_size": blocks.shape[1],
                    "statistics": list(statistics)})
    return {
        "calibration_blocks": len(blocks),
        "calibration_tokens": int(blocks.numel()),
        "calibration_loss": loss,
        "prunable_modules": len(linears),
        "prunable_weights": sum(m.weight.numel() for m in linears.values()),
        "statistics": len(statistics),
        "statistics_bytes": sum(t.numel() * t.element_size()
                                for per in stats.values() for t in per.values()),
        "tokens_per_second": round(blocks.numel() / seconds, 1),
        "bf16": bf16,
    }


if __name__ == "__main__":
    stage_main("gradients", run, data_parallel=True)
