"""compare@<criterion>-<pattern>: one row of the comparison of pruning methods.

Prunes the dense model with one criterion and pattern from the statistics the gradients stage
collected (no second gradient pass) and scores it on the same test tokens and windows (target
tokens for seq2seq) as the evaluate stage: perplexity, and with compare.zeroshot the
evaluate.tasks benchmarks. With compare.finetune the row then fine-tunes and averages exactly
as the finetune and average stages do (their params, their code, checkpoints in a temporary
folder) and scores the merge again. The row is this stage's metrics file.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from gradprune.config import CRITERIA, ParamError, Params, parse_pattern
from gradprune.data import load_tokenizer, read_blocks
from gradprune.evaluation.perplexity import parameter_counts
from gradprune.models.llama import load_model
from gradprune.pruning.prune import apply_pruning, prunable_sparsity, prune, with_overrides
from gradprune.pruning.stats import load_stats, load_stats_info
from tasks.measure import test_perplexity, zero_shot
from tasks.recovery import average_into, finetune_runs, finetune_summary
from tasks.stage import DATA, Stage, stage_main

STATS = DATA / "gradients" / "stats.safetensors"
DENSE = DATA / "train" / "model"


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


def row_of(params: Params, stage: Stage) -> tuple[str, str]:
    """(criterion, pattern) of this row: the command line's, else the matrix item DVC ran,
    which must be one of compare.criteria x compare.patterns; both checked before any compute."""
    if stage.args.criterion is not None:
        criterion, pattern = stage.args.criterion, stage.args.pattern
        if criterion not in CRITERIA:
            raise ParamError("--criterion", f"got {criterion!r}; allowed: {', '.join(CRITERIA)}")
        parse_pattern(pattern, "--pattern")
        return criterion, pattern
    rows = {f"{c}-{p}": (c, p) for c in params.compare.criteria for p in params.compare.patterns}
    key = stage.name.partition("@")[2]
    if key not in rows:
        raise ParamError("compare", f"row {key!r} is not one of compare.criteria x "
                         f"compare.patterns ({', '.join(rows)}); run `dvc repro compare`")
    return rows[key]


def run(params: Params, stage: Stage) -> dict:
    criterion, pattern = row_of(params, stage)
    cfg = row_mask_params(params, criterion, pattern)
    dense = load_model(DENSE)
    stats = load_stats(STATS)
    modules = dict(dense.named_modules())
    shapes = {name: modules[name].weight.shape for name in stats}
    pruned = prune(dense, stats, cfg, params.seed, load_stats_info(STATS)["calibration_blocks"])
    model = apply_pruning(dense, pruned)
    tokenizer = load_tokenizer(DENSE)

    def scores(model) -> dict:
        scored = test_perplexity(model, params)
        return {"sparsity": prunable_sparsity(model, shapes),
                "test_perplexity": scored["perplexity"], "tokens_scored": scored["tokens_scored"],
                # The sliding window of a decoder LM's perplexity (a seq2seq model has none).
                **{k: scored[k] for k in ("context", "stride") if k in scored},
                **parameter_counts(model),
                **(zero_shot(model, tokenizer, params) if params.compare.zeroshot else {})}

    row = {"criterion": criterion, "pattern": pattern, "scope": cfg.scope,
           "sparsity_asked": cfg.sparsity, **scores(model)}
    if params.compare.finetune:
        # A structurally smaller model has nothing left to mask.
        masks = {} if pruned.smaller is not None else pruned.masks
        with tempfile.TemporaryDirectory(prefix="gradprune-compare-") as folder:
            runs = Path(folder)
            record = finetune_runs(params, runs, lambda: copy.deepcopy(model), masks)
            merged = average_into(model, masks, params.average, record,
                                  lambda c: runs / f"run-{c['run']}" / c["file"],
                                  read_blocks(DATA / "prepare" / "val.parquet"))
        row["finetuned"] = {**finetune_summary(record), "average": params.average.method,
                            "merged_val_loss": merged["merged_val_loss"], **scores(model)}
    return row


if __name__ == "__main__":
    stage_main("compare", run, arguments={
        "--criterion": {"help": "one of masks.criterion's values (default: the row DVC runs, "
                                "named in DVC_STAGE)"},
        "--pattern": {"help": "unstructured, N:M or structured (default: DVC_STAGE's row)"}})
