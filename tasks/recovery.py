"""The recovery procedures after pruning, shared by the finetune and average stages and by the
compare rows that fine-tune: masked fine-tuning runs from one mask (`finetune_runs`) and the
merge of their checkpoints (`average_into`)."""

from __future__ import annotations

import logging
from pathlib import Path

from gradprune.config import AverageParams, Params
from gradprune.data import read_blocks
from gradprune.device import model_device
from gradprune.io import atomic_file, read_json, remove_stale_temporaries, write_json
from gradprune.models.llama import bf16_enabled, load_model
from gradprune.pruning.masks import apply_masks
from gradprune.training.averaging import checkpoint_weights, greedy_soup, merge, swa_weights
from gradprune.training.loop import Distillation, MovingAverage, mean_loss, train_lm
from gradprune.training.parallel import full_state_dict, is_main_process, is_sharded, shard_model
from tasks.stage import DATA

DENSE = DATA / "train" / "model"
PREPARED = DATA / "prepare"

# Under the library's logger, so that stage_main's handler prints it.
log = logging.getLogger("gradprune.finetune")


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """`count` steps spread evenly over 1..steps, the last one always included."""
    return sorted({round(steps * (i + 1) / count) for i in range(count)})


def save_weights(model, path: Path) -> None:
    """The model's weights to `path`, written by the main process. A sharded model is gathered
    first, which every process must take part in."""
    from safetensors.torch import save_file, save_model

    if is_sharded(model):
        state = full_state_dict(model)
        if is_main_process():
            with atomic_file(path) as tmp:
                save_file(state, str(tmp))
        return
    if is_main_process():
        with atomic_file(path) as tmp:
            save_model(model, str(tmp))


def finetune_run(run: int, params: Params, folder: Path, start, masks, train_blocks, val_blocks,
                 teacher, bf16: bool) -> dict:
    """One masked fine-tuning run from the model `start()` returns; returns its record (read
    back if an earlier attempt of the stage finished it). With finetune.sharding: fsdp the
    model is sharded over the processes, each of which saves and resumes its own shard."""
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
    sharded = cfg.sharding == "fsdp"
    if sharded:
        shard_model(model)
    ema = MovingAverage(cfg.ema_decay)
    distillation = (Distillation(teacher, cfg.distill_temperature, cfg.distill_weight)
                    if teacher is not None else None)

    def file_at(step: int) -> str:
        return f"ckpt-r{run}-{step:06d}.safetensors"

    def on_validation(step: int, val_loss: float) -> None:
        if step in save_at:
            save_weights(model, folder / file_at(step))

    log.info("run %d of %d (seed %d)", run + 1, cfg.runs, seed)
    curve = train_lm(model, train_blocks, val_blocks, cfg, seed, bf16, masks=masks,
                     validate_also_at=set(save_at), on_validation=on_validation,
                     grad_accum=cfg.grad_accum, patience=cfg.patience,
                     distillation=distillation, ema=ema, state_dir=folder / "state")
    if not (main or sharded):  # the sharded model's saves and validation need every process
        return {}
    last = curve[-1]
    if last.step not in save_at:  # stopped early: the run's last weights are a checkpoint too
        save_weights(model, folder / file_at(last.step))
    checkpoints = [{"run": run, "step": p.step, "file": file_at(p.step), "val_loss": p.val_loss}
                   for p in curve if p.step in save_at or p is last]

    # A sharded model loads its moving average shard by shard (both are DTensors).
    model.load_state_dict(ema.weights, strict=False)
    apply_masks(model, masks)
    save_weights(model, folder / f"ema-r{run}.safetensors")
    ema_val_loss = mean_loss(model, val_blocks[: cfg.eval_blocks], cfg.batch_size, bf16)
    if not main:
        return {}
    moving_average = {"run": run, "step": last.step, "file": f"ema-r{run}.safetensors",
                      "val_loss": ema_val_loss, "decay": cfg.ema_decay}
    record = {"run": run, "seed": seed, "steps": last.step,
              "stopped_early": last.step < cfg.steps, "checkpoints": checkpoints,
              "ema": moving_average, "curve": [{"run": run, **vars(p)} for p in curve]}
    write_json(record_file, record)
    return record


def finetune_runs(params: Params, folder: Path, start, masks) -> dict:
    """Every fine-tuning run from the model `start()` returns, each in folder/run-<i>, all
    checkpoint files left there; returns the record checkpoints.json holds (file names
    relative to each run's folder), with the runs' curves under "curves". Everything computes
    on the device `start()` places the model on."""
    cfg = params.finetune
    train_blocks = read_blocks(PREPARED / "train.parquet")
    val_blocks = read_blocks(PREPARED / "val.parquet")
    pruned = start()
    device = model_device(pruned)
    bf16 = bf16_enabled(cfg.bf16, device)
    teacher = load_model(DENSE, device) if cfg.distill_weight > 0 else None
    if teacher is not None and cfg.sharding == "fsdp":
        shard_model(teacher)
    pruned_val_loss = mean_loss(pruned, val_blocks[: cfg.eval_blocks], cfg.batch_size, bf16)
    del pruned
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


def load_state(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied pair ({"lm_head.weight": "model.embed_tokens.weight"}) is stored under one name.
    pairs = getattr(model, "_tied_weights_keys", None) or {}
    tied = set(pairs) | set(pairs.values() if isinstance(pairs, dict) else ())
    if unexpected or set(missing) - tied:
        raise ValueError("a fine-tuning checkpoint does not match the pruned model "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")


def weights_for(cfg: AverageParams, candidates: list[dict], paths: list[Path],
                run_ends: dict[int, int], masks: dict, val_loss_of) -> list[float]:
    losses = [c["val_loss"] for c in candidates]
    if cfg.method == "greedy":
        return greedy_soup(paths, losses, masks, val_loss_of)[0]
    if cfg.method == "swa":
        return swa_weights([c["step"] for c in candidates],
                           [run_ends[c["run"]] for c in candidates], cfg.swa_fraction)
    if cfg.method == "ema":
        return checkpoint_weights(losses, "uniform", cfg.temperature)
    return checkpoint_weights(losses, cfg.method, cfg.temperature)


def average_into(model, masks: dict, cfg: AverageParams, record: dict, path_of,
                 val_blocks) -> dict:
    """Merge the checkpoints of a finetune record (checkpoints.json's content; `path_of(entry)`
    finds an entry's file) as `cfg` says, leaving the merge in `model`. Returns the candidates
    with their weights and the merge's validation loss, measured as the checkpoints' were."""
    measured = record["validation"]
    val_blocks = val_blocks[: measured["blocks"]]

    def val_loss_of(state: dict) -> float:
        load_state(model, state)
        return mean_loss(model, val_blocks, measured["batch_size"], measured["bf16"])

    candidates = record["ema"] if cfg.method == "ema" else record["checkpoints"]
    paths = [path_of(c) for c in candidates]
    weights = weights_for(cfg, candidates, paths, {r["run"]: r["steps"] for r in record["runs"]},
                          masks, val_loss_of)
    # Measuring the merge leaves it in `model`.
    merged_val_loss = val_loss_of(merge(paths, weights, masks))
    return {"used": [{**c, "weight": w} for c, w in zip(candidates, weights)],
            "merged_val_loss": merged_val_loss}
