"""The evaluate stage's report: the table (markdown and a self-contained HTML page) and the
plots (PNG), rendered from the rows the stage measured."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from gradprune.config import Params
from gradprune.evaluation.perplexity import PAPER_PROTOCOL


def _marked(value: str, vs: dict | None) -> str:
    """`value` with a star when it differs from the dense model's at p < 0.05."""
    return value + ("*" if vs is not None and vs["significant"] else "")


def _interval(low, high, digits: int) -> str:
    return f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None else ""


def _perplexity_cell(value: float, low, high) -> str:
    return f"{value:.2f}" + _interval(low, high, 2)


def _task_cell(scores: dict, vs: dict | None) -> str:
    """acc with its 95% interval and significance against dense, then acc_norm."""
    acc = _marked(f"{scores['acc']:.3f}", vs)
    return (acc + _interval(scores.get("acc_ci_low"), scores.get("acc_ci_high"), 2)
            + f"/{scores['acc_norm']:.3f}")


def _average_cell(row: dict) -> str:
    if "average_acc" not in row:
        return "-"
    vs = row.get("vs_dense", {}).get("average")
    return _marked(f"{row['average_acc']:.3f}", vs) + _interval(
        row.get("average_acc_ci_low"), row.get("average_acc_ci_high"), 3)


def report_table(tasks: tuple[str, ...], rows: dict, compared: list[dict], speed: dict,
                 ood: tuple[str, ...] = ()) -> tuple[list, list]:
    """Header and rows of the report's one table (strings); columns of measures that were not
    taken (exact match of a decoder LM, accuracy without tasks, speed) are left out. `ood`:
    the evaluate.ood_texts, one perplexity column each."""
    generated = any("exact_match" in r for r in rows.values())
    timed = any(name in speed for name in rows)
    wikitext = any("perplexity_wikitext" in r for r in rows.values())
    sped = any("speed" in c for c in compared)
    header = ["model", "test ppl", *(["WikiText-2 ppl"] if wikitext else []),
              *[f"{name} ppl" for name in ood],
              *(["exact match"] if generated else []),
              *[f"{t} acc/acc_n" for t in tasks], *(["avg acc"] if tasks else []), "sparsity",
              "params", "non-zero", "dense MB", "sparse MB",
              *(["decode tok/s (b1)"] if timed else []),
              *(["prefill/decode speedup"] if sped else [])]
    body = []
    for name, r in rows.items():
        decode = speed.get(name, {}).get("batch_1", {}).get("decode_tokens_per_s")
        vs = r.get("vs_dense", {}).get("tasks", {})
        body.append([
            name, _perplexity_cell(r["perplexity_test"], r.get("perplexity_test_ci_low"),
                                   r.get("perplexity_test_ci_high")),
            *([_perplexity_cell(r["perplexity_wikitext"], r["perplexity_wikitext_ci_low"],
                                r["perplexity_wikitext_ci_high"])] if wikitext else []),
            *[f"{r[f'perplexity_{o}']:.2f}" for o in ood],
            *([f"{r['exact_match']:.3f}"] if generated else []),
            *[_task_cell(r["tasks"][t], vs.get(t)) for t in tasks],
            *([_average_cell(r)] if tasks else []), f"{r['sparsity']:.3f}",
            f"{r['parameters']:,}", f"{r['nonzero']:,}",
            f"{r['bytes']['dense_export'] / 1e6:.1f}", f"{r['bytes']['sparse_export'] / 1e6:.1f}",
            *([f"{decode:.0f}" if decode else "-"] if timed else []),
            *(["-"] if sped else [])])
    for c in compared:
        if "not_applicable" in c:  # e.g. sparsegpt x structured: nothing was measured
            continue
        name = f"{c['criterion']} {c['pattern']}"
        scorings = [(f"{name} (no fine-tuning)", c)]
        if "reconstructed" in c:
            scorings.append((f"{name} (block reconstruction)", c["reconstructed"]))
        if "finetuned" in c:
            scorings.append((f"{name} (fine-tuned, {c['finetuned']['average']})", c["finetuned"]))
        for label, r in scorings:
            scored = r.get("tasks", {})
            vs = r.get("vs_dense", {}).get("tasks", {})
            body.append([label, _perplexity_cell(r["test_perplexity"],
                                                 r.get("perplexity_ci_low"),
                                                 r.get("perplexity_ci_high")),
                         *([_perplexity_cell(r["wikitext_perplexity"],
                                             r["wikitext_perplexity_ci_low"],
                                             r["wikitext_perplexity_ci_high"])
                            if "wikitext_perplexity" in r else "-"] if wikitext else []),
                         *[f"{r[f'{o}_perplexity']:.2f}" if f"{o}_perplexity" in r else "-"
                           for o in ood],
                         *(["-"] if generated else []),
                         *[_task_cell(scored[t], vs.get(t)) if t in scored else "-"
                           for t in tasks],
                         *([_average_cell(r)] if tasks else []),
                         f"{r['sparsity']:.3f}", f"{r['parameters']:,}", f"{r['nonzero']:,}",
                         "-", "-", *(["-"] if timed else []),
                         *([_speedup(c.get("speed"))] if sped else [])])
    return header, body


