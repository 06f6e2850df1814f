"""`gradprune table`: the comparison that matters, in under 120 columns of a terminal.

One line per model of the main path (dense, pruned, last fine-tuning checkpoint, averaged) and
per comparison row (criterion x pattern, before and after fine-tuning), from the stages' records
in reports/: test perplexity, its ratio to the dense model's, average zero-shot accuracy,
sparsity and non-zero parameters. `dvc exp show` lists every number of every experiment; this
is the one view to read first.
"""

from __future__ import annotations

import json
from pathlib import Path

WIDTH = 120


def _cell(value, spec: str) -> str:
    """`value` formatted by `spec` (width first), or a dash as wide."""
    width = int(spec.split(".")[0].rstrip(",d"))
    return f"{'-':>{width}}" if value is None else format(value, spec)


def table_rows(reports: Path) -> list[tuple[str, str, dict]]:
    """(group, label, scores) for each model, scores with test_perplexity, average_acc,
    sparsity and nonzero (absent when not measured)."""
    rows = []
    evaluate = reports / "evaluate.json"
    if evaluate.is_file():
        for name, r in json.loads(evaluate.read_text())["models"].items():
            rows.append(("main path", name, {"test_perplexity": r["perplexity_test"], **r}))
    for path in sorted((reports / "compare").glob("*.json")):
        r = json.loads(path.read_text())
        label = f"{r['criterion']} {r['pattern']}"
        rows.append(("comparison", label, r))
        if "finetuned" in r:
            rows.append(("comparison", f"{label} +ft {r['finetuned']['average']}",
                         r["finetuned"]))
    return rows


def render_table(reports: Path = Path("reports")) -> str:
    rows = table_rows(reports)
    if not rows:
        raise FileNotFoundError(f"{reports}: no stage records; run the pipeline first "
                                "(dvc repro, or gradprune run)")
    dense = next((s["test_perplexity"] for g, label, s in rows if label == "dense"), None)
    width = max(len(label) for _, label, _ in rows)
    header = (f"{'model':<{width}}  {'test ppl':>9}  {'x dense':>7}  {'avg acc':>7}  "
              f"{'sparsity':>8}  {'non-zero':>11}")
    lines, group = [], None
    for g, label, s in rows:
        if g != group:
            lines += ([""] if group else []) + [f"{g}:", header]
            group = g
        ppl = s.get("test_perplexity")
        lines.append(
            f"{label:<{width}}  {_cell(ppl, '9.2f')}  "
            f"{_cell(ppl / dense if ppl and dense else None, '7.3f')}  "
            f"{_cell(s.get('average_acc'), '7.3f')}  {_cell(s.get('sparsity'), '8.3f')}  "
            f"{_cell(s.get('nonzero'), '11,d')}")
    return "\n".join(line[:WIDTH] for line in lines)
