"""`gradprune export`: the pipeline's final model in the forms users deploy.

    <out>/hf/                       dense Hugging Face folder (safetensors, tokenizer, README.md
                                    model card with the evaluation table when evaluate has run)
    <out>/model.sparse.safetensors  bitmask + non-zero values (docs/EXPORTS.md)
    <out>/sparse_loader.py          reads it with torch and safetensors only
    <out>/model-<dtype>.gguf        for llama.cpp-based tools (decoder LMs only)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradprune.export.sparse_loader as sparse_loader
from gradprune.config import load_params
from gradprune.export.card import pipeline_card
from gradprune.export.gguf import write_gguf
from gradprune.io import read_json

FINAL = Path("data") / "average"


def evaluation_rows(repo: Path) -> list[dict] | None:
    """The evaluate stage's rows for the card, when it has run."""
    record = repo / "reports" / "evaluate.json"
    if not record.is_file():
        return None
    return [{"model": name, "test_perplexity": r["perplexity_test"],
             "average_acc": r.get("average_acc"), "sparsity": r["sparsity"]}
            for name, r in json.loads(record.read_text())["models"].items()]


def export_final(repo: Path, out: Path, gguf_dtype: str = "f16") -> dict:
    """Write the exports of repo's final model into `out`; returns {file: bytes}."""
    folder = repo / FINAL / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no final model; run the pipeline first (dvc repro "
                                "average, or gradprune run --stage average)")
    params = load_params(repo / "params.yaml")
    card = pipeline_card(params, read_json(repo / "data" / "masks" / "masks.json"),
                         read_json(repo / FINAL / "weights.json"), evaluation_rows(repo))
    out.mkdir(parents=True, exist_ok=True)
    if (out / "hf").exists():
        shutil.rmtree(out / "hf")
    shutil.copytree(folder, out / "hf")
    (out / "hf" / "README.md").write_text(card)
    shutil.copyfile(repo / FINAL / "model.sparse.safetensors", out / "model.sparse.safetensors")
    shutil.copyfile(sparse_loader.__file__, out / "sparse_loader.py")
    written = [out / "hf" / "model.safetensors", out / "model.sparse.safetensors"]
    if params.model.arch == "llama":
        gguf = out / f"model-{gguf_dtype}.gguf"
        write_gguf(out / "hf", gguf, gguf_dtype, name=params.mlflow.registered_model)
        written.append(gguf)
    return {str(p.relative_to(out)): p.stat().st_size for p in written}
