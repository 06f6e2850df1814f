"""evaluate: what pruning won and lost, for every model the pipeline made.

Rows: the dense model, the pruned model before fine-tuning, the last fine-tuning checkpoint,
the averaged final model, and the compare stages' rows (criterion x pattern, before and, with
compare.finetune, after fine-tuning). Columns: sliding-window test perplexity, zero-shot
accuracy (acc and acc_norm, scored as lm-evaluation-harness scores them) per task, sparsity,
parameters, bytes of the dense and the sparse export, prefill and decode tokens/s; with
evaluate.wikitext, WikiText-2 perplexity as the Wanda and SparseGPT papers compute it. Every
accuracy and perplexity carries its 95% interval, and every row's accuracy is tested against
the dense model's on the same questions (exact McNemar per task, paired bootstrap for the
average; each question's correctness is in data/evaluate/questions.parquet). For the
encoder-decoder (model.arch seq2seq): target-token test perplexity and exact match of greedy
decoding instead of the decoder-LM measures (zero-shot tasks, running-text perplexity, speed),
which the report names as not run. Writes metrics.json (DVC metrics), plots (DVC plots) and
report.md / report.html.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from gradprune.config import Params
from gradprune.data import load_tokenizer
from gradprune.evaluation.perplexity import (
    PAPER_PROTOCOL,
    parameter_counts,
    sliding_window_perplexity,
)
from gradprune.evaluation.speed import measure_speed, sparse_kernel_speed
from gradprune.export.card import card_body, pipeline_card
from gradprune.export.sparse import save_sparse, sparse_size_report
from gradprune.io import atomic_dir, read_json
from gradprune.models.llama import bf16_enabled, load_model
from gradprune.models.seq2seq import exact_match
from gradprune.pruning.masks import load_masks
from gradprune.pruning.prune import MASKS_FILE, load_pruned_model, prunable_sparsity
from tasks.measure import (
    QUESTIONS,
    compare_records,
    ood_perplexities,
    ood_streams,
    perplexity_window,
    read_questions,
    test_examples,
    test_perplexity,
    wikitext_perplexity,
    wikitext_stream,
    write_questions,
    zero_shot,
)
from tasks.report import (
    html_report,
    markdown_report,
    plot_accuracy,
    plot_curves,
    plot_layers,
    report_table,
)
from tasks.stage import DATA, PLOTS, REPORTS, Stage, stage_main

OUT = DATA / "evaluate"
# Under the library's logger, so that stage_main's handler prints it.
log = logging.getLogger("gradprune.evaluate")
DENSE = DATA / "train" / "model"
MASKS = DATA / "masks"


def pipeline_models(device: torch.device) -> dict:
    """Factories for the models the pipeline made, on `device`, in the order the report lists
    them."""
    from safetensors.torch import load_model as load_weights_into

    last = read_json(DATA / "finetune" / "checkpoints.json")["checkpoints"][-1]

    def last_checkpoint():
        model, _ = load_pruned_model(DENSE, MASKS, device)
        load_weights_into(model, str(DATA / "finetune" / last["file"]), strict=False,
                          device=str(device))
        return model

    return {
        "dense": lambda: load_model(DENSE, device),
        "pruned": lambda: load_pruned_model(DENSE, MASKS, device)[0],
        "finetuned_last": last_checkpoint,
        "averaged": lambda: load_model(DATA / "average" / "model", device),
    }


def export_bytes(model: torch.nn.Module) -> dict:
    """Bytes of the model as a dense safetensors file and as a sparse export."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        dense, sparse = Path(tmp) / "dense.safetensors", Path(tmp) / "sparse.safetensors"
        save_model(model, str(dense))
        # Tied weights appear under two names; the exports store each tensor once.
        unique = {}
        for key, value in model.state_dict().items():
            if not any(value is seen for seen in unique.values()):
                unique[key] = value
        save_sparse(unique, sparse)
        report = sparse_size_report(sparse)
        return {"dense_export": dense.stat().st_size, "sparse_export": sparse.stat().st_size,
                "sparse_tensors_ratio": report["sparse_tensors"]["ratio"]}


