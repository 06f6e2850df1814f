"""average: merge the fine-tuning checkpoints, re-mask, measure, save and register.

uniform, val_weighted and greedy merge every checkpoint of every run; ema merges the runs'
moving averages; swa the checkpoints in the last average.swa_fraction of each run. Every merge
is re-masked, so no method revives a pruned weight, and its validation loss is measured as
finetune measured its checkpoints', so the two compare.
"""

from __future__ import annotations

from dataclasses import asdict

from gradprune.config import Params
from gradprune.data import load_tokenizer, read_blocks
from gradprune.export.card import card_body, pipeline_card, save_hf_folder
from gradprune.export.sparse import save_sparse, sparse_size_report
from gradprune.io import atomic_dir, read_json, write_json
from gradprune.pruning.prune import load_pruned_model
from tasks.recovery import average_into
from tasks.stage import DATA, Stage, stage_main

OUT = DATA / "average"
FINETUNED = DATA / "finetune"
DENSE = DATA / "train" / "model"


def run(params: Params, stage: Stage) -> dict:
    cfg = params.average
    record = read_json(FINETUNED / "checkpoints.json")
    val_blocks = read_blocks(DATA / "prepare" / "val.parquet")
    # The pruned model's shape (smaller when structured) and the masks every merge keeps.
    model, masks = load_pruned_model(DENSE, DATA / "masks", stage.device)
    merged = average_into(model, masks, cfg, record, lambda c: FINETUNED / c["file"], val_blocks)
    used, merged_val_loss = merged["used"], merged["merged_val_loss"]
    weights = [c["weight"] for c in used]
    best = min(record["checkpoints"], key=lambda c: c["val_loss"])

    record = {"method": cfg.method, "params": asdict(cfg), "checkpoints": used,
              "merged_val_loss": merged_val_loss, "best_checkpoint": best,
              "best_checkpoint_val_loss": best["val_loss"]}
    masks_report = read_json(DATA / "masks" / "masks.json")
    card = pipeline_card(params, masks_report, record)
    with atomic_dir(OUT) as out:
        save_hf_folder(model, load_tokenizer(DENSE), out / "model", card)
        # Beside the dense HF export, the same weights as bitmask + non-zero values.
        save_sparse(model.state_dict(), out / "model.sparse.safetensors", masks=masks)
        write_json(out / "weights.json", record)
    stage.log_artifact(OUT / "weights.json", "average")
    version = stage.register_model(OUT / "model", description=card_body(card), tags={
        "criterion": params.masks.criterion, "pattern": params.masks.pattern,
        "sparsity": round(masks_report["total"]["sparsity"], 4), **stage.source_tags()})
    return {"method": cfg.method, "checkpoints": sum(w > 0 for w in weights),
            "candidates": len(used), "max_weight": max(weights),
            "merged_val_loss": merged_val_loss, "best_checkpoint_val_loss": best["val_loss"],
            "registered_version": version,
            "sparse_export_ratio": sparse_size_report(OUT / "model.sparse.safetensors")["ratio"]}


if __name__ == "__main__":
    stage_main("average", run)