def _speedup(speed: dict | None) -> str:
    """A compare row's prefill/decode speedup over dense at its smallest timed batch size."""
    if not speed:
        return "-"
    first = speed[f"batch_{min(speed['settings']['batch_sizes'])}"]
    return f"{first['prefill_speedup']:.2f}x/{first['decode_speedup']:.2f}x"


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
        f"{tasks.max_tokens or 'all'} test tokens"
        + (f" and the first {tasks.max_tokens or 'all'} tokens of each out-of-domain text "
           f"({', '.join(tasks.ood_texts)}: packaged paragraphs joined by blank lines, see "
           "gradprune.data.ood_documents), which no stage trains or calibrates on"
           if tasks.ood_texts else "") + f". Zero-shot: {_questions(tasks)} per task "
        "(validation splits), acc / acc_norm as lm-evaluation-harness computes them. Sparsity is "
        "over the prunable Linears; dense/sparse MB are the sizes of a plain safetensors export "
        "and of the bitmask + values export.",
        "[low, high]: 95% intervals: Wilson's for a task's acc, mean +- 1.96 standard errors for "
        "the average, a bootstrap over the scored windows for perplexity. *: differs from the "
        "dense model's on the same questions at p < 0.05 (exact McNemar test for a task, "
        "paired bootstrap for the average).",
        *([f"WikiText-2 ppl: {PAPER_PROTOCOL.format(context=tasks.wikitext_context)}."]
          if tasks.wikitext else []),
    ]


def _questions(cfg) -> str:
    if cfg.limit is None:
        return "every question"
    if cfg.sample_seed is None:
        return f"the first {cfg.limit} questions"
    return f"{cfg.limit} questions sampled with seed {cfg.sample_seed}"


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


def markdown_report(params, context, stride, table, speed) -> str:
    header, body = table
    lines = ["# gradprune evaluation", "", *_caption(params, context, stride), "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", *_speed_notes(speed)]
    return "\n".join(lines) + "\n"


REPORT_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;"
    "color:#222}p{max-width:70em;line-height:1.4}"
    ".table{overflow-x:auto;margin:1em 0}table{border-collapse:collapse;font-size:12px;"
    "width:100%}td,th{border:1px solid #ddd;padding:2px 4px;text-align:right;"
    "white-space:nowrap}th{background:#f4f4f4;white-space:normal;vertical-align:bottom}"
    "td:first-child,th:first-child{text-align:left;position:sticky;left:0;background:#fff}"
    "th:first-child{background:#f4f4f4}tr.group td{background:#eef3fa;font-weight:600;"
    "text-align:left}.figures{display:flex;flex-wrap:wrap;gap:1.5em}figure{margin:0;"
    "flex:1 1 520px;max-width:100%}figure img{max-width:100%;height:auto;border:1px solid #eee}"
    "figcaption{font-weight:600;margin:.3em 0}")
# Captions of the report's plots, by file name.
PLOT_TITLES = {"loss_curve.png": "Loss during dense training and fine-tuning",
               "layer_sparsity.png": "Sparsity of each pruned Linear (final model's mask)",
               "accuracy_vs_sparsity.png": "Average zero-shot accuracy against sparsity"}


