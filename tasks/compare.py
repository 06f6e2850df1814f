"""compare@<criterion>-<pattern>: one row of the comparison of pruning methods.

Prunes the dense model with one criterion and pattern from the statistics the gradients stage
collected (no second gradient pass) and scores it before any fine-tuning, on the same test
tokens and windows as the evaluate stage. The row is this stage's metrics file.
"""

from __future__ import annotations

from gradprune.config import Params, parse_pattern
from gradprune.evaluation import parameter_counts, sliding_window_perplexity
from gradprune.model import bf16_enabled, load_model
from gradprune.pruning import apply_pruning, prunable_sparsity, prune, with_overrides
from gradprune.stats import load_stats, load_stats_info
from tasks.common import DATA, Stage, perplexity_window, stage_main, test_tokens

STATS = DATA / "gradients" / "stats.safetensors"


def row_mask_params(params: Params, criterion: str, pattern: str):
    """masks.* with this row's criterion and pattern; N:M rows take their own sparsity."""
    shape = parse_pattern(pattern, "--pattern")
    sparsity = params.compare.sparsity if params.compare.sparsity is not None \
        else params.masks.sparsity
    if isinstance(shape, tuple):
        sparsity = 1 - shape[0] / shape[1]
    return with_overrides(
        params.masks, criterion=criterion, pattern=pattern, tau=None, sparsity=sparsity,
        variant=params.masks.variant if criterion in ("gradient", "taylor") else "mean",
        overrides=params.masks.overrides if shape == "unstructured" else {})


def run(params: Params, stage: Stage) -> dict:
    criterion, pattern = stage.args.criterion, stage.args.pattern
    cfg = row_mask_params(params, criterion, pattern)
    dense = load_model(DATA / "train" / "model")
    stats = load_stats(STATS)
    modules = dict(dense.named_modules())
    shapes = {name: modules[name].weight.shape for name in stats}
    pruned = prune(dense, stats, cfg, params.seed, load_stats_info(STATS)["calibration_blocks"])
    model = apply_pruning(dense, pruned)

    context, stride = perplexity_window(params)
    scored = sliding_window_perplexity(model, test_tokens(params), context, stride,
                                       params.evaluate.batch_size,
                                       bf16_enabled(params.evaluate.bf16))
    return {
        "criterion": criterion,
        "pattern": pattern,
        "sparsity_asked": cfg.sparsity,
        "sparsity": prunable_sparsity(model, shapes),
        "test_perplexity": scored["perplexity"],
        "tokens_scored": scored["tokens_scored"],
        "context": context,
        "stride": stride,
        **parameter_counts(model),
    }


if __name__ == "__main__":
    stage_main("compare", run, arguments={
        "--criterion": {"required": True, "help": "one of masks.criterion's values"},
        "--pattern": {"required": True, "help": "unstructured, N:M or structured"}})
