"""compare@<criterion>-<pattern>: one row of the comparison of pruning methods.

Prunes the dense model with one criterion and pattern from the statistics the gradients stage
collected (no second gradient pass) and scores it on the same test tokens and windows (target
tokens for seq2seq) as the evaluate stage: perplexity, and with compare.zeroshot the
evaluate.tasks benchmarks. With compare.finetune the row then fine-tunes and averages exactly
as the finetune and average stages do (their params, their code, checkpoints in a temporary
folder) and scores the merge again. The row is this stage's record (reports/compare/), its
numbers the metrics file; every scored question's correctness goes to
data/compare/<criterion>-<pattern>/questions.parquet (models "pruned" and "finetuned").
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

from gradprune.config import Params, parse_pattern
from gradprune.data import calibration_blocks, load_tokenizer, read_blocks
from gradprune.evaluation.perplexity import parameter_counts
from gradprune.export.card import save_hf_folder
from gradprune.io import atomic_dir
from gradprune.models.llama import bf16_enabled, load_model
from gradprune.pruning.prune import apply_pruning, prunable_sparsity, with_overrides
from gradprune.pruning.sequential import layer_by_layer, prune_calibrated, statistics_to_load
from gradprune.pruning.stats import load_stats, load_stats_info
from tasks.measure import QUESTIONS, test_perplexity, write_questions, zero_shot
from tasks.recovery import average_into, finetune_runs, finetune_summary
from tasks.stage import DATA, Stage, stage_main

STATS = DATA / "gradients" / "stats.safetensors"
DENSE = DATA / "train" / "model"
# Under the library's logger, so that stage_main's handler prints it.
log = logging.getLogger("gradprune.compare")


def row_mask_params(params: Params, criterion: str, pattern: str):
    """masks.* with this row's criterion, pattern and scope; N:M rows take their own sparsity."""
    shape = parse_pattern(pattern, "--pattern")
    sparsity = params.compare.sparsity if params.compare.sparsity is not None \
        else params.masks.sparsity
    if isinstance(shape, tuple):
        sparsity = 1 - shape[0] / shape[1]
    return with_overrides(
        params.masks, criterion=criterion, pattern=pattern, tau=None, sparsity=sparsity,
        scope=params.compare.scopes.get(criterion, params.masks.scope),
        variant=params.masks.variant if criterion in ("gradient", "taylor") else "mean",
        overrides=params.masks.overrides if shape == "unstructured" else {})


def run(params: Params, stage: Stage) -> dict:
    criterion, pattern = stage.args.criterion, stage.args.pattern
    cfg = row_mask_params(params, criterion, pattern)
    # Layer by layer, the model stays in host memory and one decoder layer at a time computes
    # on the device.
    sequential = layer_by_layer(cfg)
    dense = load_model(DENSE, None if sequential else stage.device)
    stats = load_stats(STATS, stage.device, statistics_to_load(cfg))
    modules = dict(dense.named_modules())
    shapes = {name: modules[name].weight.shape for name in stats}
    log.info("pruning by %s %s", criterion, pattern)
    # Layer by layer, the calibration blocks the gradients stage used pass through the layers.
    blocks = calibration_blocks(read_blocks(DATA / "prepare" / "train.parquet"),
                                params.gradients.calibration_blocks, params.seed) \
        if sequential else None
    pruned = prune_calibrated(dense, stats, cfg, params.seed,
                              load_stats_info(STATS)["calibration_blocks"], blocks,
                              bf16=bf16_enabled(params.gradients.bf16, stage.device),
                              device=stage.device)
    model = apply_pruning(dense, pruned).to(stage.device)
    tokenizer = load_tokenizer(DENSE)

    questions: dict[str, list[dict]] = {}

    def scores(model, name: str) -> dict:
        log.info("scoring")
        scored = test_perplexity(model, params)
        accuracy = {}
        if params.compare.zeroshot:
            accuracy, questions[name] = zero_shot(model, tokenizer, params)
        return {"sparsity": prunable_sparsity(model, shapes),
                "test_perplexity": scored["perplexity"], "tokens_scored": scored["tokens_scored"],
                # The sliding window of a decoder LM's perplexity and its interval (a seq2seq
                # model has neither).
                **{k: scored[k] for k in ("context", "stride", "perplexity_ci_low",
                                          "perplexity_ci_high") if k in scored},
                **parameter_counts(model), **accuracy}

    row = {"criterion": criterion, "pattern": pattern, "scope": cfg.scope,
           "sparsity_asked": cfg.sparsity, **scores(model, "pruned")}
    if params.compare.finetune:
        # A structurally smaller model has nothing left to mask.
        masks = {} if pruned.smaller is not None else pruned.masks
        log.info("fine-tuning and averaging")
        with tempfile.TemporaryDirectory(prefix="gradprune-compare-") as folder:
            runs = Path(folder)
            record = finetune_runs(params, runs, lambda: copy.deepcopy(model), masks)
            merged = average_into(model, masks, params.average, record,
                                  lambda c: runs / f"run-{c['run']}" / c["file"],
                                  read_blocks(DATA / "prepare" / "val.parquet"))
        row["finetuned"] = {**finetune_summary(record), "average": params.average.method,
                            "merged_val_loss": merged["merged_val_loss"],
                            **scores(model, "finetuned")}
    if params.mlflow.log_compare_models:
        register_row_model(stage, model, tokenizer, row.get("finetuned", row), criterion,
                           pattern)
    # Every question's correctness, so evaluate can test this row against the dense model.
    with atomic_dir(DATA / "compare" / f"{criterion}-{pattern}") as out:
        write_questions(out / QUESTIONS, questions)
    return row


def register_row_model(stage: Stage, model, tokenizer, scored: dict, criterion: str,
                       pattern: str) -> None:
    """The row's final model (fine-tuned and averaged with compare.finetune) as a version of
    the registered model, under the alias compare-<criterion>-<pattern>."""
    with tempfile.TemporaryDirectory(prefix="gradprune-compare-model-") as folder:
        save_hf_folder(model, tokenizer, Path(folder) / "model")
        stage.register_model(Path(folder) / "model",
                             alias=f"compare-{criterion}-{pattern.replace(':', 'of')}", tags={
                                 "criterion": criterion, "pattern": pattern,
                                 "sparsity": round(scored["sparsity"], 4),
                                 "test_perplexity": round(scored["test_perplexity"], 3),
                                 **stage.source_tags()})


if __name__ == "__main__":
    stage_main("compare", run, arguments={
        "--criterion": {"required": True, "help": "one of masks.criterion's values"},
        "--pattern": {"required": True, "help": "unstructured, N:M or structured"}})
