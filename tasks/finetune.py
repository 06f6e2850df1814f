"""finetune: train the pruned model with its mask enforced; checkpoints spread over the run."""

from __future__ import annotations

from gradprune.config import Params
from gradprune.data import read_blocks
from gradprune.io import atomic_dir, write_json
from gradprune.masks import apply_masks, load_masks
from gradprune.model import bf16_enabled, load_model
from gradprune.training import mean_loss, train_lm
from tasks.common import DATA, Stage, stage_main

OUT = DATA / "finetune"


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """`count` steps spread evenly over 1..steps, the last one always included."""
    return sorted({round(steps * (i + 1) / count) for i in range(count)})


def run(params: Params, stage: Stage) -> dict:
    from safetensors.torch import save_model

    cfg = params.finetune
    model = load_model(DATA / "train" / "model")
    masks = load_masks(DATA / "masks" / "masks.safetensors")
    train_blocks = read_blocks(DATA / "prepare" / "train.parquet")
    val_blocks = read_blocks(DATA / "prepare" / "val.parquet")
    bf16 = bf16_enabled(cfg.bf16)
    save_at = checkpoint_steps(cfg.steps, cfg.checkpoints)

    with atomic_dir(OUT) as out:
        saved = []

        def on_validation(step: int, val_loss: float) -> None:
            if step in save_at:
                file = f"ckpt-{step:06d}.safetensors"
                save_model(model, str(out / file))
                saved.append({"step": step, "file": file, "val_loss": val_loss})

        apply_masks(model, masks)
        pruned_val_loss = mean_loss(model, val_blocks[: cfg.eval_blocks], cfg.batch_size, bf16)
        # A different seed from dense training, so fine-tuning sees the data in a new order.
        curve = train_lm(model, train_blocks, val_blocks, cfg, params.seed + 2, bf16, masks=masks,
                         validate_also_at=set(save_at), on_validation=on_validation)
        write_json(out / "checkpoints.json", {"checkpoints": saved,
                                              "pruned_val_loss": pruned_val_loss})
    stage.write_plot("finetune_curve", [vars(p) for p in curve])
    stage.log_artifact(OUT / "checkpoints.json", "finetune")
    return {
        "pruned_val_loss": pruned_val_loss,
        "final_val_loss": saved[-1]["val_loss"],
        "best_val_loss": min(c["val_loss"] for c in saved),
        "checkpoints": len(saved),
        "bf16": bf16,
    }


if __name__ == "__main__":
    stage_main("finetune", run)
