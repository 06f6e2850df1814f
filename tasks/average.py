"""average: merge the fine-tuning checkpoints, re-mask, measure, save and register.

uniform, val_weighted and greedy merge every checkpoint of every run; ema merges the runs'
moving averages; swa the checkpoints in the last average.swa_fraction of each run. Every merge
is re-masked, so no method revives a pruned weight, and its validation loss is measured as
finetune measured its checkpoints', so the two compare.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from gradprune.averaging import checkpoint_weights, greedy_soup, merge, swa_weights
from gradprune.config import AverageParams, Params
from gradprune.data import load_tokenizer, read_blocks
from gradprune.io import atomic_dir, read_json, write_json
from gradprune.pruning import load_pruned_model
from gradprune.sparse_export import save_sparse, sparse_size_report
from gradprune.training import mean_loss
from tasks.common import DATA, Stage, stage_main

OUT = DATA / "average"
FINETUNED = DATA / "finetune"
DENSE = DATA / "train" / "model"


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


def run(params: Params, stage: Stage) -> dict:
    cfg = params.average
    record = read_json(FINETUNED / "checkpoints.json")
    val_blocks = read_blocks(DATA / "prepare" / "val.parquet")
    # The pruned model's shape (smaller when structured) and the masks every merge keeps.
    model, masks = load_pruned_model(DENSE, DATA / "masks")
    merged = average_into(model, masks, cfg, record, lambda c: FINETUNED / c["file"], val_blocks)
    used, merged_val_loss = merged["used"], merged["merged_val_loss"]
    weights = [c["weight"] for c in used]
    best = min(record["checkpoints"], key=lambda c: c["val_loss"])

    with atomic_dir(OUT) as out:
        model.save_pretrained(out / "model")
        load_tokenizer(DENSE).save_pretrained(out / "model")
        # Beside the dense HF export, the same weights as bitmask + non-zero values.
        save_sparse(model.state_dict(), out / "model.sparse.safetensors", masks=masks)
        write_json(out / "weights.json", {
            "method": cfg.method, "params": asdict(cfg), "checkpoints": used,
            "merged_val_loss": merged_val_loss, "best_checkpoint": best,
            "best_checkpoint_val_loss": best["val_loss"]})
    stage.log_artifact(OUT / "weights.json", "average")
    version = stage.register_model(OUT / "model")
    return {"method": cfg.method, "checkpoints": sum(w > 0 for w in weights),
            "candidates": len(used), "max_weight": max(weights),
            "merged_val_loss": merged_val_loss, "best_checkpoint_val_loss": best["val_loss"],
            "registered_version": version,
            "sparse_export_ratio": sparse_size_report(OUT / "model.sparse.safetensors")["ratio"]}


if __name__ == "__main__":
    stage_main("average", run)
