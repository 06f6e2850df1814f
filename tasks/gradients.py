"""gradients: E[g], E|g|, E[g^2] per prunable weight and input-channel activation norms.

Data-parallel under `torchrun --standalone --nproc_per_node=N -m tasks.gradients`: each process
takes its share of the calibration blocks, the sums are added across processes, rank 0 writes.
"""

from __future__ import annotations

import time

from gradprune.config import Params
from gradprune.data import calibration_blocks, read_blocks
from gradprune.io import atomic_dir
from gradprune.models.llama import bf16_enabled, load_model, prunable_linears
from gradprune.pruning.stats import collect_gradient_stats, save_stats
from gradprune.training.parallel import is_main_process
from tasks.stage import DATA, Stage, stage_main

OUT = DATA / "gradients"


def run(params: Params, stage: Stage) -> dict:
    cfg = params.gradients
    model = load_model(DATA / "train" / "model")
    linears = prunable_linears(model, cfg.include, cfg.exclude)
    blocks = calibration_blocks(read_blocks(DATA / "prepare" / "train.parquet"),
                                cfg.calibration_blocks, params.seed)
    bf16 = bf16_enabled(cfg.bf16)

    started = time.perf_counter()
    stats, loss = collect_gradient_stats(model, linears, blocks, bf16, hessian=cfg.hessian)
    seconds = time.perf_counter() - started
    if not is_main_process():
        return {}

    with atomic_dir(OUT) as out:
        save_stats(out / "stats.safetensors", stats,
                   {"calibration_blocks": len(blocks), "block_size": blocks.shape[1]})
    return {
        "calibration_blocks": len(blocks),
        "calibration_tokens": int(blocks.numel()),
        "calibration_loss": loss,
        "prunable_modules": len(linears),
        "prunable_weights": sum(m.weight.numel() for m in linears.values()),
        "tokens_per_second": round(blocks.numel() / seconds, 1),
        "bf16": bf16,
    }


if __name__ == "__main__":
    stage_main("gradients", run, data_parallel=True)
