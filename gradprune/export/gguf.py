"""GGUF export of a LLaMA-architecture Hugging Face folder: the file llama.cpp and the tools built
on it (llama-cli, llama-server, Ollama, LM Studio) read, and transformers reads back with
`from_pretrained(folder, gguf_file=...)`.

Tensors are named and laid out as llama.cpp's convert_hf_to_gguf.py writes a LlamaForCausalLM:
q_proj and k_proj rows permuted from Hugging Face's rotary layout (halves) to GGML's
(interleaved pairs), 2-D weights in f16 (or f32), norms in f32. The tokenizer goes in as a
byte-level BPE ("gpt2" model: tokens, types, merges). A structurally pruned model is written
at its smaller shape, so its file is really smaller; unstructured and N:M zeros are stored as
zeros (GGUF has no sparse tensor type).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gradprune.io import atomic_file

# Hugging Face module names -> GGUF tensor names, per decoder layer.
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
DTYPES = {"f16": np.float16, "f32": np.float32}


def permute_for_ggml(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection from the rotary halves Hugging Face uses to the interleaved
    pairs GGML uses (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _tokenizer_metadata(writer, folder: Path, config) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as GGUF's "gpt2" tokenizer."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{folder}/tokenizer.json: a {model.get('type')} tokenizer; the GGUF "
                         "export writes byte-level BPE tokenizers only")
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # llama.cpp's UNUSED for ids the tokenizer does not use
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    for token, index in vocab.items():
        if index < size:
            tokens[index] = token
            types[index] = 3 if index in special else 1  # CONTROL, NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(config, key, None)
        if isinstance(value, int):
            add(value)


def write_gguf(folder: str | Path, path: str | Path, dtype: str = "f16",
               name: str | None = None) -> dict:
    """Write the LLaMA model in Hugging Face `folder` as a GGUF file; returns what it wrote
    (tensor count, bytes, dtype)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder, path = Path(folder), Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r}: use one of {sorted(DTYPES)}")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "llama":
        raise ValueError(f"{folder}: a {config.model_type!r} model; the GGUF export writes "
                         "LLaMA-architecture models (model.arch: llama)")
    state = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for layer in range(config.num_hidden_layers):
        for hf, short in LAYER_TENSORS.items():
            tensors[f"blk.{layer}.{short}.weight"] = state[f"model.layers.{layer}.{hf}.weight"]

    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name or folder.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16"
                             else gguf.LlamaFileType.ALL_F32)
        _tokenizer_metadata(writer, folder, config)
        for tensor_name, tensor in tensors.items():
            array = tensor.numpy()
            if ".attn_q." in tensor_name:
                array = permute_for_ggml(array, heads)
            elif ".attn_k." in tensor_name:
                array = permute_for_ggml(array, kv_heads)
            # llama.cpp keeps 1-D tensors (norms) in f32 whatever the file type.
            writer.add_tensor(tensor_name, array.astype(DTYPES[dtype] if array.ndim > 1
                                                        else np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"tensors": len(tensors), "bytes": Path(path).stat().st_size, "dtype": dtype,
            "parameters": int(sum(t.numel() for t in tensors.values()))}