def _row_groups(body: list[list[str]]) -> list[tuple[str, list[list[str]]]]:
    """The report's rows in two groups: the pipeline's own models (plain names) and the
    compare rows (labelled "<criterion> <pattern> (...)")."""
    main = [row for row in body if "(" not in row[0]]
    compared = [row for row in body if "(" in row[0]]
    return [(title, rows) for title, rows in (
        ("Main path: dense, pruned, fine-tuned, averaged", main),
        ("Comparison: every criterion x pattern from the same statistics", compared)) if rows]


def html_report(params, context, stride, table, speed, images: dict[str, Path]) -> str:
    header, body = table
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join(
        f'<tr class="group"><td colspan="{len(header)}">{html.escape(title)}</td></tr>'
        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                  for row in group)
        for title, group in _row_groups(body))
    figures = "".join(
        f'<figure><figcaption>{html.escape(PLOT_TITLES.get(name, name))}</figcaption>'
        f'<img alt="{html.escape(PLOT_TITLES.get(name, name))}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"></figure>'
        for name, path in images.items())
    text = "".join(f"<p>{html.escape(p)}</p>" for p in
                   _caption(params, context, stride) + _speed_notes(speed))
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>gradprune evaluation</title><style>{REPORT_STYLE}</style></head><body>"
            f"<h1>gradprune evaluation</h1>{text}<div class='table'><table><thead><tr>{cells}"
            f"</tr></thead><tbody>{rows}</tbody></table></div>"
            f"<div class='figures'>{figures}</div></body></html>\n")


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


def _loss_panel(ax, curve: list[dict], title: str, runs: bool) -> None:
    """Training loss per step (a line per run) and validation loss (markers)."""
    for run in sorted({p.get("run", 0) for p in curve}):
        points = [p for p in curve if p.get("run", 0) == run]
        name = f"run {run}" if runs else "training"
        line, = ax.plot([p["step"] for p in points], [p["train_loss"] for p in points],
                        lw=1, alpha=0.6, label=f"{name}: train loss")
        validated = [p for p in points if p["val_loss"] is not None]
        ax.plot([p["step"] for p in validated], [p["val_loss"] for p in validated], "o-",
                color=line.get_color(), label=f"{name}: validation loss")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_curves(path, train_curve: list[dict], finetune_curve: list[dict]) -> bool:
    """Dense training and fine-tuning side by side, each on its own steps: fine-tuning starts
    from the pruned model, not where training stopped."""
    plt = _pyplot()
    # A pretrained model kept as it is (train.steps 0) has no training curve.
    panels = [(c, t, r) for c, t, r in (
        (train_curve, "Dense training", False),
        (finetune_curve, "Fine-tuning of the pruned model (mask fixed)", True)) if c]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (curve, title, runs) in zip(axes[0], panels):
        _loss_panel(ax, curve, title, runs)
    return _save(fig, path)


def plot_layers(path, rows: list[dict]) -> bool:
    """Sparsity as a grid, decoder layers down and Linear types across, each cell labelled:
    readable at any depth, where one bar per Linear is not."""
    from gradprune.export.card import layer_type

    plt = _pyplot()
    kinds = sorted({layer_type(r["layer"]) for r in rows})
    blocks = sorted({r["layer"][: -len(layer_type(r["layer"])) - 1] for r in rows},
                    key=lambda b: [int(x) if x.isdigit() else x for x in b.split(".")])
    grid = [[float("nan")] * len(kinds) for _ in blocks]
    for r in rows:
        kind = layer_type(r["layer"])
        grid[blocks.index(r["layer"][: -len(kind) - 1])][kinds.index(kind)] = r["sparsity"]
    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2.5, 0.35 * len(blocks) + 1.8))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=30,
                  ha="right")
    ax.set_yticks(range(len(blocks)), [b.removeprefix("model.layers.") for b in blocks])
    ax.set_ylabel("decoder layer")
    if len(blocks) * len(kinds) <= 400:
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if value == value:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.6 else "black")
    ax.set_title("Sparsity per Linear")
    fig.colorbar(image, ax=ax, label="sparsity")
    return _save(fig, path)


def plot_accuracy(path, rows: dict) -> bool:
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