def record_final_model(params: Params, stage: Stage, rows: dict) -> None:
    """The headline numbers on the MLflow parent run; the final model's registry version
    tagged with its test perplexity and described by its card with the evaluation table."""
    headline = {f"{name}.perplexity_test": row["perplexity_test"] for name, row in rows.items()}
    headline.update({f"{name}.average_acc": row["average_acc"] for name, row in rows.items()
                     if "average_acc" in row})
    headline["averaged.sparsity"] = rows["averaged"]["sparsity"]
    stage.log_parent_metrics(headline)
    evaluation = [{"model": name, "test_perplexity": row["perplexity_test"],
                   "average_acc": row.get("average_acc"), "sparsity": row["sparsity"]}
                  for name, row in rows.items()]
    card = pipeline_card(params, read_json(MASKS / "masks.json"),
                         read_json(DATA / "average" / "weights.json"), evaluation)
    stage.tag_final_model({"test_perplexity": round(rows["averaged"]["perplexity_test"], 3)},
                          card_body(card))


def mark_against_dense(rows: dict, compared: list[dict], questions: dict[str, list[dict]],
                       seed: int) -> None:
    """Give every row but the dense one `vs_dense`: its accuracy against the dense model's on
    the same questions (`compare_records`, per task and on the average). The compare rows'
    questions (from their data/compare folders) join `questions` under
    "<criterion>-<pattern>" and "<criterion>-<pattern>/finetuned"."""
    for c in compared:
        key = f"{c['criterion']}-{c['pattern']}"
        path = DATA / "compare" / key / QUESTIONS
        scored = read_questions(path) if path.is_file() else {}
        for name, row in (("pruned", c), ("finetuned", c.get("finetuned"))):
            if row is not None and name in scored:
                label = key if name == "pruned" else f"{key}/finetuned"
                questions[label] = scored[name]
                row["vs_dense"] = compare_records(questions["dense"], scored[name], seed)
    for name, row in rows.items():
        if name != "dense" and name in questions:
            row["vs_dense"] = compare_records(questions["dense"], questions[name], seed)


