"""The evaluate stage's report: the table (markdown and a self-contained HTML page) and the
plots (PNG), rendered from the rows the stage measured."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from gradprune.config import Params


def report_table(tasks: tuple[str, ...], rows: dict, compared: list[dict], speed: dict,
                 ood: tuple[str, ...] = ()) -> tuple[list, list]:
    """Header and rows of the report's one table (strings); columns of measures that were not
    taken (exact match of a decoder LM, accuracy without tasks, speed) are left out. `ood`:
    the evaluate.ood_texts, one perplexity column each."""
    generated = any("exact_match" in r for r in rows.values())
    timed = any(name in speed for name in rows)
    sped = any("speed" in c for c in compared)
    header = ["model", "test ppl", *[f"{name} ppl" for name in ood],
              *(["exact match"] if generated else []),
              *[f"{t} acc/acc_n" for t in tasks], *(["avg acc"] if tasks else []), "sparsity",
              "params", "non-zero", "dense MB", "sparse MB",
              *(["decode tok/s (b1)"] if timed else []),
              *(["prefill/decode speedup"] if sped else [])]
    body = []
    for name, r in rows.items():
        decode = speed.get(name, {}).get("batch_1", {}).get("decode_tokens_per_s")
        body.append([
            name, f"{r['perplexity_test']:.2f}", *[f"{r[f'perplexity_{o}']:.2f}" for o in ood],
            *([f"{r['exact_match']:.3f}"] if generated else []),
            *[f"{r['tasks'][t]['acc']:.3f}/{r['tasks'][t]['acc_norm']:.3f}" for t in tasks],
            *([f"{r['average_acc']:.3f}"] if tasks else []), f"{r['sparsity']:.3f}",
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
            body.append([label, f"{r['test_perplexity']:.2f}",
                         *[f"{r[f'{o}_perplexity']:.2f}" if f"{o}_perplexity" in r else "-"
                           for o in ood],
                         *(["-"] if generated else []),
                         *[f"{scored[t]['acc']:.3f}/{scored[t]['acc_norm']:.3f}" if t in scored
                           else "-" for t in tasks],
                         *([f"{r['average_acc']:.3f}" if "average_acc" in r else "-"]
                           if tasks else []),
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
           if tasks.ood_texts else "") + f". Zero-shot: first {tasks.limit or 'all'} "
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


def markdown_report(params, context, stride, table, speed) -> str:
    header, body = table
    lines = ["# gradprune evaluation", "", *_caption(params, context, stride), "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", *_speed_notes(speed)]
    return "\n".join(lines) + "\n"


def html_report(params, context, stride, table, speed, images: dict[str, Path]) -> str:
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


def plot_curves(path, train_curve: list[dict], finetune_curve: list[dict]) -> bool:
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


def plot_layers(path, rows: list[dict]) -> bool:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, max(3, 0.18 * len(rows))))
    ax.barh([r["layer"] for r in rows], [r["sparsity"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("sparsity")
    ax.tick_params(axis="y", labelsize=6)
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
