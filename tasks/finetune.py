"""finetune: masked fine-tuning runs from one mask, checkpoints spread over each run.

The runs differ only in seed and data order (Sparse Model Soups): they share the mask, so any
average of their checkpoints is exactly as sparse as each of them. Each run also keeps an
exponential moving average of its weights, saved beside its checkpoints as one more candidate.

A run in progress keeps its resumable state and checkpoints in data/.finetune-resume, outside
the DVC output (DVC deletes a stage's outputs before rerunning it). A stage killed at any point
continues from its last validation when rerun, if the params and input files are unchanged, and
ends bit-identical to an uninterrupted run. The folder goes once the output is in place.

Data-parallel under `torchrun --standalone --nproc_per_node=N -m tasks.finetune`: every process
takes its share of each batch and the gradients are summed (gradprune.training.loop), so the global
batch is finetune.batch_size as in one process; rank 0 alone writes checkpoints, state and output.
With finetune.sharding: fsdp the processes also split the model, its gradients, AdamW moments
and moving average (FSDP2); checkpoints are gathered to rank 0 and equal the unsharded ones, and
each process keeps its own shard of the resumable state, so a relaunch with as many processes
resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from gradprune.config import Params
from gradprune.io import atomic_dir, read_json, sha256_file, write_json
from gradprune.models.llama import bf16_enabled
from gradprune.plan import check_stage_fits
from gradprune.pruning.prune import load_pruned_model
from gradprune.training.parallel import barrier, check_sharding, is_main_process, rank_and_size
from tasks.recovery import finetune_runs, finetune_summary
from tasks.stage import DATA, Stage, stage_main

OUT = DATA / "finetune"
RESUME = DATA / ".finetune-resume"
DENSE = DATA / "train" / "model"
MASKS = DATA / "masks"
PREPARED = DATA / "prepare"

# Under the library's logger, so that stage_main's handler prints it.
log = logging.getLogger("gradprune.finetune")


def inputs_fingerprint(params: Params) -> str:
    """What resumable state must have been made from to be reused: these params and files."""
    made_by = {"seed": params.seed, "finetune": asdict(params.finetune)}
    if params.finetune.sharding == "fsdp":  # each process resumes its own shard
        made_by["processes"] = rank_and_size()[1]
    digest = hashlib.sha256(json.dumps(made_by, sort_keys=True).encode())
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


def run(params: Params, stage: Stage) -> dict:
    cfg = params.finetune
    processes = rank_and_size()[1]
    check_sharding(cfg.sharding)
    if cfg.batch_size < processes:
        raise ValueError(f"finetune.batch_size={cfg.batch_size} is below the {processes} "
                         "processes, each of which needs a block of every batch; raise it or "
                         "run fewer processes")
    check_stage_fits("finetune", DENSE, params, stage.device,
                     bf16_enabled(cfg.bf16, stage.device), processes)
    _, masks = load_pruned_model(DENSE, MASKS, stage.device)
    resume = resume_folder(inputs_fingerprint(params)) if is_main_process() else RESUME
    barrier()  # the other processes read the state the main one kept or cleared
    record = finetune_runs(params, resume, lambda: load_pruned_model(DENSE, MASKS, stage.device)[0],
                           masks)
    if not is_main_process():
        return {}
    curves = record.pop("curves")

    with atomic_dir(OUT) as out:
        for entry in record["checkpoints"] + record["ema"]:
            shutil.copyfile(resume / f"run-{entry['run']}" / entry["file"], out / entry["file"])
        write_json(out / "checkpoints.json", record)
    shutil.rmtree(resume)
    stage.write_plot("finetune_curve", curves)
    stage.log_curve(curves, prefix="curve/", series="run")
    stage.log_artifact(OUT / "checkpoints.json", "finetune")
    return {**finetune_summary(record), "distill_weight": cfg.distill_weight,
            "bf16": record["validation"]["bf16"], "sharding": cfg.sharding}


if __name__ == "__main__":
    stage_main("finetune", run, data_parallel=True)