def run(params: Params, stage: Stage) -> dict:
    cfg = params.evaluate
    bf16 = bf16_enabled(cfg.bf16, stage.device)
    tokenizer = load_tokenizer(DENSE)
    seq2seq = params.model.arch == "seq2seq"
    context, stride = perplexity_window(params)
    # Perplexity of running text, zero-shot multiple choice and generation speed measure a
    # decoder LM; the encoder-decoder reports target perplexity and exact match instead.
    extra_streams = {}
    for path in cfg.extra_texts:
        ids = tokenizer(Path(path).read_text(), add_special_tokens=False)["input_ids"]
        extra_streams[Path(path).stem] = torch.tensor(ids)
    ood = ood_streams(tokenizer, params)
    tasks = () if seq2seq else cfg.tasks
    dense_shapes = {name: mask.shape for name, mask in load_masks(MASKS / MASKS_FILE).items()}

    wikitext = wikitext_stream(tokenizer, params, DENSE)

    factories = pipeline_models(stage.device)
    rows: dict[str, dict] = {}
    questions: dict[str, list[dict]] = {}
    for index, (name, make) in enumerate(factories.items()):
        log.info("scoring model %d of %d: %s", index + 1, len(factories), name)
        model = make()
        scored = test_perplexity(model, params)
        row = {"perplexity_test": scored["perplexity"]}
        if "perplexity_ci_low" in scored:
            row["perplexity_test_ci_low"] = scored["perplexity_ci_low"]
            row["perplexity_test_ci_high"] = scored["perplexity_ci_high"]
        row.update({f"perplexity_{s}": sliding_window_perplexity(
                        model, ids, context, stride, cfg.batch_size, bf16)["perplexity"]
                    for s, ids in extra_streams.items()})
        if wikitext is not None:
            paper = wikitext_perplexity(model, wikitext, params)
            row["perplexity_wikitext"] = paper["perplexity"]
            row["perplexity_wikitext_ci_low"] = paper["perplexity_ci_low"]
            row["perplexity_wikitext_ci_high"] = paper["perplexity_ci_high"]
        row.update({f"perplexity_{s}": value
                    for s, value in ood_perplexities(model, ood, params).items()})
        if seq2seq:
            examples = test_examples(params, model.config.target_length, cfg.exact_match_limit)
            row["exact_match"] = exact_match(model, examples, cfg.batch_size, bf16)
            row["exact_match_examples"] = len(examples)
        accuracy = {"tasks": {}}
        if tasks:
            accuracy, questions[name] = zero_shot(model, tokenizer, params)
        row.update(accuracy)
        row["sparsity"] = prunable_sparsity(model, dense_shapes)
        row.update(parameter_counts(model))
        row["bytes"] = export_bytes(model)
        rows[name] = row
        del model

    speed = {}
    if cfg.speed.enabled and not seq2seq:
        log.info("timing prefill and decode")
        s = cfg.speed
        speed = measure_speed(factories, len(tokenizer), s.prompt_len, s.new_tokens,
                              tuple(s.batch_sizes), s.repeats, bf16)
        pruned, masks = load_pruned_model(DENSE, MASKS, stage.device)
        if masks:  # structured pruning leaves no masked matrix to time
            name = next(iter(masks))
            weight = dict(pruned.named_modules())[name].weight
            speed["sparse_kernel"] = {"module": name,
                                      **sparse_kernel_speed(weight, s.sparse_kernel_tokens,
                                                            s.repeats)}
    # The rows of this configuration only: an earlier one's records may still lie beside them.
    compared = [read_json(REPORTS / "compare" / f"{row}.json") for row in params.compare.rows()]
    if questions:
        mark_against_dense(rows, compared, questions, params.seed)

    layer_rows = [{"layer": r["name"], "sparsity": r["sparsity"]}
                  for r in read_json(MASKS / "masks.json")["layers"]]
    with atomic_dir(OUT) as out:
        plots = {
            "loss_curve.png": plot_curves(out / "loss_curve.png",
                                           read_json(PLOTS / "train_curve.json"),
                                           read_json(PLOTS / "finetune_curve.json")),
            "layer_sparsity.png": plot_layers(out / "layer_sparsity.png", layer_rows),
            "accuracy_vs_sparsity.png": plot_accuracy(out / "accuracy_vs_sparsity.png", rows),
        }
        table = report_table(tasks, rows, compared, speed, tuple(ood))
        write_questions(out / QUESTIONS, questions)
        (out / "report.md").write_text(markdown_report(params, context, stride, table, speed))
        (out / "report.html").write_text(html_report(params, context, stride, table, speed,
                                               {k: out / k for k, v in plots.items() if v}))
    stage.write_plot("layer_sparsity", layer_rows)
    stage.log_artifacts(OUT, "report")
    record_final_model(params, stage, rows)
    # `scored` is the last model's; every model is scored on the same tokens.
    window = {"test_target_tokens_scored": scored["tokens_scored"],
              "test_examples": scored["examples"]} if seq2seq else {
        "context": context, "stride": stride, "test_tokens_scored": scored["tokens_scored"],
        "ood_tokens_scored": {name: len(ids) - 1 for name, ids in ood.items()}}
    return {
        "arch": params.model.arch,
        **window,
        "tasks": list(tasks),
        "limit": cfg.limit,
        "sample_seed": cfg.sample_seed,
        **({"wikitext_protocol": PAPER_PROTOCOL.format(context=cfg.wikitext_context)}
           if wikitext is not None else {}),
        "bf16": bf16,
        "criterion": params.masks.criterion,
        "pattern": params.masks.pattern,
        "sparsity_asked": params.masks.sparsity,
        # The compare rows are their own stages' records (reports/compare/), not repeated here;
        # only their tests against the dense model, which need the dense model's questions.
        "models": rows,
        "compare_vs_dense": {f"{c['criterion']}-{c['pattern']}": {
            name: row["vs_dense"] for name, row in (("pruned", c), ("finetuned", c.get("finetuned")))
            if row is not None and "vs_dense" in row} for c in compared},
        "speed": speed,
    }


if __name__ == "__main__":
    stage_main("evaluate", run)
