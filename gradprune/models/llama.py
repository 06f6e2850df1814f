"""The models (the LLaMA-architecture decoder, the encoder-decoder of gradprune.models.seq2seq), loading
either from its folder, its loss on token blocks, and which of its weights are prunable."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from torch import nn

from gradprune.config import ModelParams
from gradprune.device import bf16_autocast, bf16_supported, model_device
from gradprune.io import ArtifactError, reading
from gradprune.models.seq2seq import (
    Seq2SeqConfig,
    Seq2SeqTransformer,
    is_seq2seq_folder,
    load_seq2seq,
)


def build_llama(cfg: ModelParams, vocab_size: int, context: int, eos_token_id: int,
                seed: int):
    """A freshly initialised `LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU, grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=context,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_seq2seq(cfg: ModelParams, vocab_size: int, task: dict, seed: int) -> Seq2SeqTransformer:
    """A freshly initialised encoder-decoder for the prepared task's layout (data.TASK_FILE)."""
    config = Seq2SeqConfig(
        vocab_size=vocab_size, hidden=cfg.hidden, heads=cfg.heads, layers=cfg.layers,
        ffn=cfg.ffn, source_length=task["source_length"], target_length=task["target_length"],
        pad_token_id=task["pad_token_id"], eos_token_id=task["eos_token_id"],
        decoder_start_token_id=task["decoder_start_token_id"],
        tie_embeddings=cfg.tie_embeddings)
    torch.manual_seed(seed)
    return Seq2SeqTransformer(config)


def load_model(path: str | Path, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32):
    """A model folder (config.json + safetensors): the seq2seq model, or a Hugging Face causal
    LM; only safetensors weights are ever read.

    The weights are read in `dtype` straight onto `device` (None: the CPU), so a bf16 model for
    a GPU is never materialised in float32 in host memory first.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ArtifactError(path, "no Hugging Face model here (config.json missing)")
    with reading(path, "model folder"):
        if is_seq2seq_folder(path):
            model = load_seq2seq(path)
            return model.to(device=device, dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=False,
                                                    device_map=None if device is None else device)


def check_vocab(model, tokenizer, source: str) -> None:
    """Every token id of the tokenizer must have a row in the model's embedding."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer (data.tokenizer) has {len(tokenizer)} tokens but the "
                         f"model of model.source={source} embeds only {rows}: use "
                         "data.tokenizer: model, or a tokenizer made for that model")


def summed_loss(model: nn.Module, batch: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, int]:
    """Summed fp32 cross-entropy over the tokens a batch of blocks is scored on, and their
    count: every position after the first of an LM block, every non-pad target token of a
    seq2seq example. bf16 autocast covers the forward pass only; `batch` moves to the model's
    device."""
    device = model_device(model)
    batch = batch.to(device)
    with bf16_autocast(device, bf16):
        logits = model(input_ids=batch).logits
    if isinstance(model, Seq2SeqTransformer):
        return model.summed_target_loss(logits, model.split(batch)[1])
    loss = nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
        reduction="sum")
    return loss, batch[:, 1:].numel()


def prunable_linears(model: nn.Module, include: tuple[str, ...],
                     exclude: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """Linear modules whose names match an include pattern and no exclude pattern, by name.

    Names are module names (`model.layers.0.mlp.up_proj`); the weight is `<name>.weight`.
    """
    chosen = {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }
    if not chosen:
        raise ValueError(f"gradients.include {list(include)} / exclude {list(exclude)} select no "
                         "Linear module; module names look like 'model.layers.0.mlp.up_proj' "
                         "(llama) or 'decoder.layers.0.multihead_attn.k_proj' (seq2seq)")
    return dict(sorted(chosen.items()))


def bf16_enabled(setting: str, device: torch.device) -> bool:
    """"auto" turns bf16 autocast on where `device` has native bf16 (a CPU with AVX-512 or AMX,
    a GPU from Ampere on)."""
    if setting == "auto":
        return bf16_supported(device)
    return setting == "on"
