"""The Hugging Face model card (README.md with YAML metadata) written into every exported model
folder, and the tokenizer limit that goes with it: what a user of the folder sees first."""

from __future__ import annotations

from pathlib import Path

# model.source values whose Hub name is known: the card's `base_model`.
HUB_NAMES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def layer_type(name: str) -> str:
    """A prunable Linear's type, the same in every layer: model.layers.3.mlp.up_proj -> mlp.up_proj."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1:]) or name
    return parts[-1]


def sparsity_by_layer_type(layers: list[dict]) -> dict[str, float]:
    """Sparsity per layer type from masks.json's rows ({"name", "numel", "kept"}), every
    layer's weights counted once."""
    totals: dict[str, list[int]] = {}
    for row in layers:
        numel_kept = totals.setdefault(layer_type(row["name"]), [0, 0])
        numel_kept[0] += row["numel"]
        numel_kept[1] += row["kept"]
    return {kind: 1 - kept / numel for kind, (numel, kept) in sorted(totals.items())}


def _markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(*, title: str, source: str, pruning: dict, calibration: dict, finetuning: dict,
               averaging: dict, layers: list[dict], evaluation: list[dict] | None = None) -> str:
    """The card's text. `pruning`: criterion, variant, pattern, scope, sparsity; `calibration`:
    data, blocks, block_size; `finetuning`: runs, steps, tokens, distill_weight; `averaging`:
    method, checkpoints_used, merged_val_loss; `layers`: masks.json's rows; `evaluation`: rows
    of {"model", "test_perplexity", "average_acc", "sparsity"} when measured."""
    import yaml

    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["gradprune", "pruned", "sparse", f"criterion-{pruning['criterion']}",
                     f"pattern-{str(pruning['pattern']).replace(':', 'of')}"]}
    if source in HUB_NAMES:
        meta["base_model"] = HUB_NAMES[source]
        meta["base_model_relation"] = "finetune"
    by_type = sparsity_by_layer_type(layers)
    calibration_tokens = calibration["blocks"] * calibration["block_size"]
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {title}", "",
        f"A LLaMA-architecture causal language model pruned by gradprune from "
        f"`{HUB_NAMES.get(source, source)}`"
        + (" (trained from scratch by the pipeline)" if source == "scratch" else "") + ", "
        "fine-tuned with its mask held fixed and merged by checkpoint averaging. Pruned weights "
        "are stored as zeros: the folder loads with "
        "`AutoModelForCausalLM.from_pretrained(folder)`.", "",
        "## How it was pruned", "",
        _markdown_table(["", ""], [
            ["criterion", f"`{pruning['criterion']}` (variant `{pruning['variant']}`)"],
            ["pattern", f"`{pruning['pattern']}`, scope `{pruning['scope']}`"],
            ["sparsity of the pruned Linears", f"{pruning['sparsity']:.3f}"],
            ["calibration data", f"`{calibration['data']}`, {calibration['blocks']} blocks x "
             f"{calibration['block_size']} tokens = {calibration_tokens:,} tokens"],
            ["fine-tuning", f"{finetuning['runs']} run(s) x {finetuning['steps']} steps, "
             f"{finetuning['tokens']:,} tokens, distillation weight "
             f"{finetuning['distill_weight']}"],
            ["averaging", f"`{averaging['method']}` over {averaging['checkpoints_used']} "
             f"checkpoint(s), merged validation loss {averaging['merged_val_loss']:.4f}"],
        ]), "",
        "Sparsity per layer type (over all decoder layers):", "",
        _markdown_table(["layer type", "sparsity"],
                        [[f"`{kind}`", f"{value:.3f}"] for kind, value in by_type.items()]), "",
        "## Evaluation", "",
    ]
    if evaluation:
        lines.append(_markdown_table(
            ["model", "test perplexity", "average accuracy", "sparsity"],
            [[r["model"], _number(r.get("test_perplexity"), ".1f"),
              _number(r.get("average_acc"), ".3f"), _number(r.get("sparsity"), ".3f")]
             for r in evaluation]))
    else:
        lines.append("Not measured when this folder was written: the pipeline's evaluate stage "
                     "reports it (`data/evaluate/report.md`), and `gradprune export` writes a "
                     "card with the table.")
    return "\n".join(lines) + "\n"


def _number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def front_matter(card: str) -> dict:
    """The YAML metadata block of a card (what the Hub reads)."""
    import yaml

    if not card.startswith("---\n"):
        raise ValueError("model card: no YAML front matter (the text must start with '---')")
    return yaml.safe_load(card[4:card.index("\n---", 4)])


def card_body(card: str) -> str:
    """The card without its YAML metadata: what a Markdown viewer (the MLflow registry's
    description) should show."""
    front_matter(card)  # checks there is one
    return card[card.index("\n---", 4) + 4:].lstrip("\n")


def save_hf_folder(model, tokenizer, folder: Path, card: str | None = None) -> None:
    """A Hugging Face model folder: weights, config, the tokenizer limited to the model's
    context (from_pretrained's default limit is unbounded) and the model card."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = context
    tokenizer.save_pretrained(folder)
    if card is not None:
        (folder / "README.md").write_text(card)


def pipeline_card(params, masks_report: dict, average_record: dict,
                  evaluation: list[dict] | None = None) -> str:
    """The card of the pipeline's final model from its params (gradprune.config.Params), the
    masks stage's report (masks.json) and the average stage's record (weights.json)."""
    f = params.finetune
    block = params.data.block_size
    return model_card(
        title=f"{params.mlflow.registered_model}: {params.masks.criterion} "
              f"{params.masks.pattern}, {masks_report['total']['sparsity']:.0%} sparse",
        source=params.model.source,
        pruning={"criterion": params.masks.criterion, "variant": params.masks.variant,
                 "pattern": params.masks.pattern, "scope": params.masks.scope,
                 "sparsity": masks_report["total"]["sparsity"]},
        calibration={"data": params.data.source, "blocks": params.gradients.calibration_blocks,
                     "block_size": block},
        finetuning={"runs": f.runs, "steps": f.steps, "distill_weight": f.distill_weight,
                    "tokens": f.runs * f.steps * f.batch_size * f.grad_accum * block},
        averaging={"method": average_record["method"],
                   "checkpoints_used": sum(c["weight"] > 0 for c in average_record["checkpoints"]),
                   "merged_val_loss": average_record["merged_val_loss"]},
        layers=masks_report["layers"], evaluation=evaluation)
