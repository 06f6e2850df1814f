"""finetune: masked fine-tuning runs from one mask, checkpoints spread over each run.

The runs differ only in seed and data order (Sparse Model Soups): they share the mask, so any
average of their checkpoints is exactly as sparse as each of them. Each run also keeps an
exponential moving average of its weights, saved beside its checkpoints as one more candidate.

A run in progress keeps its resumable state and checkpoints in data/.finetune-resume, outside
the DVC output (DVC deletes a stage's outputs before rerunning it). A stage killed at any point
continues from its last validation when rerun, if the params and input files are unchanged, and
ends bit-identical to an uninterrupted run. The folder goes once the output is in place.

Data-parallel under `torchrun --standalone --nproc_per_node=N -m tasks.finetune`: every process
takes its share of each batch and the gradients are summed (gradprune.training), so the global
batch is finetune.batch_size as in one process; rank 0 alone writes checkpoints, state and output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from gradprune.config import Params
from gradprune.data import read_blocks
from gradprune.io import (atomic_dir, atomic_file, read_json, remove_stale_temporaries,
                          sha256_file, write_json)
from gradprune.masks import apply_masks
from gradprune.model import bf16_enabled, load_model
from gradprune.parallel import barrier, is_main_process, rank_and_size
from gradprune.pruning import load_pruned_model
from gradprune.training import Distillation, MovingAverage, mean_loss, train_lm
from tasks.common import DATA, Stage, stage_main

OUT = DATA / "finetune"
RESUME = DATA / ".finetune-resume"
DENSE = DATA / "train" / "model"
MASKS = DATA / "masks"
PREPARED = DATA / "prepare"

# Under the library's logger, so that stage_main's handler prints it.
log = logging.getLogger("gradprune.finetune")


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """`count` steps spread evenly over 1..steps, the last one always included."""
    return sorted({round(steps * (i + 1) / count) for i in range(count)})


def inputs_fingerprint(params: Params) -> str:
    """What resumable state must have been made from to be reused: these params and files."""
    digest = hashlib.sha256(json.dumps({"seed": params.seed, "finetune": asdict(params.finetune)},
                                       sort_keys=True).encode())
    for path in (DENSE / "model.safetensors", *sorted(MASKS.rglob("*.safetensors")),
                 PREPARED / "train.parquet", PREPARED / "val.parquet"):
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def resume_folder(fingerprint: str) -> Path:
    """RESUME, emptied first unless its state was made from the same params and inputs."""
    recorded = RESUME / "fingerprint.json"
    if recorded.is_file() and read_json(recorded)["fingerprint"] == fingerprint:
        log.info("%s holds state from these params and inputs; resuming", RESUME)
        return RESUME
    if RESUME.exists():
        log.info("%s holds state from other params or inputs; starting over", RESUME)
        shutil.rmtree(RESUME)
    write_json(recorded, {"fingerprint": fingerprint})
    return RESUME


def save_weights(model, path: Path) -> None:
    from safetensors.torch import save_model

    with atomic_file(path) as tmp:
        save_model(model, str(tmp))


def finetune_run(run: int, params: Params, folder: Path, start, masks, train_blocks, val_blocks,
                 teacher, bf16: bool) -> dict:
    """One masked fine-tuning run from the model `start()` returns; returns its record (read
    back if an earlier attempt of the stage finished it)."""
    record_file = folder / "run.json"
    if record_file.is_file():
        return read_json(record_file)
    main = is_main_process()
    if main:
        remove_stale_temporaries(folder)
    cfg = params.finetune
    # Seeds unlike dense training's, so every run sees the data in a new order.
    seed = params.seed + 2 + run
    save_at = checkpoint_steps(cfg.steps, cfg.checkpoints)
    model = start()
    ema = MovingAverage(cfg.ema_decay)
    distillation = (Distillation(teacher, cfg.distill_temperature, cfg.distill_weight)
                    if teacher is not None else None)

    def file_at(step: int) -> str:
        return f"ckpt-r{run}-{step:06d}.safetensors"

    def on_validation(step: int, val_loss: float) -> None:
        if step in save_at and main:
            save_weights(model, folder / file_at(step))

    log.info("run %d of %d (seed %d)", run + 1, cfg.runs, seed)
    curve = train_lm(model, train_blocks, val_blocks, cfg, seed, bf16, masks=masks,
                     validate_also_at=set(save_at), on_validation=on_validation,
                     grad_accum=cfg.grad_accum, patience=cfg.patience,
                     distillation=distillation, ema=ema, state_dir=folder / "state")
    if not main:
        return {}
    last = curve[-1]
    if last.step not in save_at:  # stopped early: the run's last weights are a checkpoint too
        save_weights(model, folder / file_at(last.step))
    checkpoints = [{"run": run, "step": p.step, "file": file_at(p.step), "val_loss": p.val_loss}
                   for p in curve if p.step in save_at or p is last]

    model.load_state_dict(ema.weights, strict=False)
    apply_masks(model, masks)
    save_weights(model, folder / f"ema-r{run}.safetensors")
    moving_average = {"run": run, "step": last.step, "file": f"ema-r{run}.safetensors",
                      "val_loss": mean_loss(model, val_blocks[: cfg.eval_blocks], cfg.batch_size,
                                            bf16),
                      "decay": cfg.ema_decay}
    record = {"run": run, "seed": seed, "steps": last.step,
              "stopped_early": last.step < cfg.steps, "checkpoints": checkpoints,
              "ema": moving_average, "curve": [{"run": run, **vars(p)} for p in curve]}
    write_json(record_file, record)
    return record


def finetune_runs(params: Params, folder: Path, start, masks) -> dict:
    """Every fine-tuning run from the model `start()` returns, each in folder/run-<i>, all
    checkpoint files left there; returns the record checkpoints.json holds (file names
    relative to each run's folder), with the runs' curves under "curves"."""
    cfg = params.finetune
    train_blocks = read_blocks(PREPARED / "train.parquet")
    val_blocks = read_blocks(PREPARED / "val.parquet")
    bf16 = bf16_enabled(cfg.bf16)
    teacher = load_model(DENSE) if cfg.distill_weight > 0 else None
    pruned_val_loss = mean_loss(start(), val_blocks[: cfg.eval_blocks], cfg.batch_size, bf16)
    runs = [finetune_run(r, params, folder / f"run-{r}", start, masks, train_blocks, val_blocks,
                         teacher, bf16) for r in range(cfg.runs)]
    if not is_main_process():  # only the main process keeps records and files
        return {}
    return {
        "pruned_val_loss": pruned_val_loss,
        # How every val_loss here was measured: the average stage measures merges alike.
        "validation": {"blocks": cfg.eval_blocks, "batch_size": cfg.batch_size, "bf16": bf16},
        "runs": [{k: r[k] for k in ("run", "seed", "steps", "stopped_early")} for r in runs],
        "checkpoints": [c for r in runs for c in r["checkpoints"]],
        "ema": [r["ema"] for r in runs],
        "curves": [p for r in runs for p in r["curve"]],
    }


def run(params: Params, stage: Stage) -> dict:
    cfg = params.finetune
    processes = rank_and_size()[1]
    if cfg.batch_size < processes:
        raise ValueError(f"finetune.batch_size={cfg.batch_size} is below the {processes} "
                         "processes, each of which needs a block of every batch; raise it or "
                         "run fewer processes")
    _, masks = load_pruned_model(DENSE, MASKS)
    resume = resume_folder(inputs_fingerprint(params)) if is_main_process() else RESUME
    barrier()  # the other processes read the state the main one kept or cleared
    record = finetune_runs(params, resume, lambda: load_pruned_model(DENSE, MASKS)[0], masks)
    if not is_main_process():
        return {}
    curves = record.pop("curves")

    with atomic_dir(OUT) as out:
        for entry in record["checkpoints"] + record["ema"]:
            shutil.copyfile(resume / f"run-{entry['run']}" / entry["file"], out / entry["file"])
        write_json(out / "checkpoints.json", record)
    shutil.rmtree(resume)
    stage.write_plot("finetune_curve", curves)
    stage.log_artifact(OUT / "checkpoints.json", "finetune")
    return {**finetune_summary(record), "distill_weight": cfg.distill_weight,
            "bf16": record["validation"]["bf16"]}


def finetune_summary(record: dict) -> dict:
    checkpoints = record["checkpoints"]
    return {
        "pruned_val_loss": record["pruned_val_loss"],
        "final_val_loss": checkpoints[-1]["val_loss"],
        "best_val_loss": min(c["val_loss"] for c in checkpoints),
        "best_ema_val_loss": min(e["val_loss"] for e in record["ema"]),
        "checkpoints": len(checkpoints),
        "runs": len(record["runs"]),
        "stopped_early": sum(r["stopped_early"] for r in record["runs"]),
    }


if __name__ == "__main__":
    stage_main("finetune", run, data_parallel=True)
