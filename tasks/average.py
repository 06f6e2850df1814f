"""average: merge the fine-tuning checkpoints by their validation losses, re-mask, save."""

from __future__ import annotations

from gradprune.averaging import average_checkpoints, checkpoint_weights
from gradprune.config import Params
from gradprune.data import load_tokenizer
from gradprune.io import atomic_dir, read_json, write_json
from gradprune.masks import apply_masks, load_masks
from gradprune.model import load_model
from tasks.common import DATA, Stage, stage_main

OUT = DATA / "average"
FINETUNED = DATA / "finetune"


def run(params: Params, stage: Stage) -> dict:
    cfg = params.average
    checkpoints = read_json(FINETUNED / "checkpoints.json")["checkpoints"]
    masks = load_masks(DATA / "masks" / "masks.safetensors")
    losses = [c["val_loss"] for c in checkpoints]
    weights = checkpoint_weights(losses, cfg.method, cfg.temperature)
    merged = average_checkpoints([FINETUNED / c["file"] for c in checkpoints], weights)

    model = load_model(DATA / "train" / "model")
    missing, unexpected = model.load_state_dict(merged, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise ValueError(f"{FINETUNED}: checkpoints do not match the model "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    apply_masks(model, masks)

    used = [{**c, "weight": w} for c, w in zip(checkpoints, weights)]
    with atomic_dir(OUT) as out:
        model.save_pretrained(out / "model")
        load_tokenizer(DATA / "train" / "model").save_pretrained(out / "model")
        write_json(out / "weights.json", {"method": cfg.method, "temperature": cfg.temperature,
                                          "checkpoints": used})
    stage.log_artifact(OUT / "weights.json", "average")
    version = stage.register_model(OUT / "model")
    return {"method": cfg.method, "checkpoints": len(used),
            "max_weight": max(weights), "registered_version": version}


if __name__ == "__main__":
    stage_main("average", run)
