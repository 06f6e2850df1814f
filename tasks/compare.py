"""compare@<criterion>-<pattern>: one row of the comparison of pruning methods.

Prunes the dense model with one criterion and pattern from the statistics the gradients stage
collected (no second gradient pass) and scores it on the same test tokens and windows (target
tokens for seq2seq) as the evaluate stage: perplexity (and that of evaluate.ood_texts and, by
the papers' protocol, evaluate.wikitext), and with compare.zeroshot the evaluate.tasks
benchmarks. With compare.finetune the row then fine-tunes and averages exactly
as the finetune and average stages do (their params, their code, checkpoints in a temporary
folder) and scores the merge again. With masks.reconstruct.steps the row also reconstructs
the pruned model block by block (as the masks stage does) and scores it before fine-tuning
starts from it. A structured row also times itself against the dense model (evaluate.speed):
prefill and decode speedups. Each phase records its wall time, fine-tuning its tokens. The row
is this stage's record (reports/compare/), its numbers the metrics file; every scored
question's correctness goes to data/compare/<criterion>-<pattern>/questions.parquet (models
"pruned", "reconstructed" and "finetuned").
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

from gradprune.config import CRITERIA, ParamError, Params, parse_pattern
from gradprune.config.schema import row_not_applicable, split_row_pattern
from gradprune.data import load_tokenizer, read_blocks
from gradprune.evaluation.perplexity import parameter_counts
from gradprune.evaluation.speed import measure_speed
from gradprune.export.card import save_hf_folder
from gradprune.io import atomic_dir
from gradprune.models.llama import bf16_enabled, load_model
from gradprune.pruning.prune import apply_pruning, prunable_sparsity, reconstruct, with_overrides
from tasks.measure import (
    QUESTIONS,
    ood_perplexities,
    ood_streams,
    test_perplexity,
    wikitext_perplexity,
    wikitext_stream,
    write_questions,
    zero_shot,
)
from tasks.pruning import DENSE, prune_trained
from tasks.recovery import average_into, finetune_runs, finetune_summary
from tasks.stage import DATA, Stage, stage_main

# Under the library's logger, so that stage_main's handler prints it.
log = logging.getLogger("gradprune.compare")


def row_mask_params(params: Params, criterion: str, pattern: str):
    """masks.* with this row's criterion, pattern and scope; N:M rows take their own sparsity,
    a pattern such as 'structured=0.25' the sparsity it names.
    masks.allocation owl reaches the rows it applies to (unstructured, and a per_layer or
    per_row scope or sparsegpt); the others, such as a global selection that spreads its
    budget over the layers by itself, stay uniform."""
    pattern, named = split_row_pattern(pattern, "--pattern")
    shape = parse_pattern(pattern, "--pattern")
    sparsity = params.compare.sparsity if params.compare.sparsity is not None \
        else params.masks.sparsity
    if named is not None:
        sparsity = named
    if isinstance(shape, tuple):
        sparsity = 1 - shape[0] / shape[1]
    scope = params.compare.scopes.get(criterion, params.masks.scope)
    owl_applies = shape == "unstructured" and (scope != "global" or criterion == "sparsegpt")
    return with_overrides(
        params.masks, criterion=criterion, pattern=pattern, tau=None, sparsity=sparsity,
        scope=scope,
        variant=params.masks.variant if criterion in ("gradient", "taylor") else "mean",
        overrides=params.masks.overrides if shape == "unstructured" else {},
        allocation=params.masks.allocation if owl_applies else "uniform")


def speedup(model, vocab_size: int, params: Params, device) -> dict:
    """A structurally smaller model's prefill and decode tokens/s against the dense model's,
    timed side by side in this process as evaluate.speed says (a masked model of the dense
    shape runs as fast as the dense one, so only structured rows are timed)."""
    s = params.evaluate.speed
    timed = measure_speed({"dense": lambda: load_model(DENSE, device), "pruned": model},
                          vocab_size, s.prompt_len, s.new_tokens, tuple(s.batch_sizes),
                          s.repeats, bf16_enabled(params.evaluate.bf16, device))
    report = {"settings": timed["settings"]}
    for b in s.batch_sizes:
        dense, pruned = timed["dense"][f"batch_{b}"], timed["pruned"][f"batch_{b}"]
        report[f"batch_{b}"] = {
            "prefill_speedup": pruned["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
            "decode_speedup": pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
            "dense": dense, "pruned": pruned}
    return report


def row_of(params: Params, stage: Stage) -> tuple[str, str]:
    """(criterion, pattern) of this row: the command line's, else the matrix item DVC ran,
    which must be one of compare.criteria x compare.patterns; both checked before any compute."""
    if stage.args.criterion is not None:
        criterion, pattern = stage.args.criterion, stage.args.pattern
        if criterion not in CRITERIA:
            raise ParamError("--criterion", f"got {criterion!r}; allowed: {', '.join(CRITERIA)}")
        split_row_pattern(pattern, "--pattern")
        return criterion, pattern
    rows = params.compare.rows()
    key = stage.name.partition("@")[2]
    if key not in rows:
        raise ParamError("compare", f"row {key!r} is not one of compare.criteria x "
                         f"compare.patterns ({', '.join(rows)}); run `dvc repro compare`")
    return rows[key]


def run(params: Params, stage: Stage) -> dict:
    criterion, pattern = row_of(params, stage)
    reason = row_not_applicable(criterion, pattern)
    if reason is not None:
        with atomic_dir(DATA / "compare" / f"{criterion}-{pattern}") as out:
            write_questions(out / QUESTIONS, {})  # the stage's output, empty as the row
        return {"criterion": criterion, "pattern": pattern, "not_applicable": reason}
    cfg = row_mask_params(params, criterion, pattern)
    tokenizer = load_tokenizer(DENSE)
    ood = ood_streams(tokenizer, params)
    wikitext = wikitext_stream(tokenizer, params, DENSE)
    log.info("pruning by %s %s", criterion, pattern)
    started = time.perf_counter()
    trained = prune_trained(params, cfg, stage.device)
    pruned, blocks, shapes = trained.pruned, trained.blocks, trained.shapes
    model = apply_pruning(trained.dense, pruned).to(stage.device)
    prune_seconds = time.perf_counter() - started

    questions: dict[str, list[dict]] = {}

    def scores(model, name: str) -> dict:
        log.info("scoring")
        scored = test_perplexity(model, params)
        accuracy = {}
        if params.compare.zeroshot:
            accuracy, questions[name] = zero_shot(model, tokenizer, params)
        return {"sparsity": prunable_sparsity(model, shapes),
                "test_perplexity": scored["perplexity"], "tokens_scored": scored["tokens_scored"],
                **{f"{text}_perplexity": value
                   for text, value in ood_perplexities(model, ood, params).items()},
                # evaluate.wikitext by the papers' protocol, with its interval
                **({f"wikitext_{k}": v
                    for k, v in wikitext_perplexity(model, wikitext, params).items()}
                   if wikitext is not None else {}),
                # The sliding window of a decoder LM's perplexity and its interval (a seq2seq
                # model has neither).
                **{k: scored[k] for k in ("context", "stride", "perplexity_ci_low",
                                          "perplexity_ci_high") if k in scored},
                **parameter_counts(model), **accuracy}

    row = {"criterion": criterion, "pattern": pattern, "scope": cfg.scope,
           "calibration": trained.calibration, "allocation": cfg.allocation, "sparsity_asked": cfg.sparsity,
           "prune_seconds": prune_seconds, **scores(model, "pruned")}
    if pruned.smaller is not None and params.evaluate.speed.enabled:
        row["speed"] = speedup(model, len(tokenizer), params, stage.device)
    # A structurally smaller model has nothing left to mask.
    masks = {} if pruned.smaller is not None else pruned.masks
    if cfg.reconstruct.steps:
        log.info("reconstructing block by block")
        # `dense` now holds the pruned weights: the teacher is loaded afresh.
        done = reconstruct(load_model(DENSE, stage.device), model, masks, blocks, cfg,
                           params.seed)
        row["reconstructed"] = {**{k: v for k, v in done.items() if k != "layers"},
                                **scores(model, "reconstructed")}
    if params.compare.finetune:
        log.info("fine-tuning and averaging")
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gradprune-compare-") as folder:
            runs = Path(folder)
            record = finetune_runs(params, runs, lambda: copy.deepcopy(model), masks)
            merged = average_into(model, masks, params.average, record,
                                  lambda c: runs / f"run-{c['run']}" / c["file"],
                                  read_blocks(DATA / "prepare" / "val.parquet"))
        row["finetuned"] = {**finetune_summary(record), "average": params.average.method,
                            "seconds": time.perf_counter() - started,
                            "tokens": sum(r["steps"] for r in record["runs"])
                            * params.finetune.batch_size * params.finetune.grad_accum
                            * params.data.block_size,
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
        "--criterion": {"help": "one of masks.criterion's values (default: the row DVC runs, "
                                "named in DVC_STAGE)"},
        "--pattern": {"help": "unstructured, N:M or structured (default: DVC_STAGE's row)"}})
