"""evaluate: test perplexity and size of every model the pipeline made, plus plots and a report."""

from __future__ import annotations

import math

import torch

from gradprune.config import Params
from gradprune.data import read_blocks
from gradprune.evaluation import parameter_counts, perplexity
from gradprune.io import atomic_dir, read_json
from gradprune.masks import apply_masks, load_masks
from gradprune.model import bf16_enabled, load_model
from tasks.common import DATA, PLOTS, Stage, stage_main

OUT = DATA / "evaluate"


def prunable_sparsity(model: torch.nn.Module, names: list[str]) -> float:
    modules = dict(model.named_modules())
    total = sum(modules[n].weight.numel() for n in names)
    zeros = sum(int((modules[n].weight == 0).sum()) for n in names)
    return zeros / total


def run(params: Params, stage: Stage) -> dict:
    cfg = params.evaluate
    test = read_blocks(DATA / "prepare" / "test.parquet")
    if cfg.max_blocks is not None:
        test = test[: cfg.max_blocks]
    masks = load_masks(DATA / "masks" / "masks.safetensors")
    checkpoints = read_json(DATA / "finetune" / "checkpoints.json")["checkpoints"]
    last = checkpoints[-1]
    bf16 = bf16_enabled(cfg.bf16)

    def dense():
        return load_model(DATA / "train" / "model")

    def pruned():
        model = dense()
        apply_masks(model, masks)
        return model

    def last_checkpoint():
        from safetensors.torch import load_model as load_into
        model = dense()
        load_into(model, str(DATA / "finetune" / last["file"]), strict=False)
        return model

    models = {
        "dense": (dense, DATA / "train" / "model" / "model.safetensors"),
        "pruned": (pruned, None),
        "finetuned_last": (last_checkpoint, DATA / "finetune" / last["file"]),
        "averaged": (lambda: load_model(DATA / "average" / "model"),
                     DATA / "average" / "model" / "model.safetensors"),
    }
    results = {}
    for name, (make, file) in models.items():
        model = make()
        ppl = perplexity(model, test, cfg.batch_size, bf16)
        results[name] = {
            "test_perplexity": ppl,
            "test_loss": math.log(ppl),
            "sparsity": prunable_sparsity(model, list(masks)),
            **parameter_counts(model),
            "checkpoint_bytes": file.stat().st_size if file else None,
        }
        del model

    mask_report = read_json(DATA / "masks" / "masks.json")
    layer_rows = [{"layer": row["name"], "sparsity": row["sparsity"]}
                  for row in mask_report["layers"]]
    train_curve = read_json(PLOTS / "train_curve.json")
    finetune_curve = read_json(PLOTS / "finetune_curve.json")

    with atomic_dir(OUT) as out:
        _plot_curves(out / "loss_curve.png", train_curve, finetune_curve)
        _plot_layers(out / "layer_sparsity.png", layer_rows)
        (out / "report.md").write_text(_report(params, results, test))
    stage.write_plot("layer_sparsity", layer_rows)
    stage.log_artifacts(OUT, "report")
    return {
        "context_length": int(test.shape[1]),
        "test_blocks": len(test),
        "test_tokens_scored": int(test[:, 1:].numel()),
        "criterion": params.masks.criterion,
        "sparsity_asked": params.masks.sparsity,
        "models": results,
    }


def _report(params: Params, results: dict, test: torch.Tensor) -> str:
    lines = [
        "# gradprune evaluation",
        "",
        f"Criterion `{params.masks.criterion}`, sparsity asked {params.masks.sparsity} "
        f"(tau {params.masks.tau}, scope {params.masks.scope}), averaging "
        f"`{params.average.method}`. Test perplexity over {len(test)} non-overlapping blocks of "
        f"{test.shape[1]} tokens.",
        "",
        "| model | test perplexity | sparsity (prunable) | parameters | non-zero | checkpoint MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        size = f"{r['checkpoint_bytes'] / 1e6:.1f}" if r["checkpoint_bytes"] else "-"
        lines.append(f"| {name} | {r['test_perplexity']:.2f} | {r['sparsity']:.4f} | "
                     f"{r['parameters']:,} | {r['nonzero']:,} | {size} |")
    return "\n".join(lines) + "\n"


def _plot_curves(path, train_curve: list[dict], finetune_curve: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = train_curve[-1]["step"]
    for curve, label, shift in ((train_curve, "train", 0), (finetune_curve, "finetune", offset)):
        ax.plot([p["step"] + shift for p in curve], [p["train_loss"] for p in curve],
                alpha=0.4, label=f"{label} (train batches)")
        points = [p for p in curve if p["val_loss"] is not None]
        ax.plot([p["step"] + shift for p in points], [p["val_loss"] for p in points], "o-",
                label=f"{label} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _plot_layers(path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, max(3, 0.18 * len(rows))))
    ax.barh([r["layer"] for r in rows], [r["sparsity"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("sparsity")
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    stage_main("evaluate", run)
