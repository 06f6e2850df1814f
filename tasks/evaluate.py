"""evaluate: what pruning won and lost, for every model the pipeline made.

Rows: the dense model, the pruned model before fine-tuning, the last fine-tuning checkpoint,
the averaged final model, and the compare stages' rows (criterion x pattern, before and, with
compare.finetune, after fine-tuning). Columns: sliding-window test perplexity, zero-shot
accuracy (acc and acc_norm, scored as lm-evaluation-harness scores them) per task, sparsity,
parameters, bytes of the dense and the sparse export, prefill and decode tokens/s. For the
encoder-decoder (model.arch seq2seq): target-token test perplexity and exact match of greedy
decoding instead of the decoder-LM measures (zero-shot tasks, running-text perplexity, speed),
which the report names as not run. Writes metrics.json (DVC metrics), plots (DVC plots) and
report.md / report.html.
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

import torch

from gradprune.config import Params
from gradprune.data import load_tokenizer
from gradprune.evaluation import parameter_counts, sliding_window_perplexity
from gradprune.io import atomic_dir, read_json
from gradprune.masks import load_masks
from gradprune.model import bf16_enabled, load_model
from gradprune.pruning import MASKS_FILE, load_pruned_model, prunable_sparsity
from gradprune.seq2seq import exact_match
from gradprune.sparse_export import save_sparse, sparse_size_report
from gradprune.speed import measure_speed, sparse_kernel_speed
from tasks.common import (DATA, METRICS, PLOTS, Stage, perplexity_window, stage_main,
                          test_examples, test_perplexity, zero_shot)

OUT = DATA / "evaluate"
DENSE = DATA / "train" / "model"
MASKS = DATA / "masks"


def pipeline_models() -> dict:
    """Factories for the models the pipeline made, in the order the report lists them."""
    from safetensors.torch import load_model as load_weights_into

    last = read_json(DATA / "finetune" / "checkpoints.json")["checkpoints"][-1]

    def last_checkpoint():
        model, _ = load_pruned_model(DENSE, MASKS)
        load_weights_into(model, str(DATA / "finetune" / last["file"]), strict=False)
        return model

    return {
        "dense": lambda: load_model(DENSE),
        "pruned": lambda: load_pruned_model(DENSE, MASKS)[0],
        "finetuned_last": last_checkpoint,
        "averaged": lambda: load_model(DATA / "average" / "model"),
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


def run(params: Params, stage: Stage) -> dict:
    cfg = params.evaluate
    bf16 = bf16_enabled(cfg.bf16)
    tokenizer = load_tokenizer(DENSE)
    seq2seq = params.model.arch == "seq2seq"
    context, stride = perplexity_window(params)
    # Perplexity of running text, zero-shot multiple choice and generation speed measure a
    # decoder LM; the encoder-decoder reports target perplexity and exact match instead.
    extra_streams = {}
    for path in cfg.extra_texts:
        ids = tokenizer(Path(path).read_text(), add_special_tokens=False)["input_ids"]
        extra_streams[Path(path).stem] = torch.tensor(ids)
    tasks = () if seq2seq else cfg.tasks
    dense_shapes = {name: mask.shape for name, mask in load_masks(MASKS / MASKS_FILE).items()}

    factories = pipeline_models()
    rows: dict[str, dict] = {}
    for name, make in factories.items():
        model = make()
        scored = test_perplexity(model, params)
        row = {"perplexity_test": scored["perplexity"]}
        row.update({f"perplexity_{s}": sliding_window_perplexity(
                        model, ids, context, stride, cfg.batch_size, bf16)["perplexity"]
                    for s, ids in extra_streams.items()})
        if seq2seq:
            examples = test_examples(params, model.config.target_length, cfg.exact_match_limit)
            row["exact_match"] = exact_match(model, examples, cfg.batch_size, bf16)
            row["exact_match_examples"] = len(examples)
        row.update(zero_shot(model, tokenizer, params) if tasks else {"tasks": {}})
        row["sparsity"] = prunable_sparsity(model, dense_shapes)
        row.update(parameter_counts(model))
        row["bytes"] = export_bytes(model)
        rows[name] = row
        del model

    speed = {}
    if cfg.speed.enabled and not seq2seq:
        s = cfg.speed
        speed = measure_speed(factories, len(tokenizer), s.prompt_len, s.new_tokens,
                              tuple(s.batch_sizes), s.repeats, bf16)
        pruned, masks = load_pruned_model(DENSE, MASKS)
        if masks:  # structured pruning leaves no masked matrix to time
            name = next(iter(masks))
            weight = dict(pruned.named_modules())[name].weight
            speed["sparse_kernel"] = {"module": name,
                                      **sparse_kernel_speed(weight, s.sparse_kernel_tokens,
                                                            s.repeats)}
    compared = [read_json(p) for p in sorted((METRICS / "compare").glob("*.json"))]

    layer_rows = [{"layer": r["name"], "sparsity": r["sparsity"]}
                  for r in read_json(MASKS / "masks.json")["layers"]]
    with atomic_dir(OUT) as out:
        plots = {
            "loss_curve.png": _plot_curves(out / "loss_curve.png",
                                           read_json(PLOTS / "train_curve.json"),
                                           read_json(PLOTS / "finetune_curve.json")),
            "layer_sparsity.png": _plot_layers(out / "layer_sparsity.png", layer_rows),
            "accuracy_vs_sparsity.png": _plot_accuracy(out / "accuracy_vs_sparsity.png", rows),
        }
        table = _table(tasks, rows, compared, speed)
        (out / "report.md").write_text(_markdown(params, context, stride, table, speed))
        (out / "report.html").write_text(_html(params, context, stride, table, speed,
                                               {k: out / k for k, v in plots.items() if v}))
    stage.write_plot("layer_sparsity", layer_rows)
    stage.log_artifacts(OUT, "report")
    # `scored` is the last model's; every model is scored on the same tokens.
    window = {"test_target_tokens_scored": scored["tokens_scored"],
              "test_examples": scored["examples"]} if seq2seq else {
        "context": context, "stride": stride, "test_tokens_scored": scored["tokens_scored"]}
    return {
        "arch": params.model.arch,
        **window,
        "tasks": list(tasks),
        "limit": cfg.limit,
        "bf16": bf16,
        "criterion": params.masks.criterion,
        "pattern": params.masks.pattern,
        "sparsity_asked": params.masks.sparsity,
        "models": rows,
        "compare": {f"{c['criterion']}-{c['pattern']}": c for c in compared},
        "speed": speed,
    }


def _table(tasks: tuple[str, ...], rows: dict, compared: list[dict], speed: dict
           ) -> tuple[list, list]:
    """Header and rows of the report's one table (strings); columns of measures that were not
    taken (exact match of a decoder LM, accuracy without tasks, speed) are left out."""
    generated = any("exact_match" in r for r in rows.values())
    timed = any(name in speed for name in rows)
    header = ["model", "test ppl", *(["exact match"] if generated else []),
              *[f"{t} acc/acc_n" for t in tasks], *(["avg acc"] if tasks else []), "sparsity",
              "params", "non-zero", "dense MB", "sparse MB",
              *(["decode tok/s (b1)"] if timed else [])]
    body = []
    for name, r in rows.items():
        decode = speed.get(name, {}).get("batch_1", {}).get("decode_tokens_per_s")
        body.append([
            name, f"{r['perplexity_test']:.2f}",
            *([f"{r['exact_match']:.3f}"] if generated else []),
            *[f"{r['tasks'][t]['acc']:.3f}/{r['tasks'][t]['acc_norm']:.3f}" for t in tasks],
            *([f"{r['average_acc']:.3f}"] if tasks else []), f"{r['sparsity']:.3f}",
            f"{r['parameters']:,}", f"{r['nonzero']:,}",
            f"{r['bytes']['dense_export'] / 1e6:.1f}", f"{r['bytes']['sparse_export'] / 1e6:.1f}",
            *([f"{decode:.0f}" if decode else "-"] if timed else [])])
    for c in compared:
        name = f"{c['criterion']} {c['pattern']}"
        scorings = [(f"{name} (no fine-tuning)", c)]
        if "finetuned" in c:
            scorings.append((f"{name} (fine-tuned, {c['finetuned']['average']})", c["finetuned"]))
        for label, r in scorings:
            scored = r.get("tasks", {})
            body.append([label, f"{r['test_perplexity']:.2f}", *(["-"] if generated else []),
                         *[f"{scored[t]['acc']:.3f}/{scored[t]['acc_norm']:.3f}" if t in scored
                           else "-" for t in tasks],
                         *([f"{r['average_acc']:.3f}" if "average_acc" in r else "-"]
                           if tasks else []),
                         f"{r['sparsity']:.3f}", f"{r['parameters']:,}", f"{r['nonzero']:,}",
                         "-", "-", *(["-"] if timed else [])])
    return header, body


def _caption(params: Params, context: int, stride: int) -> list[str]:
    m = params.masks
    tasks = params.evaluate
    pruned = (f"Criterion `{m.criterion}` ({m.variant}), pattern `{m.pattern}`, sparsity asked "
              f"{m.sparsity} (tau {m.tau}, scope {m.scope}); fine-tuning merged by "
              f"`{params.average.method}`.")
    if params.model.arch == "seq2seq":
        return [
            "Encoder-decoder Transformer (model.arch seq2seq) on span corruption. " + pruned,
            f"Test ppl: perplexity of the target tokens (teacher forcing) of the test examples "
            f"holding the first {tasks.max_tokens or 'all'} target tokens. Exact match: greedy "
            f"decoding reproduces the whole target, on the first "
            f"{tasks.exact_match_limit or 'all'} test examples. Sparsity is over the prunable "
            "Linears (attention of both stacks, cross-attention, FFN); dense/sparse MB are the "
            "sizes of a plain safetensors export and of the bitmask + values export.",
            "Not run for an encoder-decoder, being decoder-LM measures: zero-shot multiple "
            "choice (evaluate.tasks), sliding-window perplexity of running text, generation "
            "speed and the sparse-kernel timing (evaluate.speed).",
        ]
    return [
        pruned,
        f"Perplexity: sliding windows of {context} tokens, stride {stride}, over the first "
        f"{tasks.max_tokens or 'all'} test tokens. Zero-shot: first {tasks.limit or 'all'} "
        "questions per task (validation splits), acc / acc_norm as lm-evaluation-harness "
        "computes them. Sparsity is over the prunable Linears; dense/sparse MB are the sizes of "
        "a plain safetensors export and of the bitmask + values export.",
    ]


def _speed_notes(speed: dict) -> list[str]:
    kernel = speed.get("sparse_kernel")
    if not kernel:
        return []
    return [
        "Unstructured and N:M masks leave the matrices their original shape, so dense kernels "
        f"run them no faster: a masked {kernel['module']} ({kernel['density']:.0%} dense) ran "
        f"{kernel['dense_zeros_speedup']:.2f}x as fast as a fully dense one, and torch's CSR "
        f"kernel (torch.sparse.mm) {kernel['csr_speedup']:.3g}x. Only structured pruning "
        "makes the model itself smaller and faster.",
    ]


def _markdown(params, context, stride, table, speed) -> str:
    header, body = table
    lines = ["# gradprune evaluation", "", *_caption(params, context, stride), "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", *_speed_notes(speed)]
    return "\n".join(lines) + "\n"


def _html(params, context, stride, table, speed, images: dict[str, Path]) -> str:
    header, body = table
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in body)
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(name)}'
        "</figcaption></figure>" for name, path in images.items())
    text = "".join(f"<p>{html.escape(p)}</p>" for p in
                   _caption(params, context, stride) + _speed_notes(speed))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>gradprune evaluation"
            "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:"
            "collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "td:first-child{text-align:left}img{max-width:100%}</style></head><body>"
            f"<h1>gradprune evaluation</h1>{text}<table><tr>{cells}</tr>{rows}</table>"
            f"{figures}</body></html>\n")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    _pyplot().close(fig)
    return True


def _plot_curves(path, train_curve: list[dict], finetune_curve: list[dict]) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    # A pretrained model kept as it is (train.steps 0) has no training curve.
    offset = train_curve[-1]["step"] if train_curve else 0
    points = [p for p in train_curve if p["val_loss"] is not None]
    ax.plot([p["step"] for p in points], [p["val_loss"] for p in points], "o-",
            label="dense training")
    for run in sorted({p.get("run", 0) for p in finetune_curve}):
        points = [p for p in finetune_curve if p.get("run", 0) == run and p["val_loss"] is not None]
        ax.plot([p["step"] + offset for p in points], [p["val_loss"] for p in points], "o-",
                label=f"fine-tuning run {run}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.legend()
    return _save(fig, path)


def _plot_layers(path, rows: list[dict]) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, max(3, 0.18 * len(rows))))
    ax.barh([r["layer"] for r in rows], [r["sparsity"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("sparsity")
    ax.tick_params(axis="y", labelsize=6)
    return _save(fig, path)


def _plot_accuracy(path, rows: dict) -> bool:
    points = [(r["sparsity"], r["average_acc"], name) for name, r in rows.items()
              if "average_acc" in r]
    if len({round(s, 6) for s, _, _ in points}) < 2:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for sparsity, acc, name in points:
        ax.scatter(sparsity, acc)
        ax.annotate(name, (sparsity, acc), fontsize=8)
    ax.set_xlabel("sparsity of the prunable Linears")
    ax.set_ylabel("average zero-shot accuracy")
    return _save(fig, path)


if __name__ == "__main__":
    stage_main("evaluate", run)
