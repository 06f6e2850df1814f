"""Pretrained model sources: a Hugging Face checkpoint folder and a GGUF file load with their
tokenizers and compute what the model that wrote them computes; bad sources fail in params;
prepare + train keep a pretrained model as the dense one with train.steps 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, micro_params, run_env
from safetensors.torch import load_file

from gradprune.config import ParamError, params_from_dict
from gradprune.data import EOS_TOKEN, train_bpe_tokenizer
from gradprune.models.sources import load_source_model

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "A language model predicts the next token from the ones before it.",
             "Pruning removes weights; fine-tuning recovers what was lost."] * 4
LAYERS, HIDDEN, HEADS, FFN, CONTEXT = 2, 32, 4, 64, 64


def tiny_tokenizer():
    return train_bpe_tokenizer(SENTENCES, vocab_size=300)


def tiny_llama(vocab_size: int, kv_heads: int, eos_token_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=kv_heads, max_position_embeddings=CONTEXT,
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1; random ones check that each lands where it belongs
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def save_hf_checkpoint(folder: Path, kv_heads: int):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), kv_heads, tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(SENTENCES[:2], add_special_tokens=False)["input_ids"]
    batch = torch.tensor([ids[0][:12], ids[1][:12]])
    with torch.no_grad():
        return model.eval()(input_ids=batch).logits


@pytest.mark.parametrize("kv_heads", [2, HEADS], ids=["gqa", "mha"])
def test_hf_folder_loads_with_its_tokenizer(tmp_path, kv_heads):
    original, tokenizer = save_hf_checkpoint(tmp_path / "ckpt", kv_heads)
    model, loaded_tokenizer = load_source_model(str(tmp_path / "ckpt"))
    assert model.dtype == torch.float32
    assert model.config.num_key_value_heads == kv_heads
    assert loaded_tokenizer.eos_token == EOS_TOKEN
    assert loaded_tokenizer(SENTENCES[0])["input_ids"] == tokenizer(SENTENCES[0])["input_ids"]
    torch.testing.assert_close(logits(model, tokenizer), logits(original, tokenizer),
                               rtol=0, atol=0)


# --- GGUF ------------------------------------------------------------------------------------

def permute_for_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it on load):
    rotary halves become interleaved pairs within each head."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensors(model) -> dict[str, np.ndarray]:
    cfg = model.config
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"],
               "output.weight": state["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        for hf, gguf_name in GGUF_NAMES.items():
            weight = state[f"model.layers.{i}.{hf}.weight"]
            if gguf_name == "attn_q":
                weight = permute_for_gguf(weight, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = permute_for_gguf(weight, cfg.num_key_value_heads)
            tensors[f"blk.{i}.{gguf_name}.weight"] = weight
    return tensors


def write_gguf(path: Path, model, tokenizer) -> None:
    import gguf

    cfg = model.config
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.CONTROL if t == EOS_TOKEN else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_bos_token_id(tokenizer.eos_token_id)
    for name, tensor in gguf_tensors(model).items():
        writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kv_heads", [2, HEADS], ids=["gqa", "mha"])
def test_gguf_file_loads_with_its_tokenizer(tmp_path, kv_heads):
    tokenizer = tiny_tokenizer()
    original = tiny_llama(len(tokenizer), kv_heads, tokenizer.eos_token_id)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, original, tokenizer)

    model, loaded_tokenizer = load_source_model(str(path))
    assert model.dtype == torch.float32
    assert model.config.num_key_value_heads == kv_heads
    assert loaded_tokenizer.eos_token == EOS_TOKEN
    assert (loaded_tokenizer(SENTENCES[1], add_special_tokens=False)["input_ids"]
            == tokenizer(SENTENCES[1], add_special_tokens=False)["input_ids"])
    torch.testing.assert_close(logits(model, tokenizer), logits(original, tokenizer),
                               rtol=0, atol=1e-5)


# --- params validation -----------------------------------------------------------------------

def params_with(source: str, **data) -> dict:
    raw = micro_params()
    raw["model"]["source"] = source
    raw["data"].update({"tokenizer": "model", **data})
    return raw


def test_pretrained_source_is_accepted(tmp_path):
    save_hf_checkpoint(tmp_path / "ckpt", kv_heads=2)
    raw = params_with(str(tmp_path / "ckpt"))
    raw["train"]["steps"] = 0
    assert params_from_dict(raw).model.source == str(tmp_path / "ckpt")


def bad_source(folder: Path, kind: str) -> Path:
    if kind == "missing":
        return folder / "missing"
    if kind == "not-llama":
        (folder / "config.json").write_text(json.dumps(
            {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    if kind == "only-bin":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (folder / "pytorch_model.bin").write_bytes(b"")
    return folder


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"), ("no-config", "no config.json"),
    ("not-llama", "model_type 'gpt2'"), ("only-bin", "pickled .bin")])
def test_bad_model_source_names_the_key(tmp_path, kind, message):
    with pytest.raises(ParamError, match=message) as err:
        params_from_dict(params_with(str(bad_source(tmp_path, kind))))
    assert err.value.key == "model.source"


def test_model_tokenizer_needs_a_pretrained_source():
    raw = micro_params()
    raw["data"]["tokenizer"] = "model"
    with pytest.raises(ParamError, match="needs a pretrained model.source"):
        params_from_dict(raw)


def test_pretrained_source_refuses_a_fresh_bpe_tokenizer(tmp_path):
    save_hf_checkpoint(tmp_path / "ckpt", kv_heads=2)
    with pytest.raises(ParamError, match="not 'bpe'"):
        params_from_dict(params_with(str(tmp_path / "ckpt"), tokenizer="bpe"))


def test_zero_training_steps_need_a_pretrained_source():
    raw = micro_params()
    raw["train"]["steps"] = 0
    with pytest.raises(ParamError, match="train.steps"):
        params_from_dict(raw)


# --- stages ----------------------------------------------------------------------------------

@pytest.mark.integration
def test_prepare_and_train_keep_the_pretrained_model(tmp_path):
    source = tmp_path / "ckpt"
    save_hf_checkpoint(source, kv_heads=2)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    raw = params_with(str(source))
    raw["train"]["steps"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    env = run_env(tmp_path) | {"PYTHONPATH": str(ROOT),
                               "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    for stage in ("prepare", "train"):
        done = subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    prepared = json.loads((repo / "metrics" / "prepare.json").read_text())
    assert prepared["vocab_size"] == len(tiny_tokenizer())
    dense = load_file(repo / "data" / "train" / "model" / "model.safetensors")
    expected = load_file(source / "model.safetensors")
    assert dense.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(dense[name], tensor), name
    trained = json.loads((repo / "metrics" / "train.json").read_text())
    assert trained["train_tokens"] == 0 and trained["val_loss"] > 0
    assert json.loads((repo / "plots" / "train_curve.json").read_text()) == []
    assert os.path.isfile(repo / "data" / "train" / "model" / "tokenizer.json")


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_the_micro_dag_prunes_a_pretrained_source(tmp_path, kind):
    """The whole DAG, via `dvc repro`, from a tiny random LLaMA saved as a HF folder or written
    as a GGUF file: the dense model is the source's, the final model keeps the mask."""
    from conftest import make_micro_repo, run

    tokenizer = tiny_tokenizer()
    if kind == "hf":
        source = tmp_path / "ckpt"
        original, _ = save_hf_checkpoint(source, kv_heads=2)
    else:
        source = tmp_path / "tiny.gguf"
        original = tiny_llama(len(tokenizer), 2, tokenizer.eos_token_id)
        write_gguf(source, original, tokenizer)
    repo = make_micro_repo(tmp_path / "repo", {
        "model": {"source": str(source)}, "data": {"tokenizer": "model"}, "train": {"steps": 0},
        "compare": {"zeroshot": False, "finetune": False},
        "evaluate": {"tasks": ["piqa"], "speed": {"enabled": False}}})
    run([sys.executable, "-m", "dvc", "repro"], repo, run_env(tmp_path))

    dense = load_file(repo / "data" / "train" / "model" / "model.safetensors")
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(dense[name], tensor, rtol=0, atol=0, msg=name)
    evaluate = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert evaluate["models"]["dense"]["sparsity"] == 0.0
    assert 0.5 <= evaluate["models"]["averaged"]["sparsity"] < 0.51
    from gradprune.pruning.masks import load_masks
    masks = load_masks(repo / "data" / "masks" / "masks.safetensors")
    final = load_file(repo / "data" / "average" / "model" / "model.safetensors")
    for name, mask in masks.items():
        assert bool((final[f"{name}.weight"][~mask] == 0).all()), name
